"""Per-tick training statistics: accumulated on the device, reduced across ranks once per tick.

Values are added without a device sync (no `.item()` on the hot path); `reduce` returns
StyleGAN2-ADA's `stats.jsonl` entries `{name: {"num", "mean", "std"}}`.
"""

from __future__ import annotations

import torch

from facegen.engine.training.distributed import all_reduce_sum_


class TickStats:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._acc: dict[str, torch.Tensor] = {}

    def add(self, name: str, values: torch.Tensor) -> None:
        v = values.detach().reshape(-1).to(torch.float64)
        moments = torch.stack([torch.tensor(float(v.numel()), dtype=torch.float64, device=v.device),
                               v.sum(), v.square().sum()])
        if name in self._acc:
            self._acc[name] += moments
        else:
            self._acc[name] = moments

    def reduce(self, world_size: int) -> dict[str, dict[str, float]]:
        """Totals over all ranks since the last call (every rank must call it; names are identical)."""
        names = sorted(self._acc)
        if not names:
            return {}
        stacked = all_reduce_sum_(torch.stack([self._acc[n] for n in names]), world_size).cpu()
        self._acc.clear()
        out = {}
        for name, (num, total, squares) in zip(names, stacked.tolist()):
            mean = total / num if num else 0.0
            var = max(squares / num - mean * mean, 0.0) if num else 0.0
            out[name] = {"num": int(num), "mean": mean, "std": var**0.5}
        return out


def scalar(value: float) -> dict[str, float]:
    """A single value in the stats.jsonl entry format."""
    return {"num": 1, "mean": float(value), "std": 0.0}
