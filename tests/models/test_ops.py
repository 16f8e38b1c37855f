"""The pure-torch StyleGAN2 ops against direct numpy references (tiny tensors, explicit loops)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from facegen.models.ops import (
    bias_act,
    conv1x1,
    conv2d_resample,
    downsample2d,
    modulated_conv2d,
    normalize_2nd_moment,
    setup_filter,
    upfirdn2d,
    upsample2d,
)


def np_upfirdn2d(x, f, up=1, down=1, pad=(0, 0, 0, 0), gain=1.0, flip_filter=False):
    """Textbook definition: zero-insert, pad (negative = crop), true 2-D convolution, keep every down-th."""
    n, c, h, w = x.shape
    px0, px1, py0, py1 = pad
    u = np.zeros((n, c, h * up, w * up))
    u[:, :, ::up, ::up] = x
    p = np.zeros((n, c, h * up + max(py0, 0) + max(py1, 0), w * up + max(px0, 0) + max(px1, 0)))
    p[:, :, max(py0, 0) : max(py0, 0) + h * up, max(px0, 0) : max(px0, 0) + w * up] = u
    p = p[:, :, max(-py0, 0) : p.shape[2] - max(-py1, 0), max(-px0, 0) : p.shape[3] - max(-px1, 0)]
    k = f if flip_filter else f[::-1, ::-1]  # convolution = correlation with the flipped kernel
    fh, fw = f.shape
    out = np.zeros((n, c, p.shape[2] - fh + 1, p.shape[3] - fw + 1))
    for i in range(out.shape[2]):
        for j in range(out.shape[3]):
            out[:, :, i, j] = (p[:, :, i : i + fh, j : j + fw] * k).sum(axis=(2, 3))
    return out[:, :, ::down, ::down] * gain ** (f.ndim / 2)


def np_conv2d(x, w, groups=1, flip=False):
    """Valid correlation (or convolution if flip) with groups; x [N,C,H,W], w [O, C/g, k, k]."""
    n, c, h, ww = x.shape
    o, cg, kh, kw = w.shape
    k = w[:, :, ::-1, ::-1] if flip else w
    out = np.zeros((n, o, h - kh + 1, ww - kw + 1))
    og = o // groups
    for oc in range(o):
        g = oc // og
        xs = x[:, g * cg : (g + 1) * cg]
        for i in range(out.shape[2]):
            for j in range(out.shape[3]):
                out[:, oc, i, j] = (xs[:, :, i : i + kh, j : j + kw] * k[oc]).sum(axis=(1, 2, 3))
    return out


@pytest.mark.parametrize(
    "up,down,pad,flip_filter,gain",
    [(1, 1, (1, 2, 0, 1), False, 1.0), (2, 1, (2, 1, 2, 1), False, 4.0), (1, 2, (1, 1, 1, 1), True, 1.0),
     (2, 2, (1, -1, 0, 2), False, 3.0), (3, 1, (-1, 2, 1, 0), True, 1.0)],
)
def test_upfirdn2d_matches_numpy_definition(up, down, pad, flip_filter, gain):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    f = torch.tensor([[1.0, 2.0, 0.5], [0.0, 3.0, 1.0]], dtype=torch.float64)  # asymmetric: catches flips
    got = upfirdn2d(x, f, up=up, down=down, padding=list(pad), flip_filter=flip_filter, gain=gain)
    want = np_upfirdn2d(x.numpy(), f.numpy(), up, down, pad, gain, flip_filter)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)


def test_upfirdn2d_keeps_input_dtype_under_autocast():
    x = torch.randn(1, 3, 8, 8)
    f = setup_filter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = upsample2d(x, f)
    assert got.dtype == torch.float32
    assert torch.equal(got, upsample2d(x, f))


def test_setup_filter_is_normalised_outer_product():
    f = setup_filter()
    np.testing.assert_allclose(f.numpy(), np.outer([1, 3, 3, 1], [1, 3, 3, 1]) / 64.0)


def test_resampling_preserves_a_constant_image_in_the_interior():
    x = torch.full([1, 2, 8, 8], 0.75)
    f = setup_filter()
    up = upsample2d(x, f)
    down = downsample2d(x, f)
    assert up.shape == (1, 2, 16, 16) and down.shape == (1, 2, 4, 4)
    torch.testing.assert_close(up[:, :, 2:-2, 2:-2], torch.full_like(up[:, :, 2:-2, 2:-2], 0.75))
    torch.testing.assert_close(down[:, :, 1:-1, 1:-1], torch.full_like(down[:, :, 1:-1, 1:-1], 0.75))


def _generic_conv2d_resample(x, w, f, up, down, padding, groups, flip_weight):
    """Upstream's generic path, written from scratch: upsample+filter, pad, conv, filter+downsample."""
    fw = f.shape[0]
    p0 = p1 = padding
    if up > 1:
        p0, p1 = p0 + (fw + up - 1) // 2, p1 + (fw - up) // 2
    if down > 1:
        p0, p1 = p0 + (fw - down + 1) // 2, p1 + (fw - down) // 2
    pads = (p0, p1, p0, p1)
    if up > 1:
        x = np_upfirdn2d(x, f, up=up, pad=pads, gain=up * up)
    else:
        x = np_upfirdn2d(x, np.ones((1, 1)), pad=pads)
    x = np_conv2d(x, w, groups=groups, flip=not flip_weight)
    return np_upfirdn2d(x, f, down=down) if down > 1 else x


