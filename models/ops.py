"""Pure-torch equivalents of StyleGAN2-ADA's custom ops (upfirdn2d, bias_act, conv2d_resample, fma).

The math (padding rules, filter flips, operation order) follows NVIDIA's reference implementations so
that weights trained with the CUDA kernels give the same images here. Everything is plain
torch.nn.functional, so it runs on CPU, CUDA and under torch.autocast.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

# name -> (default gain, default alpha); lrelu's sqrt(2) keeps unit variance through the nonlinearity.
ACTIVATIONS: dict[str, tuple[float, float]] = {
    "linear": (1.0, 0.0),
    "relu": (math.sqrt(2), 0.0),
    "lrelu": (math.sqrt(2), 0.2),
}


def autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 only knows the CUDA flag
        return device_type == "cuda" and torch.is_autocast_enabled()


def fp16_supported(device: torch.device) -> bool:
    """Whether fp16 blocks run in fp16: only on CUDA (upstream's CPU path is fp32), and not while the
    caller's CUDA autocast manages precision itself."""
    return device.type == "cuda" and not autocast_enabled("cuda")


def setup_filter(taps: Sequence[float] = (1, 3, 3, 1)) -> torch.Tensor:
    """Normalised 2-D FIR filter (outer product of the 1-D taps), as stored in `resample_filter` buffers."""
    f = torch.as_tensor(list(taps), dtype=torch.float32)
    f = torch.outer(f, f)
    return f / f.sum()


def _pad4(padding: int | Sequence[int]) -> tuple[int, int, int, int]:
    """int / [x, y] / [x0, x1, y0, y1] -> (x0, x1, y0, y1)."""
    if isinstance(padding, int):
        return padding, padding, padding, padding
    if len(padding) == 2:
        px, py = padding
        return px, px, py, py
    px0, px1, py0, py1 = padding
    return px0, px1, py0, py1


def upfirdn2d(
    x: torch.Tensor,
    f: torch.Tensor | None,
    up: int = 1,
    down: int = 1,
    padding: int | Sequence[int] = 0,
    flip_filter: bool = False,
    gain: float = 1.0,
) -> torch.Tensor:
    """Upsample (zero insertion), pad/crop, FIR-filter, downsample. x: [N, C, H, W], f: [fh, fw]."""
    if f is None:
        f = torch.ones([1, 1], dtype=torch.float32, device=x.device)
    n, c, h, w = x.shape
    px0, px1, py0, py1 = _pad4(padding)
    if up > 1:  # insert up-1 zeros after every pixel
        x = x.reshape(n, c, h, 1, w, 1)
        x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1])
        x = x.reshape(n, c, h * up, w * up)
    x = F.pad(x, [max(px0, 0), max(px1, 0), max(py0, 0), max(py1, 0)])
    x = x[:, :, max(-py0, 0) : x.shape[2] - max(-py1, 0), max(-px0, 0) : x.shape[3] - max(-px1, 0)]
    # conv2d is a correlation; the FIR op is a true convolution, hence the flip.
    f = f.to(device=x.device, dtype=x.dtype) * (gain ** (f.ndim / 2))
    if not flip_filter:
        f = f.flip([0, 1])
    weight = f[None, None].expand(c, 1, *f.shape)
    if autocast_enabled(x.device.type):
        # Like upstream's kernel, filter in the input's dtype: fp32 skip images stay fp32 under autocast.
        with torch.autocast(x.device.type, enabled=False):
            return F.conv2d(x, weight, stride=down, groups=c)
    return F.conv2d(x, weight, stride=down, groups=c)  # every down-th output == a strided conv


