"""Running a generation job: the units every executor schedules, and the local (in-process) executor.

Units: `open_output` (spec written first, resume checked), `load_bundle` (models + index, every
compatibility check before any work), `select_identities` (phases 1+2, persisted), `run_shard`
(phase 3 for one shard: expand, then write tar -> manifest -> marker), `finalize` (report). The Ray
executor calls the same functions from actors; only the scheduling differs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from facegen.engine.bundle import Bundle, check_compatible, resolve_device
from facegen.engine.dataset.formats import shard_writer
from facegen.engine.dataset.manifest import completed_shards, is_complete, remove_incomplete
from facegen.engine.dataset.samples import ShardBatch
from facegen.engine.expand import expand_shard
from facegen.engine.identities import IDENTITIES_FILE, read_identities, write_identities
from facegen.engine.index.search import PrivacyIndex
from facegen.engine.phases import Identities, Proposals, Selection, propose
from facegen.engine.progress import progress_bar
from facegen.engine.quality import make_quality_gate
from facegen.engine.spec import JobSpec, load_spec_yaml_text, spec_diff, spec_hash, spec_to_yaml
from facegen.engine.storage import Storage
from facegen.models.errors import JobFailed, UserError

log = logging.getLogger("facegen")

COMPAT_INDEX_DIR = "privacy-index"


def open_output(spec: JobSpec, resume: bool) -> Storage:
    """Check the output location and write `job.yaml` + `job.sha256` before any other work."""
    out = Storage(spec.output.uri, spec.output.storage_options)
    out.check_writable()
    digest = spec_hash(spec)
    if out.exists("job.sha256"):
        existing = out.read_text("job.sha256").strip()
        if not resume:
            raise UserError(f"{out.uri} already holds a job; pass --resume to continue it, or choose another output")
        if existing != digest:
            previous = load_spec_yaml_text(out.read_text("job.yaml"))
            keys = ", ".join(spec_diff(previous, spec)) or "(unknown)"
            raise UserError(f"resume refused: the spec differs from the one in {out.uri} in: {keys}")
        return out
    leftovers = [name for name in out.list() if not name.startswith(".")]
    if leftovers:
        raise UserError(f"{out.uri} is not empty and holds no facegen job ({', '.join(leftovers[:5])})")
    out.write_text("job.yaml", spec_to_yaml(spec))
    out.write_text("job.sha256", digest + "\n")
    return out


def load_bundle(spec: JobSpec, out: Storage | None = None) -> Bundle:
    """Load generator, embedder and index; refuse incompatible combinations before any work."""
    from facegen.models.loading import load_embedder, load_generator

    device = resolve_device(spec.run.device)
    generator = load_generator(spec.generator.path).to(device).eval().requires_grad_(False)
    embedder = load_embedder(spec.embedder.path, **spec.embedder.preprocessing).to(device)
    index = open_index(spec, embedder, out)
    check_compatible(generator, embedder, index)
    limits = spec.filter
    gate = make_quality_gate(limits.quality_gate, limits.face_detector, limits.min_face_score)
    return Bundle(generator, embedder, index, device, spec, gate)


def open_index(spec: JobSpec, embedder: Any, out: Storage | None) -> PrivacyIndex:
    options = dict(backend=spec.index.backend, device=resolve_device(spec.run.device).type)
    if spec.index.uri:
        return PrivacyIndex.open(spec.index.uri, spec.index.storage_options, **options)
    # Compat: the original's identity_features.json, enrolled once into the dataset's own folder.
    from facegen.engine.index.build import build_index
    from facegen.engine.index.sources import embeddings_from_identity_features

    if out is None:
        raise UserError("index.features needs an output location to hold the enrolled index")
    target = out.child(COMPAT_INDEX_DIR)
    if not target.exists("index.json"):
        source = embeddings_from_identity_features(spec.index.features)
        build_index(source.embeddings, source.identities, source.files, target,
                    embedder_fingerprint=embedder.fingerprint, preprocessing=embedder.preprocessing.to_dict(),
                    source=f"identity_features.json: {spec.index.features}")
    return PrivacyIndex.open(target, **options)


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


def local_proposer(bundle: Bundle) -> ProposeMany:
    return lambda blocks: (propose(bundle, block) for block in blocks)


def selection_stats(selection: Selection, spec: JobSpec) -> dict:
    if selection.accepted < spec.identities:
        log.warning("only %d of %d identities passed within filter.max_slots=%d proposals",
                    selection.accepted, spec.identities, spec.max_slots)
    return {"proposed": selection.offered, "accepted": selection.accepted, "wanted": spec.identities,
            "verdicts": dict(sorted(selection.verdicts.items()))}


def shard_labels(spec: JobSpec, num_identities: int, shard_id: int) -> np.ndarray:
    per = spec.identities_per_shard
    return np.arange(shard_id * per, min((shard_id + 1) * per, num_identities), dtype=np.int64)


def num_shards(spec: JobSpec, num_identities: int) -> int:
    return -(-num_identities // spec.identities_per_shard)


def run_shard(bundle: Bundle, identities: Identities, out: Storage, shard_id: int) -> dict:
    """Phase 3 for one shard; returns its marker. Writing is tar, then manifest, then marker."""
    spec = bundle.spec
    expanded = expand_shard(bundle, identities, shard_labels(spec, len(identities), shard_id))
    batch = ShardBatch(labels=expanded.labels, samples=expanded.samples, vis=expanded.vis,
                       nir=expanded.nir, metas=expanded.metas)
    # The encoder pool gets this process's CPU budget (Ray does not pin actors to cores).
    result = shard_writer(spec.output).write(out, shard_id, batch, stats=expanded.stats,
                                             workers=torch.get_num_threads())
    return result.marker


def pending_shards(spec: JobSpec, out: Storage, num_identities: int) -> list[int]:
    remove_incomplete(out)
    return [s for s in range(num_shards(spec, num_identities)) if not is_complete(out, s)]


def run_local(spec: JobSpec, resume: bool = False, progress: bool = True) -> dict:
    """The whole job in this process (the local executor)."""
    out = open_output(spec, resume)
    bundle = load_bundle(spec, out)
    identities, selection = select_identities(spec, out, local_proposer(bundle), progress)
    todo = pending_shards(spec, out, len(identities))
    with progress_bar(len(todo), "shards", "shard", progress) as bar:
        for shard_id in todo:
            run_shard(bundle, identities, out, shard_id)
            bar.update(1)
    from facegen.engine.summary import finalize

    return finalize(spec, out, identities, selection, bundle.index)


def shard_markers(out: Storage) -> dict[int, dict]:
    return completed_shards(out)