@pytest.mark.parametrize(
    "k,up,down,padding,groups,flip_weight",
    [(3, 2, 1, 1, 1, False), (3, 2, 1, 1, 2, False), (3, 1, 2, 1, 1, True), (1, 1, 2, 0, 1, True),
     (1, 2, 1, 0, 1, True), (3, 1, 1, 1, 2, True), (1, 1, 1, 0, 1, False)],
)
def test_conv2d_resample_fast_paths_equal_generic_path(k, up, down, padding, groups, flip_weight):
    torch.manual_seed(1)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    w = torch.randn(6, 4 // groups, k, k, dtype=torch.float64)
    f = setup_filter().to(torch.float64)
    got = conv2d_resample(x, w, f, up=up, down=down, padding=padding, groups=groups, flip_weight=flip_weight)
    want = _generic_conv2d_resample(x.numpy(), w.numpy(), f.numpy(), up, down, padding, groups, flip_weight)
    assert got.shape == want.shape == (2, 6, 6 * up // down, 6 * up // down)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-10)


def test_bias_act_order_bias_act_gain_clamp():
    x = torch.tensor([[-2.0, 1.0, 300.0]])
    b = torch.tensor([1.0, -3.0, 0.0])
    got = bias_act(x, b, act="lrelu", gain=2.0, clamp=100.0)
    torch.testing.assert_close(got, torch.tensor([[-0.4, -0.8, 100.0]]))
    got = bias_act(x, None, act="lrelu")  # default gain sqrt(2)
    torch.testing.assert_close(got, torch.tensor([[-0.4, 1.0, 300.0]]) * math.sqrt(2))
    torch.testing.assert_close(bias_act(x, b, clamp=2.0), torch.tensor([[-1.0, -2.0, 2.0]]))


def test_normalize_2nd_moment_hand_values():
    x = torch.tensor([[3.0, 4.0], [1.0, -1.0]])
    want = torch.tensor([[3.0, 4.0], [1.0, -1.0]]) / torch.tensor([[math.sqrt(12.5 + 1e-8)], [1.0]])
    torch.testing.assert_close(normalize_2nd_moment(x), want)


def _modconv_by_definition(x, weight, styles, demodulate, up, padding, noise):
    """Per-sample: w' = w * s (over C_in), optionally / ||w'||, then an ordinary conv (or up-conv)."""
    f = setup_filter().to(x.dtype)
    outs = []
    for i in range(x.shape[0]):
        wi = weight * styles[i].reshape(1, -1, 1, 1)
        if demodulate:
            wi = wi * (wi.square().sum(dim=[1, 2, 3], keepdim=True) + 1e-8).rsqrt()
        outs.append(conv2d_resample(x[i : i + 1], wi, f, up=up, padding=padding, flip_weight=(up == 1)))
    out = torch.cat(outs)
    return out + noise if noise is not None else out


@pytest.mark.parametrize("demodulate,up,fused", [(True, 1, False), (True, 1, True), (True, 2, False),
                                                 (True, 2, True), (False, 1, False), (False, 1, True)])
def test_modulated_conv2d_matches_definition(demodulate, up, fused):
    torch.manual_seed(2)
    x = torch.randn(3, 5, 4, 4, dtype=torch.float64)
    k = 3 if demodulate else 1
    weight = torch.randn(7, 5, k, k, dtype=torch.float64)
    styles = torch.randn(3, 5, dtype=torch.float64)
    noise = torch.randn(3, 1, 4 * up, 4 * up, dtype=torch.float64) if demodulate else None
    padding = k // 2
    got = modulated_conv2d(x, weight, styles, noise=noise, up=up, padding=padding,
                           resample_filter=setup_filter().to(torch.float64), demodulate=demodulate,
                           flip_weight=(up == 1), fused_modconv=fused)
    want = _modconv_by_definition(x, weight, styles, demodulate, up, padding, noise)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_fp16_prenormalisation_avoids_overflow_and_keeps_the_result():
    torch.manual_seed(3)
    x = torch.randn(2, 8, 6, 6)
    weight = torch.randn(4, 8, 3, 3)
    styles = torch.randn(2, 8) * 1e4  # x*styles alone would overflow fp16 (max 65504) after the conv sum
    want = modulated_conv2d(x, weight, styles, padding=1)
    for fused in (False, True):
        got = modulated_conv2d(x.half() * 30, weight, styles, padding=1, fused_modconv=fused)
        assert got.dtype == torch.float16 and torch.isfinite(got).all()
        torch.testing.assert_close(got.float() / 30, want, rtol=0, atol=5e-3)


@pytest.mark.parametrize("layout", ["nchw", "nhwc", "per_sample"])
def test_conv1x1_equals_the_convolution(layout):
    torch.manual_seed(0)
    x = torch.randn(3, 16, 5, 7)
    w = torch.randn(4, 16)
    if layout == "per_sample":
        w = torch.randn(3, 4, 16)
        want = torch.cat([F.conv2d(x[i : i + 1], w[i, :, :, None, None]) for i in range(3)])
    else:
        want = F.conv2d(x, w[:, :, None, None])
        if layout == "nhwc":
            x = x.contiguous(memory_format=torch.channels_last)
    got = conv1x1(x, w)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if layout == "nhwc":  # stays NHWC: no layout copy on the shared-weight path
        assert got.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("batch", [1, 3, 16])
@pytest.mark.parametrize("fused", [False, True])
def test_pointwise_modulated_conv_does_not_depend_on_the_thread_count(batch, fused):
    """F.conv2d takes another CPU kernel for small-batch 1x1 convolutions on one thread; the torgb /
    toseg heads must give the same bits whatever the intra-op thread count."""
    torch.manual_seed(1)
    x = torch.randn(batch, 64, 16, 16)
    if not fused:
        x = x.contiguous(memory_format=torch.channels_last)
    weight, styles = torch.randn(3, 64, 1, 1), torch.randn(batch, 64)
    before = torch.get_num_threads()
    outputs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outputs.append(modulated_conv2d(x, weight, styles, demodulate=False, fused_modconv=fused))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outputs[0], outputs[1])
    want = F.conv2d(x * styles[:, :, None, None], weight)
    torch.testing.assert_close(outputs[0], want, rtol=1e-5, atol=1e-5)
