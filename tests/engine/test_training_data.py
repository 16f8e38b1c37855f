"""Training datasets: the original's folder layout and facegen WebDataset output, items, mirror."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from facegen.engine.dataset.samples import ShardBatch
from facegen.engine.dataset.webdataset import write_shard
from facegen.engine.features import FEATURES_FILE
from facegen.engine.identities import write_identities
from facegen.engine.phases import Identities
from facegen.engine.storage import Storage
from facegen.engine.training.data import open_training_data
from facegen.models.errors import UserError

SIZE = 16
C_DIM = 8


def write_folder(root: Path, names: list[str], seed: int = 0, features: bool = True) -> dict:
    """VIS (RGB) / NIR (independent grey) PNG pairs and a features JSON; returns what was written."""
    rng = np.random.default_rng(seed)
    (root / "VIS").mkdir(parents=True, exist_ok=True)
    (root / "NIR").mkdir(parents=True, exist_ok=True)
    written = {}
    for name in names:
        vis = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
        nir = rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)
        Image.fromarray(vis).save(root / "VIS" / name)
        Image.fromarray(nir).save(root / "NIR" / name)
        written[name] = (vis, nir, rng.normal(size=C_DIM).astype(np.float32) * 7)
    if features:
        # Deliberately not in natural order: the dataset must follow its own file order, not the JSON's.
        table = {name: written[name][2].tolist() for name in sorted(written, reverse=True)}
        (root / FEATURES_FILE).write_text(json.dumps(table))
    return written


NAMES = ["1_1.png", "1_2.png", "1_10.png", "2_1.png", "10_3.png"]  # natural order


def test_folder_items_equal_files_and_json(tmp_path):
    written = write_folder(tmp_path / "mydata", NAMES)
    data = open_training_data(str(tmp_path / "mydata"))
    assert (len(data), data.resolution, data.c_dim, data.num_identities) == (5, SIZE, C_DIM, 3)
    assert data.name == "mydata" and data.kind == "folder"
    assert data.labels.tolist() == [1, 1, 1, 2, 10]
    np.testing.assert_array_equal(data.conditions, np.stack([written[n][2] for n in NAMES]))
    assert data.conditions.dtype == np.float32
    for i, name in enumerate(NAMES):
        vis, nir, c = data[i]
        assert vis.dtype == nir.dtype == torch.uint8 and c.dtype == torch.float32
        np.testing.assert_array_equal(vis.numpy(), written[name][0].transpose(2, 0, 1))
        np.testing.assert_array_equal(nir.numpy(), written[name][1][None])
        np.testing.assert_array_equal(c.numpy(), written[name][2])  # raw: not normalised
    with pytest.raises(IndexError):
        data[5]


def test_mirror_gives_flipped_pairs_at_n_plus_i(tmp_path):
    write_folder(tmp_path, NAMES)
    plain = open_training_data(str(tmp_path))
    mirrored = open_training_data(str(tmp_path), mirror=True)
    assert len(mirrored) == 2 * len(plain) and mirrored.num_samples == len(plain)
    assert mirrored.conditions.shape == (5, C_DIM) and len(mirrored.labels) == 5
    for i in range(len(plain)):
        vis, nir, c = plain[i]
        same, flipped = mirrored[i], mirrored[len(plain) + i]
        assert torch.equal(same[0], vis) and torch.equal(same[1], nir)
        assert torch.equal(flipped[0], vis.flip(-1)) and torch.equal(flipped[1], nir.flip(-1))
        assert torch.equal(flipped[2], c)


def test_resolution_resizes_only_when_different(tmp_path):
    written = write_folder(tmp_path, NAMES[:2])
    data = open_training_data(str(tmp_path), resolution=8)
    vis, nir, _ = data[1]
    expected_vis = np.asarray(Image.fromarray(written["1_2.png"][0]).resize((8, 8), Image.LANCZOS))
    expected_nir = np.asarray(Image.fromarray(written["1_2.png"][1]).resize((8, 8), Image.LANCZOS))
    np.testing.assert_array_equal(vis.numpy(), expected_vis.transpose(2, 0, 1))
    np.testing.assert_array_equal(nir.numpy(), expected_nir[None])
    same = open_training_data(str(tmp_path), resolution=SIZE)
    np.testing.assert_array_equal(same[0][0].numpy(), written["1_1.png"][0].transpose(2, 0, 1))


def test_non_square_and_odd_sizes_refused(tmp_path):
    write_folder(tmp_path, NAMES[:2])
    Image.fromarray(np.zeros((SIZE, SIZE * 2, 3), np.uint8)).save(tmp_path / "VIS" / "1_2.png")
    Image.fromarray(np.zeros((SIZE, SIZE * 2), np.uint8)).save(tmp_path / "NIR" / "1_2.png")
    data = open_training_data(str(tmp_path))
    with pytest.raises(UserError, match=r"1_2.png: image is 32x16; training images must be square"):
        data[1]
    Image.fromarray(np.zeros((SIZE * 2, SIZE * 2, 3), np.uint8)).save(tmp_path / "VIS" / "1_2.png")
    Image.fromarray(np.zeros((SIZE * 2, SIZE * 2), np.uint8)).save(tmp_path / "NIR" / "1_2.png")
    with pytest.raises(UserError, match=r"1_2.png: image is 32x32 but the dataset's resolution is 16"):
        open_training_data(str(tmp_path))[1]
    Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(tmp_path / "NIR" / "1_2.png")
    with pytest.raises(UserError, match=r"VIS is 32x32 but NIR is 16x16"):
        open_training_data(str(tmp_path))[1]


def test_missing_features_json_and_unconditional(tmp_path):
    write_folder(tmp_path, NAMES, features=False)
    with pytest.raises(UserError, match="run `facegen features"):
        open_training_data(str(tmp_path))
    data = open_training_data(str(tmp_path), use_conditions=False)
    assert data.c_dim == 0 and data.conditions.shape == (5, 0) and data[0][2].shape == (0,)


def test_pairing_and_features_mismatches(tmp_path):
    written = write_folder(tmp_path, NAMES)
    (tmp_path / "NIR" / "1_10.png").unlink()
    with pytest.raises(UserError, match=r"1 missing in NIR/: 1_10.png"):
        open_training_data(str(tmp_path))
    (tmp_path / "VIS" / "1_10.png").unlink()
    with pytest.raises(UserError, match=r"describes files that are not image pairs.*1_10.png"):
        open_training_data(str(tmp_path))
    # A pair without a feature (it could not be decoded when the features were made) is left out, listed.
    table = {n: written[n][2].tolist() for n in NAMES if n not in ("1_10.png", "2_1.png")}
    (tmp_path / FEATURES_FILE).write_text(json.dumps(table))
    (tmp_path / "VIS" / "notes.txt").write_text("x")
    data = open_training_data(str(tmp_path))
    assert data.labels.tolist() == [1, 1, 10]
    np.testing.assert_array_equal(data[2][2].numpy(), written["10_3.png"][2])
    assert sorted(data.skipped) == [("VIS/2_1.png", f"no entry in {FEATURES_FILE}"),
                                    ("VIS/notes.txt", "not an image file (extension)")]


def test_not_a_dataset(tmp_path):
    with pytest.raises(UserError, match="training dataset not found"):
        open_training_data(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="neither a VIS/"):
        open_training_data(str(tmp_path))


# ----------------------------------------------------------------------------------- WebDataset
def write_generated(root: Path, labels_per_shard: list[list[int]], num_identities: int, seed: int = 1
                    ) -> dict:
    """A facegen dataset directory: identities.parquet + shards written by the engine's writers."""
    rng = np.random.default_rng(seed)
    storage = Storage(str(root))
    conditions = rng.normal(size=(num_identities, C_DIM)).astype(np.float32) * 4
    identities = Identities(slot=np.arange(num_identities) * 3, condition=conditions,
                            anchor=rng.normal(size=(num_identities, 4)).astype(np.float32),
                            anchor_real_sim=np.zeros(num_identities, np.float32),
                            anchor_real_identity=np.array(["x"] * num_identities, dtype=object))
    write_identities(storage, identities, {})
    samples = {}
    for shard_id, labels in enumerate(labels_per_shard):
        labels = np.array(labels)
        counts = {}
        sample_ids = []
        for label in labels:
            sample_ids.append(counts.get(label, 0))
            counts[label] = sample_ids[-1] + 1
        vis = rng.integers(0, 256, (len(labels), SIZE, SIZE, 3), dtype=np.uint8)
        nir = rng.integers(0, 256, (len(labels), SIZE, SIZE), dtype=np.uint8)
        write_shard(storage, shard_id, ShardBatch(labels, np.array(sample_ids), vis, nir))
        for k, (label, sample) in enumerate(zip(labels, sample_ids)):
            samples[(int(label), sample)] = (vis[k], nir[k])
    return {"conditions": conditions, "samples": samples}


