"""Generator: faithfulness to StyleGAN2-ADA / ArcBiFaceGAN (counts, names, math) and the engine's contract."""

import json
import math

import pytest
import torch

import facegen.models.synthesis as synthesis_module
from facegen.models.errors import UserError
from facegen.models.generator import Generator, GeneratorConfig, images_to_uint8

TINY = dict(z_dim=16, c_dim=8, w_dim=16, img_resolution=32, channel_base=128, channel_max=16,
            mapping_layers=2)


def tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    G = Generator(GeneratorConfig(**{**TINY, **overrides})).eval()
    with torch.no_grad():  # non-zero noise strengths so the noise paths matter
        for name, p in G.named_parameters():
            if name.endswith("noise_strength"):
                p.fill_(0.3)
    return G.requires_grad_(False)


def inputs(G, n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, G.z_dim, generator=g)
    c = torch.randn(n, G.c_dim, generator=g) if G.c_dim else None
    return z, c


# ---- parameter counts and names ---------------------------------------------------------------------

def expected_param_count(z, c, w, res, base, cmax, layers, nir, img=3):
    """Count from StyleGAN2's architecture plus the NIR heads, layer by layer (no module involved)."""
    fc = lambda i, o: i * o + o  # noqa: E731
    ch = lambda r: min(base // r, cmax)  # noqa: E731
    total = (fc(c, w) if c else 0) + fc(z + (w if c else 0), w) + (layers - 1) * fc(w, w)
    resolutions = [2**i for i in range(2, int(math.log2(res)) + 1)]
    for r in resolutions:
        cin, cout = (ch(r // 2) if r > 4 else 0), ch(r)
        convs = [(cout, cout)] if r == 4 else [(cin, cout), (cout, cout)]
        total += cout * 16 if r == 4 else 0  # const
        total += sum(fc(w, i) + o * i * 9 + o + 1 for i, o in convs)  # affine, weight, bias, noise_strength
        for out_ch in [img] + ([nir] if nir else []):  # torgb (+ toseg)
            total += fc(w, cout) + out_ch * cout + out_ch
    return total


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def test_param_count_plain_stylegan2_ada_256():
    G = Generator(GeneratorConfig(c_dim=0, nir_channels=0))
    assert n_params(G) == 24_767_458  # StyleGAN2-ADA's figure at 256², cfg paper256
    assert n_params(G) == expected_param_count(512, 0, 512, 256, 16384, 512, 8, 0)
    assert G.num_ws == 14


def test_param_count_arcbifacegan_256():
    G = Generator(GeneratorConfig())
    want = expected_param_count(512, 512, 512, 256, 16384, 512, 8, 1)
    assert n_params(G) == want == 26_575_209
    nir = sum(p.numel() for n, p in G.named_parameters() if ".toseg." in n)
    assert nir == want - expected_param_count(512, 512, 512, 256, 16384, 512, 8, 0) == 1_282_951


def spec_state_dict_keys(res, c_dim, nir, mapping_layers):
    """The names of an ArcBiFaceGAN G_ema state dict."""
    keys = {"mapping.w_avg"} | {f"mapping.fc{i}.{p}" for i in range(mapping_layers) for p in ("weight", "bias")}
    if c_dim:
        keys |= {"mapping.embed.weight", "mapping.embed.bias"}
    modconv = ("weight", "bias", "noise_strength", "noise_const", "resample_filter", "affine.weight",
               "affine.bias")
    head = ("weight", "bias", "affine.weight", "affine.bias")
    for r in [2**i for i in range(2, int(math.log2(res)) + 1)]:
        b = f"synthesis.b{r}"
        keys |= {f"{b}.resample_filter"} | ({f"{b}.const"} if r == 4 else set())
        keys |= {f"{b}.{conv}.{p}" for conv in (["conv1"] if r == 4 else ["conv0", "conv1"]) for p in modconv}
        keys |= {f"{b}.{h}.{p}" for h in (["torgb", "toseg"] if nir else ["torgb"]) for p in head}
    return keys


@pytest.mark.parametrize("c_dim,nir", [(8, 1), (0, 0)])
def test_state_dict_names_follow_spec(c_dim, nir):
    G = tiny(c_dim=c_dim, nir_channels=nir)
    sd = G.state_dict()
    assert set(sd) == spec_state_dict_keys(32, c_dim, nir, 2)
    assert sd["synthesis.b32.torgb.weight"].shape == (3, 4, 1, 1)
    if nir:
        assert sd["synthesis.b32.toseg.weight"].shape == (1, 4, 1, 1)
    assert sd["synthesis.b4.const"].shape == (16, 4, 4) and sd["synthesis.b16.conv0.noise_const"].shape == (16, 16)
    assert sd["synthesis.b8.conv0.resample_filter"].shape == (4, 4) and sd["mapping.w_avg"].shape == (16,)


def test_strict_state_dict_round_trip_reproduces_images():
    G1, G2 = tiny(seed=0), tiny(seed=5)
    z, c = inputs(G1)
    G2.load_state_dict(G1.state_dict(), strict=True)
    for a, b in zip(G1(z, c), G2(z, c)):
        assert torch.equal(a, b)


# ---- mapping -----------------------------------------------------------------------------------------

def test_mapping_normalises_inputs_by_second_moment_hand_computed():
    G = Generator(GeneratorConfig(z_dim=2, c_dim=1, w_dim=2, img_resolution=4, mapping_layers=1,
                                  channel_base=8, channel_max=2, mapping_lr_multiplier=0.5, embed_features=1))
    m = G.mapping
    with torch.no_grad():
        m.embed.weight.fill_(2.0)  # embed(c) = 2 * c / sqrt(1) (linear, gain 1/sqrt(1))
        m.embed.bias.fill_(1.0)
        m.fc0.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, -2.0]]))
        m.fc0.bias.copy_(torch.tensor([0.2, -0.4]))
    z, c = torch.tensor([[3.0, 4.0]]), torch.tensor([[-5.0]])
    zn = [3 / math.sqrt(12.5 + 1e-8), 4 / math.sqrt(12.5 + 1e-8)]
    e = 2 * -5.0 + 1.0
    en = e / math.sqrt(e * e + 1e-8)  # = -1
    g = 0.5 / math.sqrt(3)  # lr_multiplier / sqrt(fan_in)
    pre = [zn[0] * g + 0.2 * 0.5, (zn[1] - 2 * en) * g - 0.4 * 0.5]
    lrelu = lambda v: (v if v > 0 else 0.2 * v) * math.sqrt(2)  # noqa: E731
    ws = m(z, c)
    assert ws.shape == (1, G.num_ws, 2)
    torch.testing.assert_close(ws[0, 0], torch.tensor([lrelu(pre[0]), lrelu(pre[1])]))
    assert torch.equal(ws[0, 0], ws[0, 1])  # broadcast to every layer


