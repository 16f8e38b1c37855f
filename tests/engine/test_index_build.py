"""Building a privacy index from each source; index.json last; bad data counted or refused."""

import csv
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import facegen.engine.index.writer as writer_module
from facegen.engine.index import (
    PrivacyIndex,
    build_index,
    embeddings_from_identity_features,
    embeddings_from_images,
    embeddings_from_table,
)
from facegen.engine.storage import Storage
from facegen.models.embedder import Preprocessing, TorchEmbedder
from facegen.models.errors import UserError
from facegen.models.iresnet import IResNet, IResNetConfig


def normalised(x):
    x = np.asarray(x, np.float64)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def tiny_embedder():
    torch.manual_seed(0)
    module = IResNet(IResNetConfig(depth=18, embedding_dim=32, input_size=32, base_width=8))
    return TorchEmbedder(module, Preprocessing(input_size=32))


def test_identity_features_json(tmp_path):
    rng = np.random.default_rng(0)
    names = ["0001_00.png", "0001_01.png", "0002_00.png", "17_3.jpg"]
    raw = rng.standard_normal((4, 8)) * 5
    path = tmp_path / "identity_features.json"
    path.write_text(json.dumps({n: v.tolist() for n, v in zip(names, raw)}))
    source = embeddings_from_identity_features(str(path))
    assert source.identities.tolist() == ["0001", "0001", "0002", "17"]
    assert source.files.tolist() == names
    out = Storage(str(tmp_path / "index"))
    info = build_index(source.embeddings, source.identities, source.files, out, embedder_fingerprint=None,
                       preprocessing=None, shard_size=3, source=source.description)
    assert (info.count, info.dim, info.num_shards, info.embedder_fingerprint) == (4, 8, 2, None)
    index = PrivacyIndex.open(str(tmp_path / "index"), backend="numpy")
    np.testing.assert_allclose(index.embeddings(), normalised(raw), atol=1e-7)
    assert index.identity_of([0, 1, 2, 3]).tolist() == ["0001", "0001", "0002", "17"]
    assert index.file_of([3]).tolist() == ["17_3.jpg"]
    stored = json.loads((tmp_path / "index" / "index.json").read_text())
    assert stored["source"].startswith("identity_features.json") and stored["num_shards"] == 2


@pytest.mark.parametrize("content,message", [
    ('{"0001_00.png": [1, 2], "0001_01.png": [1]}', "list of 2 numbers"),
    ('{"nounderscore.png": [1, 2]}', "identity"),
    ('[1, 2]', "JSON object"),
    ('{"0001_00.png": [1, ', "not valid JSON"),
])
def test_identity_features_json_errors(tmp_path, content, message):
    path = tmp_path / "identity_features.json"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        embeddings_from_identity_features(str(path))


def test_parquet_table(tmp_path):
    rng = np.random.default_rng(1)
    raw = rng.standard_normal((6, 5)).astype(np.float32)
    table = pa.table({"embedding": [r.tolist() for r in raw], "identity": [1, 1, 2, 2, 3, 3],
                      "file": [f"f{i}.png" for i in range(6)]})
    pq.write_table(table, tmp_path / "emb.parquet")
    source = embeddings_from_table(str(tmp_path / "emb.parquet"))
    np.testing.assert_array_equal(source.embeddings, raw)
    assert source.identities.tolist() == ["1", "1", "2", "2", "3", "3"]
    assert source.files.tolist() == [f"f{i}.png" for i in range(6)]
    pq.write_table(table.drop(["file"]), tmp_path / "bad.parquet")
    with pytest.raises(UserError, match=r"missing column\(s\) \['file'\]"):
        embeddings_from_table(str(tmp_path / "bad.parquet"))


