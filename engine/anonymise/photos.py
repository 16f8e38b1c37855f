"""Anonymising real photos: project into W+, swap identity units, optionally blend back, certify.

Photos are aligned square face crops (as a face dataset ships them); each is centre-cropped to a
square and resized to the generator's resolution, which is also the output resolution. A photo's
identity reference is the embedding of the photo itself, so `source_similarity` says how much of
the real person an output still carries, and the privacy index (which must enrol the people in the
photos) checks it against everyone else too. Shards are runs of consecutive photos in file-name
order; resume skips complete shards.

Blending (StyleID's "pixel space" method): the anonymised face replaces the photo inside a face
mask, so hair, neck and background stay the photo's own pixels. The mask is a feathered ellipse
around the face centre of an aligned crop, or the face region a user-supplied segmentation model
finds in each photo (`engine/anonymise/masks.py`, `--mask-onnx`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from facegen.engine.anonymise.project import ProjectionSettings, project
from facegen.engine.anonymise.run import (
    AnonymiseJob,
    Anonymiser,
    Sources,
    check_settings,
    given_targets,
    privacy_summary,
    run_shards,
    seeded_targets,
    swap_mask,
    tradeoff_of,
    write_report,
)
from facegen.engine.anonymise.swap import Swapper
from facegen.engine.index.search import PrivacyIndex
from facegen.engine.storage import Storage
from facegen.models.errors import UserError
from facegen.models.generator import images_to_uint8

PHOTO_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
FaceMask = Callable[[torch.Tensor], torch.Tensor]  # uint8 photos [N, 3, R, R] -> float mask [N, 1, R, R]


@dataclass(frozen=True)
class PhotoSettings:
    projection: ProjectionSettings = dataclasses.field(default_factory=ProjectionSettings)
    blend: bool = False
    # The ellipse, as fractions of the side: centre (x, y), semi-axes (x, y), feather width.
    ellipse: tuple[float, float, float, float] = (0.5, 0.54, 0.36, 0.46)
    feather: float = 0.08


def list_photos(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder of photos")
    photos = sorted(p for p in folder.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES and p.is_file())
    if not photos:
        raise UserError(f"{folder}: no photos ({', '.join(PHOTO_SUFFIXES)})")
    return photos


def load_photos(paths: list[Path], resolution: int) -> torch.Tensor:
    """uint8 [N, 3, R, R]: each photo centre-cropped to a square and resized (Lanczos)."""
    arrays = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
                side = min(image.size)
                left, top = (image.width - side) // 2, (image.height - side) // 2
                image = image.crop((left, top, left + side, top + side))
                if side != resolution:
                    image = image.resize((resolution, resolution), Image.LANCZOS)
                arrays.append(np.asarray(image))
        except (OSError, ValueError) as err:  # PIL reports unreadable files as OSError
            raise UserError(f"{path}: not a readable image ({err})") from None
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def ellipse_mask(resolution: int, settings: PhotoSettings) -> torch.Tensor:
    """float [1, 1, R, R] in [0, 1]: 1 inside the face ellipse, smooth to 0 across the feather."""
    cx, cy, ax, ay = settings.ellipse
    coords = (torch.arange(resolution, dtype=torch.float64) + 0.5) / resolution
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    radius = torch.sqrt(((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2)  # 1 on the ellipse
    edge = settings.feather / min(ax, ay)
    t = ((1 + edge / 2 - radius) / edge).clamp(0, 1)
    return (t * t * (3 - 2 * t)).to(torch.float32)[None, None]  # smoothstep


def blend(photos: torch.Tensor, rendered: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """uint8 photos with the rendered face (float [-1, 1]) inside the mask; uint8 out."""
    face = images_to_uint8(rendered).float()
    return (mask * face + (1 - mask) * photos.float()).round().clamp(0, 255).to(torch.uint8)


def photo_sources(swapper: Swapper, job: AnonymiseJob, settings: PhotoSettings, paths: list[Path],
                  start: int, stop: int, face_mask: FaceMask | None = None) -> Sources:
    space, embedder = swapper.space, swapper.embedder
    photos = load_photos(paths[start:stop], space.resolution)
    ws, quality = [], []
    for part in photos.split(job.batch_size):
        codes, psnr = project(space, embedder, part, settings.projection)
        ws.append(codes)
        quality.append(psnr)
    ws, quality = torch.cat(ws), np.concatenate(quality)
    with torch.no_grad():
        embedding = embedder.embed(photos).cpu()
    lowpass = swapper.metric.lowpass(photos)
    # A user-supplied segmentation model's mask per photo, else the one ellipse of an aligned crop.
    mask = face_mask(photos) if face_mask is not None else ellipse_mask(space.resolution, settings)
    finish: Callable | None = None
    if settings.blend:
        def finish(rows: np.ndarray, rendered: torch.Tensor) -> torch.Tensor:
            rows = torch.from_numpy(rows)
            return blend(photos[rows], rendered, mask if len(mask) == 1 else mask[rows])
    else:
        def finish(rows: np.ndarray, rendered: torch.Tensor) -> torch.Tensor:
            return images_to_uint8(rendered)
    metas = [{"source": {"file": paths[i].name}, "projection_psnr": float(q)}
             for i, q in zip(range(start, stop), quality)]
    return Sources(np.arange(start, stop, dtype=np.int64), space.encode(job.space, ws), embedding, lowpass, metas,
                   finish)


def anonymise_photos(swapper: Swapper, table, job: AnonymiseJob, out: Storage, folder: str | Path,
                     settings: PhotoSettings, *, index: PrivacyIndex, targets_ws: torch.Tensor | None = None,
                     curve_pairs: int = 16, progress: Callable[[int, int], None] | None = None,
                     face_mask: FaceMask | None = None) -> dict[str, Any]:
    """Anonymise every photo in `folder` into `out`; returns the report. `face_mask` (with blending):
    a segmentation model's face mask per photo (engine/anonymise/masks.py) instead of the ellipse."""
    if job.threshold is None or index is None:
        raise UserError("anonymising real photos needs a privacy index of the people and a threshold")
    paths = list_photos(folder)
    job = dataclasses.replace(job, count=len(paths))
    space = swapper.space
    mask = swap_mask(space, table, job)
    targets = seeded_targets(space, job) if targets_ws is None else given_targets(space, job, targets_ws)
    out.check_writable()
    check_settings(out, {"job": job.to_dict(), "photos": dataclasses.asdict(settings),
                         "files": [p.name for p in paths], "embedder_fingerprint": swapper.embedder.fingerprint,
                         "index_fingerprint": index.fingerprint, "given_targets": targets_ws is not None,
                         **({"mask_onnx": face_mask.settings()} if face_mask is not None else {})})
    anonymiser = Anonymiser(swapper, job, mask, index, targets)
    totals = run_shards(anonymiser, out, lambda a, b: photo_sources(swapper, job, settings, paths, a, b, face_mask),
                         progress)
    totals["swapped_coordinates"] = int(mask.sum())
    from facegen.engine.dataset.reader import read_manifest

    written = read_manifest(out).column("projection_psnr").to_numpy() if totals["written"] else np.zeros(0)
    projection = {"mean_psnr_db": float(written.mean()) if len(written) else None,
                  "min_psnr_db": float(written.min()) if len(written) else None,
                  "steps": settings.projection.steps, "identity_weight": settings.projection.identity_weight}
    curve_points = tradeoff_of(swapper, table, job, curve_pairs) if table is not None and curve_pairs else None
    return write_report(out, job, totals, curve_points,
                        {"privacy": privacy_summary(job, totals, index), "projection": projection})
