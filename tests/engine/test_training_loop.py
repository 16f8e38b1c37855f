"""The training loop in one process: run directory contents, exact restart from a checkpoint,
`--resume` from a run directory, a snapshot folder or an original `.pkl`."""

import json
import posixpath
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from facegen.engine.storage import Storage
from facegen.engine.training.context import local_context
from facegen.engine.training.loop import StepSampler, Trainer
from facegen.engine.training.snapshot import latest_snapshot, list_snapshots, load_snapshot
from facegen.engine.training.spec import build_train_spec
from facegen.engine.training.state import fresh_networks
from facegen.models.errors import UserError
from facegen.models.loading import load_generator
from tests.engine.training_tiny import make_dataset, tiny_tree
from tests.models.stylegan_fixtures import tiny_discriminator, tiny_generator, write_snapshot

KIMG_AT_TICKS = [0.004, 0.012, 0.02, 0.028, 0.032]  # tick 0 after the first step, then every 8 images


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"))


def _trainer(tree, run_dir, latest_checkpoint=None, step_hook=None):
    spec = build_train_spec(tree)
    run = Storage(str(run_dir))
    ctx = local_context(run, torch.device("cpu"), spec.schedule.keep_checkpoints, latest_checkpoint)
    ctx.step_hook = step_hook
    return Trainer(spec, ctx, run.uri)


def _stats(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "stats.jsonl").read_text().splitlines()]


def _state(trainer):
    nets = {k: {n: t.clone() for n, t in v.state_dict().items()} for k, v in trainer.nets.items()}
    opts = {k: o.state_dict() for k, o in trainer.opts.items()}
    return nets, opts, float(trainer.augment_pipe.p)


def _assert_same_state(a, b):
    for name in a[0]:
        for key in a[0][name]:
            assert torch.equal(a[0][name][key], b[0][name][key]), f"{name}.{key}"
    for name in a[1]:
        for (i, sa), (j, sb) in zip(a[1][name]["state"].items(), b[1][name]["state"].items()):
            assert i == j and all(torch.equal(sa[k], sb[k]) for k in sa), f"optimizer {name} param {i}"
    assert a[2] == b[2]


@pytest.fixture(scope="module")
def full_run(data, tmp_path_factory):
    """8 steps uninterrupted; the reference for the restart and resume tests."""
    run_dir = tmp_path_factory.mktemp("runs") / "00000-full"
    trainer = _trainer(tiny_tree(data, run_dir.parent), run_dir)
    summary = trainer.run()
    return run_dir, trainer, summary, _state(trainer)


def test_run_directory_contents(full_run):
    run_dir, trainer, summary, _ = full_run
    assert summary["cur_nimg"] == 32 and summary["ticks"] == 5 and summary["batch_idx"] == 8
    stats = _stats(run_dir)
    assert [e["Progress/kimg"]["mean"] for e in stats] == KIMG_AT_TICKS
    assert [e["Progress/tick"]["mean"] for e in stats] == [0, 1, 2, 3, 4]
    assert [e["Loss/G/loss"]["num"] for e in stats] == [4, 8, 8, 8, 4]  # samples of 1, 2, 2, 2, 1 steps
    assert all(e["Progress/replica_spread"]["mean"] == 0 for e in stats)
    log = (run_dir / "log.txt").read_text().splitlines()
    assert [line.split()[1] for line in log if line.startswith("tick ")] == ["0", "1", "2", "3", "4"]
    # the last tick reached total_kimg: nothing left to wait for
    assert [line.split("ETA ")[1] for line in log if line.startswith("tick ")][-1] == "0s"
    assert any(line.startswith("Metrics: OFF - fid50k_full requested") for line in log)
    assert any(line.startswith("Compat: facegen (set compat=original") for line in log)
    options = json.loads((run_dir / "training_options.json").read_text())
    assert options["batch_size"] == 4 and options["hyperparameters"]["channel_base"] == 128
    assert options["spec"]["loss"]["nir_loss_weight"] == 0.1
    for name, mode in [("reals.png", "RGB"), ("reals_nir.png", "L"), ("fakes_init.png", "RGB"),
                       ("fakes000000.png", "RGB"), ("fakes000000_nir.png", "L")]:
        with Image.open(run_dir / name) as image:
            assert (image.size, image.mode) == ((32, 32), mode), name  # 2x2 grid of 16x16
    # snapshots at ticks 0, 2, 4 all round to kimg 0 (one folder); checkpoints every tick, 2 kept
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith("network-snapshot")) == [
        "network-snapshot-000000"]
    assert list_snapshots(Storage(str(run_dir))) == [
        (28, "checkpoints/checkpoint-000000000028"), (32, "network-snapshot-000000"),
        (32, "checkpoints/checkpoint-000000000032")]  # a checkpoint wins a tie


