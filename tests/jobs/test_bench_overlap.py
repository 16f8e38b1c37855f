"""`facegen bench overlap`: the writer pipeline inline and overlapped, real shards, the same bytes."""

import json

from facegen.jobs.cli import main


def test_bench_overlap_hides_the_writing_behind_the_device(tmp_path, capsys):
    out = tmp_path / "overlap.json"
    args = ["bench", "overlap", "--resolution", "32", "--samples", "4", "--shards", "3", "--device-ms", "300",
            "--json", str(out)]
    assert main(args) == 0
    record = json.loads(out.read_text())
    assert record["identical_shards"] is True and record["device_ms_per_shard"] == 300
    inline, overlapped = record["inline"], record["overlapped"]
    assert inline["shards"] == overlapped["shards"] == 3 and inline["wait_s"] == 0
    assert inline["compute_s"] >= 0.9 and inline["wall_s"] >= inline["compute_s"] + inline["write_s"] - 1e-3
    # every write but the last runs during the next shard's 300 ms device time: only the last is waited for
    assert overlapped["wait_s"] < overlapped["write_s"] or overlapped["write_s"] < 0.01
    assert "overlapped vs inline" in capsys.readouterr().out


def test_bench_overlap_refuses_a_bad_device_time(capsys):
    assert main(["bench", "overlap", "--device-ms", "fast", "--shards", "2", "--samples", "1",
                 "--resolution", "8"]) == 2
    assert "--device-ms" in capsys.readouterr().err
