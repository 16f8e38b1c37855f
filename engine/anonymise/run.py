"""Anonymised datasets: swap each source's identity units with a target's, certify, write shards.

Sources are seeded generated faces, W+ codes the user gives, or projected photos (`photos.py`); they
are cut into shards of `samples_per_shard` consecutive sources, and a shard is the unit of work and
of resume (a shard with its `done/` marker is never redone; the rest are rewritten byte for byte).

Certification: an output is kept only if its identity similarity to its own source is at most
`threshold` and, with a privacy index, its maximum similarity to every enrolled person is too (over
the VIS image and the NIR twin a generator writes beside it: both are certified). A
rejected output is retried with the next seeded random target (try 1, 2, ... up to `max_tries`);
given targets are not retried. Sources that never pass are dropped and counted.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from facegen.engine.anonymise.faces import face_ws
from facegen.engine.anonymise.metric import Metric
from facegen.engine.anonymise.swap import Swapper
from facegen.engine.dataset.manifest import completed_shards
from facegen.engine.dataset.samples import ShardBatch
from facegen.engine.dataset.webdataset import WebDatasetWriter
from facegen.engine.index.search import PrivacyIndex, reduce_max
from facegen.engine.seeding import Stream
from facegen.engine.storage import Storage
from facegen.models.errors import UserError
from facegen.models.generator import images_to_uint8

SETTINGS_FILE = "anonymise.json"
DROP_REASONS = ("dropped_near_source", "dropped_near_enrolled")  # a source may count in both
EMPTY_DIR = "empty"  # markers of shards whose every source was dropped (nothing to write)


@dataclass(frozen=True)
class AnonymiseJob:
    """What decides an anonymised dataset's bytes (the models aside)."""

    space: str = "wplus"
    unit_width: int = 1
    n: int = 0  # top-n ranked units to swap (the privacy knob); ignored when `layers` is set
    layers: tuple[int, ...] = ()  # whole layers to swap instead (StyleID: 5-9 at 1024²)
    count: int = 0  # sources (seeded faces, or rows of the given latents)
    seed: int = 0
    truncation_psi: float = 0.7
    batch_size: int = 32
    samples_per_shard: int = 64
    threshold: float | None = None  # identity similarity an output may keep (to its source and to the index)
    max_tries: int = 4
    metric: Metric = field(default_factory=Metric)
    threshold_calibration: str | None = None  # where an 'auto' threshold came from (None: given by hand)

    def __post_init__(self) -> None:
        if self.count < 1 or self.batch_size < 1 or self.samples_per_shard < 1 or self.max_tries < 1:
            raise UserError("anonymize: count, batch size, samples per shard and tries must be >= 1")
        if self.threshold is not None and not -1 < self.threshold < 1:
            raise UserError(f"anonymize: threshold must be in (-1, 1), got {self.threshold}")
        if not self.layers and self.n < 1:
            raise UserError("anonymize: give the number of units to swap (n >= 1) or whole layers")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def shards(self) -> list[tuple[int, int]]:
        return [(start, min(start + self.samples_per_shard, self.count))
                for start in range(0, self.count, self.samples_per_shard)]


@dataclass
class Sources:
    """One shard's sources: codes in the job's space and what outputs are compared with."""

    labels: np.ndarray  # int64 [B]: source numbers (the dataset's identity labels)
    codes: torch.Tensor  # [B, D]
    embedding: torch.Tensor  # [B, dim]: the source image's embedding (a photo's, for real images)
    lowpass: torch.Tensor  # the source image's low-pass (appearance reference)
    metas: list[dict[str, Any]]
    # Turns rendered swaps (float [k, 3, R, R]) of the given rows into final uint8 NCHW images
    # (a photo pipeline blends them back into the photo); None = the render itself.
    finish: Callable[[np.ndarray, torch.Tensor], torch.Tensor] | None = None


Targets = Callable[[np.ndarray, int], torch.Tensor]  # (source labels, try) -> target codes [k, D]


