"""Privacy repair on the Ray executor writes the local executor's bytes (repaired anchors and samples)."""

import json

import pytest

from facegen.cluster.executor import run_ray
from facegen.engine.local import run_local
from facegen.engine.spec import build_spec, load_spec_file
from tests.cluster.outputs import assert_same_dataset
from tests.engine.crowded import repair_flags, write_crowded_job

pytestmark = pytest.mark.ray


@pytest.mark.slow
def test_repair_on_ray_gives_the_local_bytes(ray_session, tmp_path):
    crowded = write_crowded_job(tmp_path / "job", identities=6, **{"output.samples_per_shard": 2})
    repair = [flag for flag in repair_flags(crowded["ranks"]) if flag != "--set"]
    tree = load_spec_file(crowded["job"])
    local = run_local(build_spec(tree, [f"output.uri={tmp_path / 'local'}", *repair]), progress=False)
    assert local["repair"]["identities"]["repaired"] >= 2 and local["privacy_certificate"]["violations"] == 0
    spec = build_spec(tree, [f"output.uri={tmp_path / 'ray'}", "run.executor=ray", "run.num_workers=2", *repair])
    report = run_ray(spec, progress=False)
    report.pop("executor")
    assert_same_dataset(tmp_path / "ray", tmp_path / "local")
    local_report = json.loads((tmp_path / "local" / "report.json").read_text())
    for timed in (report, local_report):  # wall-clock: the one part of a report a rerun changes
        assert set(timed.pop("timing")["seconds"]) == {"start", "model_load", "selection", "shards", "finalise"}
    assert report == local_report
