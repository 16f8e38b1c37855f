"""Tiny face-segmentation ONNX models for the --mask-onnx tests, exported from real torch conv nets.

`LeftHalfParser` scores K classes per pixel; class 1 ("face") wins by a wide margin on the left half
of the image and loses on the right half, whatever the picture (its conv branch reads the input, at a
weight too small to move the decision), so the expected mask is known exactly.
"""

from __future__ import annotations

import warnings

import torch


class LeftHalfParser(torch.nn.Module):
    def __init__(self, side: int, classes: int = 3, single: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 1 if single else classes, 3, padding=1)
        pattern = torch.zeros(1, 1 if single else classes, side, side)
        face = 0 if single else 1
        pattern[:, face, :, : side // 2] = 20.0
        pattern[:, face, :, side // 2:] = -20.0
        self.register_buffer("pattern", pattern)
        self.single = single

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.pattern + 1e-3 * self.conv(x)
        return torch.sigmoid(scores) if self.single else scores


def export_parser(path, side: int, *, fixed_side: bool = True, classes: int = 3, single: bool = False) -> str:
    """Write the parser as ONNX; with `fixed_side` its input is [N, 3, side, side], else H and W are free
    (then the photo is fed at its own resolution and must equal `side`)."""
    axes = {"image": {0: "n"}, "scores": {0: "n"}}
    if not fixed_side:
        axes = {"image": {0: "n", 2: "h", 3: "w"}, "scores": {0: "n"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(LeftHalfParser(side, classes, single), (torch.zeros(1, 3, side, side),), str(path),
                          dynamo=False, input_names=["image"], output_names=["scores"], dynamic_axes=axes)
    return str(path)
