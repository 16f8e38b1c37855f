"""`OUT/{label}/{sample}.{ext}` image folders (torchvision ImageFolder / most FR trainers' folder format).

Label folders are zero-padded to 8 digits so that sorting folder names (as ImageFolder does to
number its classes) keeps the dataset's label order.
"""

from __future__ import annotations

import os
from collections.abc import Iterable


def write_image_folder(out_dir: str, samples: Iterable[tuple[int, int, bytes]], ext: str) -> dict:
    labels, count = set(), 0
    for label, sample, data in samples:
        folder = os.path.join(out_dir, f"{label:08d}")
        if label not in labels:
            os.makedirs(folder, exist_ok=True)
            labels.add(label)
        with open(os.path.join(folder, f"{sample:03d}.{ext}"), "wb") as handle:
            handle.write(data)
        count += 1
    return {"images": count, "identities": len(labels)}