def test_truncation_psi_zero_gives_w_avg_and_cutoff_limits_layers():
    G = tiny()
    z, c = inputs(G)
    with torch.no_grad():
        G.mapping.w_avg.copy_(torch.randn(G.w_dim))
    ws = G.mapping(z, c)
    ws0 = G.mapping(z, c, truncation_psi=0)
    assert torch.equal(ws0, G.mapping.w_avg.expand_as(ws0))
    ws_cut = G.mapping(z, c, truncation_psi=0.5, truncation_cutoff=3)
    torch.testing.assert_close(ws_cut[:, :3], G.mapping.w_avg + 0.5 * (ws[:, :3] - G.mapping.w_avg))
    assert torch.equal(ws_cut[:, 3:], ws[:, 3:])


def test_w_avg_updated_only_when_asked():
    G = tiny()
    z, c = inputs(G)
    before = G.mapping.w_avg.clone()
    G.mapping(z, c)
    assert torch.equal(G.mapping.w_avg, before)
    w = G.mapping(z, c, update_emas=True)[:, 0]
    torch.testing.assert_close(G.mapping.w_avg, w.mean(0) + 0.995 * (before - w.mean(0)))


def test_mapping_without_condition_accepts_none():
    G = tiny(c_dim=0)
    z, _ = inputs(G)
    assert G.mapping(z, None).shape == (3, G.num_ws, 16)
    with pytest.raises(ValueError, match="c must be"):
        tiny().mapping(z, None)


