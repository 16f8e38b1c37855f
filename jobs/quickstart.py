"""The quickstart: a whole facegen workflow on this machine, from nothing, in a few minutes.

1. Models: the demo models shipped with facegen (`facegen.models.demo`, trained by facegen on the
   procedural world) where installed, else seeded random-initialised ones (every machine gets the same);
   copied into `OUT/models/` so the folder is self-contained.
2. The "real" population: procedural world identities (`engine.world`, seed `REAL_SEED`, the world the
   demo models were trained on), VIS and NIR, enrolled into a privacy index as `facegen index build
   --images` does, and calibrated (`facegen index calibrate`).
3. The example job (`jobs/examples/tiny.yaml`) through the full pipeline on the embedded Ray:
   proposals, the privacy filter against every enrolled image, diversity, shards, report.
4. A small face recogniser trained on the generated dataset for a few steps (the `train-fr` code path),
   then verified on world identities that neither the models nor the index have seen.

Every stage is the production code path; each one finds its earlier output and skips, so a rerun into
the same folder does nothing new, and everything but wall-clock times is a pure function of the seeds
(a fresh folder gets byte-identical shards, manifests and identities).
"""

from __future__ import annotations

import filecmp
import json
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

EXAMPLE = Path(__file__).parent / "examples" / "tiny.yaml"
DEFAULT_OUT = "facegen-quickstart"  # jobs/examples/tiny.yaml names this folder, relative to the repo root
RESOLUTION = 64
ROLES = ("embedder", "generator")  # the order matters: a random generator is conditioned on the embedder
RANDOM_EMBEDDING_DIM = 64
REAL_SEED = 0  # the world the demo models were trained on: its people are the ones to protect
REAL_IDENTITIES, REAL_SAMPLES = 100, 2  # x2 (VIS and NIR): 400 enrolled images, 79,200 impostor pairs
HELD_OUT_SEED = 2  # world identities nobody trained on (the demo models' test population), for the FR check
HELD_OUT_IDENTITIES, HELD_OUT_SAMPLES = 40, 4
CALIBRATION_FMRS = (1e-2, 1e-3)  # 79,200 impostor pairs resolve FMR 1e-3 (10 / FMR pairs needed)
FR_RUN = "00000-quickstart"
FR_SETTINGS = {  # tiny: a few steps show the data feeds training, not a usable recogniser
    "model": {"depth": 18, "embedding_dim": 64, "base_width": 8},
    "data": {"image_size": 32, "loader_workers": 0, "mode": "both"},
    "optim": {"batch_size": 32, "steps": 30, "lr": 0.1},
    "schedule": {"log_steps": 10, "checkpoint_steps": 1000, "keep_checkpoints": 1},
    "run": {"executor": "local"},
}


