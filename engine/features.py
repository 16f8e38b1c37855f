"""`identity_features.json` of a training dataset: the original's create_training_identity_features.py,
batched, with two defects fixed: VIS and NIR are paired by file name (the original pairs by sorted
index), and the output lands at DATA/identity_features.json whatever the path's trailing slash.

Layout: `DATA/VIS/{identity}_{sample}.{jpg,png}` and `DATA/NIR/` with the same file names. The output,
`DATA/identity_features.json`, maps each VIS file name (natural-sort order) to the RAW, un-normalised
embedder output: the generator's `embed` layer normalises its input itself, so conditions keep the
norm the original trained with. Mode `all`: one feature per file. Mode `one`: every file of an
identity gets the feature of that identity's medoid image.

`list_pairs` (pair VIS/NIR by name, refuse mismatches) is shared with `engine.training.data`.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from facegen.engine.index.sources import IMAGE_EXTENSIONS, decode_image, embed_image_batch
from facegen.engine.progress import progress_bar
from facegen.engine.storage import Storage
from facegen.models.embedder import FaceEmbedder
from facegen.models.errors import UserError

FEATURES_FILE = "identity_features.json"
NIR_FEATURES_FILE = "identity_features_nir.json"
MODES = ("all", "one")
SHOW_NAMES = 20  # offending files named in an error message; the rest are counted
# Medoid scores this close to the best count as a tie (float64 rounding is ~1e-16).
_TIE_TOLERANCE = 1e-9
_DIGITS = re.compile(r"(\d+)")


def natural_key(name: str) -> tuple:
    """Sort key that orders digit runs by value: '2_9.jpg' < '2_10.jpg' < '10_1.jpg'.

    `re.split` with a capture group alternates text and digit runs, so position k always holds the
    same kind and tuples compare without mixing str and int. The name itself breaks ties ('01' vs '1').
    """
    parts = _DIGITS.split(name)
    return tuple(int(p) if i % 2 else p.lower() for i, p in enumerate(parts)), name


def natural_sorted(names: Iterable[str]) -> list[str]:
    return sorted(names, key=natural_key)


def identity_of(name: str) -> int | None:
    """'0012_03.png' -> 12; None unless the name starts with '{integer}_'."""
    prefix, sep, _ = posixpath.basename(name).partition("_")
    return int(prefix) if sep and prefix.isdigit() else None


def _listing(label: str, names: list[str]) -> str:
    shown = ", ".join(names[:SHOW_NAMES])
    more = f" (+{len(names) - SHOW_NAMES} more)" if len(names) > SHOW_NAMES else ""
    return f"{len(names)} {label}: {shown}{more}"


@dataclass
class PairedFiles:
    """Image file names present in VIS/ (and NIR/), natural order, with what was left out and why."""

    names: list[str]
    identities: np.ndarray  # int64 [N], the integer prefix of each name
    has_nir: bool
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason)


def _images_in(storage: Storage, folder: str) -> tuple[list[str], list[tuple[str, str]]]:
    images, skipped = [], []
    for name in storage.list(folder):
        relative = f"{folder}/{name}"
        if storage.fs.isdir(storage.path(relative)):
            continue
        if name.lower().endswith(IMAGE_EXTENSIONS):
            images.append(name)
        else:
            skipped.append((relative, "not an image file (extension)"))
    return images, skipped


def list_pairs(storage: Storage, *, require_nir: bool) -> PairedFiles:
    """The dataset's image names, VIS and NIR paired by name; one UserError for every mismatch.

    Non-image files are skipped (and returned with the reason). Image names that are not
    `{integer identity}_{sample}.ext` are refused: the identity is what mode `one` and training use.
    """
    if not storage.exists("VIS"):
        raise UserError(f"{storage.url('VIS')}: not found; a training dataset has VIS/ and NIR/ folders")
    vis, skipped = _images_in(storage, "VIS")
    has_nir = storage.exists("NIR")
    if require_nir and not has_nir:
        raise UserError(f"{storage.url('NIR')}: not found; NIR images pair with VIS/ by file name")
    if has_nir:
        nir, nir_skipped = _images_in(storage, "NIR")
        skipped += nir_skipped
        only_vis = natural_sorted(set(vis) - set(nir))
        only_nir = natural_sorted(set(nir) - set(vis))
        if only_vis or only_nir:
            parts = [_listing(label, names) for label, names in
                     (("missing in NIR/", only_vis), ("missing in VIS/", only_nir)) if names]
            raise UserError(f"{storage.url()}: VIS/ and NIR/ must hold the same file names; "
                            + "; ".join(parts))
    names = natural_sorted(vis)
    bad = [n for n in names if identity_of(n) is None]
    if bad:
        raise UserError(f"{storage.url('VIS')}: image names must be {{identity}}_{{sample}}.ext with an "
                        f"integer identity; " + _listing("do not", bad))
    if not names:
        raise UserError(f"{storage.url('VIS')}: no images found")
    identities = np.array([identity_of(n) for n in names], dtype=np.int64)
    return PairedFiles(names, identities, has_nir, skipped)


# ------------------------------------------------------------------------------- embedding
def raw_features(embedder: FaceEmbedder, images: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW images -> the embedder network's output before L2 normalisation, float32 [N, dim]."""
    return embedder.raw_features(images)


