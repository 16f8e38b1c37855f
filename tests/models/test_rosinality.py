"""rosinality stylegan2-pytorch import: our converted Generator reproduces an independent reference.

`_reference_forward` is a compact re-statement of rosinality's `Generator.forward` (PixelNorm,
EqualLinear with fused lrelu, ModulatedConv2d with grouped per-sample weights, transposed-conv
upsampling + Blur, ToRGB with skip Upsample) written with its own math, not our modules.
"""

from __future__ import annotations

import argparse
import math
import os

import pytest
import torch
import torch.nn.functional as F

from facegen.models.errors import UnsafeCheckpointError, UserError
from facegen.models.importers.rosinality import load_rosinality
from tests.models.stylegan_fixtures import payload

SIZE, STYLE_DIM, N_MLP, LR_MLP = 32, 32, 3, 0.01
CHANNELS = {4: 32, 8: 32, 16: 16, 32: 8}
NUM_BLOCKS = int(math.log2(SIZE)) - 2


def _kernel(gain: float = 1.0) -> torch.Tensor:
    k = torch.tensor([1.0, 3.0, 3.0, 1.0])
    k = k[None, :] * k[:, None]
    return k / k.sum() * gain


def _conv_keys(sd, prefix, cin, cout, k, gen, upsample=False, demod_layer=True, style_dim=STYLE_DIM):
    sd[f"{prefix}.conv.weight"] = torch.randn(1, cout, cin, k, k, generator=gen)
    sd[f"{prefix}.conv.modulation.weight"] = torch.randn(cin, style_dim, generator=gen)
    sd[f"{prefix}.conv.modulation.bias"] = 1 + 0.1 * torch.randn(cin, generator=gen)
    if upsample:
        sd[f"{prefix}.conv.blur.kernel"] = _kernel(4.0)
    if demod_layer:
        sd[f"{prefix}.noise.weight"] = 0.3 * torch.randn(1, generator=gen)
        sd[f"{prefix}.activate.bias"] = 0.1 * torch.randn(cout, generator=gen)


