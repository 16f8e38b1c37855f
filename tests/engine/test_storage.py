import os

import pytest

from facegen.engine.storage import Storage
from facegen.models.errors import UserError


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return Storage(str(tmp_path / "ds"))
    uri, options = request.getfixturevalue("s3_bucket")
    return Storage(uri + "/ds", options)


def test_round_trip_and_listing(root):
    root.makedirs()
    root.write_bytes("shards/a-000001.tar", b"abc")
    root.write_json("done/000001.json", {"n": 3})
    root.write_text("job.yaml", "seed: 1\n")
    assert root.read_bytes("shards/a-000001.tar") == b"abc"
    assert root.read_json("done/000001.json") == {"n": 3}
    assert root.read_text("job.yaml") == "seed: 1\n"
    assert root.list("shards", ".tar") == ["a-000001.tar"]
    assert root.list("missing") == []
    assert root.exists("job.yaml") and not root.exists("nope")
    root.delete("job.yaml")
    assert not root.exists("job.yaml")


def test_failed_write_leaves_nothing(root):
    with pytest.raises(RuntimeError):
        with root.atomic_writer("shards/b.tar") as handle:
            handle.write(b"partial")
            raise RuntimeError("crash mid-write")
    assert not root.exists("shards/b.tar")
    assert root.list("shards") == []


def test_missing_file_is_a_user_error(root):
    with pytest.raises(UserError, match="not found"):
        root.read_bytes("nothing.json")


def test_child_and_pickle(root):
    import pickle

    child = pickle.loads(pickle.dumps(root.child("manifest")))
    child.write_bytes("x.parquet", b"1")
    assert root.read_bytes("manifest/x.parquet") == b"1"


def test_unwritable_local_root_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match="not writable"):
        Storage(str(blocker / "out")).check_writable()
    assert os.listdir(tmp_path) == ["file"]
