"""Independent privacy audit of any facegen dataset: decode every written image, re-embed it with a
(possibly different) embedder, and query an index of real identities.

The generator certified its samples with its own embedder; an audit with a second, independent model
checks that certificate does not merely reflect one model's blind spots.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from facegen.engine.dataset.manifest import completed_shards
from facegen.engine.dataset.reader import iter_batches
from facegen.engine.dataset.samples import sample_key
from facegen.engine.index.search import PrivacyIndex
from facegen.engine.progress import progress_bar
from facegen.engine.storage import Storage
from facegen.models.embedder import FaceEmbedder
from facegen.models.errors import UserError


@dataclass
class AuditResult:
    keys: list[str]
    labels: np.ndarray
    vis_sim: np.ndarray  # float32 [N]: max cosine of the VIS image to any enrolled image
    nir_sim: np.ndarray | None  # same for the NIR image (when audited)
    nearest_identity: np.ndarray  # str [N]: the enrolled identity behind max(vis, nir)
    threshold: float

    @property
    def max_sim(self) -> np.ndarray:
        return self.vis_sim if self.nir_sim is None else np.fmax(self.vis_sim, self.nir_sim)

    def summary(self) -> dict:
        sims = self.max_sim
        worst = int(np.nanargmax(sims)) if len(sims) else None
        return {
            "samples": len(self.keys),
            "threshold": self.threshold,
            "max_similarity": float(np.nanmax(sims)) if len(sims) else None,
            "worst_key": self.keys[worst] if worst is not None else None,
            "violations": int((~(sims <= self.threshold)).sum()),  # NaN counts as a violation
            "audited_nir": self.nir_sim is not None,
        }

    def to_table(self) -> pa.Table:
        columns = {"key": self.keys, "label": self.labels, "vis_max_sim": self.vis_sim,
                   "nearest_identity": self.nearest_identity.astype(str)}
        if self.nir_sim is not None:
            columns["nir_max_sim"] = self.nir_sim
        columns["violation"] = ~(self.max_sim <= self.threshold)
        return pa.table(columns)


def audit_dataset(dataset: Storage, index: PrivacyIndex, embedder: FaceEmbedder, threshold: float, *,
                  include_nir: bool = False, batch_size: int = 64, progress: bool = True) -> AuditResult:
    if not completed_shards(dataset):
        raise UserError(f"{dataset.uri}: no completed shards to audit")
    index.check_compatible(embedder)
    keys, labels, vis_sims, nir_sims, rows = [], [], [], [], []
    total = sum(m.get("num_samples", 0) for m in completed_shards(dataset).values())
    with progress_bar(total, "audit", "img", progress) as bar:
        for batch in iter_batches(dataset, batch_size):
            vis_sim, vis_row = index.max_similarity(embedder.embed(batch.vis.transpose(0, 3, 1, 2)))
            row = vis_row
            if include_nir and batch.nir is not None:
                nir_sim, nir_row = index.max_similarity(embedder.embed(batch.nir[:, None]))
                nir_sims.append(nir_sim)
                row = np.where(nir_sim > vis_sim, nir_row, vis_row)
            keys += [sample_key(int(label), int(s)) for label, s in zip(batch.labels, batch.samples)]
            labels.append(batch.labels)
            vis_sims.append(vis_sim)
            rows.append(row)
            bar.update(len(batch))
    return AuditResult(keys, np.concatenate(labels), np.concatenate(vis_sims).astype(np.float32),
                       np.concatenate(nir_sims).astype(np.float32) if nir_sims else None,
                       index.identity_of(np.concatenate(rows)), threshold)


def write_audit(result: AuditResult, target: Storage, name: str = "audit.parquet") -> None:
    buffer = io.BytesIO()
    pq.write_table(result.to_table(), buffer)
    target.write_bytes(name, buffer.getvalue())
