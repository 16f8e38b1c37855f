"""`index build --features` and `--images` stream: the same index as the in-memory build, read
chunk by chunk, and memory near one shard whatever the row count."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from facegen.engine.index import PrivacyIndex, build_index, embeddings_from_identity_features, features_json
from facegen.engine.index.features_json import identity_feature_blocks
from facegen.engine.index.sources import embeddings_from_images, image_stream
from facegen.engine.index.stream import build_index_from_blocks
from facegen.engine.storage import Storage
from facegen.models.errors import UserError
from tests.engine.tiny import tiny_embedder


def test_features_read_in_chunks_equal_json_loads(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    names = [f"{i // 3:04d}_{i % 3}.png" for i in range(50)] + ['9\\u00e9x_"q".png', "ünï_1.jpg"]
    values = rng.standard_normal((len(names), 7)) * 10.0 ** rng.integers(-8, 8, (len(names), 1))
    entries = [json.dumps(n) + " :\n [" + ", ".join(repr(float(v)) for v in row) + "]" for n, row in
               zip(names, values)]
    entries[3] = '"0001_0.png":[1, 2e3, -3E-2, 0, 5, 6.25, 7]'  # ints and exponents
    text = "  {\n" + ",\n ".join(entries) + "\n}\n"
    path = tmp_path / "identity_features.json"
    path.write_text(text, encoding="utf-8")
    reference = json.loads(text)
    for chunk in (1, 5, 64, 1 << 20):  # key, ':', numbers and multi-byte characters split across chunks
        monkeypatch.setattr(features_json, "CHUNK_CHARS", chunk)
        blocks = list(identity_feature_blocks(str(path), block_rows=16))
        assert [len(b[2]) for b in blocks] == [16, 16, 16, 4]
        files = [f for b in blocks for f in b[2]]
        assert files == list(reference)
        np.testing.assert_array_equal(np.concatenate([b[0] for b in blocks]),
                                      np.asarray(list(reference.values()), np.float32))
        assert [i for b in blocks for i in b[1]] == [f.split("_")[0] for f in files]


@pytest.mark.parametrize("content,message", [
    ('{"0001_00.png": [1, 2]} x', "extra data"),
    ('{"0001_00.png": [1, 2] "0001_01.png": [1, 2]}', "expected ',' or '}'"),
    ('{"0001_00.png" [1, 2]}', "expected ':'"),
    ('{"0001_00.png": [1, "a"]}', "must be numbers"),
    ('{"0001_00.png": [[1], [2]]}', "must be numbers"),
    ('{}', "non-empty JSON object"),
    ('', "non-empty JSON object"),
])
def test_features_errors(tmp_path, content, message):
    path = tmp_path / "f.json"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        embeddings_from_identity_features(str(path))


def write_images(folder, count, rng, size=8):
    folder.mkdir(parents=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i // 4}_{i % 4}.png")


def test_streamed_image_build_equals_the_in_memory_build(tmp_path):
    rng = np.random.default_rng(1)
    write_images(tmp_path / "data" / "VIS", 23, rng, size=32)
    (tmp_path / "data" / "VIS" / "7_9.png").write_bytes(b"broken")
    embedder = tiny_embedder()
    source = embeddings_from_images(str(tmp_path / "data"), embedder, 5, progress=False, skip_bad=True)
    direct, streamed = Storage(str(tmp_path / "direct")), Storage(str(tmp_path / "streamed"))
    build_index(source.embeddings, source.identities, source.files, direct, embedder_fingerprint=None,
                preprocessing=None, shard_size=10)
    stream = image_stream(str(tmp_path / "data"), embedder, 5, progress=False, skip_bad=True)
    info = build_index_from_blocks(stream.blocks(), streamed, expected_dim=embedder.dim, shard_size=10)
    assert [f for f, _ in stream.skipped] == [f for f, _ in source.skipped] == ["VIS/7_9.png"]
    assert info.count == 23 and info.num_shards == 3
    for name in ("00000.faiss", "00002.faiss", "00001.parquet"):
        assert streamed.read_bytes(f"shards/{name}") == direct.read_bytes(f"shards/{name}")
    with pytest.raises(UserError, match="7_9.png: undecodable"):  # without --skip-bad: fails, writes nothing
        build_index_from_blocks(image_stream(str(tmp_path / "data"), embedder, 5, progress=False).blocks(),
                                Storage(str(tmp_path / "bad")), shard_size=10)
    assert not (tmp_path / "bad" / "shards").exists() and not (tmp_path / "bad" / "index.json").exists()


MEASURE = """
import re, sys
import torch
from facegen.engine.index.features_json import identity_feature_blocks
from facegen.engine.index.sources import image_stream
from facegen.engine.index.stream import build_index_from_blocks
from facegen.engine.storage import Storage