def test_snapshot_g_ema_is_a_native_generator_file(full_run):
    run_dir, trainer, _, _ = full_run
    G = load_generator(run_dir / "network-snapshot-000000" / "G_ema.safetensors")
    reference = trainer.G_ema.state_dict()
    assert all(torch.equal(t, reference[k]) for k, t in G.state_dict().items())
    z, c = torch.randn(2, 16), torch.randn(2, 8)
    vis, nir = G(z, c, noise_mode="const")
    assert vis.shape == (2, 3, 16, 16) and nir.shape == (2, 1, 16, 16)
    snap = load_snapshot(run_dir / "network-snapshot-000000")
    assert snap.info["cur_nimg"] == 32 and snap.state["cur_nimg"] == 32 and snap.state["batch_idx"] == 8
    assert set(snap.state["optimizers"]) == {"G", "D", "D_NIR"} and len(snap.state["ranks"]) == 1


class Crash(RuntimeError):
    pass


def _crash_at(step):
    def hook(ctx, batch_idx):
        if batch_idx == step and ctx.latest_checkpoint is None:
            raise Crash(f"injected failure at step {step}")
    return hook


def test_restart_from_checkpoint_continues_exactly(data, full_run, tmp_path):
    _, _, _, reference = full_run
    run_dir = tmp_path / "00000-crash"
    tree = tiny_tree(data, tmp_path)
    with pytest.raises(Crash):
        _trainer(tree, run_dir, step_hook=_crash_at(6)).run()  # checkpoints at nimg 4, 12, 20 (kept: 12, 20)
    latest = latest_snapshot(Storage(str(run_dir)))
    assert latest == "checkpoints/checkpoint-000000000020"
    restarted = _trainer(tree, run_dir, latest_checkpoint=str(run_dir / latest), step_hook=_crash_at(6))
    assert (restarted.cur_nimg, restarted.cur_tick, restarted.batch_idx) == (20, 3, 5)
    summary = restarted.run()
    assert summary["cur_nimg"] == 32 and summary["start"] == "checkpoint"
    _assert_same_state(_state(restarted), reference)  # bit-identical to the uninterrupted run
    # the ticks after the checkpoint were logged once; the kimg count continued from 0.020
    assert [e["Progress/kimg"]["mean"] for e in _stats(run_dir)] == KIMG_AT_TICKS
    assert any(line.startswith("Restarted from checkpoint checkpoint-000000000020 at kimg 0.020")
               for line in (run_dir / "log.txt").read_text().splitlines())


def test_resume_from_a_run_directory_restores_kimg_and_optimizers(data, full_run, tmp_path):
    full_dir = full_run[0]
    tree = tiny_tree(data, tmp_path, resume=str(full_dir), config={"kimg": 0.04})
    trainer = _trainer(tree, tmp_path / "00001-resumed")
    assert trainer.start.kind == "snapshot" and trainer.cur_nimg == 32 and trainer.batch_idx == 8
    saved = load_snapshot(full_dir / "checkpoints" / "checkpoint-000000000032").state["optimizers"]
    for name, opt in trainer.opts.items():
        for i, s in opt.state_dict()["state"].items():
            assert all(torch.equal(s[k], saved[name]["state"][i][k]) for k in s)
    assert float(trainer.augment_pipe.p) == pytest.approx(full_run[3][2])
    summary = trainer.run()
    assert summary["cur_nimg"] == 40
    assert [e["Progress/kimg"]["mean"] for e in _stats(tmp_path / "00001-resumed")] == [0.04]  # tick 5