def _embed_decoded(images: list[np.ndarray], embedder: FaceEmbedder) -> np.ndarray:
    """Raw features of CHW uint8 images, one embedder call per distinct image size in the batch."""
    return embed_image_batch(images, embedder.raw_features)


def embed_files(storage: Storage, relatives: list[str], embedder: FaceEmbedder, *, batch_size: int = 64,
                num_workers: int = 4, progress: bool = True, desc: str = "features"
                ) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
    """Raw features of image files: (features [N, dim] with NaN rows for failures, ok mask [N], failures).

    Batch i+1 decodes on a thread pool while the embedder runs batch i. A file that cannot be
    decoded, or whose feature is not finite, is a failure with its reason, never silently dropped.
    """
    if batch_size <= 0:
        raise UserError(f"--batch: {batch_size} must be positive")
    features = np.full((len(relatives), embedder.dim), np.nan, np.float32)
    undecodable = np.zeros(len(relatives), bool)
    failures: list[tuple[str, str]] = []
    chunks = [range(s, min(s + batch_size, len(relatives))) for s in range(0, len(relatives), batch_size)]
    bar = progress_bar(len(relatives), desc, "img", progress)
    with ThreadPoolExecutor(max_workers=max(1, num_workers), thread_name_prefix="decode") as pool:
        submit = lambda rows: [pool.submit(decode_image, storage, relatives[i]) for i in rows]  # noqa: E731
        pending = submit(chunks[0]) if chunks else []
        for k, rows in enumerate(chunks):
            decoded = [future.result() for future in pending]
            pending = submit(chunks[k + 1]) if k + 1 < len(chunks) else []
            good = [(i, image) for i, image in zip(rows, decoded) if not isinstance(image, str)]
            for i, image in zip(rows, decoded):
                if isinstance(image, str):
                    undecodable[i] = True
                    failures.append((relatives[i], image))
            if good:
                features[[i for i, _ in good]] = _embed_decoded([image for _, image in good], embedder)
            bar.update(len(rows))
    bar.close()
    finite = np.isfinite(features).all(axis=1)
    failures += [(relatives[i], "non-finite embedding") for i in np.flatnonzero(~undecodable & ~finite)]
    return features, finite, failures


# ---------------------------------------------------------------------------------- medoid
def medoid_rows(features: np.ndarray, identities: np.ndarray) -> np.ndarray:
    """For each row, the row index of its identity's medoid.

    Medoid: the image whose mean cosine similarity to the identity's OTHER images is highest; a
    single-image identity is its own medoid; ties go to the first row (rows are in natural order).
    Vectorised: with unit vectors f_i and the identity sum S_g, sum_{j != i} cos(f_i, f_j) =
    f_i . S_g - f_i . f_i, so one pass over the rows scores every image (float64).
    """
    f = features.astype(np.float64)
    f /= np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    groups, group_of = np.unique(identities, return_inverse=True)
    sums = np.zeros((len(groups), f.shape[1]))
    np.add.at(sums, group_of, f)
    counts = np.bincount(group_of, minlength=len(groups))
    others = counts[group_of] - 1
    score = ((f * sums[group_of]).sum(1) - (f * f).sum(1)) / np.maximum(others, 1)
    best = np.full(len(groups), -np.inf)
    np.maximum.at(best, group_of, score)
    candidate = score >= best[group_of] - _TIE_TOLERANCE
    rows = np.arange(len(f))
    first = np.full(len(groups), len(f))
    np.minimum.at(first, group_of[candidate], rows[candidate])
    return first[group_of]


