"""The units of a generation job, the same for every executor; executors only schedule them.

`open_job` (output checked, models and index loaded and checked, thresholds resolved, then the spec
written), `enrol_compat_index` (the original's identity_features.json enrolled once into the
dataset), `load_bundle` (models + index, every compatibility check before any work),
`select_identities` (phases 1+2 from proposal blocks, persisted), `prepare_shard` + `publish_shard`
(phase 3 for one shard: expand, then write shard -> manifest -> marker) and `pending_shards` (what a
run or a resume still has to write). `engine.local` runs them in this process; `cluster.executor` on Ray actors.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from facegen.engine.bundle import Bundle, check_compatible, check_generator, generator_settings
from facegen.engine.dataset.formats import shard_writer
from facegen.engine.dataset.manifest import is_complete, remove_incomplete
from facegen.engine.dataset.samples import ShardBatch
from facegen.engine.expand import expand_shard
from facegen.engine.identities import IDENTITIES_FILE, read_identities, write_identities
from facegen.engine.index.compat import check_embedder
from facegen.engine.index.search import PrivacyIndex
from facegen.engine.lease import Lease
from facegen.engine.phases import Identities, Proposals, Selection
from facegen.engine.private import write_nearest
from facegen.engine.progress import progress_bar
from facegen.engine.quality import make_quality_gate
from facegen.engine.repair import resolve_repair
from facegen.engine.spec import JobSpec, build_spec, load_spec_yaml_text, spec_diff, spec_hash, spec_to_yaml
from facegen.engine.storage import Storage
from facegen.models.devices import resolve_device
from facegen.models.errors import JobFailed, UserError
from facegen.models.rendering import open_generator

log = logging.getLogger("facegen")

COMPAT_INDEX_DIR = "privacy-index"


def check_output(spec: JobSpec, resume: bool) -> tuple[Storage, Lease]:
    """Check the output location (writable; a job to resume, or empty) and take its lease (one writer
    per output, `engine.lease`; heartbeating from here on) without writing anything else."""
    out = Storage(spec.output.uri, spec.output.storage_options)
    existed = out.exists()
    out.check_writable()
    lease = Lease(out, spec.run.lease_ttl)
    try:
        lease.acquire(wait=spec.run.lease_wait).start_heartbeat()
        if out.exists("job.sha256"):
            if not resume:
                raise UserError(f"{out.uri} already holds a job; pass --resume to continue it, or choose another "
                                "output")
            return out, lease
        leftovers = [name for name in out.list() if not name.startswith(".")]
        if leftovers:
            raise UserError(f"{out.uri} is not empty and holds no facegen job ({', '.join(leftovers[:5])})")
    except BaseException:
        lease.release()
        forget_output(out, existed)
        raise
    out.existed = existed  # so a later refusal can leave the location as it was found
    return out, lease


def forget_output(out: Storage, existed: bool) -> None:
    """Undo `check_writable`'s folder creation when a job is refused before it wrote anything."""
    if existed:
        return
    try:
        out.fs.rmdir(out.root)
    except Exception:  # noqa: BLE001 - not empty or not a folder store: leave it
        pass


def write_job(out: Storage, spec: JobSpec) -> None:
    """`job.yaml` + `job.sha256`, or, for a resume, the check that the spec did not change."""
    digest = spec_hash(spec)
    if out.exists("job.sha256"):
        if out.read_text("job.sha256").strip() != digest:
            previous = load_spec_yaml_text(out.read_text("job.yaml"))
            keys = ", ".join(spec_diff(previous, spec)) or "(unknown)"
            raise UserError(f"resume refused: the spec differs from the one in {out.uri} in: {keys}")
        return
    out.write_text("job.yaml", spec_to_yaml(spec))
    out.write_text("job.sha256", digest + "\n")


@dataclass
class OpenJob:
    """What `open_job` hands an executor: the resolved spec (what job.yaml holds), the output, the
    output's lease (release it when the run ends) and, when loaded, the bundle."""

    spec: JobSpec
    out: Storage
    lease: Lease
    bundle: Bundle | None = None


def open_job(spec: JobSpec, resume: bool, *, load: bool = True) -> OpenJob:
    """Everything before the first byte of a job: output checked and leased, models and index loaded,
    every compatibility checked and `privacy.threshold: auto` resolved; only then `job.yaml` is
    written."""
    out, lease = check_output(spec, resume)
    try:
        spec, models = resolve_job(spec)
        write_job(out, spec)
        bundle = load_bundle(spec, out, models) if load else None
    except BaseException as err:
        lease.release()
        if isinstance(err, (UserError, JobFailed)):
            forget_output(out, getattr(out, "existed", True))
        raise
    return OpenJob(spec, out, lease, bundle)