def test_resume_from_a_snapshot_folder_and_its_state_file(data, full_run, tmp_path):
    folder = full_run[0] / "checkpoints" / "checkpoint-000000000028"
    for source in (folder, folder / "state.pt"):
        trainer = _trainer(tiny_tree(data, tmp_path, resume=str(source)), tmp_path / "00002-x")
        assert trainer.cur_nimg == 28 and trainer.cur_tick == 4


def test_resume_from_an_original_pickle(data, tmp_path):
    G, G_ema, D = tiny_generator(0), tiny_generator(1), tiny_discriminator(2)
    D_nir = tiny_discriminator(3, c_dim=0, img_channels=1)
    pkl = write_snapshot(tmp_path / "network-snapshot-000120.pkl", tmp_path / "marker", G_ema, G=G, D=D,
                         D_NIR=D_nir, augment_p=0.25)
    trainer = _trainer(tiny_tree(data, tmp_path, resume=str(pkl)), tmp_path / "00000-pkl")
    assert trainer.start.kind == "pkl" and trainer.cur_nimg == 0
    for mine, theirs in ((trainer.G, G), (trainer.G_ema, G_ema), (trainer.D, D), (trainer.D_nir, D_nir)):
        assert all(torch.equal(t, theirs.state_dict()[k]) for k, t in mine.state_dict().items())
    assert float(trainer.augment_pipe.p) == 0.25 and trainer.ada.p == 0.25
    assert not (tmp_path / "marker").exists()  # nothing from the pickle ran

    no_nir = write_snapshot(tmp_path / "plain.pkl", tmp_path / "marker", G_ema, G=G, D=D)
    trainer = _trainer(tiny_tree(data, tmp_path, resume=str(no_nir)), tmp_path / "00001-pkl")
    assert any("no D_NIR in the pickle" in note for note in trainer.start.notes)


def test_compat_original_resumes_a_pickle_with_a_fresh_nir_d(data, tmp_path):
    G, G_ema, D = tiny_generator(0), tiny_generator(1), tiny_discriminator(2)
    pkl = write_snapshot(tmp_path / "network-snapshot-000120.pkl", tmp_path / "marker", G_ema, G=G, D=D,
                         D_NIR=tiny_discriminator(3, c_dim=0, img_channels=1), augment_p=0.25)
    trainer = _trainer(tiny_tree(data, tmp_path, resume=str(pkl), compat="original"), tmp_path / "00000-orig")
    assert all(torch.equal(t, D.state_dict()[k]) for k, t in trainer.D.state_dict().items())  # G, D resumed
    fresh = fresh_networks(trainer.hp, 16, 8, seed=0)["D_NIR"]  # the original's D_NIR, built from scratch
    assert all(torch.equal(t, fresh.state_dict()[k]) for k, t in trainer.D_nir.state_dict().items())
    assert (trainer.D_nir.config.channel_base, trainer.D_nir.config.channel_max) == (16384, 512)
    assert any("compat 'original': the NIR D starts fresh" in note for note in trainer.start.notes)
    # The original's resume settings: ADA adjusts at 100 kimg, no EMA ramp-up; the ADA p is kept (its bug fixed).
    assert (trainer.ada.speed_kimg, trainer.hp.ema_rampup, trainer.ada.p) == (100, None, 0.25)
    assert trainer.loss.config.original is True


def test_resume_refuses_networks_for_another_dataset(data, tmp_path):
    G = tiny_generator(0, c_dim=4)
    D, D_nir = tiny_discriminator(2, c_dim=4), tiny_discriminator(3, c_dim=0, img_channels=1)
    pkl = write_snapshot(tmp_path / "other.pkl", tmp_path / "marker", G, G=G, D=D, D_NIR=D_nir)
    with pytest.raises(UserError, match=r"resume: .*other.pkl: G is 16x16, c_dim 4.*needs 16x16, c_dim 8"):
        _trainer(tiny_tree(data, tmp_path, resume=str(pkl)), tmp_path / "00000-bad")
    with pytest.raises(UserError, match="resume: .*nothing: not found"):
        _trainer(tiny_tree(data, tmp_path, resume=str(tmp_path / "nothing")), tmp_path / "00001-bad")


