"""insightface `arcface_torch` iResNet, with the original's structure and state-dict key names.

A state dict saved by insightface (`backbone.pth`) loads into `IResNet` with `strict=True` (insightface
recognition/arcface_torch/backbones/iresnet.py has the same layers and names). `base_width` scales
every channel count so tests can build tiny models with the same topology; at 64 (the default) the
module is exactly insightface's.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
from torch import nn

from facegen.models.errors import UserError
from facegen.models.netconfig import config_from_dict

# Residual units per stage, keyed by depth (insightface's get_model names r18 ... r200).
DEPTH_LAYERS: dict[int, tuple[int, int, int, int]] = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 14, 3),
    100: (3, 13, 30, 3),
    200: (6, 26, 60, 6),
}
BN_EPS = 1e-5
NUM_STAGES = 4
# Every stage halves the resolution: 112 -> 56 -> 28 -> 14 -> 7.
TOTAL_STRIDE = 2**NUM_STAGES


@dataclass(frozen=True)
class IResNetConfig:
    depth: int = 100
    embedding_dim: int = 512
    input_size: int = 112
    base_width: int = 64
    dropout: float = 0.0
    fp16: bool = False

    def __post_init__(self) -> None:
        if self.depth not in DEPTH_LAYERS:
            raise UserError(f"iresnet.depth: {self.depth} is not one of {sorted(DEPTH_LAYERS)}")
        if self.input_size <= 0 or self.input_size % TOTAL_STRIDE:
            raise UserError(f"iresnet.input_size: {self.input_size} must be a positive multiple of 16")
        if self.embedding_dim <= 0:
            raise UserError(f"iresnet.embedding_dim: {self.embedding_dim} must be positive")
        if self.base_width <= 0 or self.base_width % 8:
            # planes = base_width * (1, 2, 4, 8); a multiple of 8 keeps every stage integral.
            raise UserError(f"iresnet.base_width: {self.base_width} must be a positive multiple of 8")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"iresnet.dropout: {self.dropout} must be in [0, 1)")

    @property
    def layers(self) -> tuple[int, int, int, int]:
        return DEPTH_LAYERS[self.depth]

    @property
    def planes(self) -> tuple[int, int, int, int]:
        """Output channels of the four stages (64/128/256/512 at full width)."""
        return tuple(self.base_width * m for m in (1, 2, 4, 8))

    @property
    def fc_in_features(self) -> int:
        return self.planes[-1] * (self.input_size // TOTAL_STRIDE) ** 2

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> IResNetConfig:
        return config_from_dict(cls, dict(data), "iresnet config")


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, plus shortcut; no activation after the add."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=BN_EPS)
        self.conv1 = _conv3x3(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=BN_EPS)
        self.prelu = nn.PReLU(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=BN_EPS)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut


class IResNet(nn.Module):
    """insightface iResNet; forward(normalised float NCHW) -> raw, un-normalised embedding."""

    def __init__(self, config: IResNetConfig | None = None):
        super().__init__()
        self.config = config = config or IResNetConfig()
        stem = config.base_width
        self.conv1 = _conv3x3(3, stem)
        self.bn1 = nn.BatchNorm2d(stem, eps=BN_EPS)
        self.prelu = nn.PReLU(stem)
        inplanes = stem
        for index, (units, planes) in enumerate(zip(config.layers, config.planes), start=1):
            setattr(self, f"layer{index}", self._make_layer(inplanes, planes, units))
            inplanes = planes
        self.bn2 = nn.BatchNorm2d(inplanes, eps=BN_EPS)
        self.dropout = nn.Dropout(p=config.dropout)
        self.fc = nn.Linear(config.fc_in_features, config.embedding_dim)
        self.features = nn.BatchNorm1d(config.embedding_dim, eps=BN_EPS)
        self._init_weights()

    @staticmethod
    def _make_layer(inplanes: int, planes: int, units: int) -> nn.Sequential:
        # Every stage starts with stride 2, so its first unit always needs a projection shortcut.
        downsample = nn.Sequential(
            nn.Conv2d(inplanes, planes, kernel_size=1, stride=2, bias=False),
            nn.BatchNorm2d(planes, eps=BN_EPS),
        )
        blocks = [IBasicBlock(inplanes, planes, stride=2, downsample=downsample)]
        blocks += [IBasicBlock(planes, planes) for _ in range(1, units)]
        return nn.Sequential(*blocks)

    def _init_weights(self) -> None:
        # insightface's initialisation: conv N(0, 0.1), BN (1, 0); the embedding BN's scale is fixed at 1.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.1)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.ones_(self.features.weight)
        self.features.weight.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Like the original, fp16 autocast covers the trunk only and the head runs in fp32.
        use_fp16 = self.config.fp16 and x.is_cuda
        with torch.autocast("cuda", dtype=torch.float16, enabled=use_fp16):
            x = self.prelu(self.bn1(self.conv1(x)))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x.float() if use_fp16 else x))


_UNIT_KEY = re.compile(r"^layer([1-4])\.(\d+)\.conv1\.weight$")


def iresnet_config_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> IResNetConfig:
    """Infer depth, embedding dim, width and input size from an insightface iResNet state dict."""
    for key in ("conv1.weight", "fc.weight"):
        if key not in state_dict:
            raise UserError(f"iresnet state dict: missing key '{key}' (not an insightface iResNet)")
    units = [0] * NUM_STAGES
    for key in state_dict:
        match = _UNIT_KEY.match(key)
        if match:
            stage, index = int(match.group(1)) - 1, int(match.group(2))
            units[stage] = max(units[stage], index + 1)
    depth = next((d for d, layers in DEPTH_LAYERS.items() if tuple(units) == layers), None)
    if depth is None:
        known = ", ".join(f"r{d} {list(layers)}" for d, layers in DEPTH_LAYERS.items())
        raise UserError(f"iresnet state dict: units per stage {units} match no known depth ({known})")

    base_width = int(state_dict["conv1.weight"].shape[0])
    embedding_dim, fc_in = (int(n) for n in state_dict["fc.weight"].shape)
    side = math.isqrt(fc_in // (8 * base_width)) if fc_in % (8 * base_width) == 0 else 0
    if side == 0 or side * side * 8 * base_width != fc_in:
        raise UserError(
            f"iresnet state dict: fc.weight has {fc_in} inputs, not {8 * base_width} x a square feature map"
        )
    return IResNetConfig(
        depth=depth, embedding_dim=embedding_dim, input_size=side * TOTAL_STRIDE, base_width=base_width
    )