def _index_info(spec: JobSpec):
    from facegen.engine.index.store import read_info

    return read_info(Storage(spec.index.uri, spec.index.storage_options))


def resolve_job(spec: JobSpec) -> tuple[JobSpec, tuple]:
    """Load the models, check them against each other and the index, and return the spec with the
    embedder's full preprocessing and a numeric privacy threshold (plus where it came from)."""
    from facegen.engine.index.compat import embedder_for_index, print_impostor_lines, resolve_threshold
    from facegen.models.loading import load_generator

    device = resolve_device(spec.run.device)
    info = _index_info(spec) if spec.index.uri else None
    embedder = embedder_for_index(spec.embedder.path, spec.embedder.preprocessing, info, str(device))
    for note in embedder.notes:
        log.info("%s", note)
    generator = load_generator(spec.generator.path).to(device).eval().requires_grad_(False)
    check_generator(generator, embedder)
    repair = resolve_repair(spec.privacy.repair, open_generator(generator, generator_settings(spec)))
    if info is not None:
        check_embedder(info, embedder, spec.index.uri)
        print_impostor_lines(info.impostor_scores, _warn_only)
        chosen = resolve_threshold(spec.privacy.threshold, spec.privacy.fmr, info, spec.index.uri)
    else:
        chosen = _features_threshold(spec, embedder)
    calibration = None if chosen["source"] == "given" else {"fmr": chosen["fmr"],
                                                            "impostor_pairs": chosen["impostor_pairs"]}
    privacy = spec.privacy.model_copy(update={"threshold": chosen["threshold"], "calibration": calibration,
                                              "repair": repair})
    embedder_spec = spec.embedder.model_copy(update={"preprocessing": embedder.preprocessing.to_dict()})
    resolved = build_spec(json.loads(spec.model_copy(update={"privacy": privacy, "embedder": embedder_spec})
                                     .model_dump_json()))
    return resolved, (generator, embedder)


def _warn_only(text: str) -> None:
    if text.startswith("WARNING"):
        print(f"facegen: {text}", file=sys.stderr)


def _features_threshold(spec: JobSpec, embedder: Any) -> dict:
    """The compat path: check identity_features.json against the embedder and, for 'auto',
    calibrate on it in memory (the same numbers its enrolled index gets)."""
    from facegen.engine.index.calibrate import calibration_scores, threshold_at_fmr
    from facegen.engine.index.compat import (
        given_threshold,
        impostor_summary,
        print_impostor_lines,
        required_pairs,
    )
    from facegen.engine.index.sources import embeddings_from_identity_features
    from facegen.engine.index.store import normalize_rows

    source = embeddings_from_identity_features(spec.index.features)
    if source.embeddings.shape[1] != embedder.dim:
        raise UserError(f"index.features: {spec.index.features} holds {source.embeddings.shape[1]}-d features "
                        f"but the embedder produces {embedder.dim}-d")
    vectors, valid = normalize_rows(source.embeddings)
    vectors, identities = vectors[valid], source.identities[valid].astype(str)
    print_impostor_lines(impostor_summary(vectors, identities), _warn_only)
    if spec.privacy.threshold != "auto":
        return given_threshold(spec.privacy.threshold)
    fmr = spec.privacy.fmr
    impostor = calibration_scores(vectors, identities, max_genuine_pairs=0).impostor
    if len(impostor) < required_pairs(fmr):
        raise UserError(f"privacy.threshold auto: {spec.index.features} gives {len(impostor)} impostor pairs, too "
                        f"few to resolve FMR {fmr:g} (needs {required_pairs(fmr)}); choose a coarser privacy.fmr "
                        "or give privacy.threshold as a number")
    return {"threshold": threshold_at_fmr(impostor, fmr), "source": "calibrated", "fmr": fmr,
            "impostor_pairs": int(len(impostor))}


