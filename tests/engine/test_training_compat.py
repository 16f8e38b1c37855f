"""compat 'original': one step of every phase against an independent reference of the published algorithm.

The reference below is written from StyleGAN2-ADA's `training/loss.py` (`StyleGAN2Loss.accumulate_gradients`)
as ArcBiFaceGAN's `loss.py` extends it (NIR generator term weighted by λ_NIR, path length on the VIS and NIR
JVPs added, a separate NIR D), calling only the networks — never facegen's loss code. It includes the
original's side effects that compat reproduces: its extra G run in every phase (w_avg moves), the `* 0`
terms of its path-length backward (zero, not absent, gradients), and the R1 phase's real signs for ADA.
Where the original has a bug, the reference follows facegen's documented fix: the NIR D gets R1 (the
original's phase-name typo skipped it). facegen steps both D's in one phase on one set of fakes; the
reference scores the VIS D's fakes with the NIR D too and counts the original's separate D_NIR phases as
the mapping calls they made.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from facegen.engine.training.loop import loss_config
from facegen.engine.training.loss import ArcBiFaceLoss, LossConfig
from facegen.engine.training.presets import resolve
from facegen.engine.training.spec import build_train_spec
from facegen.engine.training.state import fresh_networks

RES, C_DIM, BATCH = 8, 8, 2  # the original NIR D has 512 channels: kept small
TINY = {"batch": BATCH, "channel_base": 128, "channel_max": 16, "mapping_layers": 2, "z_dim": 16, "w_dim": 16,
        "mbstd_group": 2}
SETTINGS = dict(nir_weight=0.1, gamma=0.5, gamma_nir=0.25, pl_weight=2.0, pl_shrink=2, pl_decay=0.01, mixing=0.9)
GAIN = {"Gmain": 1, "Greg": 4, "Dmain": 1, "Dreg": 16}


# -- the reference: the published algorithm, written out -------------------------------------------------
class Reference:
    def __init__(self, G, D, D_NIR, pl_mean: float) -> None:
        self.G, self.D, self.D_NIR = G, D, D_NIR
        self.pl_mean = torch.tensor(pl_mean)
        self.values: dict[str, torch.Tensor] = {}

    def run_G(self, z, c):
        ws = self.G.mapping(z, c, update_emas=True)
        cutoff = torch.empty([], dtype=torch.int64).random_(1, ws.shape[1])
        cutoff = torch.where(torch.rand([]) < SETTINGS["mixing"], cutoff, torch.full_like(cutoff, ws.shape[1]))
        mixed = self.G.mapping(torch.randn_like(z), c, update_emas=False)  # skip_w_avg_update=True
        ws = torch.cat([ws[:, :int(cutoff)], mixed[:, int(cutoff):]], dim=1)
        img, nir = self.G.synthesis(ws, noise_mode="random")
        return img, nir, ws

    def extra_G_runs(self, z, c, count):
        """The original's G runs outside the phase branches; only their w_avg update outlives them."""
        with torch.no_grad():
            for _ in range(count):
                self.G.mapping(z, c, update_emas=True)

    def Gmain(self, real, real_nir, real_c, z, c, gain):
        img, nir, _ = self.run_G(z, c)
        logits, logits_nir = self.D(img, c), self.D_NIR(nir)
        loss = F.softplus(-logits) + SETTINGS["nir_weight"] * F.softplus(-logits_nir)
        self.values["Loss/G/loss"] = loss.detach()
        loss.mean().mul(gain).backward()
        self.extra_G_runs(z, c, 1)

    def Greg(self, real, real_nir, real_c, z, c, gain):
        n = z.shape[0] // SETTINGS["pl_shrink"]
        img, nir, ws = self.run_G(z[:n], c[:n])
        pl_noise = torch.randn_like(img) / math.sqrt(img.shape[2] * img.shape[3])
        pl_noise_nir = torch.randn_like(nir) / math.sqrt(nir.shape[2] * nir.shape[3])
        pl_grads = torch.autograd.grad([(img * pl_noise).sum()], [ws], create_graph=True)[0]
        pl_grads = pl_grads + torch.autograd.grad([(nir * pl_noise_nir).sum()], [ws], create_graph=True)[0]
        pl_lengths = pl_grads.square().sum(2).mean(1).sqrt()
        pl_mean = self.pl_mean.lerp(pl_lengths.mean(), SETTINGS["pl_decay"])
        self.pl_mean.copy_(pl_mean.detach())
        pl_penalty = (pl_lengths - pl_mean).square()
        self.values["Loss/pl_penalty"] = pl_penalty.detach()
        loss_Gpl = pl_penalty * SETTINGS["pl_weight"]
        (img[:, 0, 0, 0] * 0 + nir[:, 0, 0, 0] * 0 + loss_Gpl).mean().mul(gain).backward()
        self.extra_G_runs(z, c, 1)

    def Dmain(self, real, real_nir, real_c, z, c, gain):
        img, nir, _ = self.run_G(z, c)  # the original's Dmain: its one G run gives the fakes
        loss_Dgen = F.softplus(self.D(img, c))
        loss_Dgen.mean().mul(gain).backward()
        loss_Dgen_nir = F.softplus(self.D_NIR(nir))  # its D_NIRmain phase, on the same fakes here
        loss_Dgen_nir.mean().mul(gain).backward()
        self.extra_G_runs(z, c, 1)  # the D_NIRmain phase's own G run
        real_logits = self.D(real.detach(), real_c)
        loss_Dreal = F.softplus(-real_logits)
        self.values["Loss/D/loss"] = (loss_Dgen + loss_Dreal).detach()
        (real_logits * 0 + loss_Dreal).mean().mul(gain).backward()
        real_logits_nir = self.D_NIR(real_nir.detach())
        loss_Dreal_nir = F.softplus(-real_logits_nir)
        self.values["Loss/D_NIR/loss"] = (loss_Dgen_nir + loss_Dreal_nir).detach()
        (real_logits_nir * 0 + loss_Dreal_nir).mean().mul(gain).backward()
        return real_logits.detach()

    def Dreg(self, real, real_nir, real_c, z, c, gain):
        self.extra_G_runs(z, c, 2)  # the Dreg and D_NIRreg phases' G runs (before their R1, no RNG used after)
        out = None
        for name, D, x, cond, gamma in (("", self.D, real, real_c, SETTINGS["gamma"]),
                                        ("_nir", self.D_NIR, real_nir, None, SETTINGS["gamma_nir"])):
            x_tmp = x.detach().requires_grad_(True)
            logits = D(x_tmp, cond) if cond is not None else D(x_tmp)
            r1_grads = torch.autograd.grad([logits.sum()], [x_tmp], create_graph=True)[0]
            r1_penalty = r1_grads.square().sum([1, 2, 3])
            self.values[f"Loss/r1_penalty{name}"] = r1_penalty.detach()
            (logits * 0 + r1_penalty * (gamma / 2)).mean().mul(gain).backward()  # [N,1]+[N]: upstream's broadcast
            out = logits.detach() if out is None else out
        return out


