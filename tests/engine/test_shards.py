"""Shard writing: contents, reproducibility, manifest offsets, crash safety, S3."""

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

import facegen.engine.dataset.codec as codec
import facegen.engine.dataset.webdataset as shards
from facegen.engine.dataset.manifest import completed_shards, is_complete, remove_incomplete
from facegen.engine.dataset.reader import iter_batches, iter_dataset, iter_shard, read_manifest, read_member
from facegen.engine.dataset.samples import ShardBatch
from facegen.engine.dataset.webdataset import write_shard
from facegen.engine.storage import Storage
from facegen.models.errors import UserError

REPO = Path(__file__).resolve().parents[2]


def make_batch(shard_id: int, n: int = 5, size: int = 16, nir: bool = True) -> ShardBatch:
    """Deterministic tiny batch; keys sorted: identities 2s, 2s+1 with samples 0.. each."""
    rng = np.random.default_rng(1000 + shard_id)
    labels = np.array([2 * shard_id + (i >= 3) for i in range(n)])
    samples = np.array([i if i < 3 else i - 3 for i in range(n)])
    metas = [
        {"slot": int(7 * label + 1), "seeds": {"z": 2**40 + i, "noise": np.int64(i)},
         "sims": {"max_real": np.float32(0.25) + i / 100, "anchor": 0.75}, "c": np.arange(3) / 4}
        for i, label in enumerate(labels)
    ]
    return ShardBatch(
        labels=labels,
        samples=samples,
        vis=rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
        nir=rng.integers(0, 256, (n, size, size), dtype=np.uint8) if nir else None,
        metas=metas,
    )


def write_dataset(storage: Storage, num_shards: int = 3, **kwargs) -> dict[int, ShardBatch]:
    batches = {s: make_batch(s) for s in range(num_shards)}
    for shard_id, batch in batches.items():
        write_shard(storage, shard_id, batch, stats={"attempts": 5 + shard_id, "rate": float("nan")}, **kwargs)
    return batches


def expected_meta(batch: ShardBatch, i: int) -> dict:
    meta = codec.to_jsonable(batch.metas[i])
    return {**meta, "identity": int(batch.labels[i]), "sample": int(batch.samples[i])}


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_round_trip_and_markers(tmp_path):
    storage = Storage(str(tmp_path / "ds"))
    batches = write_dataset(storage)
    read = list(iter_dataset(storage))
    assert len(read) == 15
    flat = [(batch, i) for s, batch in batches.items() for i in range(len(batch))]
    for sample, (batch, i) in zip(read, flat):
        assert sample.key == f"{batch.labels[i]:08d}_{batch.samples[i]:03d}"
        assert (sample.label, sample.sample) == (batch.labels[i], batch.samples[i])
        np.testing.assert_array_equal(sample.vis, batch.vis[i])
        np.testing.assert_array_equal(sample.nir, batch.nir[i])
        assert sample.meta == expected_meta(batch, i)
    markers = completed_shards(storage)
    assert list(markers) == [0, 1, 2]
    marker = markers[1]
    tar_path = tmp_path / "ds" / "shards" / "facegen-000001.tar"
    assert marker["shard_file"] == "facegen-000001.tar" and marker["sha256"] == sha256_file(tar_path)
    assert marker["num_samples"] == 5 and marker["num_bytes"] == tar_path.stat().st_size
    assert (marker["first_key"], marker["last_key"]) == ("00000002_000", "00000003_001")
    assert marker["stats"] == {"attempts": 6, "rate": None}  # NaN is not JSON: stored as null
    assert marker["manifest_sha256"] == sha256_file(tmp_path / "ds" / "manifest" / "000001.parquet")
    assert is_complete(storage, 2) and not is_complete(storage, 3)


def test_tar_headers_members_and_modes(tmp_path):
    storage = Storage(str(tmp_path))
    batch = make_batch(0)
    write_shard(storage, 0, batch)
    raw = (tmp_path / "shards" / "facegen-000000.tar").read_bytes()
    assert raw[257:265] == b"ustar\x0000"  # POSIX USTAR magic + version
    assert len(raw) % 10240 == 0  # whole tar records
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        members = tar.getmembers()
        names = [m.name for m in members]
        assert names[:4] == ["00000000_000.cls", "00000000_000.json", "00000000_000.nir.png", "00000000_000.vis.png"]
        assert len(names) == 20 and all("." not in n.split(".", 1)[0] for n in names)
        assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode, m.type) for m in members} == {
            (0, 0, 0, "", "", 0o644, tarfile.REGTYPE)}
        data = {m.name: tar.extractfile(m).read() for m in members}
    assert data["00000001_001.cls"] == b"1"
    vis = Image.open(io.BytesIO(data["00000000_002.vis.png"]))
    nir = Image.open(io.BytesIO(data["00000000_002.nir.png"]))
    assert (vis.mode, nir.mode) == ("RGB", "L")
    np.testing.assert_array_equal(np.asarray(nir), batch.nir[2])
    assert set(vis.info) <= {"dpi", "gamma"} and "dpi" not in vis.info  # no metadata chunks
    assert json.loads(data["00000000_002.json"]) == expected_meta(batch, 2)


