"""The end of a job: merge the shard markers into `report.json` / `report.html`.

The privacy certificate is recomputed from the manifest (every written sample's certified maximum
similarity), not trusted from the markers, so the report states what is actually on storage.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from facegen.engine.dataset.manifest import completed_shards
from facegen.engine.dataset.reader import iter_dataset, read_manifest
from facegen.engine.index.protocol import Index
from facegen.engine.phases import Identities
from facegen.engine.precision import Precision
from facegen.engine.report import PhaseTimer, write_report
from facegen.engine.spec import JobSpec, spec_hash
from facegen.engine.storage import Storage


def finalize(spec: JobSpec, out: Storage, identities: Identities, selection: dict, index: Index,
             timer: PhaseTimer | None = None, ran: tuple[int, int] = (0, 0)) -> dict:
    """The report of a job; with `timer`, its `timing` section too (`ran`: the samples and candidates
    this run computed, so a resume's rate counts only its own work)."""
    timer = timer or PhaseTimer()
    with timer.phase("finalise"):
        report, sheets, histograms, thresholds = _merge(spec, out, identities, selection, index)
    report["timing"] = timer.section(*ran)
    write_report(out, report, sheets, histograms, histogram_thresholds=thresholds)
    return report


def _merge(spec: JobSpec, out: Storage, identities: Identities, selection: dict, index: Index) -> tuple:
    markers = completed_shards(out)
    stats = [m.get("stats", {}) for m in markers.values()]
    rejected: Counter = Counter()
    for s in stats:
        rejected.update(s.get("rejected", {}))
    manifest = read_manifest(out)
    real_sims = _column(manifest, "privacy_max_sim")
    attempts = sum(s.get("attempts", 0) for s in stats)
    report = {
        "job": {"name": spec.name, "seed": spec.seed, "spec_sha256": spec_hash(spec)},
        "identities": {
            "wanted": spec.identities,
            "accepted": len(identities),
            "proposed": selection.get("proposed"),
            "proposal_verdicts": selection.get("verdicts", {}),
            "exhausted": sum(s.get("exhausted_identities", 0) for s in stats),
        },
        "samples": {
            "written": int(manifest.num_rows),
            "wanted": len(identities) * spec.samples_per_identity,
            "attempts": attempts,
            "acceptance_rate": round(manifest.num_rows / attempts, 6) if attempts else None,
            "rejected": dict(sorted(rejected.items())),
        },
        "acceptance": {"accepted": int(manifest.num_rows), **dict(sorted(rejected.items()))},
        "shards": {"count": len(markers), "files": [m.get("shard_file") for _, m in sorted(markers.items())]},
        "privacy_certificate": {
            "index_fingerprint": index.fingerprint,
            "index_count": index.count,
            "index_uri": spec.index.uri or spec.index.features,
            **shard_certificate(markers),
            "threshold": spec.privacy.value,
            "separability_threshold": spec.privacy.separability,
            "check_nir": spec.privacy.check_nir,
            # decisions within recheck_margin of the threshold were made on fp32 embeddings
            **Precision.of(spec.embedder.dtype, spec.privacy.recheck_margin).certificate(),
            "max_real_similarity": float(real_sims.max()) if len(real_sims) else None,
            "violations": int((real_sims > spec.privacy.value).sum()),
        },
        "filter": {
            "same_threshold": spec.filter.same_threshold,
            "diversity_threshold": spec.filter.diversity_threshold,
            "max_attempts": spec.filter.max_attempts,
        },
    }
    if spec.privacy.repair is not None:
        report["repair"] = repair_summary(spec, identities, selection, stats)
    histograms = {
        "privacy_max_sim": real_sims,
        "anchor_sim": _column(manifest, "anchor_sim"),
        "diversity_max_sim": _column(manifest, "diversity_max_sim"),
    }
    thresholds = {"privacy_max_sim": spec.privacy.value, "anchor_sim": spec.filter.same_threshold,
                  "diversity_max_sim": spec.filter.diversity_threshold}
    return report, contact_sheets(out, spec.output.contact_sheets), histograms, thresholds


def repair_summary(spec: JobSpec, identities: Identities, selection: dict, stats: list[dict]) -> dict:
    """privacy.repair, counted apart from everything else: anchors repaired in propose and samples
    repaired in expand, what became of them, and how many written samples carry a swapped identity."""
    verdicts = selection.get("repair_verdicts", {})
    outcomes: Counter = Counter()
    tried = accepted = swapped = 0
    for s in stats:
        repair = s.get("repair", {})
        tried += repair.get("tried", 0)
        accepted += repair.get("accepted", 0)
        swapped += repair.get("written_swapped", 0)
        outcomes.update(repair.get("rejected", {}))
    settings = spec.privacy.repair
    return {
        "settings": {"ranks": settings.ranks, "space": settings.space, "unit_width": settings.unit_width,
                     "n": settings.n, "tries": settings.tries, "units_sha256": settings.units_sha256},
        "identities": {
            "tried": sum(verdicts.values()),
            "repaired": int((identities.repair >= 0).sum()) if identities.repair is not None else 0,
            "rejected": {k: v for k, v in sorted(verdicts.items()) if k != "ok"},
        },
        "samples": {"tried": tried, "repaired": accepted, "rejected": dict(sorted(outcomes.items())),
                    "written_with_swapped_identity": swapped},
    }


def shard_certificate(markers: dict[int, dict]) -> dict:
    """The certificate every shard marker states (they agree: one spec, one embedder, one index).
    NIR counts as certified only when every shard that wrote NIR certified it."""
    certificates = [m.get("stats", {}).get("certificate") for m in markers.values()]
    certificates = [c for c in certificates if c]
    if not certificates:
        return {}
    merged = dict(certificates[0])
    merged.pop("index_fingerprint", None)
    merged["nir_written"] = any(c.get("nir_written") for c in certificates)
    merged["certified"] = sorted(set.intersection(*(set(c.get("certified", [])) for c in certificates)),
                                 key=["VIS", "NIR"].index)
    return merged


def _column(table, name: str) -> np.ndarray:
    if name not in table.column_names:
        return np.zeros(0, np.float64)
    values = table[name].to_numpy(zero_copy_only=False)
    values = np.asarray([np.nan if v is None else v for v in values], np.float64) if values.dtype == object else values
    return values[np.isfinite(values)]


def contact_sheets(out: Storage, num_identities: int) -> dict[int, tuple[np.ndarray, np.ndarray | None]]:
    """The first `num_identities` identities' samples, for the HTML report."""
    if num_identities <= 0:
        return {}
    grouped: dict[int, list] = {}
    for sample in iter_dataset(out):
        if sample.label >= num_identities:
            break
        grouped.setdefault(sample.label, []).append(sample)
    sheets = {}
    for label, samples in grouped.items():
        vis = np.stack([s.vis for s in samples])
        nir = None if samples[0].nir is None else np.stack([s.nir for s in samples])
        sheets[label] = (vis, nir)
    return sheets