def test_webdataset_source_gives_identity_conditions_and_labels(tmp_path):
    written = write_generated(tmp_path / "gen", [[0, 0, 1], [2, 2, 3]], num_identities=4)
    data = open_training_data(str(tmp_path / "gen"), mirror=True)
    assert data.kind == "webdataset" and data.name == "gen"
    assert (data.num_samples, len(data), data.resolution) == (6, 12, SIZE)
    assert (data.c_dim, data.num_identities) == (C_DIM, 4)
    assert data.labels.tolist() == [0, 0, 1, 2, 2, 3]
    np.testing.assert_array_equal(data.conditions, written["conditions"][data.labels])
    order = [(0, 0), (0, 1), (1, 0), (2, 0), (2, 1), (3, 0)]
    for i, key in enumerate(order):
        vis, nir = written["samples"][key]
        item, mirrored = data[i], data[6 + i]
        np.testing.assert_array_equal(item[0].numpy(), vis.transpose(2, 0, 1))
        np.testing.assert_array_equal(item[1].numpy(), nir[None])
        np.testing.assert_array_equal(item[2].numpy(), written["conditions"][key[0]])
        assert torch.equal(mirrored[0], item[0].flip(-1)) and torch.equal(mirrored[1], item[1].flip(-1))


def test_webdataset_without_conditions_or_identities(tmp_path):
    write_generated(tmp_path, [[0, 1]], num_identities=2)
    assert open_training_data(str(tmp_path), use_conditions=False).c_dim == 0
    (tmp_path / "identities.parquet").unlink()
    with pytest.raises(UserError, match="identities.parquet: not found"):
        open_training_data(str(tmp_path))


def test_dataloader_workers_collate_batches(tmp_path):
    write_folder(tmp_path, NAMES)
    data = open_training_data(str(tmp_path), mirror=True)
    loader = torch.utils.data.DataLoader(data, batch_size=4, num_workers=2, shuffle=False)
    batches = list(loader)
    vis = torch.cat([b[0] for b in batches])
    assert vis.shape == (10, 3, SIZE, SIZE) and torch.equal(vis[7], data[7][0])
    assert torch.equal(torch.cat([b[2] for b in batches])[:5], torch.from_numpy(data.conditions))
