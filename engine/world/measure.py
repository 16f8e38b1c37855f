"""What can be measured about models trained on the world without FID: the world's identities are known.

- `verification`: an embedder's cosine scores on genuine / impostor pairs of world images.
- `identity_match`: a generator conditioned on a world identity's feature (the embedder's raw output
  for one of its images, what `facegen features` writes) is asked for several samples; each sample's
  embedding is compared with the mean embedding of every identity's real images. The share whose
  nearest identity is the condition's own says whether the samples are recognisably that identity
  (chance: 1 / identities); the same for the NIR twins against the real NIR images.
- `nir_alignment`: VIS luminance and NIR edge maps agree best at zero shift when the twin is aligned.
- `face_detection_rate`: the share of images in which a real face detector (OpenCV's YuNet, trained on
  photos) finds a face, on images upscaled to its working size (`best_faces`, one detector pass).
- `sample_variation`, `pose_variation`: how much one identity's samples differ, per pixel and by the
  detector's landmarks.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from facegen.engine.frdata.pairs import draw_pairs
from facegen.engine.preview import latents, sample
from facegen.engine.world import render
from facegen.models.embedder import FaceEmbedder
from facegen.models.generator import Generator

SHIFTS = ((0, 1), (0, -1), (1, 0), (-1, 0))


def population(seed: int, identities: int, samples: int, resolution: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(identity per image, VIS uint8 [n,R,R,3], NIR uint8 [n,R,R]) of world identities 0..identities-1."""
    ids = np.repeat(np.arange(identities), samples)
    vis, nir = render(seed, ids, np.tile(np.arange(samples), identities), resolution)
    return ids, vis, nir


def as_batch(images: np.ndarray) -> torch.Tensor:
    """uint8 [n,R,R,3] or [n,R,R] (NIR, replicated to three channels as FR backbones take) -> NCHW."""
    if images.ndim == 3:
        images = np.repeat(images[..., None], 3, axis=3)
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def embed(embedder: FaceEmbedder, images: np.ndarray, batch: int = 256) -> np.ndarray:
    """Unit embeddings, float64 [n, dim]."""
    return embedder.embed(as_batch(images), batch_size=batch).double().numpy()


