"""One entry point per use: `load_generator`, `load_embedder`, `load_training_state`, `load_module`.

The format is detected from the file's first bytes (not its name), so a renamed file still loads:
  native        facegen safetensors (8-byte header length, then '{')
  stylegan_pickle   StyleGAN2-ADA / ArcBiFaceGAN snapshot: a plain pickle (restricted unpickler)
  rosinality    torch.save zip or legacy file whose pickle names `g_ema` / `input.input`
  insightface   any other torch.save file (an iResNet state dict)
  onnx          `.onnx` or a protobuf starting with field 1 (ir_version); embedders only
"""

from __future__ import annotations

import os
import struct
import zipfile
from pathlib import Path
from typing import Any

import torch

from facegen.models.checkpoint import family_of, load_native, read_native_header
from facegen.models.embedder import FaceEmbedder, OnnxEmbedder, Preprocessing, TorchEmbedder, fields_text
from facegen.models.errors import UserError
from facegen.models.generator import Generator
from facegen.models.importers.insightface import load_insightface_pth
from facegen.models.importers.rosinality import load_rosinality
from facegen.models.importers.stylegan_pickle import NETWORK_KEYS, load_stylegan_pickle
from facegen.models.iresnet import IResNet

FORMATS = ("native", "stylegan_pickle", "rosinality", "insightface", "onnx")
# torch.save's legacy (non-zip) files start with this pickled magic number (protocol 2, a long).
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19."
_ROSINALITY_MARKERS = (b"g_ema", b"input.input")
_PEEK_BYTES = 4 << 20  # legacy torch files put the object pickle (with key names) before the storages


def _pickle_bytes_of_torch_file(path: Path, head: bytes) -> bytes:
    """The object pickle of a torch.save file (key names live there; tensors are elsewhere)."""
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as zf:
                names = [n for n in zf.namelist() if n.endswith("data.pkl")]
                return zf.read(names[0]) if names else b""
        except zipfile.BadZipFile:
            return b""
    with open(path, "rb") as f:
        return f.read(_PEEK_BYTES)


def detect_format(path: str | os.PathLike) -> str:
    """One of FORMATS, from the file's content (its suffix only for ONNX)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    with open(path, "rb") as f:
        head = f.read(16)
    size = path.stat().st_size
    if len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < size:
        return "native"
    if head.startswith(b"PK\x03\x04") or head.startswith(_LEGACY_TORCH_MAGIC):
        blob = _pickle_bytes_of_torch_file(path, head)
        return "rosinality" if any(m in blob for m in _ROSINALITY_MARKERS) else "insightface"
    if path.suffix.lower() == ".onnx" or head[:1] == b"\x08":
        return "onnx"
    if head[:1] == b"\x80" or path.suffix.lower() == ".pkl":
        return "stylegan_pickle"
    raise UserError(f"{path}: unrecognised checkpoint format; supported: facegen .safetensors, "
                    f"StyleGAN2-ADA/ArcBiFaceGAN .pkl, rosinality .pt, insightface .pth, .onnx")


def load_module(path: str | os.PathLike, what: str = "G_ema") -> torch.nn.Module:
    """Any torch-importable checkpoint as a registered module (CPU, eval). `what` picks a snapshot entry."""
    fmt = detect_format(path)
    if what != "G_ema" and fmt != "stylegan_pickle":
        raise UserError(f"{path}: --what {what} only applies to StyleGAN2-ADA/ArcBiFaceGAN snapshots "
                        f"(this file is {fmt})")
    if what not in NETWORK_KEYS:
        raise UserError(f"{path}: --what {what}: choose from {list(NETWORK_KEYS)}")
    if fmt == "native":
        return load_native(path)
    if fmt == "stylegan_pickle":
        return load_stylegan_pickle(path, what=(what,))[what]
    if fmt == "rosinality":
        return load_rosinality(path)
    if fmt == "insightface":
        return load_insightface_pth(path)
    raise UserError(f"{path}: an ONNX model is used as an embedder directly; it has no torch module")


def load_generator(path: str | os.PathLike) -> Generator:
    """A generator from a native file, a snapshot's G_ema or a rosinality `.pt` (CPU, eval)."""
    module = load_module(path)
    if not isinstance(module, Generator):
        raise UserError(f"{path}: holds a '{family_of(module)}' model, not a generator")
    return module


def _preprocessing(overrides: dict[str, Any], input_size: int | None) -> Preprocessing:
    base = Preprocessing().to_dict()
    if input_size is not None:
        base["input_size"] = input_size
    return Preprocessing.from_dict({**base, **overrides})


def load_embedder(path: str | os.PathLike, **preprocessing_overrides: Any) -> FaceEmbedder:
    """A face embedder from a native iresnet, an insightface `.pth` or an `.onnx` model.

    Preprocessing defaults to insightface's ((x/255 - 0.5)/0.5, RGB) at the model's input size; an
    ONNX graph that normalises its own input gets raw pixels instead (`graph_preprocessing`).
    Keyword arguments override single fields (`input_size`, `mean`, `std`, `channel_order`, ...)
    and always win. `embedder.notes` says how the preprocessing was chosen.
    """
    fmt = detect_format(path)
    if fmt == "onnx":
        return OnnxEmbedder(str(path), overrides=preprocessing_overrides)
    family = read_native_header(path)["family"] if fmt == "native" else None
    if family not in (None, "iresnet"):
        raise UserError(f"{path}: holds a '{family}' model, not an embedder")
    if fmt not in ("native", "insightface"):
        raise UserError(f"{path}: a {fmt} checkpoint is a generator, not a face embedder")
    module = load_module(path)
    if not isinstance(module, IResNet):
        raise UserError(f"{path}: holds a '{family_of(module)}' model, not an embedder")
    embedder = TorchEmbedder(module, _preprocessing(preprocessing_overrides, module.config.input_size))
    if preprocessing_overrides:
        embedder.notes.append(f"{path}: preprocessing given explicitly: {fields_text(preprocessing_overrides)}")
    return embedder


def load_training_state(path: str | os.PathLike) -> dict[str, Any]:
    """G, D, G_ema and (ArcBiFaceGAN) D_NIR of a snapshot, plus `augment_p` and `training_set_kwargs`.

    D_NIR is None for a plain StyleGAN2-ADA snapshot; the caller decides whether that is acceptable.
    """
    if detect_format(path) != "stylegan_pickle":
        raise UserError(f"{path}: training resume reads StyleGAN2-ADA/ArcBiFaceGAN snapshots (.pkl)")
    return load_stylegan_pickle(path, what=("G", "D", "G_ema"), optional=("D_NIR",))