# ---- synthesis ---------------------------------------------------------------------------------------

def test_ws_indexing_shares_torgb_w_with_next_conv0():
    G = tiny()
    ws = torch.randn(2, G.num_ws, G.w_dim)
    styles = G.synthesis.compute_styles(ws)
    s = G.synthesis
    order = [("b4.conv1", 0), ("b4.torgb", 1), ("b4.toseg", 1), ("b8.conv0", 1), ("b8.conv1", 2),
             ("b8.torgb", 3), ("b16.conv0", 3), ("b32.conv1", 6), ("b32.torgb", 7), ("b32.toseg", 7)]
    for name, idx in order:
        block, layer = name.split(".")
        torch.testing.assert_close(styles[name], getattr(getattr(s, block), layer).affine(ws[:, idx]))
    assert list(styles) == s.style_names() and len(styles) == 15
    assert styles["b8.conv0"].shape == (2, 16) and styles["b32.conv1"].shape == (2, 4)


def test_const_noise_is_deterministic_and_random_noise_is_not():
    G = tiny()
    z, c = inputs(G)
    a, b = G(z, c), G(z, c)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    r1, r2 = G(z, c, noise_mode="random"), G(z, c, noise_mode="random")
    assert not torch.allclose(r1[0], r2[0])
    n1 = G(z, c, noise_mode="none")
    assert not torch.allclose(n1[0], a[0])


@pytest.mark.parametrize("c_dim,nir", [(8, 1), (8, 0), (0, 1), (0, 0)])
def test_fast_path_matches_reference(c_dim, nir):
    G = tiny(c_dim=c_dim, nir_channels=nir)
    z, c = inputs(G, n=4)
    vis, nir_img = G(z, c, fast=False)
    vis_f, nir_f = G(z, c, fast=True)
    assert vis.shape == (4, 3, 32, 32)
    torch.testing.assert_close(vis_f, vis, rtol=1e-5, atol=1e-5)
    if nir:
        assert nir_img.shape == (4, 1, 32, 32)
        torch.testing.assert_close(nir_f, nir_img, rtol=1e-5, atol=1e-5)
    else:
        assert nir_img is None and nir_f is None


