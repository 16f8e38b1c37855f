"""Phase 3 overlapped with writing (`engine.pipeline`): shard k+1 is computed while shard k is encoded
and written. The bytes must be those of the sequential run, and a failure in either stage must leave
only whole shards, so a resume completes the dataset with nothing lost or duplicated."""

import pytest

from facegen.engine import local
from facegen.engine.local import run_local
from facegen.engine.pipeline import ShardPipeline
from facegen.engine.spec import build_spec, load_spec_file
from tests.cluster.outputs import assert_same_dataset, digests
from tests.engine.tiny import write_tiny_job


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    folder = tmp_path_factory.mktemp("overlap")
    return write_tiny_job(folder, str(folder / "unused"))


def spec_for(job, out, **run):
    return build_spec(load_spec_file(job), [f"output.uri={out}", *(f"run.{k}={v}" for k, v in run.items())])


@pytest.fixture(scope="module")
def sequential(job, tmp_path_factory):
    out = tmp_path_factory.mktemp("sequential") / "out"
    report = run_local(spec_for(job, out, overlap="false"), progress=False)
    return out, report


def test_overlapped_writing_gives_the_sequential_bytes(job, sequential, tmp_path):
    reference, sequential_report = sequential
    report = run_local(spec_for(job, tmp_path / "out", overlap="true"), progress=False)
    assert_same_dataset(tmp_path / "out", reference)
    assert len(digests(reference)) == 3 * 4 + 1  # 4 shards: tar, manifest, marker each; identities.parquet
    for rep, overlap in ((report, True), (sequential_report, False)):
        stages = rep["executor"]["stages"]
        assert rep["executor"]["overlap"] is overlap
        assert stages["shards"] == 4 and stages["compute_s"] > 0 and stages["write_s"] > 0
        assert stages["wall_s"] >= stages["compute_s"]
    assert sequential_report["executor"]["stages"]["wait_s"] == 0  # nothing to wait for when inline


@pytest.mark.slow
def test_a_failure_while_the_previous_shard_is_written_loses_nothing(job, sequential, tmp_path, monkeypatch):
    """Computing shard 2 fails while shard 1 is on the writer thread: shard 1 is still published
    whole, shard 2 and later are absent, and the resume writes the sequential run's bytes."""
    out = tmp_path / "out"
    real_prepare = local.prepare_shard

    def failing(bundle, identities, shard_id):
        if shard_id == 2:
            raise RuntimeError("device lost")
        return real_prepare(bundle, identities, shard_id)

    monkeypatch.setattr(local, "prepare_shard", failing)
    with pytest.raises(RuntimeError, match="device lost"):
        run_local(spec_for(job, out), progress=False)
    assert sorted(p.name for p in (out / "done").iterdir()) == ["000000.json", "000001.json"]
    assert not (out / "report.json").exists()
    monkeypatch.setattr(local, "prepare_shard", real_prepare)
    report = run_local(spec_for(job, out), resume=True, progress=False)
    assert report["executor"]["stages"]["shards"] == 2  # only the missing ones were written
    assert_same_dataset(out, sequential[0])


def test_a_write_error_stops_the_pipeline_after_at_most_one_more_shard():
    prepared, published, written = [], [], []

    def prepare(shard_id):
        prepared.append(shard_id)
        return shard_id

    def publish(shard_id):
        if shard_id == 1:
            raise OSError("disk full")
        published.append(shard_id)
        return {"shard_id": shard_id}

    pipeline = ShardPipeline(prepare, publish, overlap=True, on_written=lambda m: written.append(m["shard_id"]))
    with pytest.raises(OSError, match="disk full"):
        pipeline.run([0, 1, 2, 3, 4])
    # shard 2 was computed while shard 1 was written; the error surfaced before shard 3 started
    assert prepared == [0, 1, 2] and published == [0] and written == [0]