@contextmanager
def one_thread():
    """torch on one thread in this process for the stage: the quickstart's models are small enough that
    splitting an op across threads saves little, and on a busy machine a thread waiting at the pool's
    barrier for a descheduled sibling costs far more (measured on a shared 2-core machine: one FR step
    0.2 s on one thread, 1.5 to 8 s on two). Ray's actors set their own threads."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class Stages:
    """Wall-clock seconds per quickstart stage, in order, and how the run went (the printed summary)."""

    started: float = field(default_factory=time.monotonic)
    seconds: dict[str, float] = field(default_factory=dict)

    def run(self, name: str, what: str, work, *args, **kwargs):
        print(f"quickstart: {what}", flush=True)
        begun = time.monotonic()
        result = work(*args, **kwargs)
        self.seconds[name] = round(time.monotonic() - begun, 2)
        return result

    @property
    def total(self) -> float:
        return round(time.monotonic() - self.started, 2)


# -- models ----------------------------------------------------------------------------------------
def shipped_models() -> dict[str, Path]:
    """The trained demo models facegen ships ("embedder", "generator"), or {} unless both are installed:
    they are a pair (the generator is conditioned on that embedder's features, and the example job's
    thresholds are set for the pair it runs with)."""
    try:
        from facegen.models.demo import demo_model_paths
    except ImportError:
        return {}
    paths = demo_model_paths()
    return {role: Path(paths[role]) for role in ROLES} if all(role in paths for role in ROLES) else {}


def random_embedder(path: Path) -> Path:
    """An r18-shaped embedder, seeded: the stand-in until trained demo models are installed."""
    import torch

    from facegen.models.checkpoint import save_native
    from facegen.models.iresnet import IResNet, IResNetConfig

    torch.manual_seed(0)
    return save_native(IResNet(IResNetConfig(depth=18, embedding_dim=RANDOM_EMBEDDING_DIM, input_size=RESOLUTION,
                                             base_width=8)), path)


def random_generator(path: Path, condition_dim: int) -> Path:
    """A 64² dual-branch generator conditioned on `condition_dim`-d identity features, seeded."""
    import torch

    from facegen.models.checkpoint import save_native
    from facegen.models.generator import Generator, GeneratorConfig

    torch.manual_seed(0)
    return save_native(Generator(GeneratorConfig(
        z_dim=64, c_dim=condition_dim, w_dim=64, img_resolution=RESOLUTION, channel_base=1024, channel_max=64,
        mapping_layers=2, num_fp16_res=0)), path)


def prepare_models(folder: Path) -> dict[str, Any]:
    """`folder/embedder.safetensors` and `folder/generator.safetensors` (kept when present: a rerun)."""
    from facegen.models.loading import load_embedder

    folder.mkdir(parents=True, exist_ok=True)
    shipped = shipped_models()
    paths = {role: folder / f"{role}.safetensors" for role in ROLES}
    for role, path in paths.items():
        if path.exists():
            continue
        if role in shipped:
            shutil.copyfile(shipped[role], path)
        elif role == "embedder":
            random_embedder(path)
        else:
            random_generator(path, load_embedder(paths["embedder"]).dim)
    # What the folder holds, not what is installed now: an earlier run's models stay (its index and
    # dataset were made with them).
    origin = {role: "trained demo model" if role in shipped and filecmp.cmp(path, shipped[role], shallow=False)
              else "seeded random weights" for role, path in paths.items()}
    return {"paths": paths, "origin": origin}


# -- the real population and its index ---------------------------------------------------------------
def enrol_real_population(folder: Path, embedder_path: Path) -> dict[str, Any]:
    """Render the world population, enrol its VIS and NIR images and calibrate; skipped when the index
    exists. Returns the index's calibrated thresholds."""
    from facegen.engine.index import PrivacyIndex, calibrate
    from facegen.engine.index.build import created_by
    from facegen.engine.index.sources import image_stream
    from facegen.engine.index.store import read_info
    from facegen.engine.index.stream import build_index_from_blocks
    from facegen.engine.storage import Storage
    from facegen.engine.world.dataset import render_dataset
    from facegen.models.loading import load_embedder

    index = Storage(str(folder / "index"))
    if not index.exists("index.json"):
        with one_thread():
            render_dataset(folder / "world", REAL_IDENTITIES, REAL_SAMPLES, resolution=RESOLUTION, seed=REAL_SEED)
            embedder = load_embedder(embedder_path)
            # As `facegen index build OUT --images world --embedder E` does: embedded batch by batch
            # into the index writer.
            stream = image_stream(str(folder / "world"), embedder, 64, include_nir=True)
            build_index_from_blocks(stream.blocks(), index, expected_dim=embedder.dim, info_fields={
                "embedder_fingerprint": embedder.fingerprint, "preprocessing": embedder.preprocessing.to_dict(),
                "embedder_weights": embedder.weights_fingerprint, "source": stream.description,
                "created_by": created_by()})
            calibrate(PrivacyIndex.open(index, backend="numpy"), CALIBRATION_FMRS)
    info = read_info(index)
    return {"rows": info.count, "identities": info.num_identities, "thresholds": info.thresholds}


