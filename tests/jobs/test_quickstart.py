"""`facegen quickstart` end to end on the embedded Ray: the summary tells the truth, the privacy filter
acts, the default audit passes for VIS and NIR, a rerun does nothing, a fresh folder gets the same
bytes, and the example job runs from the repository root as documented."""

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from facegen.jobs.cli import main
from facegen.jobs.quickstart import DEFAULT_OUT, EXAMPLE, held_out_pairs
from tests.browser import find_chromium
from tests.readme_image import readme_image, shown_sections

ROOT = Path(__file__).resolve().parents[2]


def dataset_digests(folder: Path) -> dict[str, str]:
    """SHA-256 of every shard, manifest and identities.parquet (markers and job.yaml name their paths)."""
    files = [p for sub in ("shards", "manifest") for p in sorted((folder / sub).iterdir())]
    files.append(folder / "identities.parquet")
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def first(ray_session, tmp_path_factory):
    folder = tmp_path_factory.mktemp("quickstart") / "qs"
    code, printed = run_quickstart(folder)
    assert code == 0, printed
    return folder, printed


def run_quickstart(folder: Path) -> tuple[int, str]:
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(["quickstart", "--out", str(folder)])
    return code, buffer.getvalue()


@pytest.mark.slow
@pytest.mark.ray
def test_summary_states_what_happened(first):
    folder, printed = first
    report = json.loads((folder / "dataset" / "report.json").read_text())
    ids, samples, cert = report["identities"], report["samples"], report["privacy_certificate"]
    # up to 6 samples per identity: with the barely trained demo generator a crowded identity can use up
    # filter.max_attempts before its sixth sample passes; the audit below counts exactly what was written
    assert ids["accepted"] == ids["wanted"] == 24 and 24 * 5 <= samples["written"] <= 24 * 6
    # The privacy filter acted: candidates too close to an enrolled world image were rejected, and
    # nothing at or above the calibrated threshold was written.
    assert samples["rejected"].get("privacy", 0) + ids["proposal_verdicts"].get("privacy", 0) >= 1
    assert cert["violations"] == 0 and cert["max_real_similarity"] <= cert["threshold"]
    assert cert["certified"] == ["VIS", "NIR"] and cert["index_count"] == 400
    lines = printed.splitlines()
    summary = {line.split(":")[0]: line for line in lines}
    assert f"identities: 24 of 24 accepted from {ids['proposed']} proposals" in summary["identities"]
    assert f"privacy {samples['rejected']['privacy']}" in summary["samples"]
    assert (f"max real similarity {cert['max_real_similarity']:.6f} vs threshold {cert['threshold']:.6f}"
            in summary["privacy"])
    assert "0 violations; CERTIFIED (VIS and NIR)" in summary["privacy"]
    rejected = (ids["proposal_verdicts"].get("privacy", 0), samples["rejected"].get("privacy", 0))
    assert summary["privacy"].startswith(f"privacy: {sum(rejected)} candidates rejected as too close to an "
                                         f"enrolled person ({rejected[0]} anchors, {rejected[1]} samples); ")
    assert summary["report"] == f"report: {folder}/dataset/report.html"
    fr = json.loads((folder / "fr" / "metrics.json").read_text())
    assert fr["pairs"] == 480 and fr["genuine"] == 240 and 0 <= fr["trained_accuracy"] <= 1
    assert f"held-out verification accuracy {fr['trained_accuracy']:.3f} on 480 pairs" in summary["face recognition"]
    timing = report["timing"]
    assert f"throughput: {timing['samples_per_s']:.2f} samples/s" in summary["throughput"]
    assert sum(timing["seconds"].values()) <= timing["total_seconds"]
    assert timing["samples_per_s"] == samples["written"] / timing["total_seconds"]
    stages = json.loads((folder / "quickstart.json").read_text())["stage_seconds"]
    assert set(stages) == {"models", "real_population", "generate", "train_fr", "evaluate_fr"}


@pytest.mark.slow
@pytest.mark.ray
def test_the_audit_the_summary_names_passes_for_vis_and_nir(first, capsys):
    folder, printed = first
    command = next(line for line in printed.splitlines() if line.startswith("audit it: ")).split(": ", 1)[1]
    assert command == (f"facegen audit {folder}/dataset --index {folder}/index "
                       f"--embedder {folder}/models/embedder.safetensors")
    capsys.readouterr()
    assert main(command.split()[1:] + ["--json"]) == 0
    audit = json.loads(capsys.readouterr().out)
    assert audit["audited"] == ["VIS", "NIR"] and audit["violations"] == 0 and audit["complete"]
    report = json.loads((folder / "dataset" / "report.json").read_text())
    assert audit["samples"] == report["samples"]["written"] >= 24 * 5


@pytest.mark.slow
@pytest.mark.ray
def test_a_rerun_in_the_same_folder_does_nothing(first):
    folder, _ = first
    watched = [*sorted((folder / "dataset" / "shards").iterdir()), folder / "dataset" / "report.json",
               folder / "index" / "index.json", folder / "fr" / "00000-quickstart" / "backbone.pth"]
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in watched}
    code, printed = run_quickstart(folder)
    assert code == 0
    assert "is complete; nothing to generate" in printed
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in watched} == before
    assert sorted(p.name for p in (folder / "fr").iterdir()) == ["00000-quickstart", "metrics.json"]


