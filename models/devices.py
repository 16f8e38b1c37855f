"""Where models run: one rule for every command, job and training run."""

from __future__ import annotations

import torch

from facegen.models.errors import UserError

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(name: str = "auto", *, what: str = "run.device", local_rank: int | None = None) -> torch.device:
    """'auto' -> CUDA when available, else the CPU; 'cpu'; 'cuda' or 'cuda:N' (a UserError naming
    `what` when no CUDA device exists). `local_rank` picks the GPU of one process of a multi-GPU run."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if name not in ("auto", "cuda") and not name.startswith("cuda:"):
        raise UserError(f"{what}: must be one of {', '.join(DEVICE_CHOICES)} (or cuda:N), got {name!r}")
    if not torch.cuda.is_available():
        raise UserError(f"{what} {name}: no CUDA device is available here")
    if local_rank is not None:
        return torch.device("cuda", local_rank)
    return torch.device(name if name != "auto" else "cuda")
