"""The output-format seam: `output.format` selects a shard writer, a shard file's extension its reader."""

import hashlib
import json

import numpy as np
import pytest

from facegen.engine.dataset.codec import decode_image, encode_image, round_trip
from facegen.engine.dataset.formats import FORMATS, shard_reader, shard_writer
from facegen.engine.dataset.reader import iter_shard
from facegen.engine.dataset.webdataset import WebDatasetReader, write_shard
from facegen.engine.spec import build_spec, spec_hash
from facegen.engine.storage import Storage
from facegen.models.errors import UserError
from tests.engine.test_shards import make_batch

TREE = {"generator": {"path": "g"}, "embedder": {"path": "e"}, "index": {"uri": "i"}, "output": {"uri": "o"}}


def file_sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_spec_selects_the_writer_and_it_writes_what_write_shard_writes(tmp_path):
    spec = build_spec(TREE, ["output.name=faces", "output.image_format=webp", "output.jpeg_quality=80"])
    assert spec.output.format == "webdataset"
    batch = make_batch(3)
    result = shard_writer(spec.output).write(Storage(str(tmp_path / "a")), 3, batch, stats={"attempts": 9})
    direct = write_shard(Storage(str(tmp_path / "b")), 3, batch, name="faces", image_format="webp",
                         jpeg_quality=80, stats={"attempts": 9})
    assert result == direct and result.shard_file == "faces-000003.tar"
    for relative in ("shards/faces-000003.tar", "manifest/000003.parquet", "done/000003.json"):
        assert file_sha(tmp_path / "a" / relative) == file_sha(tmp_path / "b" / relative)


def test_reader_is_found_from_the_shard_file_and_reads_what_was_written(tmp_path):
    storage = Storage(str(tmp_path))
    batch = make_batch(0)
    marker = write_shard(storage, 0, batch).marker
    assert isinstance(shard_reader(marker["shard_file"]), WebDatasetReader)
    samples = list(iter_shard(storage, marker["shard_file"]))
    assert [s.key for s in samples] == batch.keys()
    np.testing.assert_array_equal(np.stack([s.vis for s in samples]), batch.vis)
    np.testing.assert_array_equal(np.stack([s.nir for s in samples]), batch.nir)
    with pytest.raises(UserError, match=r"faces-000001\.rec: not a shard of any known output format"):
        shard_reader("faces-000001.rec")


def test_output_format_is_one_of_the_registered_formats():
    assert list(FORMATS) == ["webdataset"]
    with pytest.raises(UserError, match=r"output\.format: must be one of webdataset"):
        build_spec(TREE, ["output.format=recordio"])


def test_the_default_format_keeps_the_hash_datasets_were_written_with():
    # The hash as computed before `output.format` and `privacy.repair` existed (the same formula, without
    # the keys): a resume of an older dataset must still match its job.sha256.
    spec = build_spec(TREE)
    before = spec.model_dump(mode="json", exclude={"run": True, "output": {"uri": True, "storage_options": True,
                                                                          "format": True},
                                                   "privacy": {"repair": True}})
    assert spec_hash(spec) == hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()
    assert spec_hash(build_spec(TREE, ["output.format=webdataset"])) == spec_hash(spec)
    assert spec_hash(build_spec(TREE, ["privacy.repair=null"])) == spec_hash(spec)
    assert spec_hash(build_spec(TREE, ["privacy.repair.ranks=r.parquet"])) != spec_hash(spec)


def test_codec_round_trip_is_what_a_reader_decodes():
    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    np.testing.assert_array_equal(round_trip(image, "png"), image)  # lossless
    for image_format in ("jpg", "webp"):
        decoded = decode_image(encode_image(image, image_format, quality=90), "RGB", "test")
        np.testing.assert_array_equal(round_trip(image, image_format, 90), decoded)
        assert not np.array_equal(decoded, image)  # lossy: the certificate must use the decoded pixels
    with pytest.raises(UserError, match="where: cannot decode image"):
        decode_image(b"not an image", "RGB", "where")
