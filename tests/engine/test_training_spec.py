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


def test_the_originals_other_presets():
    # training.py cfg_specs: paper512, paper1024, cifar; auto_512 halves auto's batch.
    hp = resolve("paper512", 512, 8, {})
    assert (hp.batch_size, hp.batch_per_worker, hp.mbstd_group, hp.channel_base, hp.lr, hp.gamma, hp.ema_kimg) == (
        64, 8, 8, 32768, 0.0025, 0.5, 20)
    hp = resolve("paper1024", 1024, 8, {})
    assert (hp.batch_size, hp.batch_per_worker, hp.mbstd_group, hp.lr, hp.gamma, hp.ema_kimg) == (
        32, 4, 4, 0.002, 2, 10)
    hp = resolve("cifar", 32, 2, {})
    assert (hp.batch_size, hp.batch_per_worker, hp.mbstd_group, hp.gamma, hp.ema_kimg, hp.ema_rampup,
            hp.mapping_layers, hp.total_kimg) == (64, 32, 32, 0.01, 500, 0.05, 2, 100000)
    assert (hp.path_length, hp.style_mixing, hp.d_architecture) == (False, False, "orig")
    assert discriminator_configs(hp, 32, 10)[0].architecture == "orig"
    hp = resolve("auto_512", 512, 1, {})  # mb = int(max(min(1 * min(8, 32), 64), 1) / 2) = 4
    assert (hp.batch_size, hp.mbstd_group, hp.gamma, hp.ema_kimg) == (4, 4, pytest.approx(0.0002 * 512**2 / 4),
                                                                      4 * 10 / 32)


@pytest.mark.parametrize("preset, res, extra", [("stylegan2", 256, {}), ("auto", 512, {}), ("paper256", 256, {}),
                                                ("auto", 64, {"fp32": True, "freeze_d": 2})])
def test_compat_original_builds_the_nir_discriminator_with_fixed_settings(preset, res, extra):
    for compat in ("facegen", "original"):
        hp = resolve(preset, res, 2, extra, compat=compat)
        d, d_nir = discriminator_configs(hp, res, 512)
        assert (d_nir.c_dim, d_nir.img_channels, d_nir.architecture) == (0, 1, "resnet")
        got = (d_nir.channel_base, d_nir.channel_max, d_nir.num_fp16_res, d_nir.conv_clamp, d_nir.mbstd_group_size,
               d_nir.freeze_layers)
        if compat == "original":  # ArcBiFaceGAN training_loop.py disc_kwargs, whatever the preset says
            assert got == (16384, 512, 4, 256, 4, 0)
        else:  # the VIS D's preset
            assert got == (d.channel_base, d.channel_max, d.num_fp16_res, d.conv_clamp, d.mbstd_group_size,
                           d.freeze_layers)
    assert resolve("stylegan2", 256, 2, {}, compat="facegen").channel_base == 32768


def test_compat_original_gamma_reaches_the_vis_d_only():
    assert (resolve("biface256", 256, 1, {"gamma": 5.0}).gamma_nir) == 5.0
    hp = resolve("biface256", 256, 1, {"gamma": 5.0}, compat="original")
    assert (hp.gamma, hp.gamma_nir) == (5.0, 1)  # the NIR D keeps the preset's
    assert resolve("biface256", 256, 1, {"gamma": 5.0}, compat="original", gamma_nir=0.25).gamma_nir == 0.25
    spec = build_train_spec(BASE, ["compat=original", "resume=/r.pkl", "config.preset=auto"])
    hp = resolve_hyperparams(spec, 64)
    assert hp.ema_rampup is None  # the original's --resume turns the EMA ramp-up off ...
    from facegen.engine.training.spec import ada_speed_kimg

    assert ada_speed_kimg(spec) == 100 and ada_speed_kimg(build_train_spec(BASE)) == 500  # ... and speeds ADA up
    with pytest.raises(UserError, match="original NIR discriminator's minibatch-stddev group 4"):
        resolve("auto", 64, 1, {"batch": 6, "mbstd_group": 2}, compat="original")


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
    (["config.preset=auto_128"], "config.preset: Input should be"),
    (["compat=upstream"], "compat: Input should be"),
    (["data.subset=0"], "data.subset: Input should be greater than or equal to 1"),
    (["metrics.names=[pr50k3]"], "metrics.names.0: Input should be"),
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
