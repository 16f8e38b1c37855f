"""`facegen bench scaling`: rates, ratios and the byte-equality of the proposals across worker counts."""

import json

import pytest

from facegen.jobs.benchmarks.scaling import parse_workers
from facegen.jobs.cli import main
from facegen.models.errors import UserError

pytestmark = pytest.mark.ray


@pytest.mark.slow
def test_scaling_bench_reports_consistent_ratios(ray_session, tiny_job, tmp_path, capsys):
    out = tmp_path / "scaling.json"
    assert main(["bench", "scaling", tiny_job, "--workers", "1,2", "--slots", "96", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["slots"] == 96 and record["cluster"]["CPU"] == 2.0
    one, two = record["results"]
    assert (one["workers"], two["workers"]) == (1, 2)
    assert one["identical_to_baseline"] and two["identical_to_baseline"]
    assert one["speedup"] == 1.0 and one["efficiency"] == 1.0
    assert two["speedup"] == pytest.approx(two["candidates_per_s"] / one["candidates_per_s"])
    assert two["efficiency"] == pytest.approx(two["speedup"] / 2)
    assert two["efficiency_vs_machine"] == pytest.approx(two["speedup"] / two["machine_speedup"])
    control = two["control_convolutions_per_s"] / one["control_convolutions_per_s"]
    assert two["machine_speedup"] == pytest.approx(control)
    for row in (one, two):
        assert row["candidates_per_s"] == pytest.approx(96 / row["seconds"])
        assert row["gpus_per_worker"] == 0
    # Each actor gets its share of the 2 CPUs as threads: identical proposals from 2 and from 1 thread.
    assert (one["threads_per_worker"], two["threads_per_worker"]) == (2, 1)
    printed = capsys.readouterr().out
    assert "  1 workers" in printed and "  2 workers" in printed and printed.count("(identical)") == 2


@pytest.mark.parametrize("text", ["", "0,1", "a,b"])
def test_bad_worker_counts_are_refused(text):
    with pytest.raises(UserError, match="--workers"):
        parse_workers(text)