def verification(embeddings: np.ndarray, ids: np.ndarray, pairs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(cosine score, same identity) of `pairs` genuine and `pairs` impostor pairs (as `eval-fr` draws them)."""
    rows, first, second, same = draw_pairs(ids, pairs, pairs, np.random.default_rng(seed), "world population")
    return np.einsum("ij,ij->i", embeddings[rows[first]], embeddings[rows[second]]), same


def centroids(embeddings: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Unit mean embedding per identity, in `np.unique(ids)` order."""
    unique, inverse = np.unique(ids, return_inverse=True)
    sums = np.zeros((len(unique), embeddings.shape[1]))
    np.add.at(sums, inverse, embeddings)
    return sums / np.linalg.norm(sums, axis=1, keepdims=True)


def conditions_of(embedder: FaceEmbedder, vis: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Each identity's condition: the embedder's raw feature of its first image (`facegen features`)."""
    _, first = np.unique(ids, return_index=True)
    return embedder.raw_features(as_batch(vis[first])).float().numpy()


def generate(generator: Generator, conditions: np.ndarray, samples: int, *, truncation: float = 1.0,
             seed0: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(condition index, VIS, NIR): `samples` latents (seeds seed0.. as `facegen preview`) per condition."""
    z, _ = latents(list(range(seed0, seed0 + samples)), generator.z_dim, 0, 1.0)
    which = np.repeat(np.arange(len(conditions)), samples)
    vis, nir = sample(generator, np.tile(z, (len(conditions), 1)), conditions[which].astype(np.float32),
                      truncation=truncation)
    return which, vis, nir


def identity_match(generated: np.ndarray, which: np.ndarray, reference: np.ndarray) -> dict:
    """Share of generated embeddings whose nearest identity centroid is their condition's identity."""
    similarity = generated @ reference.T
    nearest = similarity.argmax(1)
    own = similarity[np.arange(len(which)), which]
    similarity[np.arange(len(which)), which] = -np.inf
    return {"rate": float(np.mean(nearest == which)), "chance": 1.0 / len(reference),
            "samples": int(len(which)), "identities": int(len(reference)),
            "mean_own_similarity": float(own.mean()), "mean_best_other_similarity": float(similarity.max(1).mean())}


def edge_map(images: np.ndarray) -> np.ndarray:
    gy, gx = np.gradient(images.astype(np.float32), axis=(1, 2))
    edges = np.hypot(gx, gy)
    return edges - edges.mean((1, 2), keepdims=True)


def _correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum((1, 2)) / np.sqrt((a * a).sum((1, 2)) * (b * b).sum((1, 2)) + 1e-12)


def nir_alignment(vis: np.ndarray, nir: np.ndarray) -> dict:
    """Edge agreement of each VIS luminance / NIR twin at zero shift, against one-pixel shifts and
    against another sample's NIR."""
    luminance = vis.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    ev, en = edge_map(luminance), edge_map(nir)
    same = _correlation(ev, en)
    shifted = np.stack([_correlation(ev, np.roll(en, shift, axis=(1, 2))) for shift in SHIFTS], 1)
    other = _correlation(ev, np.roll(en, 1, axis=0))
    return {"zero_shift_best": float(np.mean(same > shifted.max(1))), "mean_correlation": float(same.mean()),
            "mean_correlation_other_sample": float(other.mean())}


def sample_variation(vis: np.ndarray, which: np.ndarray) -> dict:
    """How much the samples of one identity differ: the per-pixel standard deviation (grey levels,
    0-255) over each identity's samples, averaged over pixels and identities; for the whole image and
    for its central half (where the face is, without most of the background)."""
    grey = vis.astype(np.float32).mean(-1) if vis.ndim == 4 else vis.astype(np.float32)
    size = grey.shape[1]
    centre = slice(size // 4, size - size // 4)
    whole, middle = [], []
    for label in np.unique(which):
        spread = grey[which == label].std(axis=0)
        whole.append(spread.mean())
        middle.append(spread[centre, centre].mean())
    return {"whole": float(np.mean(whole)), "centre": float(np.mean(middle))}


def best_faces(vis: np.ndarray, detect: Callable[[np.ndarray], np.ndarray], size: int = 112,
               min_score: float = 0.5) -> np.ndarray:
    """[N, 15] YuNet rows, the best-scored face of each image (upscaled, bicubic, to `size` for the
    detector), with box and landmarks in the image's own pixels; NaN where no face scores above
    `min_score`."""
    faces = np.full((len(vis), 15), np.nan, np.float32)
    for i, image in enumerate(vis):  # OpenCV's detector takes one image per call
        rows = detect(np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC)))
        if len(rows) and rows[:, 14].max() > min_score:
            faces[i] = rows[np.argmax(rows[:, 14])]
    faces[:, :14] *= vis.shape[2] / size
    return faces


def face_detection_rate(faces: np.ndarray) -> float:
    """Share of images with a face (`best_faces` rows)."""
    return float(np.isfinite(faces[:, 14]).mean())


def pose_variation(faces: np.ndarray, which: np.ndarray) -> dict:
    """How much the head pose of one identity's samples varies, from the five landmarks of
    `best_faces`: per identity, the standard deviation of the eye line's angle (roll, degrees) and of
    the landmarks' centre (shift, in the image's own pixels), averaged over the identities with at
    least two detected faces. Unlike `sample_variation`, background and lighting do not count."""
    found = np.isfinite(faces[:, 14])
    points = faces[found, 4:14].reshape(-1, 5, 2).astype(np.float64)
    eyes = points[:, 1] - points[:, 0]
    roll = np.degrees(np.arctan2(eyes[:, 1], eyes[:, 0]))
    centre = points.mean(axis=1)
    labels = np.asarray(which)[found]
    kept = [label for label in np.unique(labels) if (labels == label).sum() >= 2]
    if not kept:
        return {"roll_degrees": float("nan"), "shift_pixels": float("nan"), "identities": 0}
    return {
        "roll_degrees": float(np.mean([roll[labels == k].std() for k in kept])),
        "shift_pixels": float(np.mean([np.linalg.norm(centre[labels == k].std(axis=0)) for k in kept])),
        "identities": len(kept),
    }
