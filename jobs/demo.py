"""The benchmarks' job: the quickstart's seeded random models and the example job, with a stand-in
"real" population of faces from the same generator under an unrelated seed, enrolled into a real
privacy index. Random weights keep the measured work the same on every machine, whatever demo models
are installed; `facegen quickstart` (jobs/quickstart.py) is what users run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import yaml

from facegen.engine.index.build import build_index
from facegen.engine.index.calibrate import calibrate
from facegen.engine.index.search import PrivacyIndex
from facegen.engine.seeding import Stream, draw_keys, normal, random_directions
from facegen.engine.spec import JobSpec, build_spec
from facegen.engine.storage import Storage
from facegen.jobs.quickstart import EXAMPLE, RANDOM_EMBEDDING_DIM, random_embedder, random_generator
from facegen.models.embedder import FaceEmbedder
from facegen.models.generator import Generator, images_to_uint8
from facegen.models.loading import load_embedder

EMBEDDING_DIM = RANDOM_EMBEDDING_DIM
POPULATION_SEED = 4242
DEMO_FMRS = (5e-2, 1e-2, 1e-3)  # what a few dozen to a few hundred single-image stand-ins resolve


def demo_models(folder: Path) -> tuple[Path, Path]:
    """A 64² dual-branch generator and an r18-shaped embedder of matching width, seeded (the quickstart's
    stand-ins for trained demo models)."""
    folder.mkdir(parents=True, exist_ok=True)
    embedder = random_embedder(folder / "embedder.safetensors")
    return random_generator(folder / "generator.safetensors", EMBEDDING_DIM), embedder


def enrol_population(generator: Generator, embedder: FaceEmbedder, target: Storage, count: int = 400) -> None:
    """Stand-ins for enrolled real people: faces from an unrelated seed, embedded and indexed."""
    slots = np.arange(count)
    conditions = torch.from_numpy(random_directions(draw_keys(POPULATION_SEED, Stream.CONDITION, slots),
                                                    generator.c_dim, 4.0))
    latents = torch.from_numpy(normal(draw_keys(POPULATION_SEED, Stream.LATENT, slots, 0), generator.z_dim))
    with torch.inference_mode():
        vis, _ = generator(latents, conditions, truncation_psi=0.7, fast=True)
    embeddings = embedder.embed(images_to_uint8(vis)).numpy()
    identities = [f"{i:05d}" for i in range(count)]
    build_index(embeddings, identities, [f"{i}_0.png" for i in identities], target,
                embedder_fingerprint=embedder.fingerprint, preprocessing=embedder.preprocessing.to_dict(),
                embedder_weights=embedder.weights_fingerprint,
                source=f"demo population: {count} generated stand-ins, seed {POPULATION_SEED}")
    # The job's `privacy.threshold: auto` reads the threshold calibrated here (400 stand-ins give
    # 79,800 impostor pairs: FMR 1e-3; see `demo_fmr`).
    calibrate(PrivacyIndex.open(target, backend="numpy"), DEMO_FMRS)


def demo_fmr(wanted: float, population: int) -> float:
    """The example's FMR, or the finest calibrated one a smaller population's impostor pairs resolve
    (`privacy.threshold: auto` refuses an FMR finer than 10 / pairs)."""
    from facegen.engine.index.compat import required_pairs

    pairs = population * (population - 1) // 2
    if pairs >= required_pairs(wanted):
        return wanted
    usable = [fmr for fmr in DEMO_FMRS if pairs >= required_pairs(fmr)]
    return min(usable) if usable else max(DEMO_FMRS)


def prepare_demo(folder: str | Path, population: int = 400) -> JobSpec:
    """Write models, index and `job.yaml` under `folder`; return the job's spec. `population`: enrolled
    stand-ins (benchmarks in CI use fewer)."""
    from facegen.models.loading import load_generator

    folder = Path(folder).resolve()
    generator_path, embedder_path = demo_models(folder / "models")
    index = Storage(str(folder / "index"))
    if not index.exists("index.json"):
        enrol_population(load_generator(generator_path), load_embedder(embedder_path), index, population)
    elif not index.read_json("index.json").get("thresholds"):  # a demo folder from before calibration
        calibrate(PrivacyIndex.open(index, backend="numpy"), DEMO_FMRS)
    tree = yaml.safe_load(EXAMPLE.read_text())
    tree["privacy"]["fmr"] = demo_fmr(float(tree["privacy"]["fmr"]), population)
    tree["generator"]["path"] = str(generator_path)
    tree["embedder"]["path"] = str(embedder_path)
    tree["index"]["uri"] = str(folder / "index")
    tree["output"]["uri"] = str(folder / "dataset")
    spec = build_spec(tree)
    (folder / "job.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    return spec
