"""`facegen train`: the original's flags, run directories, --resume, errors, and a snapshot that
`facegen generate` uses directly."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from facegen.jobs.cli import main
from facegen.models.checkpoint import save_native
from facegen.models.iresnet import IResNet, IResNetConfig
from tests.engine.training_tiny import make_dataset

TINY = ["--compat", "facegen",  # tiny networks: the original's NIR D would have 512 channels
        "--set", "config.channel_base=128", "--set", "config.channel_max=16", "--set", "config.z_dim=16",
        "--set", "config.w_dim=16", "--set", "config.mapping_layers=2", "--set", "config.mbstd_group=2",
        "--set", "schedule.tick_kimg=0.008", "--set", "schedule.grid=[2,2]", "--set", "data.loader_workers=0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data") / "faces")


@pytest.fixture(scope="module")
def first_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    rc = main(["train", "--data", str(data), "--outdir", str(out), "--kimg", "0.016", "--batch", "4",
               "--mirror", "1", "--executor", "local", "--snap", "1", *TINY])
    assert rc == 0
    return out


def test_run_directory_is_named_like_the_original(first_run):
    runs = sorted(p.name for p in first_run.iterdir())
    assert runs == ["00000-faces-cond-mirror-auto1-kimg0.016-batch4"]
    run = first_run / runs[0]
    stats = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    assert [e["Progress/kimg"]["mean"] for e in stats] == [0.004, 0.012, 0.016]
    options = json.loads((run / "training_options.json").read_text())
    assert options["spec"]["data"]["mirror"] is True and options["training_set_kwargs"]["xflip"] is True
    assert options["training_set_kwargs"]["max_size"] == 24  # 12 pairs, doubled by mirroring


def test_snapshot_is_directly_usable_by_generate(first_run, data, tmp_path, capsys):
    run = next(first_run.iterdir())
    torch.manual_seed(0)
    embedder = save_native(IResNet(IResNetConfig(depth=18, embedding_dim=8, input_size=16, base_width=8)),
                           tmp_path / "embedder.safetensors")
    rc = main(["generate", "--gen_model", str(run / "network-snapshot-000000" / "G_ema.safetensors"),
               "--rec_model", str(embedder), "--training_ids", str(data / "identity_features.json"),
               "--outdir", str(tmp_path / "dataset"), "--ids", "2", "--samples_per_id", "2", "--executor", "local",
               "--privacy-threshold", "0.9999", "--same-threshold", "0.01", "--diversity-threshold", "0.99999",
               "--max-attempts", "50"])
    assert rc == 0
    report = json.loads((tmp_path / "dataset" / "report.json").read_text())
    assert report["samples"]["written"] == 4 and report["identities"]["accepted"] == 2
    assert "wrote 4 samples of 2 identities" in capsys.readouterr().out


def test_resume_continues_from_a_run_directory(first_run, data):
    run = next(first_run.iterdir())
    rc = main(["train", "--data", str(data), "--outdir", str(first_run), "--kimg", "0.024", "--batch", "4",
               "--resume", str(run), "--executor", "local", *TINY])
    assert rc == 0
    resumed = first_run / "00001-faces-cond-auto1-kimg0.024-batch4-resumecustom"
    log = (resumed / "log.txt").read_text()
    assert f"Resuming from snapshot {run}/checkpoints/checkpoint-000000000016 at kimg 0.016" in log
    stats = [json.loads(line) for line in (resumed / "stats.jsonl").read_text().splitlines()]
    assert [e["Progress/kimg"]["mean"] for e in stats] == [0.024]  # tick 3 = the next after the snapshot's
    state = torch.load(resumed / "checkpoints" / "checkpoint-000000000024" / "state.pt", weights_only=True)
    # G's Adam stepped in Gmain at steps 0-5 and in Greg (every 4) at steps 0 and 4: 8 steps, counting on
    assert state["cur_nimg"] == 24 and state["optimizers"]["G"]["state"][0]["step"].item() == 8


def test_original_flags_map_to_the_spec(data, tmp_path, capsys):
    rc = main(["train", "--data", str(data), "--outdir", str(tmp_path), "--NIR_loss_weight", "0.5", "--cfg",
               "biface256", "--snap", "20", "--batch", "8", "--mirror", "1", "--gpus", "2", "--cond", "0",
               "--gamma", "2", "--kimg", "100", "--seed", "7", "--aug", "fixed", "--p", "0.3",
               "--augpipe", "bgcfnc", "--freezed", "2", "--fp32", "true", "--resume", str(tmp_path / "r.pkl"),
               "--subset", "10", "--workers", "3", "--nobench", "1", "--allow-tf32", "yes", "--nhwc", "1",
               "--metrics", "kid50k_full,fid50k", "--gpu_device_number", "0",
               "--num-workers", "2", "-n", "--set", "resume=null"])
    assert rc == 0
    captured = capsys.readouterr()
    out = captured.out
    spec = yaml.safe_load(out)
    assert spec["compat"] == "original"  # no job spec: the original's command line
    assert spec["loss"]["nir_loss_weight"] == 0.5 and spec["config"]["preset"] == "biface256"
    assert spec["schedule"]["snap"] == 20 and spec["config"]["batch"] == 8 and spec["data"]["mirror"] is True
    assert (spec["run"]["num_workers"], spec["run"]["device"]) == (2, "cuda") and spec["data"]["cond"] is False
    assert (spec["config"]["gamma"], spec["config"]["kimg"], spec["seed"]) == (2.0, 100.0, 7)
    assert spec["augment"] == {**spec["augment"], "mode": "fixed", "p": 0.3, "pipe": "bgcfnc"}
    assert (spec["config"]["freeze_d"], spec["config"]["fp32"], spec["resume"]) == (2, True, None)
    assert (spec["data"]["subset"], spec["data"]["loader_workers"]) == (10, 3)
    assert (spec["run"]["cudnn_benchmark"], spec["run"]["allow_tf32"]) == (False, True)
    assert spec["metrics"]["names"] == ["kid50k_full", "fid50k"]
    hyper = json.loads(out.split("# hyperparameters: ")[1].splitlines()[0])
    assert (hyper["batch_size"], hyper["batch_per_worker"], hyper["gamma"], hyper["num_fp16_res"]) == (8, 4, 2.0, 0)
    assert (hyper["compat"], hyper["gamma_nir"]) == ("original", 1)  # --gamma reaches the VIS D only
    assert "# dataset: 20 items, 16x16, c_dim 0" in out  # --subset 10, mirrored; --cond 0: unconditional
    assert out.rstrip().endswith("# Dry run; exiting.")
    assert "WARNING: Metrics: OFF - kid50k_full, fid50k requested" in captured.err  # no --fid-weights
    assert "Compat: original" in captured.err
    assert not list(tmp_path.iterdir())  # a dry run creates nothing
    rc = main(["train", "--data", str(data), "--outdir", str(tmp_path), "--gamma", "2", "--compat", "facegen", "-n"])
    hyper = json.loads(capsys.readouterr().out.split("# hyperparameters: ")[1].splitlines()[0])
    assert rc == 0 and (hyper["compat"], hyper["gamma"], hyper["gamma_nir"]) == ("facegen", 2.0, 2.0)


def test_help_lists_every_original_flag(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    original = ["--outdir", "--gpus", "--snap", "--metrics", "--seed", "-n", "--dry-run", "--data", "--cond",
                "--subset", "--mirror", "--cfg", "--gamma", "--kimg", "--batch", "--aug", "--p", "--target",
                "--augpipe", "--resume", "--freezed", "--fp32", "--nhwc", "--nobench", "--allow-tf32", "--workers",
                "--gpu_device_number", "--NIR_loss_weight"]
    assert [flag for flag in original if f"{flag} " not in text and f"{flag}," not in text] == []
    docs = (Path(__file__).parents[2] / "docs" / "training.md").read_text()
    assert [flag for flag in original if f"`{flag}" not in docs] == []  # the docs' table maps each one


@pytest.mark.parametrize("argv, message", [
    (["--aug", "ada", "--p", "0.2"], "augment.p: only applies with augment.mode 'fixed'"),
    (["--cfg", "auto_128"], "--cfg: auto_128 is listed by the original but never defined"),
    (["--batch", "6", "--gpus", "4"], "config.batch: 6 must be at least and divisible by the number of workers"),
    (["--gpus", "3"], "--gpus: 3 is not a power of two"),
    (["--metrics", "pr50k3_full"], "--metrics: pr50k3_full: not supported (precision/recall needs the VGG16"),
    (["--metrics", "fid50k_full,bogus"], "--metrics: 'bogus' is not a metric"),
    (["--aug", "fixed"], "--aug fixed requires --p"),
    (["--aug", "noaug", "--augpipe", "bgc"], "--augpipe cannot be given with --aug noaug"),
    (["--resume", "ffhq256"], "--resume: 'ffhq256' is a download from NVIDIA's CDN"),
    (["--subset", "99"], "data.subset: 99 must be between 1 and 12"),
    (["--resume", "/nonexistent/run"], "resume: /nonexistent/run: not found"),
])
def test_bad_input_exits_2_with_one_message(data, tmp_path, capsys, argv, message):
    rc = main(["train", "--data", str(data), "--outdir", str(tmp_path), "--executor", "ray", *argv])
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err and err.count("facegen: error:") == 1
    assert not list(Path(tmp_path).iterdir())  # refused before any run directory exists


def test_missing_data_and_job_file(tmp_path, capsys):
    assert main(["train", "--outdir", str(tmp_path)]) == 2
    assert "data: required" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "job.yaml")]) == 2
    assert "job.yaml: training spec not found" in capsys.readouterr().err


def test_bench_train_times_whole_regulariser_cycles(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["bench", "train", "--resolution", "16", "--batch", "4", "--channel-base", "128", "--channel-max", "16",
               "--c-dim", "8", "--kimg-sample", "0.004", "--warmup-steps", "1", "--json", str(out), "--no-scaling",
               "--compat", "facegen", "--device", "cpu",
               "--set", "config.z_dim=16", "--set", "config.w_dim=16", "--set", "config.mapping_layers=2"])
    assert rc == 0
    top = json.loads(out.read_text())
    r = top["phases"]
    assert (r["steps"], r["kimg"], r["batch"], top["resolution"]) == (16, 0.064, 4, 16)  # one 16-step cycle
    assert r["sec_per_kimg"] == pytest.approx(r["seconds"] / r["kimg"])
    assert set(r["phase_sec_per_kimg"]) == {"Gmain", "Greg", "Dmain", "Dreg"}
    assert sum(r["phase_sec_per_kimg"].values()) <= r["sec_per_kimg"]
    assert r["regularisation_overhead"] > 0 and r["parameters"]["G"] < 50_000  # the --set overrides applied
    assert top["published_v100_256_sec_per_kimg"]["1"] == [21.6, 24.2] and "V100" in top["published_source"]
    assert "workers" not in top and top["compat"] == "facegen"
    assert "s/kimg" in capsys.readouterr().out
    assert main(["bench", "train", "--resolution", "12"]) == 2
    assert main(["bench", "train", "--workers", "0"]) == 2
    assert main(["bench", "train", "--no-phases", "--no-scaling"]) == 2


@pytest.mark.slow
@pytest.mark.ray
def test_bench_train_quick_with_one_and_two_ray_workers(ray_session, capsys):
    from facegen.jobs.benchmarks.train import bench_args, run_train_bench

    args = bench_args(quick=True, device="cpu", kimg_sample=0.004, warmup_steps=1, batch=2, resolution=16,
                      channel_base=128, channel_max=16, c_dim=8, phases=False)
    r = run_train_bench(args)
    assert set(r["workers"]) == {"1", "2"} and r["compat"] == "facegen" and "phases" not in r
    one, two = r["workers"]["1"], r["workers"]["2"]
    assert (one["batch"], two["batch"], one["steps"], two["steps"]) == (2, 4, 16, 16)  # 2 per worker, 1 cycle
    assert all(e["sec_per_kimg"] > 0 and e["images_per_sec"] == pytest.approx(1000 / e["sec_per_kimg"])
               for e in (one, two))
    assert one["speedup_vs_1"] == 1 and two["published_v100_sec_per_kimg"] == [11.2, 11.8]
