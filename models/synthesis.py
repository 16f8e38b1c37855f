"""Dual-branch StyleGAN2 synthesis network ('skip' architecture with a VIS `torgb` and a NIR `toseg` head).

Layer names ('b8.conv0', 'b8.torgb', ...) key the StyleSpace dicts (`compute_styles`, `styles=`) and
the per-layer noise dicts (`noise=`).
"""

from __future__ import annotations

import math

import torch

from facegen.models.layers import FullyConnectedLayer
from facegen.models.ops import ACTIVATIONS, bias_act, fp16_supported, modulated_conv2d, setup_filter, upsample2d

NOISE_MODES = ("random", "const", "none")
StyleDict = dict[str, torch.Tensor]


class SynthesisLayer(torch.nn.Module):
    """Modulated 3x3 conv (optionally upsampling x2), noise, bias, lrelu, clamp."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int,
                 up: int = 1, conv_clamp: float | None = None, kernel_size: int = 3) -> None:
        super().__init__()
        self.resolution = resolution
        self.up = up
        self.conv_clamp = conv_clamp
        self.register_buffer("resample_filter", setup_filter())
        self.padding = kernel_size // 2
        self.act_gain = ACTIVATIONS["lrelu"][0]
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = torch.nn.Parameter(torch.randn([out_channels, in_channels, kernel_size, kernel_size]))
        self.register_buffer("noise_const", torch.randn([resolution, resolution]))
        self.noise_strength = torch.nn.Parameter(torch.zeros([]))
        self.bias = torch.nn.Parameter(torch.zeros([out_channels]))

    def _noise(self, x: torch.Tensor, noise_mode: str, noise: torch.Tensor | None) -> torch.Tensor | None:
        res = self.resolution
        if noise is not None:  # caller-supplied per-sample noise wins over noise_mode
            if noise.shape != (x.shape[0], 1, res, res):
                raise ValueError(f"noise must be [{x.shape[0]}, 1, {res}, {res}], got {list(noise.shape)}")
            return noise.to(device=x.device, dtype=torch.float32) * self.noise_strength
        if noise_mode == "random":
            return torch.randn([x.shape[0], 1, res, res], device=x.device) * self.noise_strength
        if noise_mode == "const":
            return self.noise_const * self.noise_strength
        return None

    def forward(self, x: torch.Tensor, styles: torch.Tensor, noise_mode: str = "const",
                noise: torch.Tensor | None = None, fused_modconv: bool = False, gain: float = 1.0
                ) -> torch.Tensor:
        x = modulated_conv2d(x, self.weight, styles, noise=self._noise(x, noise_mode, noise), up=self.up,
                             padding=self.padding, resample_filter=self.resample_filter,
                             flip_weight=(self.up == 1), fused_modconv=fused_modconv)
        clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        return bias_act(x, self.bias, act="lrelu", gain=self.act_gain * gain, clamp=clamp)


class ToRGBLayer(torch.nn.Module):
    """1x1 modulated conv without demodulation (styles scaled by 1/sqrt(C_in)); used for torgb and toseg."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, conv_clamp: float | None = None,
                 kernel_size: int = 1) -> None:
        super().__init__()
        self.conv_clamp = conv_clamp
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = torch.nn.Parameter(torch.randn([out_channels, in_channels, kernel_size, kernel_size]))
        self.bias = torch.nn.Parameter(torch.zeros([out_channels]))
        self.weight_gain = 1 / math.sqrt(in_channels * kernel_size**2)

    def forward(self, x: torch.Tensor, styles: torch.Tensor, fused_modconv: bool = False) -> torch.Tensor:
        x = modulated_conv2d(x, self.weight, styles * self.weight_gain, demodulate=False,
                             fused_modconv=fused_modconv)
        return bias_act(x, self.bias, clamp=self.conv_clamp)


