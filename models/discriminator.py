"""StyleGAN2-ADA discriminator (training/networks.py, `architecture='resnet'`): the VIS D (conditional
by projection, 3 channels) and the NIR D (unconditional, 1 channel) are two instances of the same family.

Parameter names match StyleGAN2-ADA (`b{res}.fromrgb|conv0|conv1|skip`, `b4.mbstd|conv|fc|out`,
`mapping.*`), so original `D` / `D_NIR` state dicts load with strict=True.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from facegen.models.layers import Conv2dLayer, FullyConnectedLayer, MappingNetwork
from facegen.models.netconfig import config_from_dict, is_int, is_number, is_pow2, require
from facegen.models.ops import downsample2d, fp16_supported, setup_filter

ARCHITECTURES = ("orig", "skip", "resnet")


@dataclass(frozen=True)
class DiscriminatorConfig:
    """Constructor arguments of a discriminator (JSON-safe)."""

    c_dim: int = 0  # 0 = unconditional (NIR D); 512 for the identity-conditioned VIS D
    img_resolution: int = 256
    img_channels: int = 3
    architecture: str = "resnet"
    channel_base: int = 16384
    channel_max: int = 512
    num_fp16_res: int = 4
    conv_clamp: float | None = 256
    cmap_dim: int | None = None  # None = channels at 4x4
    mapping_layers: int = 8  # layers of the c -> cmap mapping
    mapping_lr_multiplier: float = 0.01
    mbstd_group_size: int | None = 4  # None = whole minibatch
    mbstd_num_channels: int = 1  # 0 = no minibatch-stddev feature
    freeze_layers: int = 0  # Freeze-D: the first N layers hold their weights as buffers

    def __post_init__(self) -> None:
        what = "discriminator"
        for key in ("c_dim", "num_fp16_res", "mbstd_num_channels", "freeze_layers"):
            v = getattr(self, key)
            require(is_int(v, 0), what, key, "must be an integer >= 0")
        for key in ("img_channels", "channel_base", "channel_max", "mapping_layers"):
            v = getattr(self, key)
            require(is_int(v, 1), what, key, "must be an integer >= 1")
        for key in ("cmap_dim", "mbstd_group_size"):
            v = getattr(self, key)
            require(v is None or is_int(v, 1), what, key, "must be null or an integer >= 1")
        require(is_pow2(self.img_resolution, 8), what, "img_resolution", "must be a power of two >= 8")
        require(self.architecture in ARCHITECTURES, what, "architecture", f"must be one of {ARCHITECTURES}")
        require(self.conv_clamp is None or is_number(self.conv_clamp, 0), what, "conv_clamp",
                "must be null or a number > 0")
        require(is_number(self.mapping_lr_multiplier, 0), what, "mapping_lr_multiplier", "must be a number > 0")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DiscriminatorConfig:
        return config_from_dict(cls, d, "discriminator")


def _block_dtype(use_fp16: bool, x: torch.Tensor, force_fp32: bool) -> torch.dtype:
    return torch.float16 if use_fp16 and not force_fp32 and fp16_supported(x.device) else torch.float32


class DiscriminatorBlock(torch.nn.Module):
    """[fromrgb] -> conv0 -> conv1 (down x2), with a 1x1 downsampling skip in the resnet architecture."""

    def __init__(self, in_channels: int, tmp_channels: int, out_channels: int, resolution: int,
                 img_channels: int, first_layer_idx: int, architecture: str, conv_clamp: float | None,
                 use_fp16: bool, freeze_layers: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.resolution = resolution
        self.architecture = architecture
        self.use_fp16 = use_fp16
        self.register_buffer("resample_filter", setup_filter())
        self.num_layers = 0

        def trainable() -> bool:  # layer indices count across blocks; Freeze-D freezes the first ones
            self.num_layers += 1
            return first_layer_idx + self.num_layers - 1 >= freeze_layers

        if in_channels == 0 or architecture == "skip":
            self.fromrgb = Conv2dLayer(img_channels, tmp_channels, 1, activation="lrelu",
                                       conv_clamp=conv_clamp, trainable=trainable())
        self.conv0 = Conv2dLayer(tmp_channels, tmp_channels, 3, activation="lrelu", conv_clamp=conv_clamp,
                                 trainable=trainable())
        self.conv1 = Conv2dLayer(tmp_channels, out_channels, 3, activation="lrelu", down=2,
                                 conv_clamp=conv_clamp, trainable=trainable())
        if architecture == "resnet":
            self.skip = Conv2dLayer(tmp_channels, out_channels, 1, bias=False, down=2, trainable=trainable())

    def forward(self, x: torch.Tensor | None, img: torch.Tensor | None, force_fp32: bool = False):
        dtype = _block_dtype(self.use_fp16, img if x is None else x, force_fp32)
        x = x.to(dtype) if x is not None else None
        if self.in_channels == 0 or self.architecture == "skip":
            img = img.to(dtype)
            y = self.fromrgb(img)
            x = x + y if x is not None else y
            img = downsample2d(img, self.resample_filter) if self.architecture == "skip" else None
        if self.architecture == "resnet":
            y = self.skip(x, gain=math.sqrt(0.5))
            x = self.conv1(self.conv0(x), gain=math.sqrt(0.5))
            x = y + x
        else:
            x = self.conv1(self.conv0(x))
        return x, img


class MinibatchStdLayer(torch.nn.Module):
    """Appends the mean over channels/pixels of the per-group stddev as `num_channels` extra features."""

    def __init__(self, group_size: int | None, num_channels: int = 1) -> None:
        super().__init__()
        self.group_size = group_size
        self.num_channels = num_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        g = min(self.group_size, n) if self.group_size is not None else n
        if n % g != 0:
            raise ValueError(f"minibatch-stddev: batch {n} is not a multiple of the group size {g}")
        f = self.num_channels
        # Sample i belongs to group i % (n // g): the [G, n/G] split keeps upstream's grouping.
        y = x.reshape(g, -1, f, c // f, h, w)
        y = (y - y.mean(dim=0)).square().mean(dim=0)
        y = (y + 1e-8).sqrt().mean(dim=[2, 3, 4])  # [n/G, F]
        y = y.reshape(-1, f, 1, 1).repeat(g, 1, h, w)
        return torch.cat([x, y], dim=1)


class DiscriminatorEpilogue(torch.nn.Module):
    """4x4 head: [fromrgb] -> mbstd -> conv -> fc -> out, then projection onto cmap when conditional."""

    def __init__(self, in_channels: int, cmap_dim: int, resolution: int, img_channels: int,
                 architecture: str, mbstd_group_size: int | None, mbstd_num_channels: int,
                 conv_clamp: float | None) -> None:
        super().__init__()
        self.cmap_dim = cmap_dim
        self.architecture = architecture
        if architecture == "skip":
            self.fromrgb = Conv2dLayer(img_channels, in_channels, 1, activation="lrelu")
        self.mbstd = MinibatchStdLayer(mbstd_group_size, mbstd_num_channels) if mbstd_num_channels else None
        self.conv = Conv2dLayer(in_channels + mbstd_num_channels, in_channels, 3, activation="lrelu",
                                conv_clamp=conv_clamp)
        self.fc = FullyConnectedLayer(in_channels * resolution**2, in_channels, activation="lrelu")
        self.out = FullyConnectedLayer(in_channels, 1 if cmap_dim == 0 else cmap_dim)

    def forward(self, x: torch.Tensor, img: torch.Tensor | None, cmap: torch.Tensor | None) -> torch.Tensor:
        x = x.to(torch.float32)
        if self.architecture == "skip":
            x = x + self.fromrgb(img.to(torch.float32))
        if self.mbstd is not None:
            x = self.mbstd(x)
        x = self.out(self.fc(self.conv(x).flatten(1)))
        if self.cmap_dim > 0:  # projection discriminator
            x = (x * cmap).sum(dim=1, keepdim=True) * (1 / math.sqrt(self.cmap_dim))
        return x


class Discriminator(torch.nn.Module):
    """D(img [N, C, R, R], c [N, c_dim] or None) -> logits [N, 1]."""

    def __init__(self, config: DiscriminatorConfig) -> None:
        super().__init__()
        cfg = self.config = config
        self.c_dim = cfg.c_dim
        self.img_resolution = cfg.img_resolution
        self.img_channels = cfg.img_channels
        log2 = int(math.log2(cfg.img_resolution))
        self.block_resolutions = [2**i for i in range(log2, 2, -1)]
        channels = {r: min(cfg.channel_base // r, cfg.channel_max) for r in [*self.block_resolutions, 4]}
        fp16_resolution = max(2 ** (log2 + 1 - cfg.num_fp16_res), 8)
        cmap_dim = (channels[4] if cfg.cmap_dim is None else cfg.cmap_dim) if cfg.c_dim > 0 else 0
        self.cmap_dim = cmap_dim

        layer_idx = 0
        for res in self.block_resolutions:
            block = DiscriminatorBlock(
                channels[res] if res < cfg.img_resolution else 0, channels[res], channels[res // 2], res,
                cfg.img_channels, layer_idx, cfg.architecture, cfg.conv_clamp,
                use_fp16=res >= fp16_resolution, freeze_layers=cfg.freeze_layers)
            setattr(self, f"b{res}", block)
            layer_idx += block.num_layers
        if cfg.c_dim > 0:
            self.mapping = MappingNetwork(0, cfg.c_dim, cmap_dim, None, num_layers=cfg.mapping_layers,
                                          lr_multiplier=cfg.mapping_lr_multiplier, w_avg_beta=None)
        self.b4 = DiscriminatorEpilogue(channels[4], cmap_dim, 4, cfg.img_channels, cfg.architecture,
                                        cfg.mbstd_group_size, cfg.mbstd_num_channels, cfg.conv_clamp)

    def forward(self, img: torch.Tensor, c: torch.Tensor | None = None, force_fp32: bool = False
                ) -> torch.Tensor:
        want = (self.img_channels, self.img_resolution, self.img_resolution)
        if img.ndim != 4 or tuple(img.shape[1:]) != want:
            raise ValueError(f"discriminator: img must be [N, {want[0]}, {want[1]}, {want[2]}], "
                             f"got {list(img.shape)}")
        x = None
        for res in self.block_resolutions:
            x, img = getattr(self, f"b{res}")(x, img, force_fp32=force_fp32)
        cmap = self.mapping(None, c) if self.c_dim > 0 else None
        return self.b4(x, img, cmap)
