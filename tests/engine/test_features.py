"""`facegen features`: identity_features.json format, natural order, medoid mode, pairing, bad files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from facegen.engine.features import (
    FEATURES_FILE,
    NIR_FEATURES_FILE,
    compute_identity_features,
    medoid_rows,
    natural_sorted,
    raw_features,
)
from facegen.jobs.cli import main
from facegen.models.embedder import preprocess
from facegen.models.errors import UserError
from tests.engine.tiny import tiny_embedder

SIZE = 32


@pytest.fixture(scope="module")
def embedder():
    return tiny_embedder()


def write_pairs(root: Path, names: list[str], seed: int = 0, images: dict | None = None
                ) -> dict[str, np.ndarray]:
    """PNG pairs VIS/{name} (random RGB) and NIR/{name} (its channel mean); returns the VIS pixels."""
    rng = np.random.default_rng(seed)
    (root / "VIS").mkdir(parents=True, exist_ok=True)
    (root / "NIR").mkdir(parents=True, exist_ok=True)
    pixels = {}
    for name in names:
        vis = (images or {}).get(name)
        vis = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) if vis is None else vis
        Image.fromarray(vis).save(root / "VIS" / name)
        Image.fromarray(vis.mean(axis=2).astype(np.uint8)).save(root / "NIR" / name)
        pixels[name] = vis
    return pixels


def read_ordered(path: Path) -> list[tuple[str, list[float]]]:
    return json.loads(path.read_text(), object_pairs_hook=list)


def reference_raw(embedder, images: np.ndarray) -> np.ndarray:
    """module(preprocess(x)), computed here independently of engine.features."""
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    with torch.no_grad():
        return embedder.module(preprocess(x, embedder.preprocessing)).numpy()


def numpy_medoid(features: np.ndarray) -> int:
    """Brute force: highest mean cosine to the other images, first on ties."""
    if len(features) == 1:
        return 0
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    sims = unit @ unit.T
    scores = (sims.sum(1) - np.diag(sims)) / (len(features) - 1)
    return int(np.flatnonzero(scores >= scores.max() - 1e-9)[0])


def test_natural_sort():
    names = ["10_1.png", "2_10.jpg", "2_9.jpg", "1_2.png", "2_1.jpg", "1_10.png"]
    assert natural_sorted(names) == ["1_2.png", "1_10.png", "2_1.jpg", "2_9.jpg", "2_10.jpg", "10_1.png"]


def test_all_mode_file_format_order_and_raw_values(tmp_path, embedder):
    names = ["2_10.png", "2_9.png", "10_1.png", "1_1.png", "2_1.png"]
    pixels = write_pairs(tmp_path, names)
    result = compute_identity_features(tmp_path, embedder, mode="all", batch_size=2, progress=False)

    expected_order = ["1_1.png", "2_1.png", "2_9.png", "2_10.png", "10_1.png"]
    entries = read_ordered(tmp_path / FEATURES_FILE)
    assert [k for k, _ in entries] == expected_order == result.names
    assert result.num_identities == 3 and result.failed == [] and result.skipped == []
    written = np.array([v for _, v in entries], np.float32)
    reference = reference_raw(embedder, np.stack([pixels[n] for n in expected_order]))
    np.testing.assert_allclose(written, reference, rtol=1e-5, atol=1e-5)
    # Raw means un-normalised, and normalising gives exactly what the embedder's embed() returns.
    assert not np.allclose(np.linalg.norm(written, axis=1), 1.0, atol=1e-3)
    x = torch.from_numpy(np.stack([pixels[n] for n in expected_order]).transpose(0, 3, 1, 2).copy())
    normalised = F.normalize(torch.from_numpy(written), dim=1).numpy()
    np.testing.assert_allclose(normalised, embedder.embed(x).numpy(), atol=1e-5)
    # The JSON floats are the float32 values exactly.
    assert all(float(np.float32(v)) == v for _, row in entries for v in row)


def test_raw_features_equal_module_of_preprocess(embedder):
    images = torch.randint(0, 256, (3, 3, SIZE, SIZE), dtype=torch.uint8)
    expected = embedder.module(preprocess(images, embedder.preprocessing)).detach()
    torch.testing.assert_close(raw_features(embedder, images), expected)


def test_medoid_rows_matches_brute_force():
    rng = np.random.default_rng(3)
    identities = np.repeat(np.arange(7), [1, 2, 3, 5, 8, 1, 4])
    norms = rng.uniform(0.5, 5, (len(identities), 1))  # raw features: the medoid must ignore norms
    features = (rng.normal(size=(len(identities), 16)) * norms).astype(np.float32)
    rows = medoid_rows(features, identities)
    for identity in np.unique(identities):
        members = np.flatnonzero(identities == identity)
        assert (rows[members] == members[numpy_medoid(features[members])]).all()
    # Two images of one identity are always tied: the first wins.
    assert rows[1] == rows[2] == 1


def test_one_mode_writes_the_medoid_for_every_file(tmp_path, embedder):
    rng = np.random.default_rng(5)
    base = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    near = np.clip(base.astype(int) + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8)
    images = {"3_1.png": base, "3_2.png": near, "3_5.png": base.copy()}  # 3_1 and 3_5 tie: 3_1 wins
    names = ["1_1.png", "1_2.png", "1_3.png", "1_4.png", "2_1.png", "3_1.png", "3_2.png", "3_5.png",
             "4_7.png", "4_8.png"]
    write_pairs(tmp_path, names, seed=5, images=images)
    compute_identity_features(tmp_path, embedder, mode="all", batch_size=4, progress=False)
    all_features = {k: np.array(v) for k, v in read_ordered(tmp_path / FEATURES_FILE)}
    compute_identity_features(tmp_path, embedder, mode="one", batch_size=4, progress=False)
    one = {k: np.array(v) for k, v in read_ordered(tmp_path / FEATURES_FILE)}
    assert list(one) == names

    chosen = {}
    for identity in ("1", "2", "3", "4"):
        members = [n for n in names if n.split("_")[0] == identity]
        medoid = members[numpy_medoid(np.stack([all_features[n] for n in members]))]
        chosen[identity] = medoid
        for name in members:
            np.testing.assert_array_equal(one[name], all_features[medoid])
    assert chosen["2"] == "2_1.png" and chosen["4"] == "4_7.png"  # single image; two-image tie
    assert chosen["3"] == "3_1.png"  # the duplicate pair outscores 3_2; the first of the tie wins


def test_vis_nir_mismatch_refused_with_the_list_and_nothing_written(tmp_path, embedder):
    write_pairs(tmp_path, ["1_1.png", "1_2.png", "1_3.png"])
    (tmp_path / "NIR" / "1_2.png").unlink()
    (tmp_path / "NIR" / "1_3.png").rename(tmp_path / "NIR" / "1_4.png")
    with pytest.raises(UserError) as err:
        compute_identity_features(tmp_path, embedder, progress=False)
    message = str(err.value)
    assert "2 missing in NIR/: 1_2.png, 1_3.png" in message
    assert "1 missing in VIS/: 1_4.png" in message
    assert not (tmp_path / FEATURES_FILE).exists()


def test_non_images_skipped_and_undecodable_listed(tmp_path, embedder):
    write_pairs(tmp_path, ["1_1.png", "1_2.png", "2_1.png"])
    (tmp_path / "VIS" / "notes.txt").write_text("not an image")
    (tmp_path / "NIR" / "Thumbs.db").write_bytes(b"\0")
    for folder in ("VIS", "NIR"):
        (tmp_path / folder / "2_2.png").write_bytes(b"corrupt")
    result = compute_identity_features(tmp_path, embedder, progress=False)
    assert sorted(path for path, _ in result.skipped) == ["NIR/Thumbs.db", "VIS/notes.txt"]
    assert [path for path, _ in result.failed] == ["VIS/2_2.png"]
    assert "undecodable" in result.failed[0][1]
    assert [k for k, _ in read_ordered(tmp_path / FEATURES_FILE)] == ["1_1.png", "1_2.png", "2_1.png"]


def test_names_without_integer_identity_refused(tmp_path, embedder):
    write_pairs(tmp_path, ["1_1.png", "abc_1.png", "7.png"])
    with pytest.raises(UserError, match=r"integer identity; 2 do not: 7.png, abc_1.png"):
        compute_identity_features(tmp_path, embedder, progress=False)


@pytest.mark.parametrize("suffix", ["", "/"])
def test_output_inside_data_with_or_without_trailing_slash(tmp_path, embedder, suffix):
    data = tmp_path / "data"
    write_pairs(data, ["1_1.png"])
    result = compute_identity_features(str(data) + suffix, embedder, progress=False)
    assert (data / FEATURES_FILE).is_file()
    assert result.path.endswith(f"data/{FEATURES_FILE}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no 'dataidentity_features.json'


def test_batched_equals_batch_one(tmp_path, embedder):
    write_pairs(tmp_path, [f"{i}_{s}.png" for i in range(3) for s in range(3)], seed=9)
    compute_identity_features(tmp_path, embedder, batch_size=1, progress=False)
    single = read_ordered(tmp_path / FEATURES_FILE)
    compute_identity_features(tmp_path, embedder, batch_size=4, progress=False)
    batched = read_ordered(tmp_path / FEATURES_FILE)
    assert [k for k, _ in single] == [k for k, _ in batched]
    np.testing.assert_allclose([v for _, v in batched], [v for _, v in single], rtol=1e-5, atol=1e-5)


def test_nir_features_file(tmp_path, embedder):
    pixels = write_pairs(tmp_path, ["1_1.png", "1_2.png", "2_1.png"], seed=2)
    result = compute_identity_features(tmp_path, embedder, nir=True, progress=False)
    assert result.nir_path.endswith(NIR_FEATURES_FILE)
    entries = read_ordered(tmp_path / NIR_FEATURES_FILE)
    assert [k for k, _ in entries] == ["1_1.png", "1_2.png", "2_1.png"]
    grey = np.stack([pixels[k].mean(axis=2).astype(np.uint8) for k, _ in entries])
    reference = reference_raw(embedder, np.repeat(grey[..., None], 3, axis=3))  # 1 channel replicated
    np.testing.assert_allclose(np.array([v for _, v in entries]), reference, rtol=1e-5, atol=1e-5)
    (tmp_path / "NIR" / "1_1.png").unlink()
    (tmp_path / "NIR" / "1_2.png").unlink()
    (tmp_path / "NIR" / "2_1.png").unlink()
    (tmp_path / "NIR").rmdir()
    with pytest.raises(UserError, match="NIR: not found"):
        compute_identity_features(tmp_path, embedder, nir=True, progress=False)


def test_cli_with_a_native_tiny_iresnet(tmp_path, capsys):
    model = tmp_path / "iresnet.safetensors"
    config = ("depth=18", "embedding_dim=32", "input_size=32", "base_width=8")
    sets = [a for s in config for a in ("--set", s)]
    assert main(["models", "init", "iresnet", "--out", str(model), *sets]) == 0
    data = tmp_path / "data"
    write_pairs(data, ["1_1.png", "1_2.png", "1_3.png", "2_1.png"], seed=4)
    (data / "VIS" / "readme.md").write_text("x")
    capsys.readouterr()
    assert main(["features", str(data), "--embedder", str(model), "--mode", "one", "--batch", "3"]) == 0
    out = capsys.readouterr().out
    assert "skipped (not images): 1" in out and "VIS/readme.md" in out
    assert "4 files of 2 identities, 32-d raw features, mode one" in out
    entries = read_ordered(data / FEATURES_FILE)
    assert [k for k, _ in entries] == ["1_1.png", "1_2.png", "1_3.png", "2_1.png"]
    assert entries[0][1] == entries[1][1] == entries[2][1] and len(entries[3][1]) == 32

    (data / "NIR" / "2_1.png").unlink()
    assert main(["features", str(data), "--embedder", str(model)]) == 2
    assert "1 missing in NIR/: 2_1.png" in capsys.readouterr().err


def test_onnx_embedder_raw_features_equal_torch(tmp_path, embedder):
    pytest.importorskip("onnxruntime")
    import warnings

    from facegen.models.embedder import OnnxEmbedder

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(embedder.module, (torch.zeros(1, 3, SIZE, SIZE),), str(tmp_path / "e.onnx"),
                          dynamo=False, input_names=["image"], output_names=["embedding"],
                          dynamic_axes={"image": {0: "n"}, "embedding": {0: "n"}})
    onnx_embedder = OnnxEmbedder(str(tmp_path / "e.onnx"), embedder.preprocessing)
    images = torch.randint(0, 256, (4, 3, SIZE, SIZE), dtype=torch.uint8)
    torch.testing.assert_close(raw_features(onnx_embedder, images), raw_features(embedder, images),
                               atol=1e-4, rtol=1e-4)