class SynthesisBlock(torch.nn.Module):
    """One resolution: [const | conv0 (up x2)] -> conv1 -> torgb (+ toseg), images accumulated in fp32."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int,
                 img_channels: int, nir_channels: int, conv_clamp: float | None, use_fp16: bool) -> None:
        super().__init__()
        self.name = f"b{resolution}"
        self.in_channels = in_channels
        self.resolution = resolution
        self.use_fp16 = use_fp16
        self.register_buffer("resample_filter", setup_filter())
        if in_channels == 0:
            self.const = torch.nn.Parameter(torch.randn([out_channels, resolution, resolution]))
        else:
            self.conv0 = SynthesisLayer(in_channels, out_channels, w_dim, resolution, up=2,
                                        conv_clamp=conv_clamp)
        self.conv1 = SynthesisLayer(out_channels, out_channels, w_dim, resolution, conv_clamp=conv_clamp)
        self.torgb = ToRGBLayer(out_channels, img_channels, w_dim, conv_clamp=conv_clamp)
        if nir_channels > 0:
            self.toseg = ToRGBLayer(out_channels, nir_channels, w_dim, conv_clamp=conv_clamp)
        self.num_conv = 1 if in_channels == 0 else 2
        self.num_torgb = 1  # toseg shares the torgb w

    def conv_names(self) -> list[str]:
        convs = ["conv1"] if self.in_channels == 0 else ["conv0", "conv1"]
        return [f"{self.name}.{c}" for c in convs]

    def style_names(self) -> list[str]:
        heads = ["torgb", "toseg"] if hasattr(self, "toseg") else ["torgb"]
        return self.conv_names() + [f"{self.name}.{h}" for h in heads]

    def style_layers(self, ws: torch.Tensor) -> list[tuple[str, torch.nn.Module, torch.Tensor]]:
        """(name, layer, w) for every modulated layer of the block; the heads share the last w."""
        return [(name, getattr(self, name.split(".")[1]), ws[:, min(i, self.num_conv)])
                for i, name in enumerate(self.style_names())]

    def forward(self, x: torch.Tensor | None, img: torch.Tensor | None, nir: torch.Tensor | None,
                ws: torch.Tensor, styles: StyleDict, noise_mode: str, noise: dict[str, torch.Tensor],
                fast: bool, force_fp32: bool, channels_last: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        fp16 = self.use_fp16 and not force_fp32 and fp16_supported(ws.device)
        dtype = torch.float16 if fp16 else torch.float32
        s = {n: styles[n] if n in styles else layer.affine(w) for n, layer, w in self.style_layers(ws)}
        if self.in_channels == 0:
            x = self.const.to(dtype).unsqueeze(0).repeat([ws.shape[0], 1, 1, 1])
        else:
            x = x.to(dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        for name in self.conv_names():
            layer = getattr(self, name.split(".")[1])
            x = layer(x, s[name], noise_mode=noise_mode, noise=noise.get(name), fused_modconv=fast)

        if img is not None:  # accumulate the skip images in fp32
            img = upsample2d(img, self.resample_filter)
            nir = upsample2d(nir, self.resample_filter) if nir is not None else None
        y = self.torgb(x, s[f"{self.name}.torgb"], fused_modconv=fast).to(torch.float32)
        img = img + y if img is not None else y
        if hasattr(self, "toseg"):
            y = self.toseg(x, s[f"{self.name}.toseg"], fused_modconv=fast).to(torch.float32)
            nir = nir + y if nir is not None else y
        return x, img, nir


class SynthesisNetwork(torch.nn.Module):
    """ws [N, num_ws, w_dim] -> (vis [N, img_channels, R, R], nir [N, nir_channels, R, R] or None)."""

    def __init__(self, w_dim: int, img_resolution: int, img_channels: int, nir_channels: int = 1,
                 channel_base: int = 16384, channel_max: int = 512, num_fp16_res: int = 4,
                 conv_clamp: float | None = 256) -> None:
        super().__init__()
        self.w_dim = w_dim
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.nir_channels = nir_channels
        log2 = int(math.log2(img_resolution))
        self.block_resolutions = [2**i for i in range(2, log2 + 1)]
        channels = {res: min(channel_base // res, channel_max) for res in self.block_resolutions}
        fp16_resolution = max(2 ** (log2 + 1 - num_fp16_res), 8)
        self.num_ws = 0
        for res in self.block_resolutions:
            block = SynthesisBlock(channels[res // 2] if res > 4 else 0, channels[res], w_dim, res,
                                   img_channels, nir_channels, conv_clamp, use_fp16=res >= fp16_resolution)
            self.num_ws += block.num_conv
            setattr(self, f"b{res}", block)
        self.num_ws += 1  # the last block's torgb w

    def blocks(self) -> list[SynthesisBlock]:
        return [getattr(self, f"b{res}") for res in self.block_resolutions]

    def _split_ws(self, ws: torch.Tensor) -> list[torch.Tensor]:
        if ws.ndim != 3 or ws.shape[1:] != (self.num_ws, self.w_dim):
            raise ValueError(f"ws must be [N, {self.num_ws}, {self.w_dim}], got {list(ws.shape)}")
        ws = ws.to(torch.float32)
        out, idx = [], 0
        for block in self.blocks():  # a block's torgb w is the next block's conv0 w
            out.append(ws.narrow(1, idx, block.num_conv + block.num_torgb))
            idx += block.num_conv
        return out

    def noise_shapes(self) -> dict[str, tuple[int, int]]:
        """Layer name -> (H, W) of its noise input; pass tensors [N, 1, H, W] as `noise=`."""
        return {n: (b.resolution, b.resolution) for b in self.blocks() for n in b.conv_names()}

    def style_names(self) -> list[str]:
        """Every modulated layer, in w order: 'b4.conv1', 'b4.torgb', ['b4.toseg'], 'b8.conv0', ..."""
        return [n for b in self.blocks() for n in b.style_names()]

    def compute_styles(self, ws: torch.Tensor) -> StyleDict:
        """StyleSpace: layer name -> affine(w) [N, C_in] (before torgb's 1/sqrt(C_in) gain)."""
        return {name: layer.affine(w)
                for block, bws in zip(self.blocks(), self._split_ws(ws))
                for name, layer, w in block.style_layers(bws)}

    def forward(self, ws: torch.Tensor, noise_mode: str = "const", noise: dict | None = None,
                styles: StyleDict | None = None, fast: bool = False, force_fp32: bool = False,
                channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`fast`: one grouped conv per layer with per-sample weights (best at small batch).
        `channels_last`: the shared-weight path with NHWC activations, the layout GPU tensor cores
        prefer at large batch; the grouped conv cannot use it, so it takes precedence over `fast`."""
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")
        for kind, given, known in (("noise", noise, self.noise_shapes()),
                                   ("styles", styles, self.style_names())):
            unknown = sorted(set(given or {}) - set(known))
            if unknown:
                raise ValueError(f"{kind}: unknown layer names {unknown}")
        x = img = nir = None
        for block, bws in zip(self.blocks(), self._split_ws(ws)):
            x, img, nir = block(x, img, nir, bws, styles or {}, noise_mode, noise or {},
                                fast and not channels_last, force_fp32, channels_last)
        return img, nir

