"""Training presets (`--cfg`) and the training spec: formulas, overrides, errors that name the key."""

import pytest

from facegen.engine.training.presets import auto_preset, discriminator_configs, generator_config, resolve
from facegen.engine.training.spec import build_train_spec, resolve_hyperparams
from facegen.models.errors import UserError

BASE = {"data": {"uri": "/data"}, "output": {"dir": "/out"}}


def test_auto_formula():
    p = auto_preset(256, 1)  # mb = max(min(1 * min(16, 32), 64), 1) = 16
    assert (p.mb, p.mbstd, p.fmaps, p.lr, p.ema_kimg, p.ema_rampup) == (16, 4, 0.5, 0.0025, 5.0, 0.05)
    assert p.gamma == pytest.approx(0.0002 * 256**2 / 16)  # 0.8192
    assert (p.kimg, p.mapping_layers) == (10000, 8)  # ArcBiFaceGAN's auto
    p = auto_preset(256, 8)  # mb = max(min(8 * 16, 64), 8) = 64; mbstd = min(8, 4)
    assert (p.mb, p.mbstd, p.gamma, p.ema_kimg) == (64, 4, pytest.approx(0.2048), 20.0)
    p = auto_preset(1024, 2)  # mb = max(min(2 * 4, 64), 2) = 8; mbstd = min(4, 4)
    assert (p.mb, p.mbstd, p.fmaps, p.lr) == (8, 4, 1, 0.002)
    assert p.gamma == pytest.approx(0.0002 * 1024**2 / 8)
    p = auto_preset(16, 3)  # mb = max(min(3 * 32, 64), 3) = 64, mbstd = min(21, 4)
    assert (p.mb, p.mbstd) == (64, 4)


def test_named_presets_and_per_worker_batch():
    hp = resolve("biface256", 256, 1, {})
    assert (hp.batch_size, hp.batch_per_worker, hp.mbstd_group, hp.channel_base, hp.lr, hp.gamma, hp.ema_kimg,
            hp.total_kimg, hp.ema_rampup) == (12, 12, 4, 16384, 0.0025, 1, 20, 25000, None)
    hp = resolve("paper256", 256, 2, {})  # sized for 8 GPUs: 8 per GPU, 4 accumulation rounds on 2
    assert (hp.batch_size, hp.batch_per_worker, hp.rounds, hp.mbstd_group, hp.gamma) == (64, 8, 4, 8, 1)
    hp = resolve("stylegan2", 256, 8, {})
    assert (hp.batch_size, hp.batch_per_worker, hp.channel_base, hp.lr, hp.gamma, hp.ema_kimg) == (
        32, 4, 32768, 0.002, 10, 10)


def test_overrides():
    hp = resolve("biface256", 256, 2, {"batch": 8, "gamma": 5.0, "kimg": 100, "lr": None, "fp32": True,
                                       "ema_rampup": 0})
    assert (hp.batch_size, hp.batch_per_worker, hp.gamma, hp.total_kimg, hp.lr) == (8, 4, 5.0, 100, 0.0025)
    assert (hp.num_fp16_res, hp.conv_clamp, hp.ema_rampup) == (0, None, None)
    g = generator_config(hp, 256, 512)
    d, d_nir = discriminator_configs(hp, 256, 512)
    assert (g.c_dim, g.nir_channels, g.mapping_layers, g.channel_base, g.num_fp16_res) == (512, 1, 8, 16384, 0)
    assert (d.c_dim, d.img_channels, d.mbstd_group_size) == (512, 3, 4)
    assert (d_nir.c_dim, d_nir.img_channels, d_nir.channel_base) == (0, 1, 16384)


@pytest.mark.parametrize("overrides, message", [
    ({"batch": 5}, r"config.batch: 5 must be at least and divisible by the number of workers \(2\)"),
    ({"batch": 8, "batch_per_worker": 3}, r"config.batch_per_worker: batch 8 must be a multiple"),
    ({"batch": 12, "mbstd_group": 4}, r"config.mbstd_group: the per-worker batch 6 is not a multiple"),
])
def test_inconsistent_batches_are_refused(overrides, message):
    with pytest.raises(UserError, match=message):
        resolve("auto", 64, 2, overrides)


def test_spec_defaults_and_resolution():
    spec = build_train_spec(BASE)
    assert (spec.loss.nir_loss_weight, spec.loss.nir_r1, spec.augment.mode, spec.augment.target) == (0.1, True, "ada",
                                                                                                       0.6)
    assert (spec.run.executor, spec.run.num_workers, spec.config.preset) == ("ray", 1, "auto")
    hp = resolve_hyperparams(build_train_spec(BASE, ["config.preset=biface256", "config.kimg=50"]), 256)
    assert (hp.batch_size, hp.total_kimg) == (12, 50)


@pytest.mark.parametrize("overrides, message", [
    (["loss.nir_weight=0.5"], "loss.nir_weight: unknown key"),
    (["config.preset=paper512"], "config.preset: Input should be"),
    (["augment.p=0.2"], "augment.p: only applies with augment.mode 'fixed'"),
    (["run.executor=local", "run.num_workers=2"], "run.num_workers: the local executor runs one worker"),
    (["loss.nir_loss_weight=-1"], "loss.nir_loss_weight: Input should be greater than or equal to 0"),
    (["data=null"], "data: Input should be"),
])
def test_spec_errors_name_the_key(overrides, message):
    with pytest.raises(UserError, match=message):
        build_train_spec(BASE, overrides)
    with pytest.raises(UserError, match="output: required"):
        build_train_spec({"data": {"uri": "/d"}})