# ------------------------------------------------------------------------------------ JSON
def write_features_json(storage: Storage, relative: str, names: list[str], features: np.ndarray) -> None:
    """{name: [floats]} in the given key order (natural order), atomically, one entry per line.

    Values are the float32 features converted exactly to Python floats, as the original's `.tolist()`.
    """
    with storage.atomic_writer(relative) as handle:
        handle.write(b"{")
        for i, (name, row) in enumerate(zip(names, features)):
            entry = f'{"," if i else ""}\n  {json.dumps(name)}: {json.dumps(row.tolist())}'
            handle.write(entry.encode("utf-8"))
        handle.write(b"\n}\n")


@dataclass
class FeaturesResult:
    path: str  # URI of identity_features.json
    names: list[str]  # keys written, natural order
    num_identities: int
    skipped: list[tuple[str, str]]  # non-image files (relative path, reason)
    failed: list[tuple[str, str]]  # images without a feature (relative path, reason)
    nir_path: str | None = None


def compute_identity_features(data: str | Storage, embedder: FaceEmbedder, *, mode: str = "all",
                              batch_size: int = 64, nir: bool = False, storage_options: dict | None = None,
                              num_workers: int = 4, progress: bool = True) -> FeaturesResult:
    """Write `DATA/identity_features.json` (and with `nir`, `identity_features_nir.json` from NIR/).

    Files whose image cannot be decoded get no entry and are returned in `failed`. With `nir`, the
    NIR file of an identity in mode `one` is the NIR image of the VIS medoid (the same picture).
    """
    if mode not in MODES:
        raise UserError(f"--mode: {mode!r} is not one of {MODES}")
    storage = data if isinstance(data, Storage) else Storage(str(data), storage_options)
    if not storage.exists():
        raise UserError(f"{storage.url()}: dataset folder not found")
    pairs = list_pairs(storage, require_nir=nir)
    names, identities = pairs.names, pairs.identities
    features, ok, failed = embed_files(storage, [f"VIS/{n}" for n in names], embedder, batch_size=batch_size,
                                       num_workers=num_workers, progress=progress, desc="VIS features")
    if not ok.any():
        raise UserError(f"{storage.url('VIS')}: none of {len(names)} images could be embedded "
                        f"(first: {failed[0][0]}: {failed[0][1]})")
    kept = [n for n, good in zip(names, ok) if good]
    rows = np.flatnonzero(ok)
    chosen = rows if mode == "all" else rows[medoid_rows(features[rows], identities[rows])]
    write_features_json(storage, FEATURES_FILE, kept, features[chosen])
    result = FeaturesResult(storage.url(FEATURES_FILE), kept, len(np.unique(identities[rows])),
                            pairs.skipped, failed)
    if nir:
        result.nir_path = _write_nir(storage, names, chosen, ok, embedder, batch_size, num_workers, progress,
                                     result)
    return result


def _write_nir(storage: Storage, names: list[str], chosen: np.ndarray, ok: np.ndarray, embedder: FaceEmbedder,
               batch_size: int, num_workers: int, progress: bool, result: FeaturesResult) -> str:
    """NIR features for the same keys; only the NIR images the output uses are embedded."""
    needed = np.unique(chosen)
    nir_features, nir_ok, nir_failed = embed_files(
        storage, [f"NIR/{names[i]}" for i in needed], embedder, batch_size=batch_size,
        num_workers=num_workers, progress=progress, desc="NIR features")
    result.failed += nir_failed
    lookup = np.full(len(names), -1)
    lookup[needed] = np.arange(len(needed))
    source = lookup[chosen]  # per kept VIS file: its row in nir_features
    keep = nir_ok[source]
    keys = [name for name, good in zip(result.names, keep) if good]
    write_features_json(storage, NIR_FEATURES_FILE, keys, nir_features[source[keep]])
    return storage.url(NIR_FEATURES_FILE)