def test_step_sampler_splits_steps_across_ranks_and_resumes_by_step():
    def take(sampler, n):
        it = iter(sampler)
        return [next(it) for _ in range(n)]

    one = take(StepSampler(10, 4, 0, 1, seed=3, start_step=0), 4 * 6)  # 6 steps, 2.4 epochs
    assert sorted(one[:10]) == list(range(10)) and sorted(one[10:20]) == list(range(10))
    r0 = take(StepSampler(10, 4, 0, 2, seed=3, start_step=0), 2 * 6)
    r1 = take(StepSampler(10, 4, 1, 2, seed=3, start_step=0), 2 * 6)
    assert [x for s in range(6) for x in r0[2 * s: 2 * s + 2] + r1[2 * s: 2 * s + 2]] == one
    assert take(StepSampler(10, 4, 0, 1, seed=3, start_step=4), 8) == one[16:24]


def test_an_incomplete_checkpoint_does_not_count(full_run, tmp_path):
    shutil.copytree(full_run[0], tmp_path / "run")
    run = Storage(str(tmp_path / "run"))
    folder = "checkpoints/checkpoint-000000000032"
    assert sorted(run.list(folder)) == ["D.safetensors", "D_NIR.safetensors", "G.safetensors",
                                        "G_ema.safetensors", "snapshot.json", "state.pt"]
    assert latest_snapshot(run) == folder
    run.delete(posixpath.join(folder, "state.pt"))  # an interrupted upload: state.pt comes last
    assert latest_snapshot(run) == "network-snapshot-000000"


def test_run_directory_and_resume_on_object_storage(data, s3_bucket, tmp_path):
    uri, options = s3_bucket
    tree = tiny_tree(data, tmp_path, config={"kimg": 0.012}, output={"dir": uri, "storage_options": options})
    spec = build_train_spec(tree)
    run = Storage(f"{uri}/00000-s3", options)
    summary = Trainer(spec, local_context(run, torch.device("cpu")), run.uri).run()
    assert summary["cur_nimg"] == 12
    stats = [json.loads(line) for line in run.read_text("stats.jsonl").splitlines()]
    assert [e["Progress/kimg"]["mean"] for e in stats] == [0.004, 0.012]  # appended by rewriting the object
    assert [line.split()[1] for line in run.read_text("log.txt").splitlines() if line.startswith("tick ")] == [
        "0", "1"]
    assert latest_snapshot(run) == "checkpoints/checkpoint-000000000012"
    resumed_tree = tiny_tree(data, tmp_path, resume=f"{uri}/00000-s3", config={"kimg": 0.02},
                             output={"dir": uri, "storage_options": options})
    resumed = build_train_spec(resumed_tree)
    second = Storage(f"{uri}/00001-s3", options)
    trainer = Trainer(resumed, local_context(second, torch.device("cpu")), second.uri)
    assert trainer.start.source == f"{uri}/00000-s3/checkpoints/checkpoint-000000000012" and trainer.cur_nimg == 12
    assert trainer.run()["cur_nimg"] == 20


def _tiny_embedder(path, dim):
    from facegen.models.checkpoint import save_native
    from facegen.models.iresnet import IResNet, IResNetConfig

    torch.manual_seed(0)
    return save_native(IResNet(IResNetConfig(depth=18, embedding_dim=dim, input_size=16, base_width=8)).eval(),
                       path)