class Anonymiser:
    def __init__(self, swapper: Swapper, job: AnonymiseJob, mask: torch.Tensor, index: PrivacyIndex | None,
                 targets: Targets) -> None:
        self.swapper, self.job, self.mask, self.index, self.targets = swapper, job, mask, index, targets

    @torch.no_grad()
    def shard(self, sources: Sources) -> tuple[ShardBatch | None, dict[str, Any]]:
        """Anonymise and certify one shard's sources; (batch to write or None, counts)."""
        job = self.job
        count = len(sources.labels)
        pending = np.arange(count)
        vis = [None] * count
        nir: list[np.ndarray | None] = [None] * count
        metas: list[dict[str, Any] | None] = [None] * count
        # Why each source failed its latest try: too close to itself, to someone enrolled (or both).
        near_source, near_enrolled = np.zeros(count, bool), np.zeros(count, bool)
        retried = 0
        for attempt in range(job.max_tries):
            if not len(pending):
                break
            retried += len(pending) if attempt else 0
            target = self.targets(sources.labels[pending], attempt)
            if target is None:  # given targets: one try only
                break
            source = sources.codes[pending]
            reference = (sources.embedding[pending], sources.lowpass[pending])
            swapped = self.swapper.swap(job.space, source, target, self.mask, reference)
            images = swapped.vis
            embedding, similarity, looks = swapped.embedding, swapped.source_similarity, swapped.appearance_change
            if sources.finish is not None:
                final = sources.finish(pending, images)  # uint8: the metric reads it as is
                embedding = self.swapper.embedder.embed(final).cpu()
                similarity = (embedding * sources.embedding[pending]).sum(dim=1).numpy()
                looks = self.swapper.metric.appearance_change(sources.lowpass[pending], final).numpy()
            else:
                final = images_to_uint8(images)
            # A photo has no NIR counterpart, so a blended output carries none.
            final_nir = None if swapped.nir is None or sources.finish is not None else images_to_uint8(swapped.nir)
            real_sim = np.full(len(pending), np.nan, np.float32)
            real_row = np.full(len(pending), -1, np.int64)
            if self.index is not None:
                real_sim, real_row = self._closest_enrolled(embedding, final_nir)
            passed = np.ones(len(pending), bool)
            if job.threshold is not None:
                near_source[pending] = ~(similarity <= job.threshold)
                if self.index is not None:
                    near_enrolled[pending] = ~(real_sim <= job.threshold)  # NaN fails
                passed &= ~near_source[pending] & ~near_enrolled[pending]
            final_hwc = final.permute(0, 2, 3, 1).cpu().numpy()
            nir_hw = None if final_nir is None else final_nir[:, 0].cpu().numpy()
            for k in np.flatnonzero(passed):
                row = pending[k]
                vis[row] = final_hwc[k]
                if nir_hw is not None:
                    nir[row] = nir_hw[k]
                meta = {**sources.metas[row], "source_similarity": float(similarity[k]),
                        "appearance_change": float(looks[k]), "target_try": attempt}
                if self.index is not None:
                    meta["real_similarity"] = float(real_sim[k])
                    meta["real_identity"] = str(self.index.identity_of(np.asarray([real_row[k]]))[0])
                metas[row] = meta
            pending = pending[~passed]
        kept = [i for i in range(count) if metas[i] is not None]
        has_nir = all(nir[i] is not None for i in kept)  # a generator writes a twin for every output or none
        stats = {"sources": count, "written": len(kept), "nir_written": len(kept) if has_nir else 0,
                 "dropped": count - len(kept), "retried": retried,
                 "dropped_near_source": int(near_source[pending].sum()),
                 "dropped_near_enrolled": int(near_enrolled[pending].sum()),
                 "max_source_similarity": max((metas[i]["source_similarity"] for i in kept), default=None),
                 "max_real_similarity": None if self.index is None else
                 max((metas[i]["real_similarity"] for i in kept), default=None)}
        if not kept:
            return None, stats
        batch = ShardBatch(labels=sources.labels[kept], samples=np.zeros(len(kept), np.int64),
                           vis=np.stack([vis[i] for i in kept]),
                           nir=np.stack([nir[i] for i in kept]) if has_nir else None,
                           metas=[metas[i] for i in kept])
        return batch, stats

    def _closest_enrolled(self, embedding: torch.Tensor, nir: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray]:
        """Max similarity to anyone enrolled and that row, over the VIS image and, when one is written,
        its NIR twin: a written NIR image is certified like the VIS one (NaN, never passing, wins)."""
        closest = [self.index.max_similarity(embedding)]
        if nir is not None:
            closest.append(self.index.max_similarity(self.swapper.embedder.embed(nir).cpu()))
        return reduce_max(closest)


def seeded_targets(space, job: AnonymiseJob) -> Targets:
    def targets(labels: np.ndarray, attempt: int) -> torch.Tensor:
        ws = face_ws(space, job.seed, Stream.SWAP_TARGET, labels, attempt, job.truncation_psi)
        return space.encode(job.space, ws)
    return targets


