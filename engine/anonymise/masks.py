"""Face-region masks from a user-supplied segmentation model (ONNX), for blending anonymised faces.

StyleID blends with a face parser's mask; no parser weights ship with facegen, so `--mask-onnx`
takes any segmentation network the user has, under one contract:

- **input**: one tensor, float32 NCHW RGB, `[N, 3, S, S]`, values `(pixel / 255 - mean) / std` per
  channel (defaults: ImageNet's mean and std, what face-parsing BiSeNets are trained with). S is the
  model's own input side when its graph fixes one, else the photo's resolution.
- **output** (the first one): either `[N, 1, H, W]` / `[N, H, W]`, the probability that a pixel is
  face (values are clipped to [0, 1]), or `[N, K, H, W]` class scores, from which the face mask is the
  softmax probability summed over `classes` (e.g. BiSeNet face-parsing's skin, brows, eyes, nose
  and lips: 1-13). H, W need not be S; the mask is resized (bilinear) to the photo.

Mask values below 1/510 become 0 and above 1 - 1/510 become 1: such a weight cannot move a uint8
pixel by half a grey level anyway, and snapping them makes "outside the face, the photo's own
pixels" exact instead of nearly so (a softmax is never exactly 0).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from facegen.models.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SNAP = 1.0 / 510.0


class OnnxFaceMask:
    """`mask(photos uint8 [N, 3, R, R]) -> float [N, 1, R, R]` in [0, 1] from a segmentation ONNX model."""

    def __init__(self, path: str, classes: Sequence[int] = (), mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD) -> None:
        try:
            import onnx
            import onnxruntime as ort
        except ImportError as err:
            raise UserError(f"--mask-onnx: the '{err.name}' package is missing: pip install facegen[onnx]") from None
        self.path, self.classes = str(path), tuple(int(c) for c in classes)
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise UserError("--mask-onnx: mean and std need 3 values each (RGB), std > 0")
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        try:
            with open(self.path, "rb") as handle:
                data = handle.read()
            model = onnx.load_from_string(data)
        except FileNotFoundError:
            raise UserError(f"--mask-onnx {self.path}: file not found") from None
        except Exception as err:  # protobuf decode errors have no common public base class
            raise UserError(f"--mask-onnx {self.path}: not a readable ONNX model ({type(err).__name__})") from None
        # Recorded with the anonymisation's settings: a resume with another mask model is refused.
        self.sha256 = hashlib.sha256(data).hexdigest()
        initializers = {init.name for init in model.graph.initializer}
        inputs = [v for v in model.graph.input if v.name not in initializers]
        shape = _dims(inputs[0]) if len(inputs) == 1 else []
        if len(inputs) != 1 or len(shape) != 4 or shape[1] not in (3, None):
            raise UserError(f"--mask-onnx {self.path}: expected one image input [N, 3, S, S], found "
                            f"{[(v.name, _dims(v)) for v in inputs]}")
        self.input_name, self.side = inputs[0].name, shape[2] if shape[2] == shape[3] else None
        outputs = _dims(model.graph.output[0])
        if len(outputs) not in (3, 4):
            raise UserError(f"--mask-onnx {self.path}: the first output has shape {outputs}; expected a mask "
                            "[N, 1, H, W] / [N, H, W] or class scores [N, K, H, W]")
        self._check_classes(outputs[1] if len(outputs) == 4 else 1)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(model.SerializeToString(), options,
                                                providers=["CPUExecutionProvider"])
        except Exception as err:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise UserError(f"--mask-onnx {self.path}: onnxruntime cannot load the model ({err})") from None

    def _check_classes(self, channels: int | None) -> None:
        """One channel is a face probability; several are classes, which must be named and exist."""
        if channels == 1:
            if self.classes:
                raise UserError(f"--mask-classes: {self.path} outputs a single face-probability channel, not classes")
        elif channels is not None or self.classes:
            if not self.classes:
                raise UserError(f"--mask-onnx {self.path}: outputs {channels or 'several'} classes; name the face "
                                "classes with --mask-classes (e.g. 1,2,3,4,5,6,7,8,9,10,11,12,13 for BiSeNet "
                                "face-parsing)")
            bad = [c for c in self.classes if c < 0 or (channels is not None and c >= channels)]
            if bad:
                raise UserError(f"--mask-classes {bad}: {self.path} has classes 0..{channels - 1}")

    def settings(self) -> dict:
        return {"path": self.path, "sha256": self.sha256, "classes": list(self.classes),
                "mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist()}

    @torch.no_grad()
    def __call__(self, photos: torch.Tensor) -> torch.Tensor:
        resolution = photos.shape[-1]
        x = photos.float() / 255.0
        if self.side is not None and self.side != resolution:
            x = F.interpolate(x, size=(self.side, self.side), mode="bilinear", align_corners=False)
        x = ((x - self.mean) / self.std).contiguous()
        try:
            out = self.session.run(None, {self.input_name: x.numpy()})[0]
        except Exception as err:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise UserError(f"--mask-onnx {self.path}: the model failed on {list(x.shape)} input ({err})") from None
        scores = torch.from_numpy(np.asarray(out, np.float32))
        scores = scores[:, None] if scores.ndim == 3 else scores
        if scores.ndim != 4 or len(scores) != len(photos):
            raise UserError(f"--mask-onnx {self.path}: output shape {list(out.shape)} is not a per-pixel mask")
        if scores.shape[1] == 1:
            mask = scores.clamp(0, 1)
        else:
            self._check_classes(scores.shape[1])
            mask = scores.softmax(dim=1)[:, list(self.classes)].sum(dim=1, keepdim=True)
        if mask.shape[-2:] != (resolution, resolution):
            mask = F.interpolate(mask, size=(resolution, resolution), mode="bilinear", align_corners=False)
        mask = mask.clamp(0, 1)
        return torch.where(mask < SNAP, 0.0, torch.where(mask > 1 - SNAP, 1.0, mask))


def _dims(value) -> list[int | None]:
    return [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]
