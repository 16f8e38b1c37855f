"""StyleGAN2-ADA's adaptive discriminator augmentation for VIS+NIR pairs, in pure torch.

`AugmentPipe` implements upstream's whole pipeline (pixel blitting, general geometric and colour
transforms, image-space filtering, additive noise, cutout) with upstream's default strengths; each
transform's probability is its multiplier times the buffer `p`. General geometric transforms follow
upstream's resampling: reflect padding, 2x upsampling with the orthogonal sym6 wavelet, one bilinear
`grid_sample`, sym6 downsampling.

VIS+NIR (the one change from upstream): one set of parameters is drawn per sample and applied to
both images, so the pair stays pixel-aligned. Geometry warps the 4 channels (RGB + NIR) together.
Colour: VIS gets the full 3x3 colour transform; NIR gets what upstream applies to a 1-channel image
under the SAME transform (the channel mean of the matrix rows): brightness and contrast carry over,
luma flip negates the NIR image, hue rotation and saturation leave a grey image unchanged. So a NIR
image equal to the channel mean of its VIS image stays equal to it after augmentation.

Other differences from upstream: the pixel blits (x-flip, 90-degree rotations, integer translation)
are an exact pixel gather, done before the general transforms, instead of being folded into the one
resampling (sym6 is not symmetric, so upstream's resampled x-flip is only close to a flip; the
composition is the same, only border pixels of a translated-and-warped image differ); samples whose
drawn transform is the identity pass through untouched, so p=0 is exactly the identity; the colour
matrix is applied with elementwise multiply-adds rather than a batched matmul, so TF32 never rounds
the images; transform parameters are composed in float64. Filtering, noise and cutout draw one gain
vector, one noise strength and one cutout rectangle per sample and apply them to VIS and NIR alike.

`AdaController` is upstream's p heuristic: every `interval` steps,
    p <- max(p + sign(E[sign(D(real))] - target) * batch * interval / (speed_kimg * 1000), 0).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from facegen.models.errors import UserError

GEOMETRIC = ("xflip", "rotate90", "xint", "scale", "rotate", "aniso", "xfrac")
COLOR = ("brightness", "contrast", "lumaflip", "hue", "saturation")
CORRUPTIONS = ("imgfilter", "noise", "cutout")
FLAGS = GEOMETRIC + COLOR + CORRUPTIONS
# Upstream's default strengths (augment.py): ranges and log2 standard deviations.
STRENGTHS = {
    "xint_max": 0.125, "scale_std": 0.2, "rotate_max": 1.0, "aniso_std": 0.2, "xfrac_std": 0.125,
    "brightness_std": 0.2, "contrast_std": 0.5, "hue_max": 1.0, "saturation_std": 1.0,
    "imgfilter_std": 1.0, "noise_std": 0.1, "cutout_size": 0.5,
}
# Upstream's `--augpipe` names (train.py), plus the one-letter parts so 'b', 'g', 'c', 'bc' ... work.
AUGPIPE_SPECS: dict[str, tuple[str, ...]] = {
    "blit": ("xflip", "rotate90", "xint"),
    "geom": ("scale", "rotate", "aniso", "xfrac"),
    "color": COLOR,
    "filter": ("imgfilter",),
    "noise": ("noise",),
    "cutout": ("cutout",),
    "bg": GEOMETRIC,
    "bgc": GEOMETRIC + COLOR,
    "bgcf": GEOMETRIC + COLOR + ("imgfilter",),
    "bgcfn": GEOMETRIC + COLOR + ("imgfilter", "noise"),
    "bgcfnc": GEOMETRIC + COLOR + CORRUPTIONS,
}
_LETTERS = {"b": AUGPIPE_SPECS["blit"], "g": AUGPIPE_SPECS["geom"], "c": COLOR}
# sym6 orthogonal wavelet lowpass taps (upstream's `wavelets['sym6']`, i.e. pywt's sym6 dec_lo).
SYM6 = (0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
        0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
        -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148)
SYM2 = (-0.12940952255092145, 0.22414386804185735, 0.836516303737469, 0.48296291314469025)
FILTER_EXPECTED_POWER = (10 / 13, 1 / 13, 1 / 13, 1 / 13)  # upstream: the 1/f power of the four bands


def filter_bank() -> torch.Tensor:
    """Upstream's 4-band filter bank [4, 43] for image-space filtering: band 0 the lowpass, bands 1-3
    octave bandpasses, built from the sym2 wavelet's H(z)H(1/z)/2 and H(-z)H(-1/z)/2. Its rows sum to a
    unit impulse, so unit gains are the identity."""
    lo = torch.tensor(SYM2, dtype=torch.float64)
    hi = lo * torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    full = lambda a, b: F.conv1d(a.view(-1, 1, a.shape[-1]), b.flip(0).view(1, 1, -1),  # noqa: E731
                                 padding=b.numel() - 1).view(a.shape[0], -1)  # row-wise full convolution
    lo2, hi2 = full(lo[None], lo.flip(0))[0] / 2, full(hi[None], hi.flip(0))[0] / 2
    bank = torch.zeros(4, 1, dtype=torch.float64)
    bank[0, 0] = 1
    for i in range(1, 4):
        upsampled = torch.zeros(4, bank.shape[1] * 2 - 1, dtype=torch.float64)
        upsampled[:, ::2] = bank  # zero-insert between taps
        bank = full(upsampled, lo2)
        start = (bank.shape[1] - hi2.numel()) // 2
        bank[i, start:start + hi2.numel()] += hi2
    return bank.to(torch.float32)


# ---------------------------------------------------------------------------- 2-D matrices
def _matrix3(rows: list[list[torch.Tensor | float]], like: torch.Tensor) -> torch.Tensor:
    """[B, 3, 3] from per-sample entries (tensors [B]) and constants."""
    flat = [e if torch.is_tensor(e) else torch.full_like(like, float(e)) for row in rows for e in row]
    return torch.stack(flat, dim=-1).reshape(-1, 3, 3)


def _translate(tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    return _matrix3([[1, 0, tx], [0, 1, ty], [0, 0, 1]], tx)


def _scale(sx: torch.Tensor, sy: torch.Tensor) -> torch.Tensor:
    return _matrix3([[sx, 0, 0], [0, sy, 0], [0, 0, 1]], sx)


def _rotate(theta: torch.Tensor) -> torch.Tensor:
    c, s = torch.cos(theta), torch.sin(theta)
    return _matrix3([[c, -s, 0], [s, c, 0], [0, 0, 1]], theta)


def _const3(kind: str, a: float, b: float, batch: int, device: torch.device) -> torch.Tensor:
    x = torch.full([batch], float(a), dtype=torch.float64, device=device)
    y = torch.full([batch], float(b), dtype=torch.float64, device=device)
    return _translate(x, y) if kind == "translate" else _scale(x, y)


# ------------------------------------------------------------------------------ FIR resampling
def _fir(x: torch.Tensor, taps: torch.Tensor, *, up: int = 1, down: int = 1, pad: tuple[int, int] = (0, 0),
         flip: bool = True, gain: float = 1.0) -> torch.Tensor:
    """upfirdn2d with a separable 1-D filter and upstream's rules: zero-insert, pad (negative crops) the
    same on x and y, convolve (correlate if not `flip`), keep every `down`-th pixel."""
    n, c, h, w = x.shape
    if up > 1:
        x = F.pad(x.reshape(n, c, h, 1, w, 1), [0, up - 1, 0, 0, 0, up - 1]).reshape(n, c, h * up, w * up)
    x = F.pad(x, [pad[0], pad[1], pad[0], pad[1]])
    f = taps.to(x.dtype) * math.sqrt(gain)  # the gain is split between the two 1-D passes
    f = f.flip(0) if flip else f  # conv2d correlates; upfirdn2d convolves unless flip_filter
    k = f.numel()
    x = F.conv2d(x, f.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c, stride=(1, down))
    return F.conv2d(x, f.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c, stride=(down, 1))


def _upsample2x(x: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """upstream `upsample2d(x, f, up=2)`."""
    k = taps.numel()
    return _fir(x, taps, up=2, pad=((k + 1) // 2, (k - 2) // 2), gain=4.0)


def _downsample2x(x: torch.Tensor, taps: torch.Tensor, crop: int) -> torch.Tensor:
    """upstream `downsample2d(x, f, down=2, padding=-crop, flip_filter=True)`."""
    k = taps.numel()
    return _fir(x, taps, down=2, pad=((k - 1) // 2 - crop, (k - 2) // 2 - crop), flip=False)


# ------------------------------------------------------------------------------ colour matrices
def _luma_axis(device: torch.device) -> torch.Tensor:
    return torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64, device=device) / math.sqrt(3)


def _rotate3d(v: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """[B, 4, 4] rotation by theta [B] about the unit axis v (Rodrigues); exactly I at theta = 0."""
    cos, sin = torch.cos(theta).view(-1, 1, 1), torch.sin(theta).view(-1, 1, 1)
    x, y, z = v[0], v[1], v[2]
    cross = torch.zeros(4, 4, dtype=v.dtype, device=v.device)
    cross[0, 1], cross[0, 2], cross[1, 0], cross[1, 2], cross[2, 0], cross[2, 1] = -z, y, z, -x, -y, x
    eye3 = torch.diag(torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=v.dtype, device=v.device))
    rotation = eye3 + sin * cross + (1 - cos) * (torch.outer(v, v) - eye3 * v.square().sum())
    rotation[:, 3, 3] = 1
    return rotation


def _reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    """Indices mirrored into [0, size) without repeating the edge pixel (F.pad's 'reflect')."""
    if size == 1:
        return torch.zeros_like(index)
    period = 2 * (size - 1)
    index = index.remainder(period)
    return torch.where(index >= size, period - index, index)


# --------------------------------------------------------------------------------- the pipe
class AugmentPipe(torch.nn.Module):
    """`forward(vis [B,3,H,W], nir [B,1,H,W])` -> the pair augmented with shared parameters.

    Keyword arguments: probability multipliers (`xflip=1`, ..., see FLAGS; 0 = off) and strength
    overrides (STRENGTHS). `p` (a buffer, saved with the module) scales every probability.
    """

    def __init__(self, p: float = 0.0, **flags: float):
        super().__init__()
        unknown = sorted(set(flags) - set(FLAGS) - set(STRENGTHS))
        if unknown:
            known = sorted(FLAGS + tuple(STRENGTHS))
            raise UserError(f"augment pipe: unknown option(s) {unknown}; known: {known}")
        self.register_buffer("p", torch.tensor(float(p)))
        self.flags = {name: float(flags.get(name, 0.0)) for name in FLAGS}
        self.strengths = {name: float(flags.get(name, value)) for name, value in STRENGTHS.items()}
        self.register_buffer("taps", torch.tensor(SYM6) / sum(SYM6), persistent=False)
        self.register_buffer("fbank", filter_bank(), persistent=False)

    def extra_repr(self) -> str:
        enabled = ", ".join(f"{k}={v:g}" for k, v in self.flags.items() if v)
        return f"p={float(self.p):.4f}, {enabled or 'nothing enabled'}"

    def forward(self, vis: torch.Tensor, nir: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if vis.ndim != 4 or vis.shape[1] != 3 or nir.shape != (vis.shape[0], 1, *vis.shape[2:]):
            raise ValueError(f"augment: expected vis [B,3,H,W] and nir [B,1,H,W], got {tuple(vis.shape)} "
                             f"and {tuple(nir.shape)}")
        blit_inv, geom_inv = self._sample_geometry(vis.shape[0], vis.shape[2], vis.shape[3], vis.device)
        if blit_inv is not None or geom_inv is not None:
            both = torch.cat([vis, nir], dim=1)  # one warp for the pair keeps it pixel-aligned
            both = self._blit(both, blit_inv) if blit_inv is not None else both
            both = self._warp(both, geom_inv) if geom_inv is not None else both
            vis, nir = both[:, :3], both[:, 3:]
        color = self._sample_color(vis.shape[0], vis.device)
        if color is not None:
            vis, nir = self._apply_color(vis, nir, color)
        if any(self.flags[name] for name in CORRUPTIONS):
            both = self._corrupt(torch.cat([vis, nir], dim=1))
            vis, nir = both[:, :3], both[:, 3:]
        return vis, nir

    # -- filtering and corruptions (upstream's order: filter, noise, cutout) -----------------------------
    def _corrupt(self, images: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = images.shape
        f, s, p, device = self.flags, self.strengths, self.p.to(images.device), images.device
        if f["imgfilter"]:
            images = self._filter(images, p)
        if f["noise"]:
            sigma = torch.randn([batch, 1, 1, 1], device=device).abs() * s["noise_std"]
            sigma = torch.where(torch.rand([batch, 1, 1, 1], device=device) < f["noise"] * p, sigma, 0)
            images = images + torch.randn_like(images) * sigma.to(images.dtype)
        if f["cutout"]:
            size = torch.full([batch, 2, 1, 1, 1], s["cutout_size"], device=device)
            size = torch.where(torch.rand([batch, 1, 1, 1, 1], device=device) < f["cutout"] * p, size, 0)
            center = torch.rand([batch, 2, 1, 1, 1], device=device)
            xs = torch.arange(width, device=device).reshape(1, 1, 1, -1)
            ys = torch.arange(height, device=device).reshape(1, 1, -1, 1)
            outside_x = ((xs + 0.5) / width - center[:, 0]).abs() >= size[:, 0] / 2
            outside_y = ((ys + 0.5) / height - center[:, 1]).abs() >= size[:, 1] / 2
            images = images * torch.logical_or(outside_x, outside_y).to(images.dtype)
        return images

    def _filter(self, images: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """Amplify each frequency band by 2^N(0, imgfilter_std) with probability imgfilter * p, keeping the
        expected power; one separable filter per sample (reflect padding), as upstream."""
        batch, channels, height, width = images.shape
        device, bands = images.device, self.fbank.shape[0]
        expected = torch.tensor(FILTER_EXPECTED_POWER, device=device)
        gains = torch.ones([batch, bands], device=device)
        for i in range(bands):
            t_i = torch.exp2(torch.randn([batch], device=device) * self.strengths["imgfilter_std"])
            t_i = torch.where(torch.rand([batch], device=device) < self.flags["imgfilter"] * p, t_i, 1)
            t = torch.ones([batch, bands], device=device)
            t[:, i] = t_i
            gains = gains * t / (expected * t.square()).sum(dim=-1, keepdim=True).sqrt()
        changed = (gains != 1).any(dim=1).view(batch, 1, 1, 1)
        taps = (gains @ self.fbank.to(device)).repeat_interleave(channels, dim=0)  # [B*C, K]
        pad = self.fbank.shape[1] // 2
        x = F.pad(images.reshape(1, batch * channels, height, width), [pad] * 4, mode="reflect")
        x = F.conv2d(x, taps.to(x.dtype)[:, None, None, :], groups=batch * channels)
        x = F.conv2d(x, taps.to(x.dtype)[:, None, :, None], groups=batch * channels)
        return torch.where(changed, x.reshape(images.shape), images)  # unit gains: exactly the identity

    # -- parameters --------------------------------------------------------------------------
    def _maybe(self, name: str, values: torch.Tensor, identity: float) -> torch.Tensor:
        """`values` where transform `name` applies to the sample (probability multiplier * p), else
        `identity`. One draw per sample: `values` is [B] or [B, k] (k values share the draw)."""
        shape = [values.shape[0]] + [1] * (values.ndim - 1)
        chance = torch.rand(shape, device=values.device) < self.flags[name] * self.p.to(values.device)
        return torch.where(chance, values, identity)

    def _sample_geometry(self, batch: int, height: int, width: int, device: torch.device
                         ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Inverse transforms [B, 3, 3] (float64, output pixel -> input pixel, centred coordinates) in
        upstream's order, split into the pixel blit (xflip, rotate90, xint) and the general part
        (scale, rotate, aniso, xfrac); upstream's single G_inv is their product blit @ general.
        Either is None when none of its transforms is enabled."""
        f, s, p = self.flags, self.strengths, self.p.to(device, torch.float64)
        kw = {"device": device, "dtype": torch.float64}
        rand, randn = (lambda *shape: torch.rand(*shape, **kw)), (lambda *shape: torch.randn(*shape, **kw))
        eye = torch.eye(3, **kw).expand(batch, 3, 3)
        blit = geom = None
        if f["xflip"] or f["rotate90"] or f["xint"]:
            blit = eye
            if f["xflip"]:
                i = self._maybe("xflip", torch.floor(rand(batch) * 2), 0)
                blit = blit @ _scale(1 - 2 * i, torch.ones_like(i))
            if f["rotate90"]:
                blit = blit @ _rotate(math.pi / 2 * self._maybe("rotate90", torch.floor(rand(batch) * 4), 0))
            if f["xint"]:
                t = self._maybe("xint", (rand(batch, 2) * 2 - 1) * s["xint_max"], 0)
                blit = blit @ _translate(-torch.round(t[:, 0] * width), -torch.round(t[:, 1] * height))
        if any(f[name] for name in ("scale", "rotate", "aniso", "xfrac")):
            geom = eye
            if f["scale"]:
                k = self._maybe("scale", torch.exp2(randn(batch) * s["scale_std"]), 1)
                geom = geom @ _scale(1 / k, 1 / k)
            p_rot = 1 - torch.sqrt((1 - f["rotate"] * p).clamp(0, 1))  # P(pre or post) = rotate * p
            if f["rotate"]:
                geom = geom @ _rotate(self._angle(batch, p_rot, kw))
            if f["aniso"]:
                k = self._maybe("aniso", torch.exp2(randn(batch) * s["aniso_std"]), 1)
                geom = geom @ _scale(1 / k, k)
            if f["rotate"]:
                geom = geom @ _rotate(self._angle(batch, p_rot, kw))
            if f["xfrac"]:
                t = self._maybe("xfrac", randn(batch, 2) * s["xfrac_std"], 0)
                geom = geom @ _translate(-t[:, 0] * width, -t[:, 1] * height)
        return blit, geom

    def _angle(self, batch: int, probability: torch.Tensor, kw: dict) -> torch.Tensor:
        theta = (torch.rand(batch, **kw) * 2 - 1) * math.pi * self.strengths["rotate_max"]
        return torch.where(torch.rand(batch, **kw) < probability, theta, 0)

    def _sample_color(self, batch: int, device: torch.device) -> torch.Tensor | None:
        """Colour transforms [B, 4, 4] (float64, homogeneous RGB) in upstream's order; None if disabled."""
        if not any(self.flags[name] for name in COLOR):
            return None
        f, s = self.flags, self.strengths
        kw = {"device": device, "dtype": torch.float64}
        eye = torch.eye(4, **kw)
        c = eye.expand(batch, 4, 4)
        v = _luma_axis(device)
        luma = torch.outer(v, v)
        if f["brightness"]:
            b = self._maybe("brightness", torch.randn(batch, **kw) * s["brightness_std"], 0)
            shift = eye.repeat(batch, 1, 1)
            shift[:, :3, 3] = b[:, None]
            c = shift @ c
        if f["contrast"]:
            k = self._maybe("contrast", torch.exp2(torch.randn(batch, **kw) * s["contrast_std"]), 1)
            c = torch.diag_embed(torch.stack([k, k, k, torch.ones_like(k)], dim=1)) @ c
        if f["lumaflip"]:
            i = self._maybe("lumaflip", torch.floor(torch.rand(batch, 1, 1, **kw) * 2), 0)
            c = (eye - 2 * luma * i) @ c  # Householder reflection through the grey axis
        if f["hue"]:
            theta = self._maybe("hue", (torch.rand(batch, **kw) * 2 - 1) * math.pi * s["hue_max"], 0)
            c = _rotate3d(v, theta) @ c
        if f["saturation"]:
            k = self._maybe("saturation", torch.exp2(torch.randn(batch, 1, 1, **kw) * s["saturation_std"]), 1)
            c = (eye + (k - 1) * (eye - luma)) @ c  # = luma + (I - luma) * k, exactly I at k = 1
        return c

    # -- execution ---------------------------------------------------------------------------
    def _blit(self, images: torch.Tensor, b_inv: torch.Tensor) -> torch.Tensor:
        """x-flip, 90-degree rotations and integer translation as an exact pixel gather (reflected at
        the border, like upstream's reflect padding); samples with the identity pass through."""
        batch, channels, height, width = images.shape
        eye = torch.eye(3, dtype=b_inv.dtype, device=b_inv.device)
        moved = (b_inv != eye).flatten(1).any(dim=1).nonzero().squeeze(1)  # one host sync per call
        if moved.numel() == 0:
            return images
        cx, cy = (width - 1) / 2, (height - 1) / 2
        kw = {"dtype": b_inv.dtype, "device": b_inv.device}
        ys, xs = torch.meshgrid(torch.arange(height, **kw) - cy, torch.arange(width, **kw) - cx,
                                indexing="ij")
        out_pixels = torch.stack([xs.flatten(), ys.flatten(), torch.ones_like(xs.flatten())])  # [3, H*W]
        source = b_inv.index_select(0, moved) @ out_pixels  # [b, 3, H*W]
        col = _reflect(torch.round(source[:, 0] + cx).long(), width)
        row = _reflect(torch.round(source[:, 1] + cy).long(), height)
        index = (row * width + col)[:, None, :].expand(-1, channels, -1)
        picked = images.index_select(0, moved).flatten(2).gather(2, index).view(-1, channels, height, width)
        return images.index_copy(0, moved, picked)

    def _warp(self, images: torch.Tensor, g_inv: torch.Tensor) -> torch.Tensor:
        """Resample the samples whose transform is not the identity; the others pass through untouched."""
        eye = torch.eye(3, dtype=g_inv.dtype, device=g_inv.device)
        moved = (g_inv != eye).flatten(1).any(dim=1).nonzero().squeeze(1)  # one host sync per call
        if moved.numel() == 0:
            return images
        warped = self._resample(images.index_select(0, moved), g_inv.index_select(0, moved))
        return images.index_copy(0, moved, warped.to(images.dtype))

    def _resample(self, images: torch.Tensor, g_inv: torch.Tensor) -> torch.Tensor:
        """Upstream's geometric execution: reflect-pad what the transform can reach, upsample 2x with
        sym6, bilinear grid_sample, downsample 2x with sym6 and crop back to the input size."""
        batch, channels, height, width = images.shape
        kw = {"device": images.device, "dtype": torch.float64}
        half = self.taps.numel() // 4  # upstream's Hz_pad
        cx, cy = (width - 1) / 2, (height - 1) / 2
        corners = torch.tensor([[-cx, -cy, 1], [cx, -cy, 1], [cx, cy, 1], [-cx, cy, 1]], **kw).t()
        reach = (g_inv @ corners)[:, :2, :].permute(1, 0, 2).reshape(2, -1)  # input-space corners
        margin = torch.cat([-reach, reach]).amax(dim=1)  # [x0, y0, x1, y1]
        margin = margin + torch.tensor([2 * half - cx, 2 * half - cy] * 2, **kw)
        limit = torch.tensor([width - 1, height - 1] * 2, **kw)
        mx0, my0, mx1, my1 = (int(m) for m in torch.minimum(margin.clamp(min=0), limit).ceil().tolist())
        images = F.pad(images, [mx0, mx1, my0, my1], mode="reflect")
        translate = lambda x, y: _const3("translate", x, y, batch, images.device)  # noqa: E731
        scale = lambda x, y: _const3("scale", x, y, batch, images.device)  # noqa: E731
        g = translate((mx0 - mx1) / 2, (my0 - my1) / 2) @ g_inv  # origin moves with the padding
        images = _upsample2x(images, self.taps.to(images.device))
        g = scale(2, 2) @ g @ scale(0.5, 0.5)
        g = translate(-0.5, -0.5) @ g @ translate(0.5, 0.5)  # pixel centres of the 2x grid
        out_h, out_w = (height + half * 2) * 2, (width + half * 2) * 2
        g = scale(2 / images.shape[3], 2 / images.shape[2]) @ g @ scale(out_w / 2, out_h / 2)  # to [-1, 1]
        grid = F.affine_grid(g[:, :2, :].to(images.dtype), [batch, channels, out_h, out_w],
                             align_corners=False)
        images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return _downsample2x(images, self.taps.to(images.device), crop=half * 2)

    @staticmethod
    def _apply_color(vis: torch.Tensor, nir: torch.Tensor, c: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """VIS: out_i = sum_j C_ij x_j + C_i3 (elementwise, no TF32 matmul). NIR: upstream's 1-channel
        rule with the same C (row mean). Samples with C = I pass through untouched."""
        batch = vis.shape[0]
        eye = torch.eye(4, dtype=c.dtype, device=c.device)
        changed = (c != eye).flatten(1).any(dim=1).view(batch, 1, 1, 1)
        matrix, shift = c[:, :3, :3].to(vis.dtype), c[:, :3, 3].to(vis.dtype)
        vis_out = (matrix[:, :, :, None, None] * vis[:, None]).sum(dim=2) + shift[:, :, None, None]
        grey = c[:, :3, :].mean(dim=1).to(nir.dtype)  # [B, 4]
        nir_out = nir * grey[:, :3].sum(dim=1).view(batch, 1, 1, 1) + grey[:, 3].view(batch, 1, 1, 1)
        return torch.where(changed, vis_out, vis), torch.where(changed, nir_out, nir)


def augpipe_flags(name: str) -> dict[str, float]:
    """`--augpipe` name -> enable flags: upstream's 'blit', 'geom', 'color', 'filter', 'noise', 'cutout',
    'bg', 'bgc', 'bgcf', 'bgcfn', 'bgcfnc', or any combination of the letters b (blit), g (geom),
    c (colour), e.g. 'c' or 'bc'."""
    if name in AUGPIPE_SPECS:
        names = AUGPIPE_SPECS[name]
    elif name and set(name) <= set(_LETTERS):
        names = tuple(flag for letter in name for flag in _LETTERS[letter])
    else:
        raise UserError(f"--augpipe: {name!r} is not supported; use one of {sorted(AUGPIPE_SPECS)} or "
                        f"letters from 'bgc'")
    return {flag: 1.0 for flag in names}


def augment_pipe_from_name(name: str, p: float = 0.0) -> AugmentPipe:
    return AugmentPipe(p=p, **augpipe_flags(name))


# ------------------------------------------------------------------------------ controller
class AdaController:
    """Upstream's ADA heuristic: p follows the sign of D's outputs on real images toward `target`.

    Call `accumulate(real_logits)` whenever D scores reals and `step()` once per training step;
    every `interval`-th step (as upstream: batch_idx is incremented, then `batch_idx % interval == 0`) moves p
    by batch_size * interval / (speed_kimg * 1000) toward the target, never below 0. `step` takes an
    optional `all_reduce` (sums a tensor over ranks) so every rank sees the same statistic.
    """

    def __init__(self, *, batch_size: int, target: float = 0.6, interval: int = 4, speed_kimg: float = 500,
                 p: float = 0.0, pipe: AugmentPipe | None = None):
        if batch_size <= 0 or interval <= 0 or speed_kimg <= 0:
            raise UserError("ada: batch_size, interval and speed_kimg must be positive")
        self.batch_size, self.target = batch_size, target
        self.interval, self.speed_kimg = interval, speed_kimg
        self.pipe = pipe
        self.p = float(p)
        self.num_steps = 0
        self.last_rt: float | None = None  # E[sign(D(real))] of the last adjustment
        self._sign_sum: torch.Tensor | float = 0.0
        self._count = 0
        self._publish()

    @property
    def adjust_size(self) -> float:
        return self.batch_size * self.interval / (self.speed_kimg * 1000)

    def accumulate(self, real_logits: torch.Tensor) -> None:
        """Add the signs of D's logits on real images (kept on device: no host sync)."""
        self._sign_sum = self._sign_sum + real_logits.detach().sign().sum().to(torch.float64)
        self._count += real_logits.numel()

    def step(self, all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> float:
        self.num_steps += 1  # upstream increments batch_idx before its `batch_idx % interval == 0` test
        due = self.num_steps % self.interval == 0
        if not due:
            return self.p
        stats = torch.stack([torch.as_tensor(self._sign_sum, dtype=torch.float64).reshape(()).cpu(),
                             torch.tensor(float(self._count), dtype=torch.float64)])
        if all_reduce is not None:
            stats = all_reduce(stats)
        self._sign_sum, self._count = 0.0, 0
        total, count = (float(v) for v in stats.tolist())
        if count == 0:
            return self.p
        self.last_rt = total / count
        direction = (self.last_rt > self.target) - (self.last_rt < self.target)  # numpy's sign
        self.p = max(self.p + direction * self.adjust_size, 0.0)
        self._publish()
        return self.p

    def _publish(self) -> None:
        if self.pipe is not None:
            self.pipe.p.copy_(torch.tensor(self.p))

    def state_dict(self) -> dict:
        return {"p": self.p, "num_steps": self.num_steps, "last_rt": self.last_rt,
                "sign_sum": float(self._sign_sum), "count": self._count, "target": self.target,
                "interval": self.interval, "speed_kimg": self.speed_kimg, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        """Restore p, the step counter and the pending statistics (the settings stay as constructed)."""
        self.p, self.num_steps = float(state["p"]), int(state["num_steps"])
        self.last_rt = state.get("last_rt")
        self._sign_sum, self._count = float(state.get("sign_sum", 0.0)), int(state.get("count", 0))
        self._publish()
