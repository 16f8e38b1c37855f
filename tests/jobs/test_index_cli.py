"""`facegen index build|calibrate|info|query` end to end through the real CLI entry point."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from facegen.jobs.cli import main
from facegen.jobs.common import parse_storage_options
from facegen.models.checkpoint import save_native
from facegen.models.iresnet import IResNet, IResNetConfig
from facegen.models.loading import load_embedder


def write_features(path, rng, identities=6, per_identity=3, dim=16):
    names = [f"{i:04d}_{s:02d}.png" for i in range(identities) for s in range(per_identity)]
    raw = rng.standard_normal((len(names), dim)) * 4
    path.write_text(json.dumps({n: v.tolist() for n, v in zip(names, raw)}))
    return names, raw


def test_build_info_query_calibrate_from_features(tmp_path, capsys):
    rng = np.random.default_rng(0)
    names, raw = write_features(tmp_path / "identity_features.json", rng)
    out = str(tmp_path / "index")
    assert main(["index", "build", out, "--features", str(tmp_path / "identity_features.json"),
                 "--shard-size", "5"]) == 0
    printed = capsys.readouterr()
    lines = printed.out.strip().splitlines()
    assert lines[0] == f"wrote {out}: 18 embeddings of 6 identities, dim 16, 4 shard(s)"
    assert lines[1] == "images per identity: 0000 3, 0001 3, 0002 3, 0003 3, 0004 3, 0005 3"
    assert lines[2].startswith("impostor scores (different identities, 135 pairs): median ")
    # identity_features.json is calibrated at enrolment; 135 pairs cannot resolve 1e-3 or 1e-4: said loudly.
    assert lines[3].startswith("FMR 1e-03: threshold ") and lines[4].startswith("FMR 1e-04: threshold ")
    assert printed.err.count("WARNING: FMR 0.001 is finer than 135 impostor pairs resolve (needs 10000") == 1
    assert printed.err.count("WARNING: FMR 0.0001 is finer than 135 impostor pairs resolve (needs 100000") == 1

    assert main(["index", "info", out]) == 0
    lines = dict(line.split(None, 1) for line in capsys.readouterr().out.strip().splitlines()
                 if not line.startswith("created"))
    assert lines["embeddings"] == "18" and lines["identities"] == "6" and lines["shards"] == "4"
    assert lines["dim"] == "16 (metric ip)" and lines["embedder"].startswith("unknown")
    assert lines["impostors"].startswith("median ") and lines["impostors"].endswith("(135 pairs)")

    # Queries: scaled copies of rows 4 and 13, and a row of NaNs.
    queries = np.stack([raw[4] * 0.5, raw[13] * 3, np.full(16, np.nan)]).astype(np.float32)
    np.save(tmp_path / "q.npy", queries)
    assert main(["index", "query", out, "--embeddings", str(tmp_path / "q.npy"), "--top", "2", "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [(r["query"], r["rank"]) for r in records] == [("0", 1), ("0", 2), ("1", 1), ("1", 2), ("2", 1),
                                                          ("2", 2)]
    assert (records[0]["file"], records[0]["identity"], records[0]["row"]) == (names[4], "0001", 4)
    assert records[0]["similarity"] == pytest.approx(1.0, abs=1e-6)
    assert (records[2]["file"], records[2]["identity"]) == (names[13], "0004")
    normalised = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    second = np.argsort(-(normalised @ normalised[4]))[1]
    assert records[1]["row"] == second and records[1]["file"] == names[second]
    assert records[1]["similarity"] == pytest.approx(normalised[second] @ normalised[4], abs=1e-6)
    assert np.isnan(records[4]["similarity"]) and records[4]["row"] == -1 and records[4]["file"] == ""

    assert main(["index", "query", out, "--embeddings", str(tmp_path / "q.npy"), "--backend", "numpy"]) == 0
    table = capsys.readouterr().out.strip().splitlines()
    assert table[0] == "query\trank\tsimilarity\tidentity\tfile"
    assert table[1].split("\t") == ["0", "1", "1.000000", "0001", names[4]]

    assert main(["index", "calibrate", out, "--fmr", "0.1", "--fmr", "0.01"]) == 0
    captured = capsys.readouterr()
    printed = captured.out.strip().splitlines()
    assert len(printed) == 3 and printed[0].startswith("impostor scores (different identities, 135 pairs)")
    assert printed[2].startswith("FMR 1e-02: threshold ") and "(135 impostor / 18 genuine pairs)" in printed[2]
    assert "FMR 0.1 is finer" not in captured.err and "FMR 0.01 is finer than 135 impostor pairs" in captured.err
    stored = json.loads((tmp_path / "index" / "index.json").read_text())
    assert [t["fmr"] for t in stored["thresholds"]] == [0.1, 0.01]
    assert main(["index", "info", out]) == 0
    assert sum(line.startswith("threshold ") for line in capsys.readouterr().out.splitlines()) == 2


@pytest.fixture
def embedder_file(tmp_path):
    torch.manual_seed(0)
    module = IResNet(IResNetConfig(depth=18, embedding_dim=32, input_size=32, base_width=8))
    return str(save_native(module, tmp_path / "embedder.safetensors"))


def test_build_and_query_images(tmp_path, capsys, embedder_file):
    rng = np.random.default_rng(1)
    (tmp_path / "data" / "VIS").mkdir(parents=True)
    names = ["1_0.png", "1_1.png", "2_0.png", "3_0.png"]
    for name in names:
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "data" / "VIS" / name)
    (tmp_path / "data" / "VIS" / "9_0.png").write_bytes(b"broken")
    out = str(tmp_path / "index")
    # An unreadable enrolment image fails the build, naming it (that person would lose protection)...
    assert main(["index", "build", out, "--images", str(tmp_path / "data"), "--embedder", embedder_file,
                 "--batch", "3"]) == 2
    assert "VIS/9_0.png: undecodable image" in capsys.readouterr().err
    assert not (tmp_path / "index" / "index.json").exists()
    # ...unless --skip-bad, which lists it on stdout and in index.json.
    assert main(["index", "build", out, "--images", str(tmp_path / "data"), "--embedder", embedder_file,
                 "--batch", "3", "--skip-bad"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}: 4 embeddings of 3 identities, dim 32, 1 shard(s)" in printed
    assert "images per identity: 1 2, 2 1, 3 1" in printed
    assert "skipped VIS/9_0.png: undecodable image" in printed and "dropped 1: undecodable image" in printed
    skipped = json.loads((tmp_path / "index" / "index.json").read_text())["skipped"]
    assert [item["file"] for item in skipped] == ["VIS/9_0.png"]
    assert skipped[0]["reason"].startswith("undecodable image")
    embedder = load_embedder(embedder_file)
    assert json.loads((tmp_path / "index" / "index.json").read_text())["embedder_fingerprint"] == \
        embedder.fingerprint

    assert main(["index", "query", out, "--images", str(tmp_path / "data" / "VIS"), "--embedder", embedder_file,
                 "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("skipped 9_0.png: undecodable image")
    records = [json.loads(line) for line in lines[1:]]
    assert [r["query"] for r in records] == names
    assert [r["file"] for r in records] == [f"VIS/{n}" for n in names]
    assert all(r["similarity"] == pytest.approx(1.0, abs=1e-5) for r in records)


def test_cli_errors_exit_2(tmp_path, capsys, embedder_file):
    rng = np.random.default_rng(2)
    write_features(tmp_path / "f.json", rng)
    out = str(tmp_path / "index")
    assert main(["index", "build", out, "--images", str(tmp_path)]) == 2
    assert "needs --embedder" in capsys.readouterr().err
    assert main(["index", "build", out, "--features", str(tmp_path / "f.json"), "--embedder", embedder_file]) == 2
    assert "16-d embeddings but --embedder" in capsys.readouterr().err
    assert main(["index", "build", out, "--features", str(tmp_path / "f.json")]) == 0
    assert main(["index", "build", out, "--features", str(tmp_path / "f.json")]) == 2
    assert "already exists" in capsys.readouterr().err
    np.save(tmp_path / "q.npy", np.ones((2, 5), np.float32))
    assert main(["index", "query", out, "--embeddings", str(tmp_path / "q.npy")]) == 2
    assert "the index needs [N, 16]" in capsys.readouterr().err
    assert main(["index", "query", out, "--images", str(tmp_path), "--embedder", embedder_file]) == 2
    assert "index holds 16-d embeddings but the embedder produces 32-d" in capsys.readouterr().err
    assert main(["index", "info", str(tmp_path / "nothing")]) == 2
    assert "index.json: not found" in capsys.readouterr().err
    assert main(["index", "calibrate", out, "--fmr", "2"]) == 2
    assert "--fmr: 2.0 must be in (0, 1)" in capsys.readouterr().err


def test_storage_options_reach_s3(tmp_path, capsys, s3_bucket):
    uri, options = s3_bucket
    rng = np.random.default_rng(3)
    write_features(tmp_path / "f.json", rng)
    flags = ["--storage-option", f"client_kwargs.endpoint_url={options['client_kwargs']['endpoint_url']}",
             "--storage-option", "key=testing", "--storage-option", "secret=testing"]
    assert main(["index", "build", f"{uri}/idx", "--features", str(tmp_path / "f.json"), *flags]) == 0
    capsys.readouterr()
    assert main(["index", "info", f"{uri}/idx", "--json", *flags]) == 0
    assert json.loads(capsys.readouterr().out)["count"] == 18


def test_parse_storage_options():
    assert parse_storage_options(["a.b=1", "a.c=x", "anon=true", "d={\"e\": 2}"]) == {
        "a": {"b": 1, "c": "x"}, "anon": True, "d": {"e": 2}}
    from facegen.models.errors import UserError

    with pytest.raises(UserError, match="KEY=VALUE"):
        parse_storage_options(["novalue"])


def test_bench_filter_small_run(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "filter", "--sizes", "300,600", "--dim", "32", "--queries", "40", "--repeats", "1",
                 "--baseline-candidates", "1", "--baseline-max-identities", "400", "--data", "clustered",
                 "--per-identity", "5", "--prune-tau", "0.622", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert [r["size"] for r in report["results"]] == [300, 600]
    assert [r["loop_extrapolated"] for r in report["results"]] == [False, True]
    assert "(extrapolated)" in printed and printed.count("us/candidate") == 2 * 5
    for row in report["results"]:
        assert set(row["backends"]) == {"faiss", "torch", "numpy", "pruned"}
        for name in ("torch", "numpy"):
            assert row["backends"][name]["same_rows_as_first"]
            assert row["backends"][name]["max_abs_diff_vs_first"] < 1e-6
        assert row["backends"]["pruned"]["same_decisions_as_first"]
        assert 0 < row["backends"]["pruned"]["searched_fraction"] <= 1
        assert all(entry["us_per_candidate"] > 0 for entry in row["backends"].values())