def test_rewrite_is_byte_identical(tmp_path):
    first, second = Storage(str(tmp_path / "a")), Storage(str(tmp_path / "b"))
    write_shard(first, 4, make_batch(4), workers=1)
    hashes = [sha256_file(tmp_path / "a" / p) for p in ("shards/facegen-000004.tar", "manifest/000004.parquet")]
    write_shard(first, 4, make_batch(4), workers=3)  # rerun in place, different pool size
    write_shard(second, 4, make_batch(4))
    for root in ("a", "b"):
        assert [sha256_file(tmp_path / root / p)
                for p in ("shards/facegen-000004.tar", "manifest/000004.parquet")] == hashes
    assert first.read_json("done/000004.json") == second.read_json("done/000004.json")


def test_byte_identical_across_processes(tmp_path):
    write_shard(Storage(str(tmp_path / "here")), 2, make_batch(2))
    code = ("import sys; from facegen.engine.storage import Storage; "
            "from facegen.engine.dataset.webdataset import write_shard; "
            "from tests.engine.test_shards import make_batch; "
            "write_shard(Storage(sys.argv[1]), 2, make_batch(2), workers=2)")
    env = {**os.environ, "PYTHONHASHSEED": "12345", "TZ": "Asia/Kolkata"}
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "there")], cwd=REPO, env=env, check=True)
    for relative in ("shards/facegen-000002.tar", "manifest/000002.parquet", "done/000002.json"):
        assert sha256_file(tmp_path / "here" / relative) == sha256_file(tmp_path / "there" / relative), relative


def test_manifest_offsets_point_at_member_bytes(tmp_path):
    storage = Storage(str(tmp_path))
    batches = write_dataset(storage)
    table = read_manifest(storage)
    assert table.num_rows == 15 and table.column("key").to_pylist()[:2] == ["00000000_000", "00000000_001"]
    assert table.schema.field("seeds_z").type == pa.int64() and table.schema.field("sims_anchor").type == pa.float64()
    assert "c" not in table.column_names  # lists stay in the .json member only
    rows = table.to_pylist()
    flat = [(batch, i) for batch in batches.values() for i in range(len(batch))]
    for row, (batch, i) in zip(rows, flat):
        assert (row["label"], row["sample"], row["seeds_z"]) == (batch.labels[i], batch.samples[i], 2**40 + i)
        vis = Image.open(io.BytesIO(read_member(storage, row["shard"], row["vis_offset"], row["vis_size"])))
        nir = Image.open(io.BytesIO(read_member(storage, row["shard"], row["nir_offset"], row["nir_size"])))
        np.testing.assert_array_equal(np.asarray(vis), batch.vis[i])
        np.testing.assert_array_equal(np.asarray(nir), batch.nir[i])
        assert read_member(storage, row["shard"], row["cls_offset"], row["cls_size"]) == str(batch.labels[i]).encode()
        meta = json.loads(read_member(storage, row["shard"], row["json_offset"], row["json_size"]))
        assert meta == expected_meta(batch, i)
    # The same ranges, read straight from the file, hold the same bytes.
    raw = (tmp_path / "shards" / rows[7]["shard"]).read_bytes()
    start, size = rows[7]["vis_offset"], rows[7]["vis_size"]
    assert raw[start:start + size] == read_member(storage, rows[7]["shard"], start, size)