def load_bundle(spec: JobSpec, out: Storage | None = None, models: tuple | None = None) -> Bundle:
    """Load generator, embedder and index; refuse incompatible combinations before any work.
    `spec` is a resolved one (`resolve_job`); `models` reuses the (generator, embedder) it loaded."""
    from facegen.models.loading import load_embedder, load_generator

    device = resolve_device(spec.run.device)
    if models is None:
        generator = load_generator(spec.generator.path).to(device).eval().requires_grad_(False)
        embedder = load_embedder(spec.embedder.path, **spec.embedder.preprocessing).to(device)
    else:
        generator, embedder = models
    enrol_compat_index(spec, out, embedder)
    index = open_job_index(spec, out, device.type)
    limits = spec.filter
    gate = make_quality_gate(limits.quality_gate, limits.face_detector, limits.min_face_score)
    bundle = Bundle(generator, embedder, index, device, spec, gate)
    check_compatible(bundle.renderer, embedder, index)
    return bundle


def open_job_index(spec: JobSpec, out: Storage | None, device: str = "cpu") -> PrivacyIndex:
    """The job's privacy index: `index.uri`, or the compat index enrolled into the dataset. Opening
    reads index.json only; vectors load where the index is first searched."""
    options = dict(backend=spec.index.backend, device=device)
    if spec.index.uri:
        return PrivacyIndex.open(spec.index.uri, spec.index.storage_options, **options)
    return PrivacyIndex.open(_compat_index_location(out), **options)


def enrol_compat_index(spec: JobSpec, out: Storage | None, embedder: Any = None) -> None:
    """Enrol `index.features` (the original's identity_features.json) into the dataset's own folder
    and calibrate it (the original ships no thresholds for its own recogniser), once; a no-op for
    `index.uri` jobs and when it is already there. It records `embedder`'s fingerprints (the job's
    embedder, loaded here on the CPU when not given), so later checks refuse another embedder.
    Call it where only one process runs it: several processes would race to write the same index."""
    if not compat_index_pending(spec, out):
        return
    from facegen.engine.index.build import build_index
    from facegen.engine.index.calibrate import DEFAULT_FMRS, calibrate
    from facegen.engine.index.sources import embeddings_from_identity_features

    if embedder is None:
        from facegen.models.loading import load_embedder

        embedder = load_embedder(spec.embedder.path, **spec.embedder.preprocessing)
    target = _compat_index_location(out)
    source = embeddings_from_identity_features(spec.index.features)
    build_index(source.embeddings, source.identities, source.files, target,
                embedder_fingerprint=embedder.fingerprint, preprocessing=embedder.preprocessing.to_dict(),
                embedder_weights=embedder.weights_fingerprint,
                source=f"identity_features.json: {spec.index.features}")
    calibrate(PrivacyIndex.open(target, backend="numpy"), sorted({*DEFAULT_FMRS, spec.privacy.fmr}, reverse=True))


def compat_index_pending(spec: JobSpec, out: Storage | None) -> bool:
    """True when the job reads `index.features` and its enrolled index is not in the dataset yet."""
    return not spec.index.uri and not _compat_index_location(out).exists("index.json")


def _compat_index_location(out: Storage | None) -> Storage:
    if out is None:
        raise UserError("index.features needs an output location to hold the enrolled index")
    return out.child(COMPAT_INDEX_DIR)


def proposal_blocks(spec: JobSpec):
    """Slot blocks in order: the fixed units of phase 1 (same batches in every executor)."""
    for start in range(0, spec.max_slots, spec.proposal_block):
        yield np.arange(start, min(start + spec.proposal_block, spec.max_slots), dtype=np.int64)


ProposeMany = Callable[[Iterator[np.ndarray]], Iterator[Proposals]]


def select_identities(spec: JobSpec, out: Storage, propose_many: ProposeMany,
                      progress: bool = True) -> tuple[Identities, dict]:
    """Phases 1+2, or the persisted result of an earlier run (a resume never re-decides).

    `propose_many` maps slot blocks to their proposals *in order* (lazily; it may compute ahead in
    parallel, as the Ray executor does); selection consumes them in slot order and stops early.
    """
    if out.exists(IDENTITIES_FILE):
        return read_identities(out)
    selection = Selection(wanted=spec.identities, threshold=spec.privacy.separability)
    results = propose_many(proposal_blocks(spec))
    with progress_bar(spec.identities, "identities", "id", progress) as bar:
        for proposals in results:
            selection.offer(proposals)
            bar.update(selection.accepted - bar.n)
            if selection.done:
                break
    close = getattr(results, "close", None)
    if close:
        close()  # stop a parallel producer from computing further blocks
    stats = selection_stats(selection, spec)
    if selection.accepted == 0:
        raise JobFailed(f"no identity passed the filters in {stats['proposed']} proposals "
                        f"(verdicts {stats['verdicts']}); loosen the thresholds or raise filter.max_slots")
    identities = Identities.from_selection(selection)
    write_identities(out, identities, stats)
    return identities, stats


