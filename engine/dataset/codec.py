"""How one sample's images and metadata become bytes, and back: the codec every part shares.

The bundle certifies what a reader will decode (it round-trips lossy images through `encode_image`),
the shard writers store exactly that encoding, the reader decodes it, and the report embeds PNGs made
by the same encoder. Settings are fixed and no metadata chunks are written, so the bytes depend only
on the pixels and the library versions.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image

from facegen.engine.dataset.samples import ShardBatch
from facegen.models.errors import UserError

IMAGE_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}


# -- images ------------------------------------------------------------------------------------
def encode_image(array: np.ndarray, image_format: str = "png", *, quality: int = 95,
                 png_compress_level: int = 1) -> bytes:
    """One uint8 HxW (mode L) or HxWx3 (RGB) image, with fixed settings and no metadata chunks."""
    pil_format = IMAGE_FORMATS[image_format]
    options: dict[str, Any] = {"format": pil_format}
    if pil_format == "PNG":
        options.update(compress_level=png_compress_level, optimize=False)
    elif pil_format == "JPEG":
        options.update(quality=quality, subsampling="4:2:0", optimize=False, progressive=False)
    else:
        options.update(quality=quality, method=4, lossless=False)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, **options)
    return buffer.getvalue()


def decode_image(data: bytes, mode: str, where: str) -> np.ndarray:
    """uint8 pixels of an encoded image in PIL `mode` ("RGB" or "L"); corrupt data is a UserError."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image if image.mode == mode else image.convert(mode))
    except (OSError, ValueError) as err:  # PIL reports corrupt data as OSError
        raise UserError(f"{where}: cannot decode image ({err})") from err


def round_trip(array: np.ndarray, image_format: str, quality: int = 95) -> np.ndarray:
    """An RGB image as a reader will decode it after `encode_image` (lossy formats change pixels)."""
    return decode_image(encode_image(array, image_format, quality=quality), "RGB", "round trip")


def default_workers() -> int:
    """CPU cores this process may use for encoding or decoding (affinity-aware, so Ray's CPU
    pinning is respected)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(16, cores or 1))


def _encode_sample(batch: ShardBatch, index: int, image_format: str, quality: int,
                   png_compress_level: int) -> tuple[bytes, bytes | None]:
    vis = encode_image(batch.vis[index], image_format, quality=quality, png_compress_level=png_compress_level)
    nir = None
    if batch.nir is not None:  # NIR is always lossless PNG (mode L)
        nir = encode_image(batch.nir[index], "png", png_compress_level=png_compress_level)
    return vis, nir


def iter_encoded(batch: ShardBatch, image_format: str = "png", *, quality: int = 95,
                 png_compress_level: int = 1, workers: int | None = None
                 ) -> Iterator[tuple[bytes, bytes | None]]:
    """(vis, nir) encoded bytes per sample, in order, encoded on a thread pool.

    Pillow releases the GIL while compressing, so threads scale with cores (docs/dataset-format.md
    has the measurements) without copying the arrays into worker processes.
    """
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format: must be one of {sorted(IMAGE_FORMATS)}, got {image_format!r}")
    workers = min(workers or default_workers(), len(batch))
    if workers == 1:  # no pool: nothing to overlap with
        for i in range(len(batch)):
            yield _encode_sample(batch, i, image_format, quality, png_compress_level)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="encode") as pool:
        futures = [pool.submit(_encode_sample, batch, i, image_format, quality, png_compress_level)
                   for i in range(len(batch))]
        try:
            for future in futures:
                yield future.result()
        finally:
            for future in futures:  # on failure or early exit, do not encode the rest for nothing
                future.cancel()


# -- JSON --------------------------------------------------------------------------------------
def to_jsonable(obj: Any, *, nonfinite: str = "raise", where: str = "metadata") -> Any:
    """Plain-Python copy of `obj` (numpy scalars/arrays converted, keys as str).

    Non-finite floats raise (`nonfinite="raise"`) or become None (`"null"`): JSON has no NaN.
    """
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v, nonfinite=nonfinite, where=f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        items = obj.tolist() if isinstance(obj, np.ndarray) else obj
        return [to_jsonable(v, nonfinite=nonfinite, where=where) for v in items]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        if nonfinite == "null":
            return None
        raise ValueError(f"{where}: non-finite value {obj} cannot be stored as JSON")
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"{where}: {type(obj).__name__} is not JSON-serialisable")


def json_bytes(meta: dict[str, Any]) -> bytes:
    """Canonical JSON (sorted keys, no spaces, no NaN): the same dict always gives the same bytes."""
    return json.dumps(meta, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")