def test_crash_before_marker_then_cleanup_and_rerun(tmp_path, monkeypatch):
    reference = Storage(str(tmp_path / "ref"))
    write_shard(reference, 1, make_batch(1))
    storage = Storage(str(tmp_path / "ds"))
    write_shard(storage, 0, make_batch(0))

    def crash(*args, **kwargs):
        raise RuntimeError("worker died before the marker")

    monkeypatch.setattr(shards, "write_marker", crash)
    with pytest.raises(RuntimeError):
        write_shard(storage, 1, make_batch(1))
    monkeypatch.undo()
    write_shard(storage, 2, make_batch(2))
    (tmp_path / "ds" / "shards" / ".tmp-abandoned").write_bytes(b"partial")  # a killed writer's temp

    assert (tmp_path / "ds" / "shards" / "facegen-000001.tar").exists()
    assert list(completed_shards(storage)) == [0, 2] and not is_complete(storage, 1)
    assert [s.label for s in iter_dataset(storage)] == [0, 0, 0, 1, 1, 4, 4, 4, 5, 5]
    assert read_manifest(storage).column("shard_id").to_pylist() == [0] * 5 + [2] * 5

    removed = remove_incomplete(storage)
    assert sorted(removed) == ["manifest/000001.parquet", "shards/.tmp-abandoned", "shards/facegen-000001.tar"]
    assert sorted(os.listdir(tmp_path / "ds" / "shards")) == ["facegen-000000.tar", "facegen-000002.tar"]
    assert remove_incomplete(storage) == []
    write_shard(storage, 1, make_batch(1))
    rerun, clean = (sha256_file(tmp_path / root / "shards/facegen-000001.tar") for root in ("ds", "ref"))
    assert rerun == clean
    assert list(completed_shards(storage)) == [0, 1, 2]


def test_marker_without_tar_is_removed(tmp_path):
    storage = Storage(str(tmp_path))
    write_dataset(storage, num_shards=2)
    (tmp_path / "shards" / "facegen-000000.tar").unlink()
    assert remove_incomplete(storage) == ["done/000000.json", "manifest/000000.parquet"]
    assert list(completed_shards(storage)) == [1]


@pytest.mark.parametrize("workers", [1, 2])  # inline encoding and the thread pool
def test_failed_encoding_never_publishes_a_partial_tar(tmp_path, monkeypatch, workers):
    storage = Storage(str(tmp_path))
    big = make_batch(0, size=64)  # noise images: several KiB each, so the temp file fills before the failure
    write_shard(storage, 0, big)
    good = sha256_file(tmp_path / "shards" / "facegen-000000.tar")
    real_encode, calls, temp_sizes = codec.encode_image, [], []

    def temp_size() -> int:
        return sum(p.stat().st_size for p in (tmp_path / "shards").glob(".tmp-*"))

    def failing_encode(*args, **kwargs):
        calls.append(1)
        if len(calls) == 7:  # ~sample 3's VIS: the samples before it are encoded and go into the temp file
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and temp_size() < 30_000:
                time.sleep(0.01)  # the writer thread streams the finished samples meanwhile
            temp_sizes.append(temp_size())
            raise OSError("encoder failure")
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(codec, "encode_image", failing_encode)
    with pytest.raises(OSError, match="encoder failure"):
        write_shard(storage, 0, big, workers=workers)
    with pytest.raises(OSError, match="encoder failure"):
        calls.clear()
        write_shard(storage, 5, make_batch(5, size=64), workers=workers)
    assert len(temp_sizes) == 2 and min(temp_sizes) >= 30_000  # partial data existed, under a temp name
    assert sorted(os.listdir(tmp_path / "shards")) == ["facegen-000000.tar"]  # no temp, no shard 5
    assert sha256_file(tmp_path / "shards" / "facegen-000000.tar") == good  # the old tar untouched
    assert not is_complete(storage, 0)  # its marker went first: the shard will be rewritten
    assert not (tmp_path / "manifest" / "000005.parquet").exists()


def test_s3_round_trip(s3_bucket, tmp_path):
    uri, options = s3_bucket
    storage = Storage(uri + "/ds", options)
    batches = write_dataset(storage, num_shards=2)
    local = Storage(str(tmp_path))
    write_dataset(local, num_shards=2)
    assert storage.read_bytes("shards/facegen-000001.tar") == (tmp_path / "shards/facegen-000001.tar").read_bytes()
    assert completed_shards(storage) == completed_shards(local)
    samples = list(iter_dataset(storage))
    assert [s.key for s in samples] == [s.key for s in iter_dataset(local)]
    np.testing.assert_array_equal(samples[6].vis, batches[1].vis[1])
    row = read_manifest(storage).to_pylist()[6]
    nir = read_member(storage, row["shard"], row["nir_offset"], row["nir_size"])
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(nir))), batches[1].nir[1])
    storage.write_bytes("shards/facegen-000007.tar", b"half a shard")
    assert remove_incomplete(storage) == ["shards/facegen-000007.tar"]
    assert storage.list("shards") == ["facegen-000000.tar", "facegen-000001.tar"]


