import json

import pytest

from facegen.jobs.cli import main


def test_bench_generate_reports_consistent_ratios(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["bench", "generate", "--sizes", "100,300", "--resolution", "16", "--channel-base", "128",
            "--embedder-depth", "18", "--embedder-width", "8", "--batch", "4", "--candidates", "4",
            "--baseline-candidates", "1",
            "--json", str(out)]
    assert main(args) == 0
    record = json.loads(out.read_text())
    assert [r["enrolled"] for r in record["results"]] == [100, 300]
    for row in record["results"]:
        assert row["facegen_candidates_per_s"] > 0 and row["loop_candidates_per_s"] > 0
        assert abs(row["speedup"] - row["facegen_candidates_per_s"] / row["loop_candidates_per_s"]) < 1e-9
    printed = capsys.readouterr().out
    assert "speed-up" in printed and printed.count("x\n") == 2


@pytest.mark.slow
def test_bench_generate_compiled(tmp_path, capsys):
    """--compile times compiled copies of the networks (aot_eager here: dynamo without inductor's C++ build,
    which tests/engine/test_compile.py covers); the loop keeps the eager modules."""
    out = tmp_path / "bench.json"
    args = ["bench", "generate", "--sizes", "100", "--resolution", "16", "--channel-base", "128",
            "--embedder-depth", "18", "--embedder-width", "8", "--batch", "4", "--candidates", "4",
            "--baseline-candidates", "1", "--compile", "aot_eager", "--json", str(out)]
    assert main(args) == 0
    record = json.loads(out.read_text())
    assert record["compile"] == "aot_eager" and record["results"][0]["facegen_candidates_per_s"] > 0
