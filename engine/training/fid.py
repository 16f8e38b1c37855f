"""FID for VIS and NIR (SPEC §3: the original reports both), computed at network snapshots.

FID = ‖μ_r − μ_g‖² + tr(Σ_r + Σ_g − 2 (Σ_r Σ_g)^½), with tr((Σ_r Σ_g)^½) = Σ √λ_i(Σ_r Σ_g) (the
product of two covariance matrices has real, non-negative eigenvalues), in float64 — no scipy.
Real statistics cover every training pair once (no mirrored copies) and are computed once per run;
fakes are `fid_images` G_ema samples with features of random training images as conditions,
`noise_mode='const'`, from their own seeded generator (the training RNG stream is left untouched).
NIR images are repeated to three channels for the RGB feature network.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from facegen.models.generator import images_to_uint8

FeatureFn = Callable[[torch.Tensor], torch.Tensor]  # float images in [0, 1], [N, 3, H, W] -> [N, D]


class FeatureStats:
    """Streaming mean and covariance of feature vectors (float64)."""

    def __init__(self) -> None:
        self.count = 0
        self.total: torch.Tensor | None = None
        self.outer: torch.Tensor | None = None

    def add(self, features: torch.Tensor) -> None:
        f = features.detach().to("cpu", torch.float64)
        if self.total is None:
            self.total, self.outer = torch.zeros(f.shape[1], dtype=torch.float64), torch.zeros(
                f.shape[1], f.shape[1], dtype=torch.float64)
        self.count += f.shape[0]
        self.total += f.sum(0)
        self.outer += f.T @ f

    def mean_cov(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.count < 2:
            raise ValueError("FID needs at least 2 images per side")
        mean = self.total / self.count
        cov = (self.outer - self.count * torch.outer(mean, mean)) / (self.count - 1)
        return mean, cov


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    mu1, mu2, sigma1, sigma2 = (t.to(torch.float64) for t in (mu1, mu2, sigma1, sigma2))
    eigenvalues = torch.linalg.eigvals(sigma1 @ sigma2).real.clamp(min=0)
    trace_sqrt = eigenvalues.sqrt().sum()
    return float((mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt)


def _as_rgb01(images_uint8: torch.Tensor) -> torch.Tensor:
    x = images_uint8.to(torch.float32) / 255
    return x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x


def stats_of(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], features: FeatureFn
             ) -> tuple[FeatureStats, FeatureStats]:
    """(VIS stats, NIR stats) of uint8 (vis [N,3,H,W], nir [N,1,H,W]) batches."""
    vis_stats, nir_stats = FeatureStats(), FeatureStats()
    with torch.no_grad():
        for vis, nir in batches:
            vis_stats.add(features(_as_rgb01(vis)))
            nir_stats.add(features(_as_rgb01(nir)))
    return vis_stats, nir_stats


def real_batches(data: torch.utils.data.Dataset, num_samples: int, batch: int):
    for start in range(0, num_samples, batch):
        items = [data[i] for i in range(start, min(start + batch, num_samples))]
        yield torch.stack([it[0] for it in items]), torch.stack([it[1] for it in items])


def fake_batches(G: torch.nn.Module, conditions: torch.Tensor, num_images: int, batch: int, seed: int,
                 device: torch.device):
    g = torch.Generator().manual_seed(seed)
    for start in range(0, num_images, batch):
        n = min(batch, num_images - start)
        z = torch.randn([n, G.z_dim], generator=g).to(device)
        c = conditions[torch.randint(len(conditions), [n], generator=g).to(conditions.device)].to(device)
        vis, nir = G(z, c, noise_mode="const")
        yield images_to_uint8(vis), images_to_uint8(nir)


class FidMetric:
    """FID VIS and NIR of a generator against the training set, with a given feature network."""

    def __init__(self, metrics_spec, device: torch.device, features: FeatureFn | None = None) -> None:
        self.spec, self.device = metrics_spec, device
        if features is None:
            from facegen.engine.training.inception import load_fid_inception

            net = load_fid_inception(metrics_spec.fid_weights).to(device)
            features = lambda x: net(x.to(device))  # noqa: E731
        self.features = features
        self._real: tuple[FeatureStats, FeatureStats] | None = None

    def evaluate(self, G: torch.nn.Module, data, conditions: torch.Tensor, seed: int = 0) -> dict[str, float]:
        if self._real is None:
            self._real = stats_of(real_batches(data, data.num_samples, self.spec.fid_batch), self.features)
        fakes = stats_of(fake_batches(G, conditions, self.spec.fid_images, self.spec.fid_batch, seed, self.device),
                         self.features)
        out = {}
        for name, real, fake in (("fid_vis", self._real[0], fakes[0]), ("fid_nir", self._real[1], fakes[1])):
            out[name] = frechet_distance(*real.mean_cov(), *fake.mean_cov())
        return out
