"""Checking a job without running it (`facegen generate --dry-run`): every input a run would open,
opened and checked against the others, and nothing written.

The checks are the ones a run makes before its first proposal (models load, the generator is
conditioned on this embedder's features, the index was built with this embedder, the output is
usable for a new job or the resumed one), so a plan that passes here fails later only on resources.
"""

from __future__ import annotations

import os
from pathlib import Path

from facegen.engine.lease import read_lease
from facegen.engine.spec import JobSpec, load_spec_yaml_text, spec_diff, spec_hash
from facegen.engine.storage import Storage
from facegen.models.errors import UserError


def check_output(spec: JobSpec, resume: bool) -> str:
    """What the run would do with the output location, or the refusal it would raise (writes nothing)."""
    out = Storage(spec.output.uri, spec.output.storage_options)
    holder = read_lease(out) if out.exists() else None
    if holder is not None and holder.left() > 0:
        where = f"{out.uri} is held by another facegen run, {holder.describe()}"
        if holder.process_gone():
            return f"{where}: its process is gone; the run would wait for the lease to expire"
        if not spec.run.lease_wait:
            raise UserError(f"{where}; wait for it to finish, or stop it and rerun with --resume")
        return f"{where}: the run would wait up to {spec.run.lease_wait:g} s"
    if out.exists("job.sha256"):
        if not resume:
            raise UserError(f"{out.uri} already holds a job; pass --resume to continue it, or choose another output")
        if out.read_text("job.sha256").strip() != spec_hash(spec):
            keys = ", ".join(spec_diff(load_spec_yaml_text(out.read_text("job.yaml")), spec)) or "(unknown)"
            raise UserError(f"resume refused: the spec differs from the one in {out.uri} in: {keys}")
        done = len(out.list("done")) if out.exists("done") else 0
        return f"resume the job in {out.uri} ({done} shards done)"
    if out.exists():
        leftovers = [name for name in out.list() if not name.startswith(".")]
        if leftovers:
            raise UserError(f"{out.uri} is not empty and holds no facegen job ({', '.join(leftovers[:5])})")
    protocols = out.fs.protocol if isinstance(out.fs.protocol, tuple) else (out.fs.protocol,)
    if "file" in protocols:  # object stores are checked by the run itself
        existing = Path(out.path())
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise UserError(f"{out.uri}: output location is not writable ({existing} is not a writable folder)")
    return f"new job in {out.uri}"


def preflight(spec: JobSpec, resume: bool = False) -> list[str]:
    """Open and cross-check every input; return one line per input describing what was found."""
    from facegen.engine.bundle import check_compatible, generator_settings
    from facegen.engine.job import open_job_index, resolve_job
    from facegen.engine.quality import make_quality_gate
    from facegen.models.devices import resolve_device
    from facegen.models.loading import detect_format
    from facegen.models.rendering import open_generator

    device = resolve_device(spec.run.device)
    # The run's own resolution: embedder preprocessing (index / graph / given) and the threshold
    # ('auto' refused here exactly as the run would refuse it).
    spec, (generator, embedder) = resolve_job(spec)
    renderer = open_generator(generator, generator_settings(spec))  # the family checks its settings
    calibration = spec.privacy.calibration
    lines = [
        f"generator {spec.generator.path}: {detect_format(spec.generator.path)}, {generator.img_resolution} px, "
        f"c_dim {generator.c_dim}, {'VIS+NIR' if generator.nir_channels else 'VIS only'}",
        f"embedder  {spec.embedder.path}: width {embedder.dim}, fingerprint {embedder.fingerprint}, "
        f"preprocessing {embedder.preprocessing.to_json()}",
        f"privacy   threshold {spec.privacy.value:.6g} ("
        + ("given by hand" if calibration is None else
           f"calibrated at FMR {calibration['fmr']:g} on {calibration['impostor_pairs']} impostor pairs")
        + f"), certifies VIS{' and NIR' if spec.privacy.check_nir and generator.nir_channels else ''}",
    ]
    if spec.index.uri:
        index = open_job_index(spec, None, device.type)
        check_compatible(renderer, embedder, index)
        lines.append(f"index     {spec.index.uri}: {index.count} embeddings, dim {index.dim}, built with this embedder")
    else:
        from facegen.engine.index.sources import embeddings_from_identity_features

        source = embeddings_from_identity_features(spec.index.features)
        if source.embeddings.shape[1] != embedder.dim:
            raise UserError(f"index.features {spec.index.features}: features are {source.embeddings.shape[1]}-d but "
                            f"the embedder's are {embedder.dim}-d")
        if generator.c_dim and generator.c_dim != embedder.dim:
            raise UserError(f"generator c_dim {generator.c_dim} != embedder width {embedder.dim}: the generator is "
                            "conditioned on identity features of another recognition model")
        lines.append(f"index     {spec.index.features}: {len(source.embeddings)} features, enrolled at the start")
    make_quality_gate(spec.filter.quality_gate, spec.filter.face_detector, spec.filter.min_face_score)
    lines.append(f"output    {check_output(spec, resume)}")
    lines.append(f"device    {device}")
    return lines