# -- the job ---------------------------------------------------------------------------------------
def write_job(folder: Path, models: dict[str, Path]) -> Path:
    """The example job with this folder's models, index and dataset (absolute paths), as OUT/job.yaml."""
    tree = yaml.safe_load(EXAMPLE.read_text())
    tree["generator"]["path"] = str(models["generator"])
    tree["embedder"]["path"] = str(models["embedder"])
    tree["index"]["uri"] = str(folder / "index")
    tree["output"]["uri"] = str(folder / "dataset")
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def generate(job: Path, executor: str) -> dict:
    """Run the job, or read the report of a finished one (written last: its presence means done), so a
    rerun starts no Ray and keeps the first run's timing."""
    from facegen.engine.spec import build_spec, load_spec_file
    from facegen.jobs.common import execute_job

    spec = build_spec(load_spec_file(str(job)), [f"run.executor={executor}"])
    report = Path(spec.output.uri) / "report.json"
    if report.exists():
        print(f"quickstart: {report.parent} is complete; nothing to generate", flush=True)
        return json.loads(report.read_text())
    return execute_job(spec, resume=True)


# -- face recognition on the result ------------------------------------------------------------------
def train_recogniser(folder: Path) -> Path:
    """A few steps of `facegen train-fr` on the dataset (in-process); skipped when already trained."""
    from facegen.engine.frtrain.launch import prepare, run_local
    from facegen.engine.frtrain.spec import build_fr_spec

    backbone = folder / "fr" / FR_RUN / "backbone.pth"
    if backbone.exists():
        return backbone
    run = folder / "fr" / FR_RUN
    if run.exists():  # an interrupted earlier attempt: start it again from nothing
        shutil.rmtree(run)
    spec = build_fr_spec({**FR_SETTINGS, "seed": 0,
                          "data": {**FR_SETTINGS["data"], "uri": str(folder / "dataset")},
                          "output": {"dir": str(folder / "fr"), "desc": "quickstart"}})
    prepared = prepare(spec)
    with one_thread():
        run_local(spec, prepared)
    return Path(prepared.run_uri) / "backbone.pth"


def held_out_pairs(seed: int = HELD_OUT_SEED) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """World identities no model saw: VIS images [N,R,R,3], and every genuine pair with as many
    impostor pairs (drawn with `seed`) as (first, second, same) index arrays."""
    from facegen.engine.world import render

    ids = np.repeat(np.arange(HELD_OUT_IDENTITIES), HELD_OUT_SAMPLES)
    samples = np.tile(np.arange(HELD_OUT_SAMPLES), HELD_OUT_IDENTITIES)
    vis, _ = render(seed, ids, samples, RESOLUTION)
    a, b = np.triu_indices(len(ids), k=1)
    same = ids[a] == ids[b]
    genuine = np.flatnonzero(same)
    impostor = np.random.default_rng(seed).choice(np.flatnonzero(~same), len(genuine), replace=False)
    chosen = np.sort(np.concatenate([genuine, impostor]))
    return vis, a[chosen], b[chosen], same[chosen]


def verification_accuracy(model: Path, pairs: tuple) -> float:
    """10-fold verification accuracy of `model` on the held-out pairs (as `facegen eval-fr`)."""
    import torch

    from facegen.engine.evaluation import verification_report
    from facegen.models.loading import load_embedder

    vis, first, second, same = pairs
    embeddings = load_embedder(model).embed(torch.from_numpy(vis).permute(0, 3, 1, 2)).numpy().astype(np.float64)
    scores = np.einsum("ij,ij->i", embeddings[first], embeddings[second])
    return float(verification_report(scores, same, folds=10)["accuracy"])


