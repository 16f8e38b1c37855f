"""ADA augment pipe on VIS+NIR pairs and the p controller."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from facegen.engine.training.augment import (
    COLOR,
    FLAGS,
    GEOMETRIC,
    AdaController,
    AugmentPipe,
    augment_pipe_from_name,
    augpipe_flags,
    filter_bank,
)
from facegen.models.errors import UserError

B, R = 12, 16


def smooth_pair(seed: int = 0, batch: int = B, size: int = R) -> tuple[torch.Tensor, torch.Tensor]:
    """Natural-ish images in [-1, 1] (upsampled noise), NIR = the channel mean of VIS."""
    g = torch.Generator().manual_seed(seed)
    vis = F.interpolate(torch.rand(batch, 3, size // 4, size // 4, generator=g) * 2 - 1, size=(size, size),
                        mode="bilinear", align_corners=False)
    return vis, vis.mean(dim=1, keepdim=True)


def test_names_to_flags():
    assert set(augpipe_flags("bgc")) == set(GEOMETRIC + COLOR) and len(FLAGS) == 15
    assert set(augpipe_flags("bgcfnc")) == set(FLAGS)
    assert set(augpipe_flags("bgcfn")) == set(FLAGS) - {"cutout"}
    assert set(augpipe_flags("bgcf")) == set(GEOMETRIC + COLOR) | {"imgfilter"}
    assert (augpipe_flags("filter"), augpipe_flags("noise"), augpipe_flags("cutout")) == (
        {"imgfilter": 1.0}, {"noise": 1.0}, {"cutout": 1.0})
    assert set(augpipe_flags("bg")) == set(GEOMETRIC)
    assert set(augpipe_flags("c")) == set(augpipe_flags("color")) == set(COLOR)
    assert set(augpipe_flags("blit")) == {"xflip", "rotate90", "xint"}
    assert set(augpipe_flags("bc")) == {"xflip", "rotate90", "xint", *COLOR}
    with pytest.raises(UserError, match="'bgcx' is not supported"):
        augpipe_flags("bgcx")
    with pytest.raises(UserError, match="unknown option"):
        AugmentPipe(cutouts=1)
    pipe = augment_pipe_from_name("bgc", p=0.25)
    assert float(pipe.p) == 0.25 and "p" in pipe.state_dict() and "taps" not in pipe.state_dict()


def test_p_zero_is_exactly_the_identity():
    vis, nir = smooth_pair()
    torch.manual_seed(0)
    out_vis, out_nir = augment_pipe_from_name("bgc", p=0.0)(vis, nir)
    assert torch.equal(out_vis, vis) and torch.equal(out_nir, nir)


def test_xflip_flips_each_pair_together_or_not_at_all():
    vis, nir = torch.rand(B, 3, R, R) * 2 - 1, torch.rand(B, 1, R, R) * 2 - 1  # NIR independent of VIS
    torch.manual_seed(1)
    out_vis, out_nir = AugmentPipe(p=1.0, xflip=1)(vis, nir)
    flipped = []
    for i in range(B):
        if torch.equal(out_vis[i], vis[i]):
            assert torch.equal(out_nir[i], nir[i])
            flipped.append(False)
        else:
            assert torch.equal(out_vis[i], vis[i].flip(-1)) and torch.equal(out_nir[i], nir[i].flip(-1))
            flipped.append(True)
    assert 0 < sum(flipped) < B  # both outcomes occur (each has probability 1/2 at p = 1)


def test_rotate90_and_integer_translation_are_exact_blits():
    vis, nir = torch.rand(B, 3, R, R), torch.rand(B, 1, R, R)
    torch.manual_seed(2)
    out_vis, out_nir = AugmentPipe(p=1.0, rotate90=1)(vis, nir)
    turns = [next(k for k in range(4) if torch.equal(out_vis[i], vis[i].rot90(k, (1, 2)))) for i in range(B)]
    assert all(torch.equal(out_nir[i], nir[i].rot90(k, (1, 2))) for i, k in enumerate(turns))
    assert len(set(turns)) > 1
    out_vis, out_nir = AugmentPipe(p=1.0, xint=1)(vis, nir)
    m = 2  # xint_max 0.125 * 16 = 2 pixels at most; compare away from the reflected border
    for i in range(B):
        shifts = [(dy, dx) for dy in range(-m, m + 1) for dx in range(-m, m + 1)
                  if torch.equal(out_vis[i, :, m:-m, m:-m], vis[i].roll((dy, dx), (1, 2))[:, m:-m, m:-m])]
        assert len(shifts) == 1
        assert torch.equal(out_nir[i, :, m:-m, m:-m], nir[i].roll(shifts[0], (1, 2))[:, m:-m, m:-m])


def test_resampler_identity_and_one_pixel_translation():
    """The general path (upsample, grid_sample, downsample) reproduces the image under the identity
    (sym6 is orthogonal) and shifts it by exactly one pixel under a one-pixel translation."""
    vis, nir = smooth_pair(3, batch=2, size=24)
    images = torch.cat([vis, nir], 1)
    pipe = AugmentPipe()
    eye = torch.eye(3, dtype=torch.float64).expand(2, 3, 3)
    torch.testing.assert_close(pipe._resample(images, eye), images, atol=2e-5, rtol=0)
    shift = eye.clone()
    shift[:, 0, 2] = -1.0  # output x reads input x - 1: content moves right by one pixel
    moved = pipe._resample(images, shift)
    torch.testing.assert_close(moved[..., 8:-8, 8:-8], images.roll(1, -1)[..., 8:-8, 8:-8], atol=2e-5, rtol=0)


@pytest.mark.parametrize("name", ["bg", "bgc", "geom", "c"])
def test_nir_stays_aligned_with_vis(name):
    vis, nir = smooth_pair(4)
    torch.manual_seed(4)
    out_vis, out_nir = augment_pipe_from_name(name, p=1.0)(vis, nir)
    changed = (out_vis - vis).flatten(1).abs().amax(1) > 1e-3
    assert changed.sum() >= B // 2  # the pipe really transformed most samples
    torch.testing.assert_close(out_nir, out_vis.mean(dim=1, keepdim=True), atol=1e-5, rtol=0)


def test_brightness_and_contrast_use_the_same_parameters_on_nir():
    vis, nir = torch.rand(B, 3, R, R) * 2 - 1, torch.rand(B, 1, R, R) * 2 - 1
    torch.manual_seed(5)
    out_vis, out_nir = AugmentPipe(p=1.0, brightness=1)(vis, nir)
    shift = (out_vis - vis).flatten(1)
    # One offset per sample, for every VIS pixel and channel and for the NIR pixels.
    torch.testing.assert_close(shift, shift[:, :1].expand_as(shift), atol=1e-6, rtol=0)
    torch.testing.assert_close((out_nir - nir).flatten(1), shift[:, : R * R], atol=1e-6, rtol=0)
    assert shift[:, 0].abs().min() > 0
    out_vis, out_nir = AugmentPipe(p=1.0, contrast=1)(vis, nir)
    gain = (out_vis / vis).flatten(1)
    torch.testing.assert_close(gain, gain[:, :1].expand_as(gain), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out_nir, nir * gain[:, :1].view(B, 1, 1, 1), atol=1e-5, rtol=0)


def test_lumaflip_negates_nir_with_the_vis_decision():
    vis, nir = torch.rand(B, 3, R, R) * 2 - 1, torch.rand(B, 1, R, R) * 2 - 1
    torch.manual_seed(6)
    out_vis, out_nir = AugmentPipe(p=1.0, lumaflip=1)(vis, nir)
    reflected = vis - 2 * vis.mean(dim=1, keepdim=True)  # Householder reflection through the grey axis
    flips = 0
    for i in range(B):
        if torch.equal(out_vis[i], vis[i]):
            assert torch.equal(out_nir[i], nir[i])
        else:
            torch.testing.assert_close(out_vis[i], reflected[i], atol=1e-5, rtol=0)
            torch.testing.assert_close(out_nir[i], -nir[i], atol=1e-6, rtol=0)
            flips += 1
    assert 0 < flips < B


def test_gradients_flow_including_double_backward():
    vis, nir = smooth_pair(7)
    vis.requires_grad_(True)
    nir.requires_grad_(True)
    conv = torch.nn.Conv2d(4, 2, 3)
    torch.manual_seed(7)
    out_vis, out_nir = augment_pipe_from_name("bgc", p=1.0)(vis, nir)
    logits = conv(torch.cat([out_vis, out_nir], 1)).sum()
    grad_vis, grad_nir = torch.autograd.grad(logits, [vis, nir], create_graph=True)
    assert grad_vis.abs().sum() > 0 and grad_nir.abs().sum() > 0
    r1 = grad_vis.square().sum() + grad_nir.square().sum()  # lazy R1 differentiates through the pipe twice
    r1.backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    assert torch.isfinite(conv.weight.grad).all()


# ---------------------------------------------------------------------------------- controller
def test_ada_controller_moves_p_by_the_upstream_step():
    pipe = AugmentPipe(xflip=1)
    ada = AdaController(batch_size=32, target=0.6, interval=4, speed_kimg=500, pipe=pipe)
    step = 32 * 4 / (500 * 1000)
    for _ in range(3):  # upstream: batch_idx += 1, then adjust when batch_idx % interval == 0
        ada.accumulate(torch.ones(32))
        assert ada.step() == 0.0 and ada.last_rt is None
    ada.accumulate(torch.ones(32))
    assert ada.step() == pytest.approx(step, abs=0) and float(pipe.p) == pytest.approx(step)
    for _ in range(3):  # steps 1..3 of the interval do not adjust, statistics keep accumulating
        ada.accumulate(-torch.ones(32))
        assert ada.step() == step
    ada.accumulate(-torch.ones(32))
    assert ada.step() == 0.0 and ada.last_rt == -1.0
    for _ in range(4):
        ada.accumulate(-torch.ones(32))
        ada.step()
    assert ada.p == 0.0  # never below 0
    for _ in range(8):  # exactly at the target: sign 0, no change
        ada.accumulate(torch.tensor([1.0] * 8 + [-1.0] * 2))
        ada.step()
    assert ada.p == 0.0 and ada.last_rt == pytest.approx(0.6)
    for _ in range(12):
        ada.accumulate(torch.full((32,), 3.0))
        ada.step()
    assert ada.p == pytest.approx(3 * step, rel=1e-12)


def test_ada_controller_all_reduce_and_state_round_trip():
    ada = AdaController(batch_size=8, interval=2, speed_kimg=10)
    # Another rank saw only negative logits: the summed statistic is below the target.
    other_rank = lambda stats: stats + torch.tensor([-24.0, 24.0], dtype=torch.float64)  # noqa: E731
    ada.accumulate(torch.ones(8))
    assert ada.step(all_reduce=other_rank) == 0.0 and ada.last_rt is None  # first step: not due yet
    assert ada.step(all_reduce=other_rank) == 0.0 and ada.last_rt == pytest.approx(-0.5)
    sequence = [torch.ones(8), torch.ones(8), -torch.ones(8), torch.ones(8), torch.ones(8), -torch.ones(8)]
    for logits in sequence[:3]:
        ada.accumulate(logits)
        ada.step()
    ada.accumulate(torch.ones(8))  # pending statistics are part of the state
    state = ada.state_dict()

    pipe = AugmentPipe(xflip=1)
    restored = AdaController(batch_size=8, interval=2, speed_kimg=10, pipe=pipe)
    restored.load_state_dict(state)
    assert restored.p == ada.p and restored.num_steps == ada.num_steps
    assert float(pipe.p) == pytest.approx(ada.p)
    for logits in sequence[3:]:
        for controller in (ada, restored):
            controller.step()
            controller.accumulate(logits)
    assert restored.p == ada.p and restored.state_dict() == ada.state_dict()
    assert ada.p > 0


# -- image-space filtering, noise, cutout (upstream's 'f', 'n', 'c' of bgcfnc) ---------------------------------
def _upstream_filter_bank() -> np.ndarray:
    """StyleGAN2-ADA augment.py's construction, written with numpy's row-wise full convolution."""
    lo = np.array([-0.12940952255092145, 0.22414386804185735, 0.836516303737469, 0.48296291314469025])
    hi = lo * ((-1) ** np.arange(lo.size))
    lo2, hi2 = np.convolve(lo, lo[::-1]) / 2, np.convolve(hi, hi[::-1]) / 2
    bank = np.eye(4, 1)
    for i in range(1, 4):
        bank = np.dstack([bank, np.zeros_like(bank)]).reshape(4, -1)[:, :-1]
        bank = np.stack([np.convolve(row, lo2) for row in bank])
        bank[i, (bank.shape[1] - hi2.size) // 2:(bank.shape[1] + hi2.size) // 2] += hi2
    return bank


def test_filter_bank_is_upstreams_and_unit_gains_are_the_identity():
    bank = filter_bank()
    assert bank.shape == (4, 43)
    assert np.abs(bank.double().numpy() - _upstream_filter_bank()).max() < 1e-7
    impulse = torch.zeros(43)
    impulse[21] = 1
    assert torch.allclose(bank.sum(0), impulse, atol=1e-6)


def test_filter_noise_and_cutout_treat_the_pair_alike():
    vis, nir = smooth_pair(batch=6, size=32)
    torch.manual_seed(3)
    out_vis, out_nir = AugmentPipe(p=1.0, imgfilter=1, cutout=1)(vis, nir)
    assert not torch.allclose(out_vis, vis)
    # Linear, channel-independent filter and one mask per sample: NIR stays the channel mean of VIS.
    assert torch.allclose(out_vis.mean(dim=1, keepdim=True), out_nir, atol=1e-5)
    holes = (out_vis == 0).all(dim=1)  # [B, H, W]: where the cutout rectangle fell
    assert torch.equal(holes, out_nir[:, 0] == 0)
    assert all(8 * 8 <= int(h.sum()) <= 16 * 16 for h in holes)  # 16x16 (0.5 of 32), clipped at the borders
    torch.manual_seed(4)
    noisy_vis, noisy_nir = AugmentPipe(p=1.0, noise=1)(vis, nir)
    residual = torch.cat([noisy_vis - vis, noisy_nir - nir], dim=1).flatten(1)
    assert residual.std(dim=1).max() < 0.6 and residual.abs().sum(dim=1).min() > 0  # sigma = |N(0,1)| * 0.1
    torch.manual_seed(5)
    same_vis, same_nir = augment_pipe_from_name("bgcfnc", p=0.0)(vis, nir)
    assert torch.equal(same_vis, vis) and torch.equal(same_nir, nir)