def make_rosinality_state(seed: int = 0, size: int = SIZE, channels: dict[int, int] | None = None,
                          style_dim: int = STYLE_DIM, n_mlp: int = N_MLP) -> dict[str, torch.Tensor]:
    """Tensors with rosinality's names and shapes (random, as after training)."""
    channels = channels or CHANNELS
    num_blocks = int(math.log2(size)) - 2
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for i in range(1, n_mlp + 1):
        sd[f"style.{i}.weight"] = torch.randn(style_dim, style_dim, generator=gen) / LR_MLP
        sd[f"style.{i}.bias"] = 0.1 * torch.randn(style_dim, generator=gen)
    sd["input.input"] = torch.randn(1, channels[4], 4, 4, generator=gen)
    _conv_keys(sd, "conv1", channels[4], channels[4], 3, gen, style_dim=style_dim)
    _conv_keys(sd, "to_rgb1", channels[4], 3, 1, gen, demod_layer=False, style_dim=style_dim)
    sd["to_rgb1.bias"] = 0.1 * torch.randn(1, 3, 1, 1, generator=gen)
    cin = channels[4]
    for k in range(num_blocks):
        cout = channels[2 ** (k + 3)]
        _conv_keys(sd, f"convs.{2 * k}", cin, cout, 3, gen, upsample=True, style_dim=style_dim)
        _conv_keys(sd, f"convs.{2 * k + 1}", cout, cout, 3, gen, style_dim=style_dim)
        _conv_keys(sd, f"to_rgbs.{k}", cout, 3, 1, gen, demod_layer=False, style_dim=style_dim)
        sd[f"to_rgbs.{k}.bias"] = 0.1 * torch.randn(1, 3, 1, 1, generator=gen)
        sd[f"to_rgbs.{k}.upsample.kernel"] = _kernel(4.0)
        cin = cout
    for j in range(2 * num_blocks + 1):
        res = 2 ** ((j + 5) // 2)
        sd[f"noises.noise_{j}"] = torch.randn(1, 1, res, res, generator=gen)
    return sd


def _upfirdn(x, kernel, up=1, pad=(0, 0)):
    """Zero-insertion upsampling, (pad0, pad1) on both axes, true convolution with `kernel`."""
    n, c, h, w = x.shape
    if up > 1:
        y = x.new_zeros(n, c, h * up, w * up)
        y[:, :, ::up, ::up] = x
        x = y
    x = F.pad(x, (pad[0], pad[1], pad[0], pad[1]))
    weight = torch.flip(kernel, [0, 1]).expand(c, 1, *kernel.shape)
    return F.conv2d(x, weight, groups=c)


def _modulated(sd, prefix, x, w, demodulate, upsample):
    b, cin, h, width = x.shape
    weight = sd[f"{prefix}.conv.weight"]
    cout, k = weight.shape[1], weight.shape[-1]
    style = F.linear(w, sd[f"{prefix}.conv.modulation.weight"] / math.sqrt(STYLE_DIM),
                     sd[f"{prefix}.conv.modulation.bias"])
    wt = weight / math.sqrt(cin * k * k) * style.view(b, 1, cin, 1, 1)
    if demodulate:
        wt = wt * torch.rsqrt(wt.pow(2).sum([2, 3, 4]) + 1e-8).view(b, cout, 1, 1, 1)
    x = x.reshape(1, b * cin, h, width)
    if upsample:
        wt = wt.transpose(1, 2).reshape(b * cin, cout, k, k)
        out = F.conv_transpose2d(x, wt, stride=2, padding=0, groups=b)
        out = out.view(b, cout, *out.shape[2:])
        return _upfirdn(out, sd[f"{prefix}.conv.blur.kernel"], pad=(1, 1))
    out = F.conv2d(x, wt.reshape(b * cout, cin, k, k), padding=k // 2, groups=b)
    return out.view(b, cout, h, width)


def _styled_conv(sd, prefix, x, w, noise, upsample=False):
    out = _modulated(sd, prefix, x, w, True, upsample)
    out = out + sd[f"{prefix}.noise.weight"] * noise
    return F.leaky_relu(out + sd[f"{prefix}.activate.bias"].view(1, -1, 1, 1), 0.2) * math.sqrt(2)


def _to_rgb(sd, prefix, x, w, skip):
    out = _modulated(sd, prefix, x, w, False, False) + sd[f"{prefix}.bias"]
    if skip is not None:
        out = out + _upfirdn(skip, sd[f"{prefix}.upsample.kernel"], up=2, pad=(2, 1))
    return out


def _reference_mapping(sd, z):
    x = z * torch.rsqrt(z.pow(2).mean(dim=1, keepdim=True) + 1e-8)
    for i in range(1, N_MLP + 1):
        x = F.linear(x, sd[f"style.{i}.weight"] * (LR_MLP / math.sqrt(STYLE_DIM)))
        x = F.leaky_relu(x + sd[f"style.{i}.bias"] * LR_MLP, 0.2) * math.sqrt(2)
    return x


def _reference_synthesis(sd, latent):
    """rosinality Generator([latent], input_is_latent=True, randomize_noise=False); latent [N, n_latent, D]."""
    noise = [sd[f"noises.noise_{j}"] for j in range(2 * NUM_BLOCKS + 1)]
    out = sd["input.input"].repeat(latent.shape[0], 1, 1, 1)
    out = _styled_conv(sd, "conv1", out, latent[:, 0], noise[0])
    skip = _to_rgb(sd, "to_rgb1", out, latent[:, 1], None)
    i = 1
    for k in range(NUM_BLOCKS):
        out = _styled_conv(sd, f"convs.{2 * k}", out, latent[:, i], noise[2 * k + 1], upsample=True)
        out = _styled_conv(sd, f"convs.{2 * k + 1}", out, latent[:, i + 1], noise[2 * k + 2])
        skip = _to_rgb(sd, f"to_rgbs.{k}", out, latent[:, i + 2], skip)
        i += 2
    return skip


def _reference_forward(sd, z, truncation, latent_avg):
    """rosinality Generator([z], truncation, truncation_latent, randomize_noise=False)."""
    w = latent_avg + truncation * (_reference_mapping(sd, z) - latent_avg)
    return _reference_synthesis(sd, w[:, None].repeat(1, 2 * NUM_BLOCKS + 2, 1))


def _assert_close(ours, ref):
    scale = ref.abs().max()
    assert ours.shape == ref.shape
    assert scale > 0.1  # a meaningful image, not all zeros
    assert (ours - ref).abs().max() <= 2e-5 * scale


def test_training_checkpoint_matches_reference_with_truncation(tmp_path):
    sd = make_rosinality_state(0)
    latent_avg = 0.5 * torch.randn(STYLE_DIM, generator=torch.Generator().manual_seed(1))
    path = tmp_path / "550000.pt"
    torch.save({"g": sd, "d": {}, "g_ema": sd, "latent_avg": latent_avg,
                "args": argparse.Namespace(size=SIZE, channel_multiplier=2), "ada_aug_p": 0.1}, path)
    G = load_rosinality(path)
    cfg = G.config
    assert (cfg.img_resolution, cfg.z_dim, cfg.mapping_layers, cfg.c_dim, cfg.nir_channels) == (32, 32, 3, 0, 0)
    assert (cfg.channel_base, cfg.channel_max) == (256, 32)
    assert torch.equal(G.mapping.w_avg, latent_avg)
    z = torch.randn(3, STYLE_DIM, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for psi in (1.0, 0.6):
            vis, nir = G(z, None, truncation_psi=psi, noise_mode="const")
            assert nir is None
            _assert_close(vis, _reference_forward(sd, z, psi, latent_avg))


def test_per_layer_latents_index_the_same_layers(tmp_path):
    """Distinct w per layer (W+, what StyleID edits) pins down which w drives which layer."""
    sd = make_rosinality_state(5)
    torch.save({"g_ema": sd}, tmp_path / "g.pt")
    G = load_rosinality(tmp_path / "g.pt")
    latent = torch.randn(2, G.num_ws, STYLE_DIM, generator=torch.Generator().manual_seed(6))
    assert G.num_ws == 2 * NUM_BLOCKS + 2
    with torch.no_grad():
        _assert_close(G.synthesis(latent, noise_mode="const")[0], _reference_synthesis(sd, latent))


def test_bare_state_dict_gets_the_mean_latent(tmp_path):
    sd = make_rosinality_state(3)
    path = tmp_path / "g.pt"
    torch.save(sd, path)
    G = load_rosinality(path)
    z4096 = torch.randn(4096, STYLE_DIM, generator=torch.Generator().manual_seed(0))
    expected = _reference_mapping(sd, z4096).mean(dim=0)
    assert (G.mapping.w_avg - expected).abs().max() < 1e-4
    z = torch.randn(2, STYLE_DIM, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        _assert_close(G(z, None, truncation_psi=0.7)[0], _reference_forward(sd, z, 0.7, expected))


def test_unexpected_layout_and_widths_are_refused(tmp_path):
    sd = make_rosinality_state(0)
    torch.save({"g_ema": {**sd, "extra.weight": torch.zeros(1)}}, tmp_path / "x.pt")
    with pytest.raises(UserError, match=r"x\.pt: .*unexpected \['extra\.weight'\]"):
        load_rosinality(tmp_path / "x.pt")
    odd = dict(sd)
    odd["convs.2.conv.weight"] = torch.randn(1, 24, 32, 3, 3)  # 16x16 at 24 wide, then 8: no formula
    torch.save({"g_ema": odd}, tmp_path / "w.pt")
    with pytest.raises(UserError, match="channel widths"):
        load_rosinality(tmp_path / "w.pt")
    torch.save({"d": {}}, tmp_path / "d.pt")
    with pytest.raises(UserError, match="no rosinality generator"):
        load_rosinality(tmp_path / "d.pt")


def test_code_in_a_pt_file_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"g_ema": payload(os.system, f"touch {marker}")}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeCheckpointError, match="evil.pt"):
        load_rosinality(tmp_path / "evil.pt")
    assert not marker.exists()
