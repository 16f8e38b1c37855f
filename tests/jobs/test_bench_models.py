"""`facegen bench models` on tiny models: the record is complete and self-consistent."""

import argparse
import json

import pytest
import torch

from facegen.jobs.benchmarks import models as bench_models
from facegen.models.errors import UserError
from facegen.models.generator import Generator, GeneratorConfig
from facegen.models.iresnet import IResNet, IResNetConfig

TINY_ARGS = [
    "--resolution", "16", "--channel-base", "256", "--channel-max", "32",
    "--embedder-depth", "18", "--embedder-width", "8", "--batch", "3", "--iters", "1", "--warmup", "0",
]  # fmt: skip


def parse(argv):
    parser = argparse.ArgumentParser(prog="bench")
    bench_models.register(parser.add_subparsers())
    return parser.parse_args(["models", *argv])


def test_bench_models_record(tmp_path, capsys):
    args = parse([*TINY_ARGS, "--json", str(tmp_path / "out" / "models.json")])
    assert args.func(args) == 0
    record = json.loads((tmp_path / "out" / "models.json").read_text())
    printed = capsys.readouterr().out

    assert (record["benchmark"], record["device"], record["dtype"], record["batch"]) == ("models", "cpu", "fp32", 3)
    g, e = record["generator"], record["embedder"]
    expected_g = Generator(GeneratorConfig(img_resolution=16, channel_base=256, channel_max=32, num_fp16_res=0))
    assert g["params"] == sum(p.numel() for p in expected_g.parameters())
    assert e["params"] == sum(p.numel() for p in IResNet(IResNetConfig(depth=18, base_width=8)).parameters())
    assert (e["model"], e["input_size"]) == ("iresnet18", 112)
    # The fast batched generator computes the same images as the batch-1 reference path.
    assert 0 <= g["max_abs_diff_fast_vs_reference"] < 1e-3
    for stage in (g, e):
        assert stage["batched_images_per_s"] > 0 and stage["reference_images_per_s"] > 0
        ratio = stage["batched_images_per_s"] / stage["reference_images_per_s"]
        assert stage["speedup"] == pytest.approx(ratio, rel=1e-9)
        assert f"{stage['speedup']:.2f}x" in printed
    assert f"{g['batched_images_per_s']:.2f}" in printed and "reference (batch 1)" in printed


def test_bench_models_through_cli_bf16(tmp_path):
    from facegen.jobs.cli import main

    out = tmp_path / "bf16.json"
    assert main(["bench", "models", *TINY_ARGS, "--dtype", "bf16", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["dtype"] == "bf16"
    assert record["embedder"]["speedup"] > 0 and record["generator"]["max_abs_diff_fast_vs_reference"] < 0.1


def test_bench_models_user_errors(capsys):
    from facegen.jobs.cli import main

    for bad, message in (
        (["--batch", "0"], "--batch: must be >= 1"),
        (["--dtype", "fp16"], "--dtype fp16: fp16 runs only on CUDA"),
    ):
        args = parse([*TINY_ARGS, *bad])
        with pytest.raises(UserError, match=message):
            args.func(args)
    if not torch.cuda.is_available():
        assert main(["bench", "models", *TINY_ARGS, "--device", "cuda"]) == 2
        assert "--device cuda: no CUDA device" in capsys.readouterr().err
