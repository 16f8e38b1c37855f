"""`facegen bench separability` and `facegen bench samples`: cost vs identities and vs samples."""

import json

import pytest

from facegen.jobs.cli import main


def test_bench_separability_matches_the_dense_path_at_every_count(tmp_path, capsys):
    out = tmp_path / "sep.json"
    assert main(["bench", "separability", "--identities", "40,300", "--dim", "16", "--candidates", "32",
                 "--block", "64", "--repeats", "1", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert [r["identities"] for r in record["results"]] == [40, 300]
    for r in record["results"]:
        # random 16-d anchors at threshold 0.5: some are too close; both paths agreed (else it raises)
        assert 0 < r["accepted"] <= r["identities"]
        assert r["select_seconds"] > 0 and r["dense_select_seconds"] > 0
        assert r["expand_us_per_candidate"] > 0 and r["dense_expand_us_per_candidate"] > 0
    assert "300" in capsys.readouterr().out
    assert main(["bench", "separability", "--identities", "300", "--dim", "16", "--dense-up-to", "100",
                 "--repeats", "1", "--json", str(out)]) == 0
    assert "dense_select_seconds" not in json.loads(out.read_text())["results"][0]


def test_bench_separability_and_samples_refuse_bad_sizes():
    assert main(["bench", "separability", "--identities", "1"]) == 2
    assert main(["bench", "separability", "--threshold", "1.5"]) == 2
    assert main(["bench", "samples", "--samples-per-identity", "0"]) == 2


@pytest.mark.slow
def test_bench_samples_runs_the_job_per_size(tmp_path):
    out = tmp_path / "samples.json"
    assert main(["bench", "samples", "--identities", "2", "--samples-per-identity", "1,2", "--population", "40",
                 "--batch-size", "8", "--scratch", str(tmp_path), "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert [(r["identities"], r["samples_per_identity"]) for r in results] == [(2, 1), (2, 2)]
    for r in results:
        assert 0 < r["samples"] <= r["identities"] * r["samples_per_identity"]
        assert r["samples_per_s"] > 0 and r["candidates_per_s"] >= r["samples_per_s"]