def test_channels_last_path_matches_reference():
    G = tiny()
    z, c = inputs(G, n=4)
    ws = G.mapping(z, c)
    vis, nir = G.synthesis(ws)
    vis_cl, nir_cl = G.synthesis(ws, channels_last=True, fast=True)
    torch.testing.assert_close(vis_cl, vis, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(nir_cl, nir, rtol=1e-5, atol=1e-5)


def test_fast_path_gradients_match_reference():
    G = tiny().requires_grad_(True)
    z, c = inputs(G, n=2)
    grads = []
    for fast in (False, True):
        G.zero_grad()
        vis, nir = G(z, c, fast=fast)
        (vis.square().mean() + nir.mean()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in G.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-5)


def test_styles_round_trip_and_partial_injection():
    G = tiny()
    z, c = inputs(G)
    ws = G.mapping(z, c)
    ref = G.synthesis(ws)
    styles = G.synthesis.compute_styles(ws)
    for fast in (False, True):
        out = G.synthesis(ws, styles=styles, fast=fast)
        torch.testing.assert_close(out[0], ref[0], rtol=1e-5, atol=1e-5)
    partial = G.synthesis(ws, styles={"b16.conv1": styles["b16.conv1"]})
    assert torch.equal(partial[0], ref[0])
    scaled = G.synthesis(ws, styles={"b16.conv1": styles["b16.conv1"] * 2})
    torch.testing.assert_close(scaled[0], ref[0], rtol=1e-5, atol=1e-5)  # demodulation: scale-free
    edited = G.synthesis(ws, styles={"b16.conv1": styles["b16.conv1"] + torch.randn_like(styles["b16.conv1"])})
    assert not torch.allclose(edited[0], ref[0])
    nir_only = G.synthesis(ws, styles={"b32.toseg": styles["b32.toseg"] + 1})
    assert torch.equal(nir_only[0], ref[0]) and not torch.allclose(nir_only[1], ref[1])
    with pytest.raises(ValueError, match="unknown layer names"):
        G.synthesis(ws, styles={"b64.conv0": styles["b16.conv1"]})


def test_explicit_noise_overrides_per_layer():
    G = tiny()
    z, c = inputs(G)
    ws = G.mapping(z, c)
    shapes = G.synthesis.noise_shapes()
    assert shapes == {"b4.conv1": (4, 4), "b8.conv0": (8, 8), "b8.conv1": (8, 8), "b16.conv0": (16, 16),
                      "b16.conv1": (16, 16), "b32.conv0": (32, 32), "b32.conv1": (32, 32)}
    const = {n: getattr(getattr(G.synthesis, n.split(".")[0]), n.split(".")[1]).noise_const.expand(3, 1, *hw)
             for n, hw in shapes.items()}
    ref = G.synthesis(ws, noise_mode="const")
    assert torch.equal(G.synthesis(ws, noise=const)[0], ref[0])  # const noise given explicitly
    g = torch.Generator().manual_seed(7)
    noise = {n: torch.randn(3, 1, *hw, generator=g) for n, hw in shapes.items()}
    a, b = G.synthesis(ws, noise=noise), G.synthesis(ws, noise={k: v.clone() for k, v in noise.items()})
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.allclose(a[0], ref[0])
    one = G.synthesis(ws, noise={"b32.conv1": noise["b32.conv1"]})
    assert not torch.allclose(one[0], ref[0]) and not torch.allclose(one[0], a[0])
    with pytest.raises(ValueError, match="noise must be"):
        G.synthesis(ws, noise={"b8.conv0": torch.zeros(3, 1, 4, 4)})


@pytest.mark.parametrize("fast", [False, True])
def test_batch_independence(fast):
    G = tiny()
    z, c = inputs(G, n=4)
    vis, nir = G(z, c, fast=fast)
    for i in (0, 3):
        vi, ni = G(z[i : i + 1], c[i : i + 1], fast=fast)
        # Equal up to float rounding (BLAS/conv kernels may sum in another order for another batch size).
        torch.testing.assert_close(vi, vis[i : i + 1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ni, nir[i : i + 1], rtol=1e-5, atol=1e-5)


def test_single_block_generator_matches_hand_written_stylegan2_math():
    """img_resolution 4: vis = torgb(conv1(const)) — written out with plain torch ops."""
    G = tiny(img_resolution=4)
    ws = torch.randn(2, G.num_ws, G.w_dim)
    b = G.synthesis.b4
    s = b.conv1.affine.weight @ ws[:, 0].T / math.sqrt(G.w_dim)
    s = s.T + b.conv1.affine.bias
    w = b.conv1.weight[None] * s[:, None, :, None, None]
    w = w / (w.square().sum(dim=[2, 3, 4], keepdim=True) + 1e-8).sqrt()
    x = torch.stack([torch.nn.functional.conv2d(b.const[None], w[i], padding=1)[0] for i in range(2)])
    x = x + b.conv1.noise_const * b.conv1.noise_strength + b.conv1.bias.reshape(1, -1, 1, 1)
    x = (torch.nn.functional.leaky_relu(x, 0.2) * math.sqrt(2)).clamp(-256, 256)
    heads = []
    for head in (b.torgb, b.toseg):
        cin = head.weight.shape[1]
        st = (ws[:, 1] @ head.affine.weight.T / math.sqrt(G.w_dim) + head.affine.bias) / math.sqrt(cin)
        y = torch.einsum("nchw,oc,nc->nohw", x, head.weight[:, :, 0, 0], st)
        heads.append((y + head.bias.reshape(1, -1, 1, 1)).clamp(-256, 256))
    vis, nir = G.synthesis(ws)
    torch.testing.assert_close(vis, heads[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(nir, heads[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("res,num_ws", [(16, 6), (64, 10)])
def test_other_resolutions_build_and_run(res, num_ws):
    G = tiny(img_resolution=res, channel_base=512)
    z, c = inputs(G, n=2)
    vis, nir = G(z, c, fast=True)
    assert G.num_ws == num_ws == G.config.num_ws
    assert vis.shape == (2, 3, res, res) and nir.shape == (2, 1, res, res)
    assert torch.isfinite(vis).all() and torch.isfinite(nir).all()


def test_fp16_blocks_keep_images_fp32_and_close_to_fp32(monkeypatch):
    # fp16 is only enabled on CUDA; force it on to exercise the fp16 plumbing on the CPU.
    G = tiny(num_fp16_res=2)
    z, c = inputs(G, n=2)
    ref = G(z, c)
    monkeypatch.setattr(synthesis_module, "fp16_supported", lambda device: True)
    assert torch.equal(G(z, c, force_fp32=True)[0], ref[0])
    for fast in (False, True):
        vis, nir = G(z, c, fast=fast)
        assert vis.dtype == nir.dtype == torch.float32
        assert not torch.equal(vis, ref[0])  # the fp16 blocks really ran in fp16
        torch.testing.assert_close(vis, ref[0], rtol=0, atol=0.05)
        torch.testing.assert_close(nir, ref[1], rtol=0, atol=0.05)


def test_autocast_bf16_fast_path_runs_close_to_fp32():
    G = tiny()
    z, c = inputs(G)
    ref = G(z, c)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        vis, nir = G(z, c, fast=True)
    assert vis.dtype == nir.dtype == torch.float32
    scale = ref[0].abs().max()
    assert (vis - ref[0]).abs().max() < 0.05 * scale


@pytest.mark.gpu
def test_cuda_fp16_and_autocast_match_fp32():
    G = tiny(num_fp16_res=2).cuda()
    z, c = (t.cuda() for t in inputs(G))
    ref = G(z, c, force_fp32=True)
    for fast in (False, True):
        vis, nir = G(z, c, fast=fast)
        assert vis.dtype == torch.float32
        torch.testing.assert_close(vis, ref[0], rtol=0, atol=0.05)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            vis, nir = G(z, c, fast=fast)
        assert (vis - ref[0]).abs().max() < 0.05 * ref[0].abs().max()


# ---- config and conversion ---------------------------------------------------------------------------

def test_config_json_round_trip_and_errors():
    cfg = GeneratorConfig(**TINY, conv_clamp=None)
    assert GeneratorConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert GeneratorConfig().num_ws == 14
    with pytest.raises(UserError, match=r"unknown keys \['bogus', 'mapping_kwargs'\]"):
        GeneratorConfig.from_dict({"bogus": 1, "mapping_kwargs": {}, "z_dim": 512})
    with pytest.raises(UserError, match="generator.img_resolution"):
        GeneratorConfig.from_dict({"img_resolution": 48})
    with pytest.raises(UserError, match="generator.nir_channels"):
        GeneratorConfig(nir_channels=-1)
    with pytest.raises(UserError, match="generator.conv_clamp"):
        GeneratorConfig.from_dict({"conv_clamp": "256"})
    with pytest.raises(UserError, match="generator.w_avg_beta"):
        GeneratorConfig(w_avg_beta=1.0)


def test_images_to_uint8_matches_original_conversion():
    x = torch.tensor([-1.5, -1.0, -0.999, 0.0, 0.5, 0.996, 1.0, 2.0])
    # (x*127.5 + 128) = [-63.25, 0.5, 0.6275, 128, 191.75, 254.99, 255.5, 383] -> clamp -> truncate
    assert images_to_uint8(x).tolist() == [0, 0, 0, 128, 191, 254, 255, 255]
    assert images_to_uint8(x).dtype == torch.uint8
