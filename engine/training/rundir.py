"""The run directory, laid out like StyleGAN2-ADA's (train.py), on any storage:

    <outdir>/NNNNN-<desc>/
        training_options.json   the resolved spec and hyperparameters
        log.txt                 one line per tick (plus start/restore/snapshot lines)
        stats.jsonl             one JSON object per tick: {name: {num, mean, std}, ..., timestamp}
        reals.png reals_nir.png fakes_init.png fakes_init_nir.png fakes{kimg:06d}.png fakes{kimg:06d}_nir.png
        network-snapshot-{kimg:06d}/     native snapshots (see snapshot.py)
        checkpoints/checkpoint-<nimg>/   restart checkpoints (local executor; Ray Train writes them here too)
"""

from __future__ import annotations

import io
import json
import re
import sys
import time
from typing import Any

import numpy as np
import torch
from PIL import Image

from facegen.engine.storage import Storage

LOG_FILE = "log.txt"
STATS_FILE = "stats.jsonl"
OPTIONS_FILE = "training_options.json"


def next_run_name(outdir: Storage, desc: str) -> str:
    """`NNNNN-<desc>` with NNNNN one past the highest run number already in `outdir`."""
    ids = [int(m.group()) for n in outdir.list() if (m := re.match(r"^\d+", n))]
    return f"{max(ids, default=-1) + 1:05d}-{desc}"


def describe(data_name: str, spec: Any, num_workers: int) -> str:
    """The original's run description: dataset, -cond, -mirror, -<cfg>, explicit overrides."""
    if spec.output.desc:
        return spec.output.desc
    cfg = spec.config
    parts = [re.sub(r"[^A-Za-z0-9_.+-]", "_", data_name) or "data"]
    parts += ["cond"] if spec.data.cond else []
    parts += [f"subset{spec.data.subset}"] if spec.data.subset else []
    parts += ["mirror"] if spec.data.mirror else []
    parts.append(f"auto{num_workers}" if cfg.preset == "auto" else cfg.preset)
    parts += [f"gamma{cfg.gamma:g}"] if cfg.gamma is not None else []
    parts += [f"kimg{cfg.kimg:g}"] if cfg.kimg is not None else []
    parts += [f"batch{cfg.batch}"] if cfg.batch is not None else []
    parts += [spec.augment.mode] if spec.augment.mode != "ada" else []
    parts += [f"nir{spec.loss.nir_loss_weight:g}"] if spec.loss.nir_loss_weight != 0.1 else []
    parts += ["resumecustom"] if spec.resume else []
    return "-".join(parts)


class _Appender:
    """A text file that only grows. Local: appended in place; object storage: rewritten on flush."""

    def __init__(self, storage: Storage, name: str) -> None:
        self.storage, self.name = storage, name
        self.text = storage.read_text(name) if not storage.is_local and storage.exists(name) else ""
        self.pending = ""

    def append(self, text: str) -> None:
        self.pending += text

    def flush(self) -> None:
        if not self.pending:
            return
        if self.storage.is_local:
            self.storage.makedirs()
            with open(self.storage.path(self.name), "a", encoding="utf-8") as f:
                f.write(self.pending)
        else:
            self.text += self.pending
            self.storage.write_text(self.name, self.text)
        self.pending = ""

    def rewrite(self, text: str) -> None:
        self.pending, self.text = "", text
        self.storage.write_text(self.name, text)

    def read(self) -> str:
        self.flush()
        return self.storage.read_text(self.name) if self.storage.exists(self.name) else ""


class RunDir:
    """Rank 0's writer for one run directory."""

    def __init__(self, storage: Storage, echo: bool = True) -> None:
        self.storage = storage
        self.echo = echo
        storage.makedirs()
        self._log = _Appender(storage, LOG_FILE)
        self._stats = _Appender(storage, STATS_FILE)

    def log(self, line: str) -> None:
        if self.echo:
            print(line, file=sys.stdout, flush=True)
        self._log.append(line + "\n")

    def append_stats(self, entry: dict[str, Any]) -> None:
        self._stats.append(json.dumps({**entry, "timestamp": time.time()}) + "\n")

    def flush(self) -> None:
        self._log.flush()
        self._stats.flush()

    def truncate_stats(self, max_kimg: float) -> int:
        """Drop stats of ticks past a restored checkpoint (they are trained again); returns how many."""
        lines = [ln for ln in self._stats.read().splitlines() if ln.strip()]
        keep = [ln for ln in lines if json.loads(ln).get("Progress/kimg", {}).get("mean", 0) <= max_kimg + 1e-9]
        if len(keep) != len(lines):
            self._stats.rewrite("".join(ln + "\n" for ln in keep))
        return len(lines) - len(keep)

    def write_options(self, options: dict[str, Any]) -> None:
        self.storage.write_json(OPTIONS_FILE, options)

    def write_grid(self, name: str, images: torch.Tensor, grid: tuple[int, int]) -> None:
        self.storage.write_bytes(name, grid_png(images, grid))


def default_grid(resolution: int) -> tuple[int, int]:
    """StyleGAN2-ADA's snapshot grid: about 7680x4320 pixels, 7-32 columns, 4-32 rows."""
    return int(np.clip(7680 // resolution, 7, 32)), int(np.clip(4320 // resolution, 4, 32))


def grid_png(images: torch.Tensor, grid: tuple[int, int]) -> bytes:
    """uint8 images [gw·gh, C, H, W] (C = 1 or 3) -> one PNG, row-major, like the original's grids."""
    gw, gh = grid
    n, c, h, w = images.shape
    if n != gw * gh:
        raise ValueError(f"grid {gw}x{gh} needs {gw * gh} images, got {n}")
    tiles = images.detach().to("cpu", torch.uint8).reshape(gh, gw, c, h, w).permute(0, 3, 1, 4, 2)
    array = tiles.reshape(gh * h, gw * w, c).numpy()
    image = Image.fromarray(array[:, :, 0], "L") if c == 1 else Image.fromarray(array, "RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
