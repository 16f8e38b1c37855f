"""Quality gates: which rendered faces are good enough to keep (pluggable, chosen by name).

The default is no gate. `frontal` is ArcBiFaceGAN's face check (generate_recognition_data.py:
`|dl + dr| < (|dl| + |dr|) / 3` on the eyes' x offsets from the nose), with a real landmark
detector: OpenCV's YuNet (`cv2.FaceDetectorYN`, the optional `quality` extra) finds faces and five
landmarks; a candidate passes when exactly one face scores at least `filter.min_face_score` (the
original's "more than one face" test could never fire; this one can) and its eyes and nose pass
the original's frontal heuristic. YuNet scores are on their own scale: the original's MTCNN 0.97
is not comparable, so the default is 0.9.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from facegen.models.errors import UserError

Gate = Callable[[np.ndarray], np.ndarray]  # uint8 [N, H, W, 3] RGB -> bool [N]


def no_gate(images: np.ndarray) -> np.ndarray:
    return np.ones(len(images), dtype=bool)


def frontal_heuristic(left_eye_x: np.ndarray, right_eye_x: np.ndarray, nose_x: np.ndarray) -> np.ndarray:
    """The original's test: |dl + dr| < (|dl| + |dr|) / 3 with d = x_eye - x_nose (vectorised)."""
    dl = np.asarray(left_eye_x, np.float64) - nose_x
    dr = np.asarray(right_eye_x, np.float64) - nose_x
    return np.abs(dl + dr) < (np.abs(dl) + np.abs(dr)) / 3.0


class FrontalFaceGate:
    """Exactly one confident face, facing the camera (YuNet landmarks + the original's heuristic)."""

    def __init__(self, detector_path: str, min_score: float = 0.9):
        try:
            import cv2
        except ImportError:
            raise UserError("filter.quality_gate 'frontal' needs OpenCV: pip install 'facegen[quality]'") from None
        if not os.path.isfile(detector_path):
            raise UserError(f"filter.face_detector: {detector_path}: file not found")
        self.min_score = min_score
        # Candidates below half the bar are not faces at all; NMS merges duplicate boxes of one face.
        # OpenCV's DNN warns on stderr that its new graph engine ignores the preferred target (the
        # CPU either way); quieten its log for the creation only.
        logging = cv2.utils.logging
        level = logging.getLogLevel()
        logging.setLogLevel(logging.LOG_LEVEL_ERROR)
        try:
            self._detector = cv2.FaceDetectorYN.create(detector_path, "", (0, 0), min_score / 2, 0.3, 50)
        finally:
            logging.setLogLevel(level)

    def detect(self, image: np.ndarray) -> np.ndarray:
        """YuNet rows [x, y, w, h, 5 landmarks (x, y), score] for one RGB image (may be empty)."""
        self._detector.setInputSize((image.shape[1], image.shape[0]))
        _, faces = self._detector.detect(np.ascontiguousarray(image[:, :, ::-1]))
        return np.zeros((0, 15), np.float32) if faces is None else faces

    def __call__(self, images: np.ndarray) -> np.ndarray:
        # OpenCV's detector takes one image per call; the gate is optional and off the default path.
        passed = np.zeros(len(images), dtype=bool)
        for i, image in enumerate(images):
            faces = self.detect(image)
            faces = faces[faces[:, 14] >= self.min_score]
            if len(faces) == 1:
                first_eye_x, second_eye_x, nose_x = faces[0, 4], faces[0, 6], faces[0, 8]
                passed[i] = bool(frontal_heuristic(second_eye_x, first_eye_x, nose_x))
        return passed


def make_quality_gate(name: str, detector_path: str | None = None, min_score: float = 0.9) -> Gate:
    if name == "none":
        return no_gate
    if name == "frontal":
        if not detector_path:
            raise UserError("filter.face_detector: the 'frontal' gate needs a YuNet ONNX face detector file")
        return FrontalFaceGate(detector_path, min_score)
    raise UserError(f"filter.quality_gate: unknown gate {name!r} (known: frontal, none)")
