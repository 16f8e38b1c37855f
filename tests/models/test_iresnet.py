"""iResNet matches insightface arcface_torch (structure, key names, parameter counts); .pth importer."""

import pickle

import pytest
import torch
import torch.nn.functional as F

from facegen.models.errors import UserError
from facegen.models.importers.insightface import load_insightface_pth
from facegen.models.iresnet import DEPTH_LAYERS, IResNet, IResNetConfig, iresnet_config_from_state_dict

TINY = dict(base_width=8, embedding_dim=16, input_size=32)


def expected_param_count(layers, width=64, embedding_dim=512, side=7):
    """Parameters of insightface's iResNet, counted by hand from its architecture."""
    planes = [width, 2 * width, 4 * width, 8 * width]
    bn, prelu = 2, 1  # per channel: BN weight + bias; PReLU slope
    count = 3 * width * 9 + bn * width + prelu * width  # stem conv3x3, bn1, prelu
    inplanes = width
    for units, out in zip(layers, planes):
        for unit in range(units):
            cin = inplanes if unit == 0 else out
            count += bn * cin + cin * out * 9 + bn * out + prelu * out + out * out * 9 + bn * out
            if unit == 0:
                count += cin * out + bn * out  # downsample conv1x1 + BN
        inplanes = out
    head = bn * planes[-1] + planes[-1] * side * side * embedding_dim + embedding_dim + bn * embedding_dim
    return count + head


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("depth", [18, 50, 100])
def test_param_count_matches_insightface(depth):
    model = IResNet(IResNetConfig(depth=depth))
    assert n_params(model) == expected_param_count(DEPTH_LAYERS[depth])


def test_param_counts_known_values():
    # r50: 43,590,848, as printed for insightface's iresnet50; r100: the well-known ~65.2M.
    assert expected_param_count(DEPTH_LAYERS[50]) == 43_590_848
    assert expected_param_count(DEPTH_LAYERS[18]) == 24_025_600
    assert abs(expected_param_count(DEPTH_LAYERS[100]) / 1e6 - 65.2) < 0.05


def spec_keys_r18():
    """State-dict keys in insightface's order (arcface_torch backbones/iresnet.py)."""

    def bn(prefix):
        return [
            f"{prefix}.{n}" for n in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
        ]

    keys = ["conv1.weight", *bn("bn1"), "prelu.weight"]
    for stage in range(1, 5):
        for unit in range(2):
            p = f"layer{stage}.{unit}"
            keys += [*bn(f"{p}.bn1"), f"{p}.conv1.weight", *bn(f"{p}.bn2"), f"{p}.prelu.weight"]
            keys += [f"{p}.conv2.weight", *bn(f"{p}.bn3")]
            if unit == 0:
                keys += [f"{p}.downsample.0.weight", *bn(f"{p}.downsample.1")]
    return keys + [*bn("bn2"), "fc.weight", "fc.bias", *bn("features")]


def test_r18_state_dict_keys_and_shapes():
    sd = IResNet(IResNetConfig(depth=18)).state_dict()
    assert list(sd) == spec_keys_r18()
    assert sd["fc.weight"].shape == (512, 512 * 7 * 7)
    assert sd["conv1.weight"].shape == (64, 3, 3, 3)
    assert sd["layer4.0.downsample.0.weight"].shape == (512, 256, 1, 1)
    assert sd["layer2.1.conv2.weight"].shape == (128, 128, 3, 3)


def test_bn_eps_and_fixed_embedding_scale():
    model = IResNet(IResNetConfig(depth=18, **TINY))
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(norms) == 1 + 4 * 2 * 3 + 4 + 1 + 1  # stem, 3 per unit, downsamples, bn2, features
    assert {m.eps for m in norms} == {1e-5}
    assert torch.equal(model.features.weight, torch.ones(16))
    assert model.features.weight.requires_grad is False


