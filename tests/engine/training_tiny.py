"""Test helpers for training: a tiny VIS/NIR folder dataset and a tiny training spec (16², batch 4)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

TINY_CONFIG = {"batch": 4, "channel_base": 128, "channel_max": 16, "mapping_layers": 2, "z_dim": 16,
               "w_dim": 16, "mbstd_group": 2, "kimg": 0.032}


def make_dataset(root: Path, identities: int = 3, per_identity: int = 4, resolution: int = 16, c_dim: int = 8,
                 seed: int = 0) -> Path:
    """The original layout: VIS/{id}_{n}.png, NIR/ (the VIS luma), identity_features.json."""
    rng = np.random.default_rng(seed)
    (root / "VIS").mkdir(parents=True, exist_ok=True)
    (root / "NIR").mkdir(parents=True, exist_ok=True)
    features = {}
    for identity in range(identities):
        for sample in range(per_identity):
            name = f"{identity}_{sample}.png"
            vis = rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)
            Image.fromarray(vis).save(root / "VIS" / name)
            Image.fromarray(vis.mean(axis=2).astype(np.uint8)).save(root / "NIR" / name)
            features[name] = rng.normal(size=c_dim).round(4).tolist()
    (root / "identity_features.json").write_text(json.dumps(features))
    return root


def tiny_tree(data: Path, out: Path, **sections: Any) -> dict[str, Any]:
    """A spec tree: 8 steps of batch 4, a tick every 2 steps, snapshots every 2 ticks, 2x2 grids."""
    tree = {
        "data": {"uri": str(data), "loader_workers": 0},
        "output": {"dir": str(out)},
        "config": dict(TINY_CONFIG),
        "schedule": {"tick_kimg": 0.008, "snap": 2, "checkpoint_ticks": 1, "grid": [2, 2]},
        "augment": {"interval": 1, "speed_kimg": 0.1},
        "run": {"executor": "local"},
    }
    for key, value in sections.items():
        tree[key] = {**tree.get(key, {}), **value} if isinstance(value, dict) else value
    return tree