@pytest.mark.parametrize("labels", ["csv", "parquet"])
def test_npy_with_sidecar_labels(tmp_path, labels):
    rng = np.random.default_rng(2)
    raw = rng.standard_normal((4, 3)).astype(np.float32)
    np.save(tmp_path / "emb.npy", raw)
    identities, files = ["a", "a", "b", "c"], ["a_1.png", "a,2.png", "b_1.png", "c_1.png"]
    if labels == "csv":
        with open(tmp_path / "emb.labels.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["identity", "file"])
            writer.writerows(zip(identities, files))
    else:
        pq.write_table(pa.table({"identity": identities, "file": files}), tmp_path / "emb.labels.parquet")
    source = embeddings_from_table(str(tmp_path / "emb.npy"))
    np.testing.assert_array_equal(source.embeddings, raw)
    assert source.identities.tolist() == identities and source.files.tolist() == files


def test_npy_without_labels_is_refused(tmp_path):
    np.save(tmp_path / "emb.npy", np.ones((2, 3), np.float32))
    with pytest.raises(UserError, match="emb.labels.csv"):
        embeddings_from_table(str(tmp_path / "emb.npy"))


def write_image(path, rng, size=32, mode="RGB"):
    channels = 3 if mode == "RGB" else 1
    pixels = rng.integers(0, 256, (size, size, channels), dtype=np.uint8)
    Image.fromarray(pixels if channels == 3 else pixels[..., 0], mode).save(path)
    return pixels


def test_image_folder_equals_direct_embedding(tmp_path):
    rng = np.random.default_rng(3)
    data = tmp_path / "data"
    (data / "VIS").mkdir(parents=True)
    (data / "NIR").mkdir()
    names = ["1_0.png", "1_1.png", "2_0.png", "2_1.png", "3_0.png"]
    sizes = [32, 32, 48, 32, 48]  # two sizes: embedded in one call per size
    vis = {n: write_image(data / "VIS" / n, rng, s) for n, s in zip(names, sizes)}
    nir = {n: write_image(data / "NIR" / n, rng, 32, "L") for n in names[:2]}
    (data / "VIS" / "4_0.png").write_bytes(b"not a png at all")  # undecodable
    (data / "VIS" / "notes.txt").write_text("hello")  # not an image
    write_image(data / "VIS" / "noidentity.png", rng)  # bad name
    embedder = tiny_embedder()
    with pytest.raises(UserError, match=r"noidentity\.png: file name is not"):
        embeddings_from_images(str(data), embedder, batch_size=2, include_nir=True, progress=False)
    (data / "VIS" / "noidentity.png").rename(data / "noidentity.png")
    with pytest.raises(UserError, match=r"VIS/4_0\.png: undecodable image.*--skip-bad"):
        embeddings_from_images(str(data), embedder, batch_size=2, include_nir=True, progress=False)
    (data / "noidentity.png").rename(data / "VIS" / "noidentity.png")
    source = embeddings_from_images(str(data), embedder, batch_size=2, include_nir=True, progress=False,
                                    skip_bad=True)

    expected_files = [f"VIS/{n}" for n in names] + [f"NIR/{n}" for n in names[:2]]
    assert source.files.tolist() == expected_files
    assert source.identities.tolist() == ["1", "1", "2", "2", "3", "1", "1"]
    direct = [embedder.embed(torch.from_numpy(vis[n].transpose(2, 0, 1)[None].copy())) for n in names]
    direct += [embedder.embed(torch.from_numpy(np.repeat(nir[n].transpose(2, 0, 1), 3, 0)[None].copy()))
               for n in names[:2]]
    np.testing.assert_allclose(source.embeddings, torch.cat(direct).numpy(), atol=2e-6)
    reasons = dict(source.skipped)
    assert reasons["VIS/4_0.png"].startswith("undecodable image")
    assert reasons["VIS/notes.txt"] == "not an image file (extension)"
    assert reasons["VIS/noidentity.png"].startswith("file name is not")
    assert source.skipped_by_reason() == {"undecodable image": 1, "not an image file (extension)": 1,
                                          "file name is not {identity}_{sample}.ext": 1}

    out = Storage(str(tmp_path / "index"))
    build_index(source.embeddings, source.identities, source.files, out,
                embedder_fingerprint=embedder.fingerprint, preprocessing=embedder.preprocessing.to_dict(),
                dropped=source.skipped_by_reason())
    index = PrivacyIndex.open(out.uri)
    assert index.info.dropped["undecodable image"] == 1
    assert index.info.preprocessing == embedder.preprocessing.to_dict()
    sims, rows = index.max_similarity(torch.cat(direct))
    np.testing.assert_array_equal(rows, np.arange(7))
    np.testing.assert_allclose(sims, 1.0, atol=1e-6)


def test_flat_image_folder(tmp_path):
    rng = np.random.default_rng(4)
    for name in ["5_a.jpg", "6_b.png"]:
        write_image(tmp_path / name, rng)
    source = embeddings_from_images(str(tmp_path), tiny_embedder(), progress=False)
    assert source.files.tolist() == ["5_a.jpg", "6_b.png"] and source.identities.tolist() == ["5", "6"]
    with pytest.raises(UserError, match="VIS/ and NIR/"):
        embeddings_from_images(str(tmp_path), tiny_embedder(), include_nir=True, progress=False)


def test_index_json_is_written_last(tmp_path, monkeypatch):
    writes = []
    original = Storage.atomic_writer  # every write goes through it (write_bytes too)

    def recording(self, relative):
        writes.append(relative)
        return original(self, relative)

    monkeypatch.setattr(Storage, "atomic_writer", recording)
    rng = np.random.default_rng(5)
    build_index(rng.standard_normal((10, 4)), ["a"] * 10, ["f"] * 10, Storage(str(tmp_path)),
                embedder_fingerprint=None, preprocessing=None, shard_size=4)
    shard_writes = [w for w in writes if w.startswith("shards/")]
    assert len(shard_writes) == 6 and writes[-1] == "index.json"


def test_crashed_build_leaves_no_readable_index(tmp_path, monkeypatch):
    rng = np.random.default_rng(6)
    calls = []
    original = writer_module.write_shard

    def crash_on_second_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return original(*args, **kwargs)

    monkeypatch.setattr(writer_module, "write_shard", crash_on_second_shard)
    with pytest.raises(OSError, match="disk full"):
        build_index(rng.standard_normal((10, 4)), ["a"] * 10, ["f"] * 10, Storage(str(tmp_path)),
                    embedder_fingerprint=None, preprocessing=None, shard_size=4)
    assert len(calls) == 2  # the first shard was written, then removed with the failed build
    assert not (tmp_path / "shards").exists() and not (tmp_path / "index.json").exists()
    with pytest.raises(UserError, match="did not finish"):
        PrivacyIndex.open(str(tmp_path))


def test_rebuild_needs_overwrite_and_replaces_shards(tmp_path):
    rng = np.random.default_rng(7)
    out = Storage(str(tmp_path))
    build_index(rng.standard_normal((10, 4)), ["a"] * 10, ["f"] * 10, out, embedder_fingerprint=None,
                preprocessing=None, shard_size=2)
    with pytest.raises(UserError, match="already exists"):
        build_index(rng.standard_normal((3, 4)), ["a"] * 3, ["f"] * 3, out, embedder_fingerprint=None,
                    preprocessing=None)
    info = build_index(rng.standard_normal((3, 4)), ["a"] * 3, ["f"] * 3, out, embedder_fingerprint=None,
                       preprocessing=None, overwrite=True)
    # The replacement's shards are named apart from the replaced index's, whose files are gone once it is done.
    assert info.num_shards == 1 and out.list("shards") == ["next-00000.faiss", "next-00000.parquet"]
    assert PrivacyIndex.open(str(tmp_path), backend="numpy").count == 3
    info = build_index(rng.standard_normal((5, 4)), ["a"] * 5, ["f"] * 5, out, embedder_fingerprint=None,
                       preprocessing=None, overwrite=True, shard_size=4)
    assert [s.name for s in info.shards] == ["00000", "00001"]
    assert out.list("shards") == ["00000.faiss", "00000.parquet", "00001.faiss", "00001.parquet"]


def test_a_failed_overwrite_leaves_the_old_index_whole(tmp_path):
    from facegen.engine.index.stream import build_index_from_blocks

    rng = np.random.default_rng(9)
    out = Storage(str(tmp_path))
    old = rng.standard_normal((6, 4))
    build_index(old, ["a", "b"] * 3, [f"f{i}" for i in range(6)], out, embedder_fingerprint=None,
                preprocessing=None, shard_size=4)
    before = {p.name: p.read_bytes() for p in (tmp_path / "shards").iterdir()} | {
        "index.json": (tmp_path / "index.json").read_bytes()}
    bad = rng.standard_normal((3, 4))
    bad[2] = np.nan

    def blocks():  # a good first shard's worth, then a row the build must refuse
        yield rng.standard_normal((4, 4)), ["c"] * 4, ["g"] * 4
        yield bad, ["d"] * 3, ["h"] * 3

    with pytest.raises(UserError, match="not finite"):
        build_index_from_blocks(blocks(), out, shard_size=4, overwrite=True)
    after = {p.name: p.read_bytes() for p in (tmp_path / "shards").iterdir()} | {
        "index.json": (tmp_path / "index.json").read_bytes()}
    assert after == before
    index = PrivacyIndex.open(str(tmp_path), backend="numpy")
    assert index.count == 6


def test_invalid_rows_refused_or_dropped_and_counted(tmp_path):
    rng = np.random.default_rng(8)
    raw = rng.standard_normal((6, 4))
    raw[1] = 0.0
    raw[4, 2] = np.nan
    files = [f"x_{i}.png" for i in range(6)]
    with pytest.raises(UserError, match=r"2 embeddings are not finite .*x_1.png.*x_4.png"):
        build_index(raw, ["x"] * 6, files, Storage(str(tmp_path)), embedder_fingerprint=None,
                    preprocessing=None)
    assert not (tmp_path / "index.json").exists()
    info = build_index(raw, ["x"] * 6, files, Storage(str(tmp_path)), embedder_fingerprint=None,
                       preprocessing=None, drop_invalid=True, dropped={"undecodable image": 3})
    assert info.count == 4
    assert info.dropped == {"undecodable image": 3, "non-finite or zero-norm embedding": 2}
    index = PrivacyIndex.open(str(tmp_path), backend="numpy")
    assert index.file_of(range(4)).tolist() == ["x_0.png", "x_2.png", "x_3.png", "x_5.png"]
    np.testing.assert_allclose(index.embeddings(), normalised(raw[[0, 2, 3, 5]]), atol=1e-7)


def test_label_count_mismatch(tmp_path):
    with pytest.raises(UserError, match="3 embeddings but 2 identities"):
        build_index(np.ones((3, 4)), ["a", "b"], ["f"] * 3, Storage(str(tmp_path)),
                    embedder_fingerprint=None, preprocessing=None)