def randomise_bn(model, seed=0):
    """Non-trivial BN statistics, so eval-mode tests exercise the running stats."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            if m is not getattr(model, "features", None):
                m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model


def test_block_computes_the_insightface_sequence():
    torch.manual_seed(0)
    model = randomise_bn(IResNet(IResNetConfig(depth=18, **TINY))).eval()
    block = model.layer2[0]
    x = torch.randn(2, 8, 16, 16)

    def bn(m, t):
        return F.batch_norm(t, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)

    out = bn(block.bn2, F.conv2d(bn(block.bn1, x), block.conv1.weight, padding=1))
    out = bn(block.bn3, F.conv2d(F.prelu(out, block.prelu.weight), block.conv2.weight, stride=2, padding=1))
    shortcut = bn(block.downsample[1], F.conv2d(x, block.downsample[0].weight, stride=2))
    with torch.no_grad():
        assert torch.allclose(block(x), out + shortcut, atol=1e-5)  # no activation after the add


def test_forward_shape_and_resolution_path():
    torch.manual_seed(0)
    model = IResNet(IResNetConfig(depth=18, base_width=8, embedding_dim=24, input_size=48)).eval()
    with torch.no_grad():
        out = model(torch.randn(3, 3, 48, 48))
    assert out.shape == (3, 24) and out.dtype == torch.float32
    assert model.fc.in_features == 64 * 3 * 3  # 8*base_width channels x (48/16)^2


def test_state_dict_round_trip():
    torch.manual_seed(0)
    a = randomise_bn(IResNet(IResNetConfig(depth=34, **TINY))).eval()
    torch.manual_seed(1)
    b = IResNet(IResNetConfig(depth=34, **TINY)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(a(x), b(x))
        b.load_state_dict(a.state_dict(), strict=True)
        assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("depth", sorted(DEPTH_LAYERS))
def test_config_inferred_from_state_dict(depth):
    config = IResNetConfig(depth=depth, base_width=8, embedding_dim=24, input_size=64)
    assert iresnet_config_from_state_dict(IResNet(config).state_dict()) == config


def test_config_inferred_full_width_r18():
    sd = IResNet(IResNetConfig(depth=18)).state_dict()
    assert iresnet_config_from_state_dict(sd) == IResNetConfig(depth=18)


def test_unknown_depth_names_the_counts():
    sd = IResNet(IResNetConfig(depth=18, **TINY)).state_dict()
    sd = {k: v for k, v in sd.items() if not k.startswith("layer3.1.")}
    with pytest.raises(UserError, match=r"units per stage \[2, 2, 1, 2\]"):
        iresnet_config_from_state_dict(sd)
    with pytest.raises(UserError, match="missing key 'fc.weight'"):
        iresnet_config_from_state_dict({"conv1.weight": torch.zeros(8, 3, 3, 3)})


def test_config_dict_round_trip_and_validation():
    config = IResNetConfig(depth=50, embedding_dim=256, input_size=96, base_width=32, dropout=0.2, fp16=True)
    assert IResNetConfig.from_dict(config.to_dict()) == config
    with pytest.raises(UserError, match=r"unknown keys \['width', 'zzz'\]"):
        IResNetConfig.from_dict({"depth": 18, "width": 64, "zzz": 1})
    with pytest.raises(UserError, match="iresnet.depth: 101"):
        IResNetConfig(depth=101)
    with pytest.raises(UserError, match="iresnet.input_size: 100"):
        IResNetConfig(input_size=100)


# ----------------------------------------------------------------------------- importer


def test_pth_round_trip(tmp_path):
    torch.manual_seed(0)
    model = randomise_bn(IResNet(IResNetConfig(depth=18, **TINY))).eval()
    path = tmp_path / "backbone.pth"
    torch.save(model.state_dict(), path)
    loaded = load_insightface_pth(path)
    assert loaded.config == model.config and not loaded.training
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_pth_without_bn_counters_and_with_ddp_prefix(tmp_path):
    torch.manual_seed(0)
    model = randomise_bn(IResNet(IResNetConfig(depth=18, **TINY))).eval()
    sd = {f"module.{k}": v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(sd, tmp_path / "ddp.pth")
    loaded = load_insightface_pth(tmp_path / "ddp.pth")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


class Payload:
    """Unpickling this would open (create) a file: weights_only must refuse it before that."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pth_refuses_pickled_objects(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as handle:
        pickle.dump(Payload(marker), handle, protocol=2)
    with pytest.raises(UserError, match=r"evil.pth: refused.*GLOBAL (io|builtins).open\)"):
        load_insightface_pth(path)
    assert not marker.exists()

    torch.save({"conv1.weight": torch.zeros(1), "meta": Payload(marker)}, tmp_path / "mixed.pth")
    with pytest.raises(UserError, match="mixed.pth: refused"):
        load_insightface_pth(tmp_path / "mixed.pth")
    assert not marker.exists()


def test_pth_refuses_bad_files(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(UserError, match="junk.pth: refused, not a plain tensor state dict"):
        load_insightface_pth(tmp_path / "junk.pth")
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    with pytest.raises(UserError, match="list.pth: expected a state dict"):
        load_insightface_pth(tmp_path / "list.pth")
    torch.save({"conv1.weight": torch.zeros(1), "epoch": 3}, tmp_path / "ints.pth")
    with pytest.raises(UserError, match=r"ints.pth: .*non-tensor entries \['epoch'\]"):
        load_insightface_pth(tmp_path / "ints.pth")
    with pytest.raises(UserError, match="missing.pth: insightface checkpoint not found"):
        load_insightface_pth(tmp_path / "missing.pth")


def test_pth_strict_load_reports_extra_keys(tmp_path):
    sd = IResNet(IResNetConfig(depth=18, **TINY)).state_dict()
    sd["head.weight"] = torch.zeros(3)
    torch.save(sd, tmp_path / "extra.pth")
    with pytest.raises(UserError, match=r"extra.pth: does not match an insightface iResNet-18.*head.weight"):
        load_insightface_pth(tmp_path / "extra.pth")
