"""The dataset as (label, sample, image) in identity order, resized and encoded for an export."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from facegen.engine.dataset.codec import default_workers, encode_image
from facegen.engine.dataset.reader import iter_batches
from facegen.engine.frdata.images import FRTransform
from facegen.engine.storage import Storage
from facegen.models.errors import UserError


def encoded_samples(storage: Storage, mode: str, size: int | None, image_format: str, quality: int = 95,
                    batch_size: int = 64) -> Iterator[tuple[int, int, bytes]]:
    """(label, sample, encoded image) in dataset order, which must be identity-sorted (as generate writes)."""
    if mode not in ("vis", "nir"):
        raise UserError(f"--mode: {mode!r} is not vis or nir")
    transform = FRTransform(size=size) if size else None
    last = -1
    with ThreadPoolExecutor(max_workers=default_workers(), thread_name_prefix="export") as pool:
        for batch in iter_batches(storage, batch_size):
            if mode == "nir" and batch.nir is None:
                raise UserError(f"{storage.uri}: --mode nir, but the dataset has no NIR images")
            if (np.diff(batch.labels) < 0).any() or batch.labels[0] < last:
                raise UserError(f"{storage.uri}: samples are not sorted by identity; cannot export identity ranges")
            last = int(batch.labels[-1])
            images = batch.nir if mode == "nir" else batch.vis

            def encode(image: np.ndarray) -> bytes:
                pixels = image if transform is None else transform.pixels(image)
                if mode == "nir" and pixels.ndim == 3:
                    pixels = pixels[..., 0]  # greyscale replicated by the resize; store one channel
                return encode_image(pixels, image_format, quality=quality)

            for label, sample, data in zip(batch.labels, batch.samples, pool.map(encode, images)):
                yield int(label), int(sample), data