@pytest.mark.slow
@pytest.mark.ray
def test_a_fresh_folder_gets_the_same_bytes(first, tmp_path):
    folder, _ = first
    code, _ = run_quickstart(tmp_path / "again")
    assert code == 0
    assert dataset_digests(tmp_path / "again" / "dataset") == dataset_digests(folder / "dataset")
    for name in ("world/VIS/00042_01.png", "world/NIR/00042_01.png", "index/shards/00000.parquet",
                 "index/shards/00000.faiss"):
        assert (tmp_path / "again" / name).read_bytes() == (folder / name).read_bytes(), name


@pytest.mark.slow
@pytest.mark.ray
def test_the_example_job_runs_from_the_repository_root(first, tmp_path):
    """README: after `facegen quickstart`, `facegen generate jobs/examples/tiny.yaml --out tiny-dataset`
    from the repository root; it names the quickstart's default folder, which holds its models and index."""
    folder, _ = first
    link = ROOT / DEFAULT_OUT
    if link.exists() or link.is_symlink():
        pytest.skip(f"{link} exists (a quickstart run in the checkout); not touching it")
    link.symlink_to(folder, target_is_directory=True)
    try:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        # In-process rather than on a second embedded Ray: the same bytes either way, and Ray's start-up
        # is already exercised by the quickstart.
        done = subprocess.run([sys.executable, "-m", "facegen.jobs", "generate", str(EXAMPLE.relative_to(ROOT)),
                               "--out", str(tmp_path / "tiny-dataset"), "--executor", "local"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=600)
    finally:
        link.unlink()
    assert done.returncode == 0, done.stderr[-3000:]
    assert "CERTIFIED (VIS and NIR)" in done.stdout
    assert dataset_digests(tmp_path / "tiny-dataset") == dataset_digests(folder / "dataset")


@pytest.mark.slow
@pytest.mark.ray
def test_train_fr_reads_the_quickstart_dataset_from_flags(first, tmp_path):
    """README: `facegen train-fr --data synthetic --outdir fr-runs --follow` (here 2 tiny steps in-process)."""
    folder, _ = first
    argv = ["train-fr", "--data", str(folder / "dataset"), "--outdir", str(tmp_path / "fr-runs"), "--follow",
            "--executor", "local", "--steps", "2", "--set", "model.depth=18", "--set", "model.base_width=8",
            "--set", "model.embedding_dim=16", "--set", "data.image_size=32", "--set", "optim.batch_size=8",
            "--set", "data.loader_workers=0"]
    assert main(argv) == 0
    assert (tmp_path / "fr-runs" / "00000-dataset-r18-arcface" / "backbone.pth").is_file()


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.skipif(find_chromium() is None, reason="no chromium here (.ci/run installs it)")
def test_the_readme_picture_is_the_quickstart_report(first, tmp_path):
    """docs/images/quickstart-report.png is made this way: the report in headless chromium, cut to the
    certificate, rejections, timing and contact sheets."""
    folder, _ = first
    image = readme_image(folder / "dataset" / "report.html")
    assert image.width == 800 and 1000 < image.height < 2500
    html = shown_sections((folder / "dataset" / "report.html").read_text())
    assert [h for h in re.findall(r"<h2>([^<]+)</h2>", html)] == [
        "Privacy certificate", "Acceptance by reason", "Where the time went", "Contact sheets"]
    assert html.count("<img") == 8


def test_held_out_pairs_are_balanced_and_deterministic():
    vis, first_, second, same = held_out_pairs()
    assert vis.shape == (160, 64, 64, 3) and len(same) == 480 and same.sum() == 240
    assert (first_ < second).all()
    again = held_out_pairs()
    assert all((a == b).all() for a, b in zip((vis, first_, second, same), again))


def test_shipped_demo_models_are_used_as_a_pair(monkeypatch, tmp_path):
    import facegen.models.demo as demo
    from facegen.jobs.quickstart import prepare_models, random_embedder, random_generator, shipped_models

    shipped = {"embedder": random_embedder(tmp_path / "E.safetensors"),
               "generator": random_generator(tmp_path / "G.safetensors", 32)}  # not the fallback's bytes
    monkeypatch.setattr(demo, "demo_model_paths", lambda: {"embedder": shipped["embedder"]})
    assert shipped_models() == {}  # an embedder alone is not the generator's pair
    monkeypatch.setattr(demo, "demo_model_paths", lambda: {**shipped, "facts": tmp_path / "demo.json"})
    assert shipped_models() == shipped
    models = prepare_models(tmp_path / "out")
    assert models["origin"] == {"embedder": "trained demo model", "generator": "trained demo model"}
    for role, path in models["paths"].items():
        assert path.read_bytes() == shipped[role].read_bytes()
    # A folder made before the demo models were installed keeps (and names) its random ones.
    monkeypatch.setattr(demo, "demo_model_paths", lambda: {})
    earlier = prepare_models(tmp_path / "earlier")["paths"]
    monkeypatch.setattr(demo, "demo_model_paths", lambda: shipped)
    again = prepare_models(tmp_path / "earlier")
    assert again["origin"]["generator"] == "seeded random weights"
    assert again["paths"] == earlier
