"""FID and KID for VIS and NIR (the original reports its metrics for both), computed at network snapshots.

FID = ‖μ_r − μ_g‖² + tr(Σ_r + Σ_g − 2 (Σ_r Σ_g)^½), with tr((Σ_r Σ_g)^½) = Σ √λ_i(Σ_r Σ_g) (the
product of two covariance matrices has real, non-negative eigenvalues), in float64 — no scipy.
KID is StyleGAN2-ADA's `kernel_inception_distance.py`: the unbiased MMD² with the cubic polynomial
kernel k(x, y) = (x·y/d + 1)³, averaged over 100 random subsets of up to 1000 features per side.
Metric names as StyleGAN2-ADA's: `*_full` uses every training pair, `fid50k`/`kid50k` the first 50000;
each generates `fid_images` (50000) fakes. Results are named `<metric>_vis` and `<metric>_nir`.
Real statistics cover the training pairs once each (no mirrored copies) and are computed once per run;
fakes are `fid_images` G_ema samples with features of random training images as conditions,
`noise_mode='const'`, from their own seeded generator (the training RNG stream is left untouched).
NIR images are repeated to three channels for the RGB feature network.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from facegen.models.generator import images_to_uint8

FeatureFn = Callable[[torch.Tensor], torch.Tensor]  # float images in [0, 1], [N, 3, H, W] -> [N, D]


METRICS = {  # name -> (kind, most real pairs used; None = all)
    "fid50k_full": ("fid", None), "fid50k": ("fid", 50000),
    "kid50k_full": ("kid", 1000000), "kid50k": ("kid", 50000),
}


class FeatureStats:
    """Streaming mean and covariance of feature vectors (float64); `keep=True` also keeps the features
    (float32), which KID needs."""

    def __init__(self, keep: bool = False) -> None:
        self.count = 0
        self.total: torch.Tensor | None = None
        self.outer: torch.Tensor | None = None
        self.kept: list[torch.Tensor] | None = [] if keep else None

    @property
    def features(self) -> torch.Tensor:
        return torch.cat(self.kept)

    def add(self, features: torch.Tensor) -> None:
        if self.kept is not None:
            self.kept.append(features.detach().to("cpu", torch.float32))
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


def kernel_inception_distance(real: torch.Tensor, fake: torch.Tensor, num_subsets: int = 100,
                              max_subset_size: int = 1000, seed: int = 0) -> float:
    """StyleGAN2-ADA's KID: mean over subsets of the unbiased MMD² with k(x, y) = (x·y/d + 1)³ (float64)."""
    real, fake = real.to(torch.float64), fake.to(torch.float64)
    d = real.shape[1]
    m = min(real.shape[0], fake.shape[0], max_subset_size)
    if m < 2:
        raise ValueError("KID needs at least 2 images per side")
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(num_subsets):  # one subset per iteration: [m, d] matmuls, as upstream
        x = fake[torch.randperm(fake.shape[0], generator=g)[:m]]
        y = real[torch.randperm(real.shape[0], generator=g)[:m]]
        a = (x @ x.T / d + 1) ** 3 + (y @ y.T / d + 1) ** 3
        b = (x @ y.T / d + 1) ** 3
        total += float((a.sum() - a.diagonal().sum()) / (m - 1) - b.sum() * 2 / m)
    return total / num_subsets / m


def _as_rgb01(images_uint8: torch.Tensor) -> torch.Tensor:
    x = images_uint8.to(torch.float32) / 255
    return x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x


def stats_of(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], features: FeatureFn, keep: bool = False
             ) -> tuple[FeatureStats, FeatureStats]:
    """(VIS stats, NIR stats) of uint8 (vis [N,3,H,W], nir [N,1,H,W]) batches."""
    vis_stats, nir_stats = FeatureStats(keep), FeatureStats(keep)
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
    """The spec's metrics (FID, KID) for VIS and NIR of a generator against the training set."""

    def __init__(self, metrics_spec, device: torch.device, features: FeatureFn | None = None) -> None:
        self.spec, self.device = metrics_spec, device
        self.names = tuple(metrics_spec.names)
        self.keep = any(METRICS[n][0] == "kid" for n in self.names)
        if features is None:
            from facegen.engine.training.inception import load_fid_inception

            net = load_fid_inception(metrics_spec.fid_weights).to(device)
            features = lambda x: net(x.to(device))  # noqa: E731
        self.features = features
        self._real: dict[int, tuple[FeatureStats, FeatureStats]] = {}  # by the number of real pairs

    def _reals(self, data, limit: int | None) -> tuple[FeatureStats, FeatureStats]:
        count = data.num_samples if limit is None else min(limit, data.num_samples)
        if count not in self._real:
            self._real[count] = stats_of(real_batches(data, count, self.spec.fid_batch), self.features, self.keep)
        return self._real[count]

    def evaluate(self, G: torch.nn.Module, data, conditions: torch.Tensor, seed: int = 0) -> dict[str, float]:
        """{`<metric>_vis`, `<metric>_nir`} for every named metric; one set of fakes serves them all."""
        fakes = stats_of(fake_batches(G, conditions, self.spec.fid_images, self.spec.fid_batch, seed, self.device),
                         self.features, self.keep)
        out = {}
        for name in self.names:
            kind, limit = METRICS[name]
            reals = self._reals(data, limit)
            for side, real, fake in (("vis", reals[0], fakes[0]), ("nir", reals[1], fakes[1])):
                out[f"{name}_{side}"] = (frechet_distance(*real.mean_cov(), *fake.mean_cov()) if kind == "fid"
                                         else kernel_inception_distance(real.features, fake.features, seed=seed))
        return out
