"""Independent privacy audit of any facegen dataset: decode every written image, re-embed it with a
(possibly different) embedder, and query an index of real identities.

The generator certified its samples with its own embedder; an audit with a second, independent model
checks that certificate does not merely reflect one model's blind spots. VIS and, when the dataset
has them, NIR images are both audited: a NIR image is released as much as a VIS one.

The audit also says whether the dataset is *complete* (`completeness`): every planned shard has
its marker, no shard file lies there without one, every marker's samples are there, and the
report was written. An incomplete dataset is still audited as far as it goes.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from facegen.engine.dataset.codec import default_workers
from facegen.engine.dataset.formats import shard_reader
from facegen.engine.dataset.manifest import SHARDS_DIR, completed_shards
from facegen.engine.dataset.samples import Sample
from facegen.engine.index.search import PrivacyIndex
from facegen.engine.index.sources import embed_image_batch
from facegen.engine.progress import progress_bar
from facegen.engine.storage import Storage
from facegen.models.embedder import FaceEmbedder
from facegen.models.errors import UserError


@dataclass
class AuditResult:
    keys: list[str]
    labels: np.ndarray
    vis_sim: np.ndarray  # float32 [N]: max cosine of the VIS image to any enrolled image
    nir_sim: np.ndarray | None  # same for the NIR image (when audited); NaN where a sample has none
    threshold: float
    nearest_identity: np.ndarray | None = None  # str [N], only with `with_identities` (not for release)
    missing: list[str] = field(default_factory=list)  # why the dataset is incomplete (empty: complete)
    nir_present: bool = False

    @property
    def max_sim(self) -> np.ndarray:
        return self.vis_sim if self.nir_sim is None else np.fmax(self.vis_sim, self.nir_sim)

    @property
    def violating(self) -> np.ndarray:
        return ~(self.max_sim <= self.threshold)  # NaN counts as a violation

    def summary(self) -> dict:
        sims, violating = self.max_sim, self.violating
        worst = int(np.nanargmax(sims)) if len(sims) and np.isfinite(sims).any() else None
        audited = ["VIS"] + (["NIR"] if self.nir_sim is not None else [])
        return {
            "samples": len(self.keys),
            "threshold": self.threshold,
            "max_similarity": float(sims[worst]) if worst is not None else None,
            "worst_key": self.keys[worst] if worst is not None else None,
            "violations": int(violating.sum()),
            "violating_keys": [self.keys[i] for i in np.flatnonzero(violating)[:100]],
            "audited": audited,
            "audited_nir": self.nir_sim is not None,
            "nir_present": self.nir_present,
            "complete": not self.missing,
            "missing": list(self.missing),
        }

    def to_table(self) -> pa.Table:
        columns = {"key": self.keys, "label": self.labels, "vis_max_sim": self.vis_sim}
        if self.nir_sim is not None:
            columns["nir_max_sim"] = self.nir_sim
        if self.nearest_identity is not None:
            columns["nearest_identity"] = self.nearest_identity.astype(str)
        columns["violation"] = self.violating
        return pa.table(columns)


def completeness(dataset: Storage, planned_shards: int | None, markers: dict[int, dict],
                 empty_shards: set[int] = frozenset()) -> list[str]:
    """What is missing from a dataset, one line each (empty: complete). `planned_shards` comes
    from the job (None: unknown, itself a reason); `empty_shards` were planned but rightly hold no
    samples (an anonymisation whose every source in them was dropped)."""
    missing = []
    absent = sorted(set(range(planned_shards or 0)) - set(markers) - set(empty_shards))
    if planned_shards is None:
        missing.append("no job.yaml/identities.parquet (generate) or anonymise.json (anonymize): the planned "
                       "number of shards is unknown")
    elif absent:
        missing.append(f"{len(absent)} of {planned_shards} planned shards are not complete (shard ids "
                       f"{absent[:10]}{' …' if len(absent) > 10 else ''})")
    files = set(dataset.list(SHARDS_DIR)) if dataset.exists(SHARDS_DIR) else set()
    orphans = sorted(files - {m.get("shard_file") for m in markers.values()})
    if orphans:
        missing.append(f"{len(orphans)} shard file(s) without a completion marker (an interrupted write), e.g. "
                       f"{orphans[:3]}")
    if not dataset.exists("report.json"):
        missing.append("no report.json (the job did not finish)")
    return missing


def _samples(dataset: Storage, markers: dict[int, dict], workers: int) -> Iterator[list[Sample]]:
    """Decoded samples in chunks, shard by shard (decoding on threads)."""
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="audit-decode") as pool:
        for marker in markers.values():
            reader = shard_reader(marker["shard_file"])
            raws = list(reader.iter_raw(dataset, marker["shard_file"]))
            for start in range(0, len(raws), 256):
                yield list(pool.map(reader.decode, raws[start:start + 256]))


def _embed_grouped(embedder: FaceEmbedder, images: list[np.ndarray], batch_size: int) -> np.ndarray:
    """Embed decoded HWC(3) or HW images of possibly different sizes: one stacked call per size."""
    chw = [image[None] if image.ndim == 2 else image.transpose(2, 0, 1) for image in images]
    return embed_image_batch(chw, lambda batch: embedder.embed(batch, batch_size))


def audit_dataset(dataset: Storage, index: PrivacyIndex, embedder: FaceEmbedder, threshold: float, *,
                  include_nir: bool | None = None, batch_size: int = 64, progress: bool = True,
                  planned_shards: int | None = None, empty_shards: set[int] = frozenset(),
                  with_identities: bool = False) -> AuditResult:
    """Audit every complete shard. `include_nir` None: NIR whenever the dataset has it."""
    if not 0.0 < threshold < 1.0:
        raise UserError(f"audit threshold {threshold}: must be in (0, 1)")
    index.check_compatible(embedder)
    markers = completed_shards(dataset)
    missing = completeness(dataset, planned_shards, markers, empty_shards)
    keys, labels, vis_sims, nir_sims, rows = [], [], [], [], []
    nir_present = False
    expected = sum(int(m.get("num_samples", 0)) for m in markers.values())
    with progress_bar(expected, "audit", "img", progress) as bar:
        for chunk in _samples(dataset, markers, default_workers()):
            vis_sim, vis_row = index.max_similarity(_embed_grouped(embedder, [s.vis for s in chunk], batch_size))
            row = vis_row
            with_nir = [i for i, s in enumerate(chunk) if s.nir is not None]
            nir_present |= bool(with_nir)
            nir_sim = np.full(len(chunk), np.nan, np.float32)
            if with_nir and include_nir is not False:
                sims, nir_rows = index.max_similarity(
                    _embed_grouped(embedder, [chunk[i].nir for i in with_nir], batch_size))
                nir_sim[with_nir] = sims
                full_rows = np.full(len(chunk), -1, np.int64)
                full_rows[with_nir] = nir_rows
                row = np.where(nir_sim > vis_sim, full_rows, vis_row)
            keys += [s.key for s in chunk]
            labels.append(np.array([s.label for s in chunk], np.int64))
            vis_sims.append(vis_sim)
            nir_sims.append(nir_sim)
            rows.append(row)
            bar.update(len(chunk))
    if len(keys) != expected:
        missing.append(f"the completion markers list {expected} samples but the shards hold {len(keys)}")
    audited_nir = nir_present and include_nir is not False
    if include_nir and not nir_present:
        raise UserError(f"{dataset.uri}: --nir asked for, but the dataset has no NIR images")
    return AuditResult(
        keys, np.concatenate(labels) if labels else np.zeros(0, np.int64),
        np.concatenate(vis_sims).astype(np.float32) if vis_sims else np.zeros(0, np.float32),
        np.concatenate(nir_sims).astype(np.float32) if audited_nir else None, threshold,
        index.identity_of(np.concatenate(rows)) if with_identities and rows else None, missing, nir_present)


def write_audit(result: AuditResult, target: Storage, name: str = "audit.parquet") -> None:
    buffer = io.BytesIO()
    pq.write_table(result.to_table(), buffer)
    target.write_bytes(name, buffer.getvalue())
