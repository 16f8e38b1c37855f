"""FID: Fréchet distance against hand-computed values, streaming statistics, the Inception loader
(plain state dicts only), and FID VIS/NIR at the loop's snapshots with a small stand-in feature network."""

import json
import math

import pytest
import torch

from facegen.engine.storage import Storage
from facegen.engine.training import inception
from facegen.engine.training.context import local_context
from facegen.engine.training.fid import FeatureStats, FidMetric, frechet_distance, kernel_inception_distance, stats_of
from facegen.engine.training.inception import FIDInceptionV3, load_fid_inception
from facegen.engine.training.loop import Trainer
from facegen.engine.training.spec import MetricsSpec, build_train_spec
from facegen.models.errors import UserError
from tests.engine.training_tiny import make_dataset, tiny_tree


def test_frechet_distance_hand_values():
    # 1-D: (0 - 2)^2 + 1 + 4 - 2 sqrt(1 * 4) = 5
    assert frechet_distance(torch.tensor([0.0]), torch.tensor([[1.0]]), torch.tensor([2.0]),
                            torch.tensor([[4.0]])) == pytest.approx(5.0)
    # diag(1, 4) vs diag(4, 1), equal means: 5 + 5 - 2 (2 + 2) = 2
    assert frechet_distance(torch.zeros(2), torch.diag(torch.tensor([1.0, 4.0])), torch.zeros(2),
                            torch.diag(torch.tensor([4.0, 1.0]))) == pytest.approx(2.0)
    sigma = torch.tensor([[2.0, 0.5], [0.5, 1.0]])
    assert frechet_distance(torch.ones(2), sigma, torch.ones(2), sigma) == pytest.approx(0.0, abs=1e-9)


def test_feature_stats_are_exact_and_streaming():
    stats = FeatureStats()
    stats.add(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
    stats.add(torch.tensor([[0.0, 2.0], [0.0, -2.0]]))
    mean, cov = stats.mean_cov()
    assert mean.tolist() == [0.0, 0.0]
    assert torch.allclose(cov, torch.tensor([[2 / 3, 0.0], [0.0, 8 / 3]], dtype=torch.float64))


class ChannelMoments(torch.nn.Module):
    """A tiny stand-in feature network: per-channel mean and standard deviation (6 features)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append((x.shape[1], float(x.min()), float(x.max())))
        return torch.cat([x.mean([2, 3]), x.std([2, 3])], 1)


def test_fid_of_identical_sets_is_zero_and_nir_goes_through_as_three_channels():
    torch.manual_seed(0)
    vis = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    nir = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8)
    net = ChannelMoments()
    a = stats_of([(vis[:8], nir[:8]), (vis[8:], nir[8:])], net)
    b = stats_of([(vis, nir)], net)
    for sa, sb in zip(a, b):
        assert frechet_distance(*sa.mean_cov(), *sb.mean_cov()) == pytest.approx(0.0, abs=1e-9)
    assert {s[0] for s in net.seen} == {3} and min(s[1] for s in net.seen) >= 0 and max(s[2] for s in net.seen) <= 1


def test_inception_loader_round_trip_and_refusals(tmp_path):
    torch.manual_seed(0)
    model = FIDInceptionV3().eval()
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "pt_inception.pth")
    loaded = load_fid_inception(tmp_path / "pt_inception.pth")
    x = torch.rand(1, 3, 16, 16)
    assert torch.equal(loaded(x), model(x)) and loaded(x).shape == (1, 2048)

    torch.save({k: v for k, v in state.items() if not k.startswith("Mixed_7c")}, tmp_path / "partial.pth")
    with pytest.raises(UserError, match=r"partial.pth: not the FID Inception-v3 \(missing \['Mixed_7c"):
        load_fid_inception(tmp_path / "partial.pth")
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(tmp_path / "scripted.pt"))
    with pytest.raises(UserError, match="scripted.pt: not a plain state dict"):
        load_fid_inception(tmp_path / "scripted.pt")
    with pytest.raises(UserError, match="missing.pth: file not found"):
        load_fid_inception(tmp_path / "missing.pth")


def test_fid_vis_and_nir_at_network_snapshots(tmp_path, monkeypatch):
    data = make_dataset(tmp_path / "data")
    monkeypatch.setattr(inception, "load_fid_inception", lambda path: ChannelMoments())
    tree = tiny_tree(data, tmp_path, metrics={"fid_weights": "stand-in", "fid_images": 8, "fid_batch": 4,
                                              "names": ["fid50k_full", "kid50k_full"]},
                     config={"kimg": 0.012}, schedule={"snap": 1})
    spec = build_train_spec(tree)
    run = Storage(str(tmp_path / "00000-fid"))
    summary = Trainer(spec, local_context(run, torch.device("cpu")), run.uri).run()
    assert summary["snapshots"] == ["network-snapshot-000000"] * 2
    results = json.loads((tmp_path / "00000-fid" / "metric-network-snapshot-000000.json").read_text())
    assert set(results) == {"fid50k_full_vis", "fid50k_full_nir", "kid50k_full_vis", "kid50k_full_nir"}
    assert all(math.isfinite(v) for v in results.values()) and results["fid50k_full_vis"] >= 0
    stats = [json.loads(line) for line in (tmp_path / "00000-fid" / "stats.jsonl").read_text().splitlines()]
    assert [round(e["Metrics/fid50k_full_nir"]["mean"], 9) for e in stats][-1] == round(results["fid50k_full_nir"], 9)
    assert "Metrics: fid50k_full, kid50k_full (VIS and NIR) at network snapshots" in (
        tmp_path / "00000-fid" / "log.txt").read_text()


def test_fid_metric_evaluate_uses_every_real_pair_once(tmp_path):
    data = make_dataset(tmp_path / "data")
    from facegen.engine.training.data import open_training_data
    from tests.models.stylegan_fixtures import tiny_generator

    dataset = open_training_data(str(data), mirror=True)
    net = ChannelMoments()
    metric = FidMetric(MetricsSpec(fid_images=6, fid_batch=4), torch.device("cpu"), features=net)
    conditions = torch.as_tensor(dataset.conditions)
    first = metric.evaluate(tiny_generator(0), dataset, conditions)
    reals = sum(1 for _ in net.seen)  # 12 pairs (not the 24 mirrored items): 3 batches x VIS+NIR, + fakes
    assert metric._real[12][0].count == 12 and metric._real[12][1].count == 12
    assert reals == 3 * 2 + 2 * 2
    assert metric.evaluate(tiny_generator(0), dataset, conditions) == first  # seeded fakes, cached reals


def test_kid_matches_the_published_formula_written_out():
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(30, 6, generator=g), torch.randn(20, 6, generator=g) + 0.5
    subsets, m, d = 7, 10, 6
    got = kernel_inception_distance(real, fake, num_subsets=subsets, max_subset_size=m, seed=3)
    # The same subsets, drawn the same way; the MMD² as pairwise sums over i != j (upstream's a.sum() - diag).
    pick = torch.Generator().manual_seed(3)
    k = lambda a, b: (float(a.double() @ b.double()) / d + 1) ** 3  # noqa: E731
    total = 0.0
    for _ in range(subsets):
        x = fake[torch.randperm(20, generator=pick)[:m]]
        y = real[torch.randperm(30, generator=pick)[:m]]
        within = sum(k(x[i], x[j]) + k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
        across = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
        total += within / (m - 1) - across * 2 / m
    assert got == pytest.approx(total / subsets / m, rel=1e-9) and got > 0  # shifted fakes: a positive distance
