"""A tiny job whose privacy filter rejects most anchors, and a rank table to repair them with.

The index enrols the exact anchors of the job's first `crowded` identity slots (stand-ins for real
people who happen to look like those draws), so without privacy repair every one of them is refused.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from facegen.engine.bundle import Bundle
from facegen.engine.spec import build_spec, load_spec_file
from facegen.jobs.cli import main
from tests.engine.test_phases import probe_anchors
from tests.engine.tiny import make_index, real_population, tiny_embedder, tiny_generator, write_tiny_job

CROWDED_SLOTS = 12


def write_crowded_job(folder: Path, **overrides) -> dict[str, str]:
    """The job YAML (`job`), its crowded index (`index`) and a whole-layer rank table made by
    `facegen disentangle rank` (`ranks`); the YAML points at the crowded index."""
    folder = Path(folder)
    ranks, index = str(folder / "ranks.parquet"), str(folder / "crowded")
    job = write_tiny_job(folder, str(folder / "out"), **{"index.uri": index, **overrides})
    assert main(["disentangle", "rank", "--generator", str(folder / "G.safetensors"), "--embedder",
                 str(folder / "E.safetensors"), "--out", ranks, "--widths", "layer", "--pairs", "2",
                 "--pairs-per-task", "2"]) == 0
    generator, embedder = tiny_generator(), tiny_embedder()
    probe = Bundle(generator, embedder, None, torch.device("cpu"), build_spec(load_spec_file(job)))
    planted = probe_anchors(probe, np.arange(CROWDED_SLOTS))
    make_index(index, embedder, np.concatenate([real_population(generator, embedder, 20), planted]))
    return {"job": job, "index": index, "ranks": ranks, "embedder": str(folder / "E.safetensors")}


def repair_flags(ranks: str, n: int = 3, tries: int = 3) -> list[str]:
    """`--set` flags turning privacy repair on with the whole-layer ranks."""
    settings = {"ranks": ranks, "n": n, "tries": tries, "unit_width": 0}
    return [arg for key, value in settings.items() for arg in ("--set", f"privacy.repair.{key}={value}")]
