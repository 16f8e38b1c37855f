"""`facegen bench index`: build, memory, storage and query figures per row count and row storage."""

import json

import pytest

from facegen.jobs.cli import main


@pytest.mark.slow
def test_bench_index_reports_every_row_count_and_storage(tmp_path, capsys):
    out = tmp_path / "index.json"
    assert main(["bench", "index", "--rows", "2000,6000", "--shards", "3", "--dim", "16", "--queries", "32",
                 "--scratch", str(tmp_path), "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    rows = [(r["rows"], r["row_dtype"]) for r in record["results"]]
    assert rows == [(2000, "float32"), (2000, "float16"), (6000, "float32"), (6000, "float16")]
    for r in record["results"]:
        assert r["shards"] == 3 and r["identities"] == r["rows"] // 10
        assert r["matrix_bytes"] == r["rows"] * 16 * 4
        assert r["query_us_per_candidate"] > 0 and r["build_seconds"] > 0
    f32, f16 = record["results"][2], record["results"][3]
    # float16 storage keeps the float32 rows on storage too (for re-scoring): ~1.5x the float32 bytes
    assert f16["storage_bytes"] == pytest.approx(f32["storage_bytes"] + f32["matrix_bytes"] / 2, rel=0.05)
    assert "6,000" in capsys.readouterr().out


def test_bench_index_refuses_bad_sizes(capsys):
    assert main(["bench", "index", "--rows", "2", "--shards", "4"]) == 2
    assert main(["bench", "index", "--row-dtypes", "int8"]) == 2