# -- the comparison ---------------------------------------------------------------------------------------
def _networks():
    hp = resolve("auto", RES, 1, TINY, compat="original")
    nets = fresh_networks(hp, RES, C_DIM, seed=0)
    return hp, nets


def _inputs():
    g = torch.Generator().manual_seed(1)
    real = torch.rand(BATCH, 3, RES, RES, generator=g) * 2 - 1
    return (real, real.mean(dim=1, keepdim=True), torch.randn(BATCH, C_DIM, generator=g),
            torch.randn(BATCH, TINY["z_dim"], generator=g), torch.randn(BATCH, C_DIM, generator=g))


def _run_phase(phase, nets, pl_mean, use_reference):
    """Fresh copies of the networks, one phase, the gradients; returns (grads, values, w_avg, pl_mean, logits)."""
    import copy

    G, D, D_NIR = (copy.deepcopy(nets[k]) for k in ("G", "D", "D_NIR"))
    for module in (G, D, D_NIR):
        module.requires_grad_(phase.startswith("G") == (module is G))
    real, real_nir, real_c, z, c = _inputs()
    torch.manual_seed(123)
    values = {}
    if use_reference:
        ref = Reference(G, D, D_NIR, pl_mean)
        logits = getattr(ref, phase)(real, real_nir, real_c, z, c, GAIN[phase])
        values, new_pl_mean = ref.values, float(ref.pl_mean)
    else:
        config = LossConfig(r1_gamma=SETTINGS["gamma"], r1_gamma_nir=SETTINGS["gamma_nir"], nir_r1=True,
                            nir_loss_weight=SETTINGS["nir_weight"], pl_weight=SETTINGS["pl_weight"],
                            pl_batch_shrink=SETTINGS["pl_shrink"], pl_decay=SETTINGS["pl_decay"],
                            style_mixing_prob=SETTINGS["mixing"], original=True)
        loss = ArcBiFaceLoss(G, D, D_NIR, config, None, lambda name, v: values.__setitem__(name, v.detach()))
        loss.pl_mean.fill_(pl_mean)
        logits = loss.accumulate_gradients(phase, real, real_nir, real_c, z, c, gain=GAIN[phase])
        new_pl_mean = float(loss.pl_mean)
    grads = {f"{net}.{name}": p.grad for net, module in (("G", G), ("D", D), ("D_NIR", D_NIR))
             for name, p in module.named_parameters()}
    return grads, values, G.mapping.w_avg.clone(), new_pl_mean, logits


