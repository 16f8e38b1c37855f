"""`facegen demo` end to end: its dataset passes the default audit, VIS and NIR both audited."""

import json

import pytest
import yaml

from facegen.jobs.cli import main
from facegen.jobs.demo import EXAMPLE, demo_fmr


def test_demo_fmr_fits_the_population():
    assert yaml.safe_load(EXAMPLE.read_text())["privacy"]["threshold"] == "auto"
    assert demo_fmr(1e-3, 400) == 1e-3  # 79,800 impostor pairs >= 10 / 1e-3
    assert demo_fmr(1e-3, 40) == 5e-2  # 780 pairs: only 5e-2 is resolved


@pytest.mark.slow
def test_demo_dataset_passes_the_default_audit(tmp_path, capsys):
    folder = tmp_path / "demo"
    assert main(["demo", "--out", str(folder)]) == 0
    printed = capsys.readouterr().out
    assert "privacy: CERTIFIED (VIS and NIR)" in printed
    assert "calibrated at FMR 0.001 on 79800 impostor pairs" in printed
    assert main(["audit", str(folder / "dataset"), "--index", str(folder / "index"), "--embedder",
                 str(folder / "models" / "embedder.safetensors"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["audited"] == ["VIS", "NIR"] and summary["violations"] == 0 and summary["complete"]
    assert summary["samples"] == 192 and summary["threshold_source"] == "calibrated at FMR 0.001, from job.yaml"
