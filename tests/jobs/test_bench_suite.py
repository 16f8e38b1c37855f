"""`facegen bench suite`: the quick suite runs the same code as the GPU one, every section present."""

import json

import pytest
import torch

from facegen.jobs.benchmarks.roofline import count_flops, gpu_peak, peak_for, share
from facegen.jobs.benchmarks.suite import QUICK, SECTIONS
from facegen.jobs.cli import main


@pytest.mark.slow
def test_quick_suite_writes_every_section(tmp_path, capsys):
    out, md = tmp_path / "suite.json", tmp_path / "suite.md"
    assert main(["bench", "suite", "--quick", "--device", "cpu", "--json", str(out), "--markdown", str(md)]) == 0
    record = json.loads(out.read_text())
    sections = record["sections"]
    assert list(sections) == list(SECTIONS)
    assert [name for name, s in sections.items() if "error" in s] == []

    assert sections["environment"]["versions"]["torch"] == torch.__version__
    correctness = sections["correctness"]
    assert set(correctness["generator"]) == set(correctness["embedder"]) == {"bf16"}
    assert 0 < correctness["generator"]["bf16"]["max_abs_diff"] < 1
    assert 0.99 < correctness["embedder"]["bf16"]["min_cosine_to_fp32"] <= 1.0 + 1e-6
    assert all(r["identical_top1"] for r in correctness["search"].values())

    # every (precision, path, batch) appears, measured or marked as skipped by the time box
    rows = sections["generator"]["rows"]
    assert [(r["dtype"], r["path"], r["batch"]) for r in rows] == [
        (d, p, b) for d in ("fp32", "bf16") for p in ("shared", "fused") for b in QUICK.batches]
    measured = [r for r in rows if "images_per_s" in r]
    assert measured and all(r["images_per_s"] > 0 and 0 < r["roofline_share"] for r in measured)
    assert sections["generator"]["flops_per_image"] > 0 and sections["embedder"]["flops_per_image"] > 0
    assert [r["enrolled"] for r in sections["privacy"]["rows"]] == list(QUICK.privacy_sizes)
    assert sections["png"]["images_per_s_per_core"] > 0
    assert sections["end_to_end"]["samples"] == 4  # 2 identities x 2 samples
    assert sections["end_to_end"]["stages"]["shards"] >= 1
    overlap = sections["overlap"]
    assert [r["overlap"] for r in overlap["rows"]] == [False, True]
    assert overlap["identical_shards"] is True and all(r["shards"] == 3 for r in overlap["rows"])
    assert overlap["rows"][0]["wait_s"] == 0 and overlap["speedup"] > 0
    compiled = sections["compile"]
    assert compiled["backend"] == "aot_eager" and compiled["compiled_candidates_per_s"] > 0
    assert compiled["max_embedding_diff"] < 1e-4 and compiled["uint8_max_level_change"] <= 1
    assert sections["train"]["phases"]["sec_per_kimg"] > 0

    printed = capsys.readouterr().out
    assert printed.strip() == md.read_text().strip()
    for heading in ("| check | precision | result |", "generator: 32²", "embedder: iresnet18", "Bundle.evaluate",
                    "| enrolled | backend |", "PNG encode", "End to end", "| writing | shards |",
                    "torch.compile, aot_eager", "facegen bench train"):
        assert heading in printed


def test_unknown_section_is_refused(capsys):
    assert main(["bench", "suite", "--quick", "--sections", "generator,nope"]) == 2
    assert "--sections" in capsys.readouterr().err


def test_peak_table_and_roofline_share():
    h200 = gpu_peak("NVIDIA H200")
    assert h200["table_entry"] == "H200"
    assert gpu_peak("NVIDIA H100 PCIe")["table_entry"] == "H100 PCIe"  # the specific entry wins
    assert gpu_peak("Some Future GPU")["tflops"] is None
    assert peak_for(h200, "bf16") == 989.4e12
    assert peak_for(h200, "fp32", tf32=True) == 494.7e12 and peak_for(h200, "fp32", tf32=False) == 67e12
    # 1000 items/s of 1 GFLOP each on a 989.4 TFLOP/s device
    assert share(1000, 1e9, h200, "bf16") == pytest.approx(1e12 / 989.4e12)


def test_flop_count_of_a_matrix_product():
    a, b = torch.zeros(8, 16), torch.zeros(16, 4)
    assert count_flops(lambda: a @ b) == 2 * 8 * 16 * 4