def given_targets(space, job: AnonymiseJob, ws: torch.Tensor) -> Targets:
    def targets(labels: np.ndarray, attempt: int) -> torch.Tensor | None:
        if attempt:
            return None
        return space.encode(job.space, ws[torch.from_numpy(labels % len(ws))])
    return targets


def generated_sources(swapper: Swapper, job: AnonymiseJob, start: int, stop: int,
                      given_ws: torch.Tensor | None = None) -> Sources:
    """Seeded faces (or rows of the given W+ codes) start..stop as sources."""
    space, labels = swapper.space, np.arange(start, stop, dtype=np.int64)
    if given_ws is None:
        ws = face_ws(space, job.seed, Stream.SWAP_SOURCE, labels, 0, job.truncation_psi)
        metas = [{"source": {"seed": job.seed, "slot": int(i)}} for i in labels]
    else:
        ws = given_ws[start:stop]
        metas = [{"source": {"row": int(i)}} for i in labels]
    codes = space.encode(job.space, ws)
    embedding, lowpass = swapper.sources(job.space, codes)
    return Sources(labels, codes, embedding, lowpass, metas)


def check_settings(out: Storage, settings: dict[str, Any]) -> None:
    """A resumed output must have been started with the same settings (else its shards would mix)."""
    text = json.dumps(settings, sort_keys=True, indent=2) + "\n"
    if out.exists(SETTINGS_FILE):
        if out.read_text(SETTINGS_FILE) != text:
            raise UserError(f"{out.url()}: holds an anonymisation with other settings ({SETTINGS_FILE}); "
                            "use a new --out")
        return
    out.write_text(SETTINGS_FILE, text)


def audit_plan(out: Storage) -> dict[str, Any] | None:
    """What `facegen audit` needs from an anonymised dataset (None: `out` holds no anonymisation): the
    planned shard count, the shards that rightly hold nothing (every source dropped: an `empty/` marker
    instead of a shard) and the threshold every output was certified at."""
    if not out.exists(SETTINGS_FILE):
        return None
    job = out.read_json(SETTINGS_FILE).get("job", {})
    try:
        planned = -(-int(job["count"]) // int(job["samples_per_shard"]))
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{out.url(SETTINGS_FILE)}: not an anonymisation's settings (no count/samples_per_shard)"
                        ) from None
    empty = {int(name.removesuffix(".json")) for name in out.list(EMPTY_DIR, ".json")}
    return {"planned_shards": planned, "empty_shards": empty, "threshold": job.get("threshold"),
            "threshold_calibration": job.get("threshold_calibration")}


def run_shards(anonymiser: Anonymiser, out: Storage, make_sources: Callable[[int, int], Sources],
               progress: Callable[[int, int], None] | None = None, image_format: str = "png") -> dict[str, int]:
    """Every shard not yet complete; returns the summed counts of all shards (including earlier runs)."""
    shards = anonymiser.job.shards()
    done = completed_shards(out)
    totals: dict[str, Any] = {"sources": 0, "written": 0, "nir_written": 0, "dropped": 0, "retried": 0,
                              "shards_resumed": 0, **dict.fromkeys(DROP_REASONS, 0), "max_source_similarity": None,
                              "max_real_similarity": None}
    if progress:
        progress(0, len(shards))
    for shard_id, (start, stop) in enumerate(shards):
        empty = f"{EMPTY_DIR}/{shard_id:06d}.json"
        if shard_id in done or out.exists(empty):
            stats = done[shard_id]["stats"] if shard_id in done else out.read_json(empty)
            totals["shards_resumed"] += 1
        else:
            batch, stats = anonymiser.shard(make_sources(start, stop))
            if batch is None:
                out.write_json(empty, stats)
            else:
                WebDatasetWriter(name="anonymised", image_format=image_format).write(out, shard_id, batch, stats=stats)
        for key in ("sources", "written", "nir_written", "dropped", "retried", *DROP_REASONS):
            totals[key] += int(stats.get(key, 0))
        for key in ("max_source_similarity", "max_real_similarity"):
            if stats.get(key) is not None:
                totals[key] = max(stats[key], totals[key] if totals[key] is not None else -np.inf)
        if progress:
            progress(shard_id + 1, len(shards))
    return totals