def upsample2d(x: torch.Tensor, f: torch.Tensor, up: int = 2, gain: float = 1.0) -> torch.Tensor:
    """FIR upsampling by `up` that keeps the image centred (used for the skip-image accumulation)."""
    fw = f.shape[-1]
    pad = [(fw + up - 1) // 2, (fw - up) // 2, (fw + up - 1) // 2, (fw - up) // 2]
    return upfirdn2d(x, f, up=up, padding=pad, gain=gain * up * up)


def downsample2d(x: torch.Tensor, f: torch.Tensor, down: int = 2, gain: float = 1.0) -> torch.Tensor:
    """FIR downsampling by `down` (the 'skip' discriminator's image path)."""
    fw = f.shape[-1]
    pad = [(fw - down + 1) // 2, (fw - down) // 2, (fw - down + 1) // 2, (fw - down) // 2]
    return upfirdn2d(x, f, down=down, padding=pad, gain=gain)


def bias_act(
    x: torch.Tensor,
    b: torch.Tensor | None = None,
    act: str = "linear",
    gain: float | None = None,
    clamp: float | None = None,
    dim: int = 1,
) -> torch.Tensor:
    """Bias, activation, gain, clamp — in that order (as the fused CUDA kernel)."""
    def_gain, alpha = ACTIVATIONS[act]
    if b is not None:
        shape = [-1 if i == dim else 1 for i in range(x.ndim)]
        x = x + b.to(x.dtype).reshape(shape)
    if act == "lrelu":
        x = F.leaky_relu(x, alpha)
    elif act == "relu":
        x = F.relu(x)
    gain = def_gain if gain is None else gain
    if gain != 1:
        x = x * gain
    if clamp is not None and clamp >= 0:
        x = x.clamp(-clamp, clamp)
    return x


def normalize_2nd_moment(x: torch.Tensor, dim: int = 1, eps: float = 1e-8) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) along `dim`."""
    return x * (x.square().mean(dim=dim, keepdim=True) + eps).rsqrt()


def _conv(
    x: torch.Tensor,
    w: torch.Tensor,
    stride: int = 1,
    padding: int | Sequence[int] = 0,
    groups: int = 1,
    transpose: bool = False,
    flip_weight: bool = True,
) -> torch.Tensor:
    # flip_weight=True is a correlation (what conv2d computes); False is a true convolution.
    if not flip_weight:
        w = w.flip([2, 3])
    if transpose:
        return F.conv_transpose2d(x, w, stride=stride, padding=padding, groups=groups)
    return F.conv2d(x, w, stride=stride, padding=padding, groups=groups)


def _transpose_weight(w: torch.Tensor, groups: int) -> torch.Tensor:
    """[O, I/g, k, k] conv weight -> [I, O/g, k, k] conv_transpose2d weight, per group."""
    out_ch, in_per_group, kh, kw = w.shape
    if groups == 1:
        return w.transpose(0, 1)
    w = w.reshape(groups, out_ch // groups, in_per_group, kh, kw).transpose(1, 2)
    return w.reshape(groups * in_per_group, out_ch // groups, kh, kw)


def conv2d_resample(
    x: torch.Tensor,
    w: torch.Tensor,
    f: torch.Tensor | None = None,
    up: int = 1,
    down: int = 1,
    padding: int = 0,
    groups: int = 1,
    flip_weight: bool = True,
) -> torch.Tensor:
    """2-D convolution with optional FIR up/downsampling, using the cheapest equivalent order."""
    kh, kw = w.shape[2], w.shape[3]
    fh, fw = (f.shape[0], f.shape[1]) if f is not None else (1, 1)
    px0, px1, py0, py1 = _pad4(padding)
    if up > 1:
        px0, px1 = px0 + (fw + up - 1) // 2, px1 + (fw - up) // 2
        py0, py1 = py0 + (fh + up - 1) // 2, py1 + (fh - up) // 2
    if down > 1:
        px0, px1 = px0 + (fw - down + 1) // 2, px1 + (fw - down) // 2
        py0, py1 = py0 + (fh - down + 1) // 2, py1 + (fh - down) // 2
    pads = [px0, px1, py0, py1]

    if kw == 1 and kh == 1 and down > 1 and up == 1:  # 1x1: downsample first, then convolve
        x = upfirdn2d(x, f, down=down, padding=pads)
        return _conv(x, w, groups=groups, flip_weight=flip_weight)
    if kw == 1 and kh == 1 and up > 1 and down == 1:  # 1x1: convolve first, then upsample
        x = _conv(x, w, groups=groups, flip_weight=flip_weight)
        return upfirdn2d(x, f, up=up, padding=pads, gain=up * up)
    if down > 1 and up == 1:  # filter, then strided conv
        x = upfirdn2d(x, f, padding=pads)
        return _conv(x, w, stride=down, groups=groups, flip_weight=flip_weight)
    if up > 1:  # strided transposed conv, then filter
        w = _transpose_weight(w, groups)
        px0, px1, py0, py1 = px0 - (kw - 1), px1 - (kw - up), py0 - (kh - 1), py1 - (kh - up)
        pxt, pyt = max(min(-px0, -px1), 0), max(min(-py0, -py1), 0)
        x = _conv(x, w, stride=up, padding=[pyt, pxt], groups=groups, transpose=True,
                  flip_weight=not flip_weight)
        x = upfirdn2d(x, f, padding=[px0 + pxt, px1 + pxt, py0 + pyt, py1 + pyt], gain=up * up)
        return upfirdn2d(x, f, down=down) if down > 1 else x
    if px0 == px1 and py0 == py1 and px0 >= 0 and py0 >= 0:  # plain conv
        return _conv(x, w, padding=[py0, px0], groups=groups, flip_weight=flip_weight)
    x = upfirdn2d(x, None, padding=pads)  # general fallback: asymmetric padding
    x = _conv(x, w, groups=groups, flip_weight=flip_weight)
    return upfirdn2d(x, f, down=down) if down > 1 else x


def conv1x1(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """1x1 convolution as one matrix product. x: [N, I, H, W]; w: [O, I] shared or [N, O, I] per sample.

    Not `F.conv2d`, because ATen picks the CPU kernel of a 1x1 convolution by batch size *and* thread
    count (`use_mkldnn` in ATen's Convolution.cpp takes the oneDNN path only when `get_num_threads() > 1`
    or the batch is >= 16), and the two kernels round differently: the same job then wrote other pixels
    with one thread than with two. The BLAS GEMM shares out output tiles, not the channel sum, among
    its threads, so the bits do not depend on the thread count (checked with MKL: 1 to 4 threads,
    batches 1-32, 4²-256², 32-512 channels; tests/engine/test_thread_determinism.py runs a job both ways).
    NHWC activations (the shared-weight path) stay NHWC: one [N·H·W, I] x [I, O] product, no copy.
    """
    n, in_ch, h, wd = x.shape
    if w.ndim == 2 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        rows = x.permute(0, 2, 3, 1).reshape(n * h * wd, in_ch)
        return torch.mm(rows, w.t()).reshape(n, h, wd, -1).permute(0, 3, 1, 2)
    return torch.matmul(w, x.reshape(n, in_ch, h * wd)).reshape(n, -1, h, wd)


def modulated_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    styles: torch.Tensor,
    noise: torch.Tensor | None = None,
    up: int = 1,
    padding: int = 0,
    resample_filter: torch.Tensor | None = None,
    demodulate: bool = True,
    flip_weight: bool = True,
    fused_modconv: bool = False,
) -> torch.Tensor:
    """StyleGAN2 modulated convolution. x: [N, I, H, W], weight: [O, I, k, k], styles: [N, I].

    fused_modconv=False scales activations before and after one shared conv (reference path);
    True builds per-sample weights and runs one grouped conv (faster inference, same math).
    """
    n = x.shape[0]
    out_ch, in_ch, kh, kw = weight.shape
    if styles.shape != (n, in_ch):
        raise ValueError(f"styles must be [{n}, {in_ch}], got {list(styles.shape)}")
    if x.dtype == torch.float16 and demodulate:
        # Rescale so the fp16 intermediates cannot overflow; demodulation cancels the scale exactly.
        w_max = weight.norm(float("inf"), dim=[1, 2, 3], keepdim=True)
        weight = weight * (1 / math.sqrt(in_ch * kh * kw) / w_max)
        styles = styles / styles.norm(float("inf"), dim=1, keepdim=True)

    w = dcoefs = None
    if demodulate or fused_modconv:
        w = weight.unsqueeze(0) * styles.reshape(n, 1, -1, 1, 1)  # [N, O, I, k, k]
    if demodulate:
        dcoefs = (w.square().sum(dim=[2, 3, 4]) + 1e-8).rsqrt()  # [N, O]

    pointwise = kh == 1 and kw == 1 and up == 1 and padding == 0  # the torgb / toseg heads
    if not fused_modconv:
        x = x * styles.to(x.dtype).reshape(n, -1, 1, 1)
        if pointwise:
            x = conv1x1(x, weight.to(x.dtype).reshape(out_ch, in_ch))
        else:
            x = conv2d_resample(x, weight.to(x.dtype), resample_filter, up=up, padding=padding,
                                flip_weight=flip_weight)
        if demodulate and noise is not None:
            return torch.addcmul(noise.to(x.dtype), x, dcoefs.to(x.dtype).reshape(n, -1, 1, 1))
        if demodulate:
            return x * dcoefs.to(x.dtype).reshape(n, -1, 1, 1)
        return x + noise.to(x.dtype) if noise is not None else x

    if demodulate:
        w = w * dcoefs.reshape(n, -1, 1, 1, 1)
    if pointwise:
        x = conv1x1(x, w.reshape(n, out_ch, in_ch).to(x.dtype))
        return x + noise.to(x.dtype) if noise is not None else x
    x = x.reshape(1, -1, *x.shape[2:])
    w = w.reshape(-1, in_ch, kh, kw)
    x = conv2d_resample(x, w.to(x.dtype), resample_filter, up=up, padding=padding, groups=n,
                        flip_weight=flip_weight)
    x = x.reshape(n, -1, *x.shape[2:])
    return x + noise.to(x.dtype) if noise is not None else x