def evaluate(folder: Path, backbone: Path, embedder: Path) -> dict[str, Any]:
    pairs = held_out_pairs()
    with one_thread():
        trained, reference = verification_accuracy(backbone, pairs), verification_accuracy(embedder, pairs)
    result = {"pairs": int(len(pairs[3])), "genuine": int(pairs[3].sum()),
              "identities": HELD_OUT_IDENTITIES, "samples": HELD_OUT_SAMPLES, "world_seed": HELD_OUT_SEED,
              "trained_accuracy": trained, "embedder_accuracy": reference}
    (folder / "fr" / "metrics.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return result


# -- the whole run ---------------------------------------------------------------------------------
def run_quickstart(out: str | Path, executor: str = "ray") -> dict[str, Any]:
    """Every stage into `out`; returns the summary (also written to OUT/quickstart.json)."""
    folder = Path(out).resolve()
    stages = Stages()
    models = stages.run("models", f"models in {folder / 'models'}", prepare_models, folder / "models")
    index = stages.run("real_population", f"the real population: {REAL_IDENTITIES} world identities x "
                       f"{REAL_SAMPLES} samples, VIS and NIR, enrolled and calibrated in {folder / 'index'}",
                       enrol_real_population, folder, models["paths"]["embedder"])
    job = write_job(folder, models["paths"])
    where = "the embedded Ray" if executor == "ray" else "this process"
    report = stages.run("generate", f"generating {job} on {where}", generate, job, executor)
    backbone = stages.run("train_fr", "training a small face recogniser on the dataset for "
                          f"{FR_SETTINGS['optim']['steps']} steps", train_recogniser, folder)
    fr = stages.run("evaluate_fr", f"verifying it on {HELD_OUT_IDENTITIES} held-out world identities",
                    evaluate, folder, backbone, models["paths"]["embedder"])
    shown = str(out).rstrip("/") or "/"  # the folder as the user named it, for the lines they read
    summary = {"folder": shown, "models": models["origin"], "real_population": index,
               "report": report, "fr": fr, "stage_seconds": stages.seconds, "seconds": stages.total,
               "audit_command": f"facegen audit {shown}/dataset --index {shown}/index "
                                f"--embedder {shown}/models/embedder.safetensors"}
    (folder / "quickstart.json").write_text(json.dumps(
        {k: v for k, v in summary.items() if k != "report"}, indent=2, sort_keys=True, default=str) + "\n")
    return summary


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """What the user reads at the end: what was made, what the filter did, how fast, where to look."""
    report, fr = summary["report"], summary["fr"]
    ids, samples, cert = report["identities"], report["samples"], report["privacy_certificate"]
    timing = report["timing"]
    origin = summary["models"]
    if set(origin.values()) == {"trained demo model"}:
        models = "the trained demo models (generator and embedder trained by facegen on the procedural world)"
    else:
        models = ", ".join(f"{role}: {how}" for role, how in origin.items())
        models += " (faces are noise and the embedder recognises nobody until trained demo models are installed)"
    proposal = {k: v for k, v in ids["proposal_verdicts"].items() if k != "ok"}
    privacy_rejected = ids["proposal_verdicts"].get("privacy", 0) + samples["rejected"].get("privacy", 0)
    from facegen.engine.report import PHASES, certificate_headline

    return [
        f"facegen quickstart: done in {summary['seconds']:.0f} s; models: {models}",
        f"real people: {summary['real_population']['rows']} images of {summary['real_population']['identities']} "
        "world identities enrolled",
        f"identities: {ids['accepted']} of {ids['wanted']} accepted from {ids['proposed']} proposals "
        f"(rejected: {_counts(proposal)})",
        f"samples: {samples['written']} VIS/NIR pairs written from {samples['attempts']} candidates "
        f"(rejected: {_counts(samples['rejected'])})",
        f"privacy: {privacy_rejected} candidates rejected as too close to an enrolled person "
        f"({ids['proposal_verdicts'].get('privacy', 0)} anchors, {samples['rejected'].get('privacy', 0)} samples); "
        f"max real similarity {cert['max_real_similarity']:.6f} vs threshold {cert['threshold']:.6f} "
        f"({cert.get('threshold_source', 'given')}); {cert['violations']} violations; "
        f"{certificate_headline(cert)[1].split(':')[0]}",
        f"throughput: {timing['samples_per_s']:.2f} samples/s, {timing['candidates_per_s']:.2f} candidates/s "
        f"over the {timing['total_seconds']:.0f} s job (" + ", ".join(
            f"{name} {timing['seconds'][name]:.0f} s" for name in PHASES) + ")",
        f"face recognition: trained {FR_SETTINGS['optim']['steps']} steps, held-out verification accuracy "
        f"{fr['trained_accuracy']:.3f} on {fr['pairs']} pairs (chance 0.5; the job's embedder: "
        f"{fr['embedder_accuracy']:.3f})",
        f"report: {summary['folder']}/dataset/report.html",
        f"audit it: {summary['audit_command']}",
    ]


def _counts(counts: dict[str, int]) -> str:
    shown = [f"{reason} {count}" for reason, count in sorted(counts.items()) if count]
    return ", ".join(shown) or "none"
