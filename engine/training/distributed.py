"""The few collectives the training loop needs, as no-ops when it runs alone.

The host (Ray Train, or a test) initialises `torch.distributed` (gloo on CPU, NCCL on GPU); the loop
only calls these. Gradients are averaged DDP-style: one all-reduce of the flattened gradients per
optimiser step.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def active(world_size: int) -> bool:
    return world_size > 1 and dist.is_available() and dist.is_initialized()


def average_gradients(params: list[torch.nn.Parameter], world_size: int) -> None:
    """Mean of each parameter's gradient over the ranks (a missing gradient counts as zero)."""
    if not active(world_size) or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size
    for p, g in zip(params, flat.split([q.numel() for q in params])):
        p.grad = g.view_as(p)


def all_reduce_sum_(tensor: torch.Tensor, world_size: int) -> torch.Tensor:
    if active(world_size):
        dist.all_reduce(tensor)
    return tensor


def any_rank(flag: bool, world_size: int, device: torch.device) -> bool:
    """True on every rank if it is true on any (keeps rank-dependent decisions in step)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    return bool(all_reduce_sum_(t, world_size).item() > 0)


def broadcast_object(obj: Any, world_size: int, src: int = 0) -> Any:
    if not active(world_size):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any, world_size: int) -> list[Any]:
    """Every rank's `obj`, in rank order (on every rank)."""
    if not active(world_size):
        return [obj]
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(world_size: int) -> None:
    if active(world_size):
        dist.barrier()

