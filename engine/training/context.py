"""The training context: what a host gives the loop (rank, world size, device, report, checkpoint).

Ray Train provides one implementation (`cluster/train.py`); `local_context` is the single-process one
(`facegen train --executor local`, tests). `report(metrics, checkpoint_dir)` is called by every rank
once per tick; rank 0 passes a snapshot folder whose name is the checkpoint's name when one is due.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from facegen.engine.storage import Storage
from facegen.engine.training.snapshot import CHECKPOINT_DIR, CHECKPOINT_PATTERN, upload_folder

ReportFn = Callable[[dict[str, Any], "str | None"], None]


@dataclass
class TrainContext:
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    report: ReportFn = lambda metrics, checkpoint_dir: None  # noqa: E731
    latest_checkpoint: str | None = None  # local snapshot folder to restart from (after a failure)
    # Test-only fault injection: called before every training step with (context, batch_idx).
    step_hook: Callable[[TrainContext, int], None] | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def local_context(run: Storage, device: torch.device, keep_checkpoints: int = 2,
                  latest_checkpoint: str | None = None) -> TrainContext:
    """Single process; checkpoints go to `RUN/checkpoints/<name>/`, the newest `keep_checkpoints` kept."""

    def report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        if checkpoint_dir is None:
            return
        upload_folder(checkpoint_dir, run, posixpath.join(CHECKPOINT_DIR, Path(checkpoint_dir).name))
        existing = [n for n in run.list(CHECKPOINT_DIR) if CHECKPOINT_PATTERN.match(n)]
        for name in existing[:-keep_checkpoints]:
            run.delete(posixpath.join(CHECKPOINT_DIR, name))

    return TrainContext(rank=0, world_size=1, device=device, report=report, latest_checkpoint=latest_checkpoint)