def test_identity_and_diversity_losses_train_through_a_frozen_embedder(data, tmp_path):
    embedder = _tiny_embedder(tmp_path / "embedder.safetensors", 8)
    run_dir = tmp_path / "runs" / "00000-identity"
    tree = tiny_tree(data, run_dir.parent, loss={"identity_embedder": str(embedder), "identity_nir_weight": 0.5,
                                                 "diversity_weight": 1.0, "diversity_target": 5.0})
    trainer = _trainer(tree, run_dir)
    before = {n: t.clone() for n, t in trainer.loss.identity.__self__.module.state_dict().items()}
    trainer.run()
    stats = _stats(run_dir)
    assert [e["Loss/G/identity_vis"]["num"] for e in stats] == [4, 8, 8, 8, 4]
    assert [e["Loss/G/identity_nir"]["num"] for e in stats] == [4, 8, 8, 8, 4]
    assert all(0 <= e["Loss/G/identity_vis"]["mean"] <= 2 for e in stats)
    # one hinge per pair of samples that share a condition; a target this high is never reached
    assert [e["Loss/G/diversity"]["num"] for e in stats] == [2, 4, 4, 4, 2]
    assert all(0 < e["Loss/G/diversity"]["mean"] < 5 for e in stats)
    after = trainer.loss.identity.__self__.module.state_dict()
    assert all(torch.equal(before[n], after[n]) for n in before)  # the embedder stays frozen


def test_identity_loss_refuses_an_embedder_of_another_dimension(data, tmp_path):
    embedder = _tiny_embedder(tmp_path / "embedder.safetensors", 16)
    tree = tiny_tree(data, tmp_path / "runs", loss={"identity_embedder": str(embedder)})
    with pytest.raises(UserError, match="16-d features but the data's conditions are 8-d"):
        _trainer(tree, tmp_path / "runs" / "00000-x")


def test_identity_loss_and_noiseless_training_are_not_part_of_compat_original(data, tmp_path):
    tree = tiny_tree(data, tmp_path / "runs", compat="original", loss={"identity_embedder": "e.safetensors"})
    with pytest.raises(UserError, match="identity_embedder adds a loss the original never had"):
        build_train_spec(tree)
    tree = tiny_tree(data, tmp_path / "runs", compat="original", loss={"noise": False})
    with pytest.raises(UserError, match="the original always trains with noise inputs"):
        build_train_spec(tree)
    tree = tiny_tree(data, tmp_path / "runs", compat="original", loss={"diversity_weight": 1.0})
    with pytest.raises(UserError, match="diversity_weight adds a loss the original never had"):
        build_train_spec(tree)


def test_paired_nir_d_trains_and_a_resumed_unpaired_run_gets_a_fresh_one(data, full_run, tmp_path):
    full_dir, _, _, full_state = full_run
    tree = tiny_tree(data, tmp_path, resume=str(full_dir), config={"kimg": 0.04}, loss={"nir_pair": True})
    trainer = _trainer(tree, tmp_path / "00001-paired")
    assert trainer.D_nir.img_channels == 2 and trainer.start.fresh_d_nir
    assert any("its NIR D reads 1 channel(s), loss.nir_pair on needs 2; the NIR D starts fresh" in note
               for note in trainer.start.notes)
    assert trainer.cur_nimg == 32  # G, D, their optimisers and the counters carry over
    for name in ("G", "D"):
        assert all(torch.equal(t, full_state[0][name][k]) for k, t in trainer.nets[name].state_dict().items())
    assert trainer.opts["D_NIR"].state_dict()["state"] == {} and trainer.opts["G"].state_dict()["state"]
    assert trainer.run()["cur_nimg"] == 40
    stats = _stats(tmp_path / "00001-paired")
    assert stats[-1]["Loss/D_NIR/loss"]["num"] == 8
    # its own snapshots hold the 2-channel NIR D: resuming them keeps it
    again = _trainer(tiny_tree(data, tmp_path, resume=str(tmp_path / "00001-paired"), config={"kimg": 0.048},
                               loss={"nir_pair": True}), tmp_path / "00002-paired")
    assert not again.start.fresh_d_nir and again.D_nir.img_channels == 2 and again.cur_nimg == 40


def test_paired_nir_d_is_not_part_of_compat_original(data, tmp_path):
    tree = tiny_tree(data, tmp_path / "runs", compat="original", loss={"nir_pair": True})
    with pytest.raises(UserError, match="nir_pair: the original's NIR D sees the NIR image alone"):
        build_train_spec(tree)
