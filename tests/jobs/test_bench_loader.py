"""`facegen bench loader` runs both sides over the same images and reports both rates."""

import json

from facegen.jobs.cli import main


def test_bench_loader_small(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["bench", "loader", "--shards", "2", "--identities-per-shard", "3", "--samples", "4",
                 "--resolution", "32", "--workers", "0,2", "--batch", "8", "--image-size", "16",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["images"] == 24 and [r["workers"] for r in result["rows"]] == [0, 2]
    assert all(r["shards_img_s"] > 0 and r["folder_img_s"] > 0 for r in result["rows"])
    assert "workers 2: shards" in capsys.readouterr().out