class Projection:  # a stand-in embedder: a fixed random projection of the pixels, 512-d
    def __init__(self, pixels):
        self.weight = torch.randn(pixels, 512, generator=torch.Generator().manual_seed(0))
    def embed(self, images):
        return images.reshape(len(images), -1).float() @ self.weight

def status(key):
    return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024

def build(kind, out, source):
    if kind == "features":
        blocks = identity_feature_blocks(source)
    else:
        blocks = image_stream(source, Projection(3 * 8 * 8), 256, progress=False).blocks()
    build_index_from_blocks(blocks, Storage(out), shard_size=int(sys.argv[5]))

kind, out, source, warm = sys.argv[1:5]
build(kind, out + "-warm", warm)  # imports and thread pools first: what is measured is the build's own memory
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
before = status("VmRSS")
build(kind, out, source)
print("growth", status("VmHWM") - before)
"""


def measure(kind, tmp_path, source, warm, shard):
    out = tmp_path / f"index-{kind}"
    done = subprocess.run([sys.executable, "-c", MEASURE, kind, str(out), str(source), str(warm), str(shard)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return int(done.stdout.split("growth ")[1].split()[0]), PrivacyIndex.open(str(out))


def write_features(path, rows, dim, rng):
    """identity_features.json written in pieces (the test never holds it whole); 4 decimals a value."""
    with open(path, "w") as handle:
        handle.write("{")
        for start in range(0, rows, 5000):
            block = rng.standard_normal((min(5000, rows - start), dim)).astype(np.float32)
            lines = (f'"{(start + i) // 10}_{i % 10}.png": [' + ",".join(f"{v:.4f}" for v in row) + "]"
                     for i, row in enumerate(block))
            handle.write(("," if start else "") + ",".join(lines))
        handle.write("}")


@pytest.mark.slow
def test_streamed_features_build_stays_under_a_memory_budget(tmp_path):
    rows, dim, shard = 100_000, 256, 5_000
    rng = np.random.default_rng(2)
    write_features(tmp_path / "features.json", rows, dim, rng)
    write_features(tmp_path / "warm.json", 500, dim, rng)
    # 102 MB of float32 rows (json.load alone would hold ~1 GB of Python floats); a shard is 5 MB, the
    # impostor sample 8 MB.
    budget = 64 << 20
    assert rows * dim * 4 > budget
    growth, index = measure("features", tmp_path, tmp_path / "features.json", tmp_path / "warm.json", shard)
    assert growth < budget, f"peak memory grew by {growth / 2**20:.1f} MiB"
    assert index.count == rows and index.num_shards == rows // shard and index.info.num_identities == rows // 10
    assert index.file_of([54_321]).tolist() == ["5432_1.png"]


@pytest.mark.slow
def test_streamed_image_build_stays_under_a_memory_budget(tmp_path):
    rows, shard = 40_000, 2_000
    rng = np.random.default_rng(3)
    write_images(tmp_path / "images", rows, rng)
    write_images(tmp_path / "warm", 300, rng)
    budget = 64 << 20  # the rows: 82 MB of 512-d float32; a shard 4 MB, the impostor sample 16 MB
    assert rows * 512 * 4 > budget
    growth, index = measure("images", tmp_path, tmp_path / "images", tmp_path / "warm", shard)
    assert growth < budget, f"peak memory grew by {growth / 2**20:.1f} MiB"
    assert index.count == rows and index.num_shards == rows // shard and index.info.num_identities == rows // 4
