"""Encoded image bytes -> face-recognition input: decode, resize, optional flip, normalise.

Default: 112x112 RGB, insightface's normalisation `(x / 255 - 0.5) / 0.5`, the input of arcface_torch
backbones. NIR (greyscale) is replicated to 3 channels, as FR backbones take RGB.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from facegen.models.errors import UserError


@dataclass(frozen=True)
class FRTransform:
    size: int = 112
    mean: float = 0.5
    std: float = 0.5
    normalize: bool = True  # False: uint8 CHW tensors (normalise the batch on the device instead)

    def __post_init__(self) -> None:
        if self.size < 8:
            raise UserError(f"image_size: {self.size} is too small (at least 8)")
        if self.std <= 0:
            raise UserError(f"std: {self.std} must be positive")

    def decode(self, data: bytes, where: str) -> np.ndarray:
        """uint8 HxWx3 at `size` x `size`. PIL's bilinear resize filters over the source area when it
        shrinks (antialiasing), like the embedder's default `bilinear_antialias`."""
        try:
            with Image.open(io.BytesIO(data)) as image:
                return self._resized(image.convert("RGB"))
        except (OSError, ValueError) as err:
            raise UserError(f"{where}: cannot decode image ({err})") from err

    def pixels(self, array: np.ndarray) -> np.ndarray:
        """A decoded uint8 HxWx3 (or HxW) image at `size` x `size`, RGB."""
        return self._resized(Image.fromarray(array).convert("RGB"))

    def _resized(self, image: Image.Image) -> np.ndarray:
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), Image.BILINEAR)
        return np.asarray(image)

    def to_tensor(self, pixels: np.ndarray, flip: bool) -> torch.Tensor:
        if flip:
            pixels = pixels[:, ::-1]
        chw = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))
        if not self.normalize:
            return chw
        return (chw.float() / 255.0 - self.mean) / self.std

    def __call__(self, data: bytes, flip: bool = False, where: str = "image") -> torch.Tensor:
        return self.to_tensor(self.decode(data, where), flip)


def normalize_batch(images: torch.Tensor, mean: float = 0.5, std: float = 0.5) -> torch.Tensor:
    """uint8 NCHW (from `normalize=False`) -> float input, on whatever device the batch is on."""
    return (images.float() / 255.0 - mean) / std