def write_report(out: Storage, job: AnonymiseJob, totals: dict[str, int], curve: list[dict] | None,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """report.json / report.html (engine.report) and, with a curve, tradeoff.png."""
    from facegen.engine.anonymise.tradeoff import plot_png
    from facegen.engine.report import write_report as write_html_report

    report: dict[str, Any] = {"title": "facegen anonymisation report", "totals": totals,
                              "settings": job.to_dict(), **(extra or {})}
    if curve:
        report["tradeoff"] = {f"n={p['n']}": {k: v for k, v in p.items() if k != "n"} for p in curve}
        out.write_bytes("tradeoff.png", plot_png(curve))
    write_html_report(out, report)
    return report


def swap_mask(space, table, job: AnonymiseJob) -> torch.Tensor:
    """The flat mask of what is swapped: whole layers, or the top-n units of the rank table."""
    from facegen.engine.anonymise.rank import top_units
    from facegen.engine.anonymise.swap import layer_units

    layout = space.layout(job.space)
    if job.layers:
        return layout.mask(layer_units(layout, list(job.layers)))
    if table is None:
        raise UserError("anonymize: swapping the top-n units needs a rank table (--ranks)")
    return layout.mask(top_units(table, job.space, job.unit_width, job.n))


def tradeoff_of(swapper: Swapper, table, job: AnonymiseJob, pairs: int, ns: list[int] | None = None) -> list[dict]:
    """The trade-off curve on `pairs` seeded source/target faces (slots after the dataset's own)."""
    from facegen.engine.anonymise.rank import select
    from facegen.engine.anonymise.tradeoff import curve, default_ns

    space = swapper.space
    units = select(table, job.space, job.unit_width).num_rows
    ns = sorted({*(ns or default_ns(units)), job.n} & set(range(units + 1)))
    slots = np.arange(pairs)
    source = space.encode(job.space, face_ws(space, job.seed + 1, Stream.SWAP_SOURCE, slots, 0, job.truncation_psi))
    target = space.encode(job.space, face_ws(space, job.seed + 1, Stream.SWAP_TARGET, slots, 0, job.truncation_psi))
    return curve(swapper, table, job.space, job.unit_width, ns, source, target, seed=job.seed)


def anonymise_generated(swapper: Swapper, table, job: AnonymiseJob, out: Storage, *,
                        index: PrivacyIndex | None = None, sources_ws: torch.Tensor | None = None,
                        targets_ws: torch.Tensor | None = None, curve_pairs: int = 16,
                        progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Anonymise seeded faces (or given W+ codes) into `out`; returns the report."""
    space = swapper.space
    if sources_ws is not None and len(sources_ws) != job.count:
        raise UserError(f"anonymize: count {job.count} but {len(sources_ws)} source latents")
    for name, ws in (("source", sources_ws), ("target", targets_ws)):
        if ws is not None and tuple(ws.shape[1:]) != (space.num_ws, space.w_dim):
            raise UserError(f"anonymize: {name} latents must be W+ [N, {space.num_ws}, {space.w_dim}], "
                            f"got {list(ws.shape)}")
    mask = swap_mask(space, table, job)
    targets = seeded_targets(space, job) if targets_ws is None else given_targets(space, job, targets_ws)
    out.check_writable()
    check_settings(out, {"job": job.to_dict(), "embedder_fingerprint": swapper.embedder.fingerprint,
                         "index_fingerprint": index.fingerprint if index is not None else None,
                         "given_sources": sources_ws is not None, "given_targets": targets_ws is not None})
    anonymiser = Anonymiser(swapper, job, mask, index, targets)
    totals = run_shards(anonymiser, out, lambda a, b: generated_sources(swapper, job, a, b, sources_ws), progress)
    totals["swapped_coordinates"] = int(mask.sum())
    curve_points = tradeoff_of(swapper, table, job, curve_pairs) if table is not None and curve_pairs else None
    return write_report(out, job, totals, curve_points, {"privacy": privacy_summary(job, totals, index)})


def privacy_summary(job: AnonymiseJob, totals: dict[str, Any], index: PrivacyIndex | None) -> dict[str, Any]:
    """The certificate: every written output is at most `threshold` from its source (and the index)."""
    worst = max((v for v in (totals["max_source_similarity"], totals["max_real_similarity"]) if v is not None),
                default=None)
    source = {"threshold_source": job.threshold_calibration} if job.threshold_calibration else {}
    # What the enrolled-people check covered: every written VIS image and every written NIR twin.
    certified = None if index is None else ["VIS"] + (["NIR"] if totals["nir_written"] else [])
    return {"threshold": job.threshold, **source, "certified": certified, "nir_written": bool(totals["nir_written"]),
            "index_fingerprint": index.fingerprint if index is not None else None,
            "max_real_similarity": totals["max_real_similarity"],
            "max_source_similarity": totals["max_source_similarity"],
            "violations": None if job.threshold is None or worst is None else int(worst > job.threshold)}