@pytest.fixture(scope="module")
def networks():
    torch.manual_seed(0)
    hp, nets = _networks()
    with torch.no_grad():  # a w_avg away from 0, so that the count of its updates shows
        nets["G"].mapping.w_avg.normal_()
    return hp, nets


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["Gmain", "Greg", "Dmain", "Dreg"])
def test_one_step_of_every_phase_equals_the_published_algorithm(networks, phase):
    hp, nets = networks
    assert nets["D_NIR"].config.channel_base == 16384 and nets["D_NIR"].config.channel_max == 512  # original's
    got_grads, got_values, got_w_avg, got_pl_mean, got_logits = _run_phase(phase, nets, 0.5, False)
    ref_grads, ref_values, ref_w_avg, ref_pl_mean, ref_logits = _run_phase(phase, nets, 0.5, True)

    assert set(got_values) >= set(ref_values) and ref_values
    for name, value in ref_values.items():
        torch.testing.assert_close(got_values[name].reshape(-1), value.reshape(-1), rtol=1e-5, atol=1e-6, msg=name)
    # Gradients: present on exactly the same parameters (zero where the reference's `* 0` makes them
    # zero), equal within float rounding.
    assert [k for k, g in got_grads.items() if g is None] == [k for k, g in ref_grads.items() if g is None]
    assert any(g is not None for g in got_grads.values())
    for name, ref in ref_grads.items():
        if ref is not None:
            scale = float(ref.abs().max()) + 1e-12
            torch.testing.assert_close(got_grads[name], ref, rtol=1e-5, atol=1e-6 * scale, msg=name)
    torch.testing.assert_close(got_w_avg, ref_w_avg, rtol=0, atol=1e-6)
    assert got_pl_mean == pytest.approx(ref_pl_mean, rel=1e-6)
    if phase in ("Dmain", "Dreg"):  # the VIS D's real logits reach ADA, in the R1 phase too
        torch.testing.assert_close(got_logits, ref_logits, rtol=1e-6, atol=1e-6)
    if phase == "Greg":  # the output biases: zero gradients, not none (Adam decays their second moment)
        biases = [k for k in ref_grads if k.startswith("G.") and ("torgb.bias" in k or "toseg.bias" in k)]
        assert biases and all(got_grads[k] is not None and not got_grads[k].any() for k in biases)


def test_without_compat_the_side_effects_are_absent(networks):
    """The comparison above can fail: facegen's own mode differs from the original exactly there."""
    hp, nets = networks
    import copy

    G, D, D_NIR = (copy.deepcopy(nets[k]) for k in ("G", "D", "D_NIR"))
    G.requires_grad_(True)
    real, real_nir, real_c, z, c = _inputs()
    torch.manual_seed(123)
    loss = ArcBiFaceLoss(G, D, D_NIR, LossConfig(pl_weight=2.0, original=False))
    before = G.mapping.w_avg.clone()
    loss.accumulate_gradients("Greg", real, real_nir, real_c, z, c, gain=4)
    bias = next(p for n, p in G.named_parameters() if "torgb.bias" in n)
    assert bias.grad is None  # facegen: no gradient at all
    after_one = G.mapping.w_avg.clone()
    assert not torch.equal(after_one, before)
    ref_w_avg = _run_phase("Greg", nets, 0.0, True)[2]
    assert not torch.allclose(after_one, ref_w_avg, atol=1e-6)  # one mapping update fewer than the original


def test_compat_is_wired_from_the_spec():
    base = {"data": {"uri": "/d"}, "output": {"dir": "/o"}, "config": TINY}
    hp = resolve("auto", RES, 1, TINY, compat="original")
    assert loss_config(build_train_spec(base, ["compat=original"]), hp).original is True
    assert loss_config(build_train_spec(base), hp).original is False
