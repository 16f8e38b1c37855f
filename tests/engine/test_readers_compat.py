"""The shards are read unmodified by webdataset, Ray Data and Hugging Face datasets."""

import io

import numpy as np
import pytest
from PIL import Image

from facegen.engine.storage import Storage
from tests.engine.test_shards import expected_meta, write_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """3 shards x 5 samples of 16x16 VIS + NIR: (tar paths, expected rows in key order)."""
    root = tmp_path_factory.mktemp("compat")
    batches = write_dataset(Storage(str(root)))
    expected = [
        {"key": f"{b.labels[i]:08d}_{b.samples[i]:03d}", "label": int(b.labels[i]), "vis": b.vis[i],
         "nir": b.nir[i], "meta": expected_meta(b, i)}
        for b in batches.values() for i in range(len(b))
    ]
    paths = [str(root / "shards" / f"facegen-{s:06d}.tar") for s in batches]
    return paths, expected


def test_webdataset_reads_the_shards(dataset):
    import webdataset as wds

    paths, expected = dataset
    def pipeline():
        return wds.WebDataset(paths, shardshuffle=False, empty_check=False)

    raw = list(pipeline())  # undecoded: the stored bytes
    assert [r["__key__"] for r in raw] == [e["key"] for e in expected]
    assert [(Image.open(io.BytesIO(r["vis.png"])).mode, Image.open(io.BytesIO(r["nir.png"])).mode) for r in raw] == [
        ("RGB", "L")] * 15
    rows = list(pipeline().decode("rgb8"))  # the usual training pipeline: uint8 HxWx3 arrays
    for row, want in zip(rows, expected):
        assert row["cls"] == want["label"] and row["json"] == want["meta"]
        np.testing.assert_array_equal(row["vis.png"], want["vis"])
    nir = [n for (n,) in pipeline().decode("l8").to_tuple("nir.png")]  # grey uint8 HxW
    np.testing.assert_array_equal(np.stack(nir), np.stack([e["nir"] for e in expected]))


@pytest.mark.ray
def test_ray_data_reads_the_shards(dataset, ray_session):
    paths, expected = dataset
    rows = sorted(ray_session.data.read_webdataset(paths).take_all(), key=lambda r: r["__key__"])
    assert len(rows) == 15
    assert [r["__key__"] for r in rows] == [e["key"] for e in expected]
    assert [int(r["cls"]) for r in rows] == [e["label"] for e in expected]
    for row, want in zip(rows, expected):
        np.testing.assert_array_equal(row["vis.png"], want["vis"])
        np.testing.assert_array_equal(row["nir.png"], want["nir"])


def test_hugging_face_datasets_reads_the_shards(dataset, tmp_path):
    import datasets

    paths, expected = dataset
    ds = datasets.load_dataset("webdataset", data_files={"train": paths}, split="train", cache_dir=str(tmp_path))
    assert ds.num_rows == 15
    assert ds["cls"] == [e["label"] for e in expected]
    assert ds["__key__"] == [e["key"] for e in expected]
    for row, want in zip(ds, expected):
        assert (row["vis.png"].mode, row["nir.png"].mode) == ("RGB", "L")
        np.testing.assert_array_equal(np.asarray(row["vis.png"]), want["vis"])
        np.testing.assert_array_equal(np.asarray(row["nir.png"]), want["nir"])
        assert row["json"]["seeds"] == want["meta"]["seeds"] and row["json"]["slot"] == want["meta"]["slot"]
