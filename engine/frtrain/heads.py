"""Margin softmax heads with class centres split across ranks and sampled per step ("partial FC").

Follows insightface's `arcface_torch` (partial_fc_v2.py, losses.py): every rank holds the centres of
a contiguous range of classes; embeddings and labels of the whole global batch are all-gathered; each
rank takes the cosines of the global batch against its (sampled) centres, applies the margin to the
target logits it holds, and a softmax cross-entropy is computed across ranks (max and sum of
exponentials all-reduced). With `sample_rate < 1` each rank uses only a random subset of its centres
per step, always including every class present in the global batch (An et al., "Partial FC:
Training 10 Million Identities on a Single Machine", 2021). One rank and sample_rate 1: a plain FC.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

MARGINS = ("arcface", "cosface")


def class_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """(first class, count) held by `rank`: the first `num_classes % world_size` ranks get one more."""
    base, extra = divmod(num_classes, world_size)
    count = base + (rank < extra)
    return rank * base + min(rank, extra), count


def apply_margin(cosines: torch.Tensor, targets: torch.Tensor, margin: str, m: float, scale: float) -> torch.Tensor:
    """Scaled logits; target cosines (targets >= 0, a column index) get ArcFace cos(θ+m) or CosFace cos θ - m."""
    rows = torch.nonzero(targets >= 0).squeeze(1)
    cols = targets[rows]
    target = cosines[rows, cols]
    if margin == "arcface":
        # Where θ + m would pass π the cosine would rise again; insightface's "easy margin off" branch
        # keeps it monotonic with cos θ - m·sin m (ArcFace paper, Deng et al. 2019, section 3).
        theta = torch.acos(target.clamp(-1 + 1e-7, 1 - 1e-7))
        adjusted = torch.where(theta + m < math.pi, torch.cos(theta + m), target - m * math.sin(m))
    elif margin == "cosface":
        adjusted = target - m
    else:
        raise ValueError(f"margin: {margin!r} is not one of {MARGINS}")
    logits = cosines.index_put((rows, cols), adjusted)
    return logits * scale


def _active(world_size: int) -> bool:
    return world_size > 1 and dist.is_available() and dist.is_initialized()


class _AllGather(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient of this rank's slice (insightface AllGather)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, world_size: int) -> torch.Tensor:
        ctx.rank, ctx.size = dist.get_rank(), tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.size:(ctx.rank + 1) * ctx.size], None


def all_gather_with_grad(tensor: torch.Tensor, world_size: int) -> torch.Tensor:
    return _AllGather.apply(tensor, world_size) if _active(world_size) else tensor


def all_gather_labels(labels: torch.Tensor, world_size: int) -> torch.Tensor:
    if not _active(world_size):
        return labels
    parts = [torch.empty_like(labels) for _ in range(world_size)]
    dist.all_gather(parts, labels.contiguous())
    return torch.cat(parts)


class _DistCrossEntropy(torch.autograd.Function):
    """Softmax cross-entropy over logits whose columns are spread across ranks (insightface
    DistCrossEntropyFunc). targets: column on this rank, or -1 where the class lives elsewhere."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, world_size: int) -> torch.Tensor:
        active = _active(world_size)
        batch = logits.shape[0]
        probs = logits.detach().clone()
        if probs.shape[1]:
            top = probs.max(dim=1, keepdim=True).values
        else:  # this rank holds no centre this step
            top = torch.full((batch, 1), -1e30, device=logits.device)
        if active:
            dist.all_reduce(top, dist.ReduceOp.MAX)
        probs.sub_(top).exp_()
        total = probs.sum(dim=1, keepdim=True)
        if active:
            dist.all_reduce(total)
        probs.div_(total)
        rows = torch.nonzero(targets >= 0).squeeze(1)
        picked = torch.zeros(batch, device=logits.device, dtype=probs.dtype)
        picked[rows] = probs[rows, targets[rows]]
        if active:
            dist.all_reduce(picked)
        ctx.save_for_backward(probs, targets, rows)
        return -picked.clamp_min(1e-30).log().mean()

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        probs, targets, rows = ctx.saved_tensors
        grad = probs.clone()
        grad[rows, targets[rows]] -= 1.0
        return grad * (grad_loss / probs.shape[0]), None, None


class PartialFCHead(nn.Module):
    """This rank's class centres and the margin loss over the global batch (see the module docstring)."""

    def __init__(self, num_classes: int, embedding_dim: int, *, margin: str = "arcface", m: float = 0.5,
                 scale: float = 64.0, sample_rate: float = 1.0, rank: int = 0, world_size: int = 1,
                 seed: int = 0) -> None:
        super().__init__()
        if margin not in MARGINS:
            raise ValueError(f"margin: {margin!r} is not one of {MARGINS}")
        self.num_classes, self.margin, self.m, self.scale = num_classes, margin, m, scale
        self.rank, self.world_size = rank, world_size
        self.class_start, self.num_local = class_range(num_classes, rank, world_size)
        self.num_sample = max(1, int(sample_rate * self.num_local))
        self.sample_rate = sample_rate
        weight = torch.empty(num_classes, embedding_dim)
        nn.init.normal_(weight, 0, 0.01, generator=torch.Generator().manual_seed(seed))
        self.weight = nn.Parameter(weight[self.class_start:self.class_start + self.num_local].clone())
        self.sampler = torch.Generator().manual_seed(seed * 1000 + rank + 1)

    def sample(self, local_targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices of the centres used this step, targets remapped to them). Positives always stay."""
        held = local_targets >= 0
        positives = torch.unique(local_targets[held])
        if self.sample_rate >= 1 or self.num_sample <= positives.numel():
            index = positives if self.sample_rate < 1 else torch.arange(self.num_local)
        else:
            score = torch.rand(self.num_local, generator=self.sampler)
            score[positives.cpu()] = 2.0
            index = torch.topk(score, self.num_sample).indices.sort().values
        index = index.to(local_targets.device)
        remapped = local_targets.clone()
        remapped[held] = torch.searchsorted(index, local_targets[held])
        return index, remapped

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        everyone = all_gather_with_grad(embeddings.float(), self.world_size)
        all_labels = all_gather_labels(labels, self.world_size)
        local = all_labels - self.class_start
        local_targets = torch.where((local >= 0) & (local < self.num_local), local, torch.full_like(local, -1))
        index, targets = self.sample(local_targets)
        centres = self.weight if index.numel() == self.num_local else self.weight[index]
        cosines = F.linear(F.normalize(everyone), F.normalize(centres)).clamp(-1, 1)
        logits = apply_margin(cosines, targets, self.margin, self.m, self.scale)
        return _DistCrossEntropy.apply(logits, targets, self.world_size)