@pytest.mark.parametrize("image_format", ["jpg", "webp"])
def test_lossy_formats(tmp_path, image_format):
    storage = Storage(str(tmp_path))
    smooth = np.linspace(0, 255, 32, dtype=np.float32)
    vis = np.stack([np.stack([*np.meshgrid(smooth, smooth[::-1]), np.full((32, 32), 128.0)], -1)] * 3)
    batch = ShardBatch(np.array([0, 0, 1]), np.array([0, 1, 0]), vis.astype(np.uint8),
                       np.full((3, 32, 32), 77, np.uint8), [{}] * 3)
    write_shard(storage, 0, batch, image_format=image_format, jpeg_quality=90)
    first = storage.read_bytes("shards/facegen-000000.tar")
    write_shard(storage, 0, batch, image_format=image_format, jpeg_quality=90)
    assert storage.read_bytes("shards/facegen-000000.tar") == first
    samples = list(iter_shard(storage, "facegen-000000.tar"))
    assert [s.key for s in samples] == ["00000000_000", "00000000_001", "00000001_000"]
    assert np.abs(samples[0].vis.astype(int) - batch.vis[0]).mean() < 3.0
    assert (samples[2].nir == 77).all()  # NIR stays lossless PNG
    assert read_manifest(storage).column("vis_format").to_pylist() == [image_format] * 3
    assert f"00000000_000.vis.{image_format}".encode() in first


def test_without_nir_and_batches(tmp_path):
    storage = Storage(str(tmp_path))
    for shard_id in range(3):
        write_shard(storage, shard_id, make_batch(shard_id, nir=False))
    assert [len(b) for b in iter_batches(storage, 4)] == [4, 4, 4, 3]
    stacked = list(iter_batches(storage, 4, workers=2))
    assert all(b.nir is None for b in stacked)
    expected = np.concatenate([make_batch(s).vis for s in range(3)])
    np.testing.assert_array_equal(np.concatenate([b.vis for b in stacked]), expected)
    assert np.concatenate([b.labels for b in stacked]).tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 4, 4, 5, 5]
    assert read_manifest(storage).column("nir_offset").null_count == 15
    assert b".nir.png" not in storage.read_bytes("shards/facegen-000000.tar")


def test_bad_batches_are_refused(tmp_path):
    storage = Storage(str(tmp_path))
    good = make_batch(0)
    with pytest.raises(ValueError, match="vis must be uint8"):
        ShardBatch(good.labels, good.samples, good.vis.astype(np.float32), None, [])
    with pytest.raises(ValueError, match="nir must be uint8"):
        ShardBatch(good.labels, good.samples, good.vis, good.nir[:, :8], [])
    with pytest.raises(ValueError, match="duplicate sample keys"):
        write_shard(storage, 0, ShardBatch(np.zeros(5), np.zeros(5), good.vis, None, []))
    with pytest.raises(ValueError, match="disagrees"):
        write_shard(storage, 0, ShardBatch(good.labels, good.samples, good.vis, None, [{"identity": 9}] * 5))
    with pytest.raises(ValueError, match="non-finite"):
        write_shard(storage, 0, ShardBatch(good.labels, good.samples, good.vis, None, [{"s": float("nan")}] * 5))
    with pytest.raises(ValueError, match="shard name"):
        write_shard(storage, 0, good, name="bad.name")
    with pytest.raises(ValueError, match="image_format"):
        write_shard(storage, 0, good, image_format="gif")
    assert not storage.exists("shards") or storage.list("shards") == []


def test_corrupt_data_and_markers_are_user_errors(tmp_path):
    storage = Storage(str(tmp_path))
    write_shard(storage, 0, make_batch(0))
    row = read_manifest(storage).to_pylist()[3]
    path = tmp_path / "shards" / "facegen-000000.tar"
    raw = bytearray(path.read_bytes())
    raw[row["vis_offset"]:row["vis_offset"] + row["vis_size"]] = b"\0" * row["vis_size"]
    path.write_bytes(bytes(raw))
    with pytest.raises(UserError, match=r"facegen-000000.tar:00000001_000.vis.png: cannot decode"):
        list(iter_shard(storage, "facegen-000000.tar"))
    (tmp_path / "done" / "000003.json").write_text("{not json")
    with pytest.raises(UserError, match="000003.json: unreadable completion marker"):
        completed_shards(storage)
