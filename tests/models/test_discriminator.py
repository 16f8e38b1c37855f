"""Discriminators: StyleGAN2-ADA names and counts, resnet/projection math written out by hand."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

import facegen.models.discriminator as discriminator_module
from facegen.models.discriminator import Discriminator, DiscriminatorConfig, MinibatchStdLayer
from facegen.models.errors import UserError
from facegen.models.ops import normalize_2nd_moment, setup_filter, upfirdn2d

TINY = dict(img_resolution=16, channel_base=128, channel_max=16, mapping_layers=2)


def tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    return Discriminator(DiscriminatorConfig(**{**TINY, **overrides})).requires_grad_(False)


def expected_param_count(res, base, cmax, img, c_dim, mapping_layers=8, mbstd=1):
    """resnet D counted block by block from the architecture (StyleGAN2-ADA's resnet D)."""
    ch = lambda r: min(base // r, cmax)  # noqa: E731
    conv = lambda i, o, k, bias=True: i * o * k * k + (o if bias else 0)  # noqa: E731
    total = 0
    for r in [2**i for i in range(int(math.log2(res)), 2, -1)]:
        t, o = ch(r), ch(r // 2)
        total += conv(img, t, 1) if r == res else 0  # fromrgb
        total += conv(t, t, 3) + conv(t, o, 3) + conv(t, o, 1, bias=False)  # conv0, conv1, skip
    c4 = ch(4)
    cmap = c4 if c_dim else 0
    total += conv(c4 + mbstd, c4, 3) + (16 * c4 * c4 + c4) + (c4 * (cmap or 1) + (cmap or 1))  # conv, fc, out
    if c_dim:
        total += c_dim * cmap + cmap + mapping_layers * (cmap * cmap + cmap)  # embed, fc0..7
    return total


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def test_param_counts_at_256():
    vis = Discriminator(DiscriminatorConfig(c_dim=512, img_channels=3))
    nir = Discriminator(DiscriminatorConfig(c_dim=0, img_channels=1))
    assert n_params(vis) == expected_param_count(256, 16384, 512, 3, 512) == 26_627_136
    assert n_params(nir) == expected_param_count(256, 16384, 512, 1, 0) == 24_000_961
    assert expected_param_count(256, 16384, 512, 3, 0) == 24_001_089  # StyleGAN2-ADA paper256 D


def test_state_dict_names_conditional_and_unconditional():
    conv = {"weight", "bias", "resample_filter"}
    want = {"b16.resample_filter", "b8.resample_filter"}
    want |= {f"b16.fromrgb.{p}" for p in conv}
    for r in (16, 8):
        want |= {f"b{r}.{layer}.{p}" for layer in ("conv0", "conv1") for p in conv}
        want |= {f"b{r}.skip.weight", f"b{r}.skip.resample_filter"}
    want |= {f"b4.conv.{p}" for p in conv} | {f"b4.{fc}.{p}" for fc in ("fc", "out") for p in ("weight", "bias")}
    assert set(tiny(c_dim=0, img_channels=1).state_dict()) == want
    mapping = {f"mapping.{fc}.{p}" for fc in ("embed", "fc0", "fc1") for p in ("weight", "bias")}
    sd = tiny(c_dim=8).state_dict()
    assert set(sd) == want | mapping
    assert sd["mapping.embed.weight"].shape == (16, 8) and sd["b4.out.weight"].shape == (16, 16)
    assert sd["b4.conv.weight"].shape == (16, 17, 3, 3) and sd["b16.fromrgb.weight"].shape == (8, 3, 1, 1)


def test_output_shapes_and_condition_use():
    vis_d, nir_d = tiny(c_dim=8), tiny(c_dim=0, img_channels=1)
    img = torch.randn(4, 3, 16, 16)
    c1, c2 = torch.randn(4, 8), torch.randn(4, 8)
    assert vis_d(img, c1).shape == (4, 1) and nir_d(torch.randn(4, 1, 16, 16)).shape == (4, 1)
    assert not torch.allclose(vis_d(img, c1), vis_d(img, c2))
    with pytest.raises(ValueError, match="img must be"):
        vis_d(torch.randn(4, 1, 16, 16), c1)


def test_projection_logit_is_scaled_dot_product_with_cmap():
    D = tiny(c_dim=8, cmap_dim=6)
    captured = {}
    D.b4.out.register_forward_hook(lambda m, i, o: captured.setdefault("out", o))
    img, c = torch.randn(2, 3, 16, 16), torch.randn(2, 8)
    logits = D(img, c)
    m = D.mapping
    x = normalize_2nd_moment(c @ m.embed.weight.T / math.sqrt(8) + m.embed.bias)
    for fc in (m.fc0, m.fc1):  # lr multiplier 0.01 on weight and bias, lrelu * sqrt(2)
        x = F.leaky_relu(x @ fc.weight.T * (0.01 / math.sqrt(6)) + fc.bias * 0.01, 0.2) * math.sqrt(2)
    assert captured["out"].shape == (2, 6)
    torch.testing.assert_close(logits, (captured["out"] * x).sum(1, keepdim=True) / math.sqrt(6))


def test_minibatch_stddev_hand_computed():
    x = torch.arange(4 * 2 * 1 * 2, dtype=torch.float32).reshape(4, 2, 1, 2) ** 1.5
    y = MinibatchStdLayer(group_size=2)(x)
    assert y.shape == (4, 3, 1, 2) and torch.equal(y[:, :2], x)
    for i in range(4):  # upstream groups sample i with i +- n/G: here {0, 2} and {1, 3}
        a, b = x[i % 2], x[i % 2 + 2]
        std = ((a - b).square() / 4 + 1e-8).sqrt()  # population std of two values = |a - b| / 2
        torch.testing.assert_close(y[i, 2], torch.full((1, 2), std.mean().item()))
    with pytest.raises(ValueError, match="not a multiple"):
        MinibatchStdLayer(group_size=4)(torch.randn(6, 2, 1, 1))


def test_resnet_discriminator_matches_hand_written_math():
    """An 8x8 unconditional resnet D written out with plain conv2d / upfirdn2d."""
    D = tiny(img_resolution=8, c_dim=0, mbstd_group_size=2)
    img = torch.randn(4, 3, 8, 8)
    f = setup_filter()
    b, e = D.b8, D.b4

    def conv(layer, x, k, stride=1, act=True, gain=1.0, clamp=256.0):
        w = layer.weight / math.sqrt(layer.weight[0].numel())
        y = F.conv2d(x, w, stride=stride, padding=k // 2 if stride == 1 else 0)
        y = y + layer.bias.reshape(1, -1, 1, 1) if layer.bias is not None else y
        y = F.leaky_relu(y, 0.2) * math.sqrt(2) * gain if act else y * gain
        return y.clamp(-clamp * gain, clamp * gain) if clamp else y

    x = conv(b.fromrgb, img, 1)
    skip = conv(b.skip, upfirdn2d(x, f, down=2, padding=1), 1, act=False, gain=math.sqrt(0.5), clamp=None)
    h = conv(b.conv0, x, 3)
    h = conv(b.conv1, upfirdn2d(h, f, padding=2), 3, stride=2, gain=math.sqrt(0.5))
    x = skip + h
    groups = x.reshape(2, 2, -1)  # [G, n, C*H*W]
    std = (groups.var(dim=0, unbiased=False) + 1e-8).sqrt().mean(dim=1)  # [n]
    x = torch.cat([x, std.repeat(2).reshape(4, 1, 1, 1).expand(4, 1, 4, 4)], dim=1)
    x = conv(e.conv, x, 3).flatten(1)
    x = F.leaky_relu(x @ e.fc.weight.T / math.sqrt(x.shape[1]) + e.fc.bias, 0.2) * math.sqrt(2)
    want = x @ e.out.weight.T / math.sqrt(x.shape[1]) + e.out.bias
    torch.testing.assert_close(D(img), want, rtol=1e-5, atol=1e-5)


def test_freeze_layers_keeps_names_and_freezes_first_layers():
    D = tiny(c_dim=0, freeze_layers=2)
    frozen = {n for n, _ in D.named_buffers() if n.endswith((".weight", ".bias"))}
    assert frozen == {"b16.fromrgb.weight", "b16.fromrgb.bias", "b16.conv0.weight", "b16.conv0.bias"}
    assert set(D.state_dict()) == set(tiny(c_dim=0).state_dict())
    tiny(c_dim=0).load_state_dict(D.state_dict(), strict=True)


@pytest.mark.parametrize("architecture", ["skip", "orig"])
def test_other_architectures(architecture):
    D = tiny(c_dim=8, architecture=architecture)
    names = set(D.state_dict())
    assert ("b8.fromrgb.weight" in names) == (architecture == "skip")
    assert ("b4.fromrgb.weight" in names) == (architecture == "skip")
    assert not any(".skip." in n for n in names)
    assert D(torch.randn(2, 3, 16, 16), torch.randn(2, 8)).shape == (2, 1)


def test_input_gradient_for_r1():
    D = tiny(c_dim=8).requires_grad_(True)
    img = torch.randn(2, 3, 16, 16, requires_grad=True)
    (grad,) = torch.autograd.grad(D(img, torch.randn(2, 8)).sum(), img, create_graph=True)
    assert grad.shape == img.shape and grad.abs().sum() > 0
    grad.square().sum().backward()
    assert D.b16.conv0.weight.grad is not None


def test_fp16_blocks_close_to_fp32(monkeypatch):
    D = tiny(c_dim=8, num_fp16_res=2)
    img, c = torch.randn(2, 3, 16, 16), torch.randn(2, 8)
    ref = D(img, c)
    monkeypatch.setattr(discriminator_module, "fp16_supported", lambda device: True)
    out = D(img, c)
    assert out.dtype == torch.float32 and not torch.equal(out, ref)
    torch.testing.assert_close(out, ref, rtol=0, atol=0.02 * max(1.0, ref.abs().max().item()))
    assert torch.equal(D(img, c, force_fp32=True), ref)


def test_config_round_trip_and_errors():
    cfg = DiscriminatorConfig(**TINY, c_dim=8, cmap_dim=4, mbstd_group_size=None)
    assert DiscriminatorConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(UserError, match=r"unknown keys \['epilogue_kwargs'\]"):
        DiscriminatorConfig.from_dict({"epilogue_kwargs": {}})
    with pytest.raises(UserError, match="discriminator.architecture"):
        DiscriminatorConfig(architecture="stylegan3")
    with pytest.raises(UserError, match="discriminator.img_resolution"):
        DiscriminatorConfig(img_resolution=4)
    with pytest.raises(UserError, match="discriminator.mbstd_group_size"):
        DiscriminatorConfig.from_dict({"mbstd_group_size": 0})