def selection_stats(selection: Selection, spec: JobSpec) -> dict:
    if selection.accepted < spec.identities:
        log.warning("only %d of %d identities passed within filter.max_slots=%d proposals",
                    selection.accepted, spec.identities, spec.max_slots)
    stats = {"proposed": selection.offered, "accepted": selection.accepted, "wanted": spec.identities,
             "verdicts": dict(sorted(selection.verdicts.items()))}
    if spec.privacy.repair is not None:
        stats["repair_verdicts"] = dict(sorted(selection.repair_verdicts.items()))
    return stats


def shard_labels(spec: JobSpec, num_identities: int, shard_id: int) -> np.ndarray:
    per = spec.identities_per_shard
    return np.arange(shard_id * per, min((shard_id + 1) * per, num_identities), dtype=np.int64)


def shards_for(spec: JobSpec, num_identities: int) -> int:
    """Shards that hold `num_identities` selected identities (`JobSpec.num_shards` is the plan for the
    wanted count; fewer may pass selection)."""
    return -(-num_identities // spec.identities_per_shard)


@dataclass
class PreparedShard:
    """One shard's accepted samples, decided and ready to write (what `prepare_shard` computes on the
    device and `publish_shard` encodes and writes on the CPU)."""

    shard_id: int
    batch: ShardBatch
    stats: dict
    nearest: Any  # the private nearest-real table (engine.private), or None


def prepare_shard(bundle: Bundle, identities: Identities, shard_id: int) -> PreparedShard:
    """Phase 3's computation for one shard: render, embed, decide; images copied to the host."""
    spec = bundle.spec
    expanded = expand_shard(bundle, identities, shard_labels(spec, len(identities), shard_id))
    expanded.stats["certificate"] = certificate(spec, bundle.embedder, bundle.index,
                                                nir_written=expanded.nir is not None)
    batch = ShardBatch(labels=expanded.labels, samples=expanded.samples, vis=expanded.vis,
                       nir=expanded.nir, metas=expanded.metas)
    return PreparedShard(shard_id, batch, expanded.stats, expanded.nearest)


def publish_shard(output: Any, out: Storage, prepared: PreparedShard,
                  guard: Callable[[], None] | None = None, workers: int | None = None) -> dict:
    """Phase 3's writing for one shard: the private table, then shard file, manifest and marker;
    returns the marker. `guard` (the run's lease) is checked before anything is published."""
    guard = guard or (lambda: None)
    batch = prepared.batch
    if prepared.nearest is not None:  # before the marker: a complete shard always has its private table
        guard()
        write_nearest(out, prepared.shard_id, batch.keys(), prepared.nearest,
                      [m["privacy_max_sim"] for m in batch.metas])
    # The encoder pool gets this process's CPU budget (Ray does not pin actors to cores).
    result = shard_writer(output).write(out, prepared.shard_id, batch, stats=prepared.stats,
                                        workers=workers or torch.get_num_threads(), guard=guard)
    return result.marker


def certificate(spec: JobSpec, embedder: Any, index: Any, *, nir_written: bool) -> dict:
    """What was certified, against what, at which operating point (report.json and every marker)."""
    calibration = spec.privacy.calibration
    source = ("given by hand" if calibration is None else
              f"calibrated at FMR {calibration['fmr']:g} on {calibration['impostor_pairs']} impostor pairs")
    certified = ["VIS"] + (["NIR"] if nir_written and spec.privacy.check_nir else [])
    return {
        "threshold": spec.privacy.value,
        "threshold_source": source,
        "fmr": None if calibration is None else calibration["fmr"],
        "impostor_pairs": None if calibration is None else calibration["impostor_pairs"],
        "similarity": "maximum cosine similarity to every enrolled real image (signed, not |cos|)",
        "embedder": {"path": spec.embedder.path, "fingerprint": embedder.fingerprint,
                     "weights": embedder.weights_fingerprint, "preprocessing": embedder.preprocessing.to_dict()},
        "index_fingerprint": index.fingerprint,
        "certified": certified,
        "nir_written": nir_written,
    }


def pending_shards(spec: JobSpec, out: Storage, num_identities: int) -> list[int]:
    """Shards still to write; removes what an interrupted run left without a marker first (call it
    only while no writer runs on this dataset)."""
    remove_incomplete(out)
    return [s for s in range(shards_for(spec, num_identities)) if not is_complete(out, s)]
