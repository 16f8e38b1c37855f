"""Loss terms against hand-computed values on fixed tensors: λ_NIR scaling, R1 on both D's,
path length on the summed VIS+NIR gradients, D losses, and the phases' gradients."""

import math

import pytest
import torch

from facegen.engine.training.loss import (
    ArcBiFaceLoss,
    LossConfig,
    binomial_blur,
    discriminator_fake_loss,
    discriminator_real_loss,
    diversity_loss,
    generator_loss,
    identity_loss,
    nir_pair_input,
    paired_conditions,
    path_length_noise,
    path_length_penalty,
    path_lengths,
    r1_penalties,
)
from facegen.models.discriminator import Discriminator, DiscriminatorConfig
from facegen.models.generator import Generator, GeneratorConfig

LN2, LN3, LN4 = math.log(2), math.log(3), math.log(4)


# -- pure terms ----------------------------------------------------------------------------------------
def test_generator_loss_scales_only_the_nir_term():
    vis = torch.tensor([[0.0], [LN3]])
    nir = torch.tensor([[0.0], [-LN3]])
    # softplus(-0) = ln 2; softplus(-ln 3) = ln(4/3); softplus(ln 3) = ln 4
    expected = torch.tensor([[LN2 + 0.1 * LN2], [math.log(4 / 3) + 0.1 * LN4]])
    assert torch.allclose(generator_loss(vis, nir, 0.1), expected, atol=1e-6)
    assert torch.allclose(generator_loss(vis, nir, 0.0), torch.tensor([[LN2], [math.log(4 / 3)]]), atol=1e-6)
    assert torch.allclose(generator_loss(vis, nir, 0.5), torch.tensor([[1.5 * LN2], [math.log(4 / 3) + 0.5 * LN4]]),
                          atol=1e-6)


def test_discriminator_losses():
    logits = torch.tensor([[0.0], [LN3], [-LN3]])
    assert torch.allclose(discriminator_fake_loss(logits), torch.tensor([[LN2], [LN4], [math.log(4 / 3)]]))
    assert torch.allclose(discriminator_real_loss(logits), torch.tensor([[LN2], [math.log(4 / 3)], [LN4]]))


def test_r1_penalty_of_a_quadratic_discriminator():
    # D(x) = 0.5 * sum(x^2): grad = x, penalty = sum(x^2) per sample; a second D(y) = 3 * sum(y).
    x = torch.tensor([[[[1.0, 2.0]], [[0.0, -1.0]], [[3.0, 0.0]]]]).requires_grad_(True)  # [1,3,1,2]
    y = torch.tensor([[[[1.0, -1.0]]], [[[2.0, 0.5]]]]).requires_grad_(True)  # [2,1,1,2]
    pen_x, pen_y = r1_penalties([0.5 * x.square().sum([1, 2, 3]), 3 * y.sum([1, 2, 3])], [x, y])
    assert pen_x.tolist() == [1 + 4 + 0 + 1 + 9 + 0]
    assert pen_y.tolist() == [18.0, 18.0]  # (3^2) * 2 pixels


def test_path_length_uses_the_gradient_of_the_summed_outputs():
    # ws [N, 2 ws, 1 dim]; vis = 2 w0 + w1; nir = 3 w0 - 4 w1 (1x1 images), noise 1 everywhere.
    ws = torch.tensor([[[1.0], [2.0]], [[-1.0], [0.5]]], requires_grad=True)
    vis = (2 * ws[:, 0] + ws[:, 1]).view(2, 1, 1, 1)
    nir = (3 * ws[:, 0] - 4 * ws[:, 1]).view(2, 1, 1, 1)
    ones = torch.ones(2, 1, 1, 1)
    # summed gradient per ws: [2+3, 1-4] = [5, -3] -> mean of squares 17 -> sqrt(17)
    assert torch.allclose(path_lengths(vis, nir, ws, ones, ones), torch.full([2], math.sqrt(17)))
    # the NIR noise flipped: [2-3, 1+4] = [-1, 5] -> sqrt(13); not a sum of separate lengths
    assert torch.allclose(path_lengths(vis, nir, ws, ones, -ones), torch.full([2], math.sqrt(13)))
    # VIS alone: [2, 1] -> sqrt(2.5)
    assert torch.allclose(path_lengths(vis, None, ws, ones, None), torch.full([2], math.sqrt(2.5)))


def test_path_length_penalty_and_running_mean():
    lengths = torch.tensor([1.0, 3.0])
    penalty, mean = path_length_penalty(lengths, torch.tensor(0.0), 0.01)
    assert mean.item() == pytest.approx(0.02)  # 0 + 0.01 * (2 - 0)
    assert torch.allclose(penalty, torch.tensor([0.98**2, 2.98**2]))
    penalty, mean = path_length_penalty(lengths, torch.tensor(2.5), 0.5)
    assert mean.item() == pytest.approx(2.25) and torch.allclose(penalty, torch.tensor([1.25**2, 0.75**2]))


def test_path_length_noise_scale():
    torch.manual_seed(0)
    noise = path_length_noise(torch.zeros(64, 3, 16, 16))
    assert noise.std().item() == pytest.approx(1 / 16, rel=0.02)


# -- phases with stand-in networks -------------------------------------------------------------------
class StubG(torch.nn.Module):
    """ws = [m z, m z] (m = 1); vis = s * w0[:3] (1x1), nir = t * w1[3]. Linear, no randomness."""

    z_dim, c_dim = 4, 0

    def __init__(self, s=1.0, t=1.0):
        super().__init__()
        self.s = torch.nn.Parameter(torch.tensor(s))
        self.t = torch.nn.Parameter(torch.tensor(t))
        self.m = torch.nn.Parameter(torch.tensor(1.0))  # makes ws depend on a parameter, as in a real G

    def mapping(self, z, c, update_emas=False):
        return (self.m * z).unsqueeze(1).repeat(1, 2, 1)

    def synthesis(self, ws, noise_mode="random"):
        n = ws.shape[0]
        return (self.s * ws[:, 0, :3]).view(n, 3, 1, 1), (self.t * ws[:, 1, 3:]).view(n, 1, 1, 1)


class LinearD(torch.nn.Module):
    """D(img) = a * sum(img) (logits [N, 1]); ignores c."""

    def __init__(self, a=0.0):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(a))

    def forward(self, img, c=None):
        return (self.a * img.sum([1, 2, 3])).unsqueeze(1)


class Doubler:
    """Stand-in augment pipe: scales both images by 2 (records what it saw)."""

    def __init__(self):
        self.calls = []

    def __call__(self, vis, nir):
        self.calls.append((vis.shape[1], None if nir is None else nir.shape[1]))
        return 2 * vis, 2 * nir


def _loss(G, D, D_nir, stats=None, pipe=None, identity=None, **config):
    config = {"style_mixing_prob": 0.0, **config}
    record = (lambda name, value: stats.setdefault(name, []).append(value.detach().clone())) if stats is not None \
        else None
    return ArcBiFaceLoss(G, D, D_nir, LossConfig(**config), augment_pipe=pipe, stat=record, identity=identity)


def _flat_unit(images):
    """A stand-in embedder: the image's pixels as a unit vector."""
    return torch.nn.functional.normalize(images.flatten(1), dim=1)


def test_identity_loss_is_one_minus_the_cosine_to_the_condition():
    vis = torch.tensor([3.0, 4.0, 0.0, 0.0, 0.0, 2.0]).view(2, 3, 1, 1)
    c = torch.tensor([[6.0, 8.0, 0.0], [0.0, 0.0, -5.0]])  # same direction as sample 0; opposite of sample 1
    assert identity_loss(_flat_unit, vis, c).flatten().tolist() == pytest.approx([0.0, 2.0], abs=1e-6)
    nir = torch.tensor([1.0, -1.0]).view(2, 1, 1, 1)  # seen as grey RGB: (1,1,1) and (-1,-1,-1)
    grey = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    assert identity_loss(_flat_unit, nir, grey).flatten().tolist() == pytest.approx([0.0, 2.0], abs=1e-6)


def test_binomial_blur_removes_the_pixel_checkerboard_and_keeps_flat_images():
    checker = torch.ones(1, 2, 6, 6)
    checker[:, :, 0::2, 1::2] = checker[:, :, 1::2, 0::2] = -1.0
    assert binomial_blur(checker)[:, :, 1:-1, 1:-1].abs().max().item() == 0.0
    flat = torch.full((2, 3, 4, 4), 0.25)
    assert torch.equal(binomial_blur(flat), flat)
    one_pixel = torch.tensor([3.0, -1.0]).view(2, 1, 1, 1)  # replicated edges: a 1x1 image is its own blur
    assert torch.equal(binomial_blur(one_pixel), one_pixel)


@pytest.mark.parametrize("weights", [(0.0, 0.0), (1.0, 0.0), (0.5, 2.0)])
def test_generator_main_adds_the_weighted_identity_terms(weights):
    # D's at a = b = 0: the adversarial part is ln 2 + λ_NIR ln 2 whatever G does.
    w_vis, w_nir = weights
    z = torch.tensor([[1.0, 2.0, 2.0, 4.0], [0.0, 3.0, -4.0, -2.0]])
    c = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.6, -0.8]])
    stats = {}
    loss = _loss(StubG(), LinearD(0.0), LinearD(0.0), stats, identity=_flat_unit, nir_loss_weight=0.1,
                 identity_weight=w_vis, identity_nir_weight=w_nir)
    loss.accumulate_gradients("Gmain", REAL_VIS, REAL_NIR, None, z, c, gain=1)
    # vis = z[:3]: cos to c = 1/3 and 1; nir = z[3] as grey (sign only): cos = +-1/sqrt(3) and -(0.6-0.8)/sqrt(3)
    cos_vis = torch.tensor([1 / 3, 1.0])
    cos_nir = torch.tensor([1.0, 0.2]) / math.sqrt(3)
    expected = 1.1 * LN2 + w_vis * (1 - cos_vis) + w_nir * (1 - cos_nir)
    assert stats["Loss/G/loss"][0].flatten().tolist() == pytest.approx(expected.tolist(), rel=1e-6)
    assert ("Loss/G/identity_vis" in stats) == (w_vis != 0)
    assert ("Loss/G/identity_nir" in stats) == (w_nir != 0)


def test_paired_conditions_give_row_i_and_i_plus_half_one_condition():
    c = torch.arange(10.0).view(5, 2)
    assert paired_conditions(c).tolist() == [[0, 1], [2, 3], [0, 1], [2, 3], [8, 9]]
    assert paired_conditions(c[:4]).tolist() == [[0, 1], [2, 3], [0, 1], [2, 3]]


def test_diversity_loss_reads_the_central_half_and_scales_by_the_latent_gap():
    images = torch.zeros(4, 1, 4, 4)
    images[2, 0, 1:3, 1:3] = 0.2  # pair (0, 2): centre differs by 0.2 everywhere
    images[2, 0, 0, :] = 9.0  # outside the central half: ignored
    images[3, 0, 1, 1] = 0.4  # pair (1, 3): one of four centre pixels differs by 0.4
    z = torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, -1.0], [1.0, 1.5]])  # latent gaps 1 and 0.25
    # ratios 0.2 / 1 = 0.2 and 0.1 / 0.25 = 0.4
    assert diversity_loss(images, z, 0.3).flatten().tolist() == pytest.approx([0.1, 0.0])
    assert diversity_loss(images, z, 0.5).flatten().tolist() == pytest.approx([0.3, 0.1])


def test_generator_main_pairs_conditions_and_adds_the_diversity_hinge():
    z = torch.tensor([[1.0, 2.0, 2.0, 4.0], [0.0, 3.0, -4.0, -2.0], [1.0, 2.0, 3.0, 1.0], [0.0, 3.0, -4.0, 6.0]])
    c = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.6, -0.8], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    stats, G = {}, StubG()
    loss = _loss(G, LinearD(0.0), LinearD(0.0), stats, identity=_flat_unit, nir_loss_weight=0.1,
                 identity_weight=1.0, diversity_weight=2.0, diversity_target=0.5)
    loss.accumulate_gradients("Gmain", REAL_VIS, REAL_NIR, None, z, c, gain=1)
    # pair (0, 2): |Δ vis| = (0, 0, 1) -> 1/3, |Δ z| mean 1 -> ratio 1/3, hinge 1/6; pair (1, 3) identical
    # images (ratio 0), hinge 0.5; their mean 1/3, times λ 2, on every sample's loss
    assert stats["Loss/G/diversity"][0].flatten().tolist() == pytest.approx([1 / 6, 0.5])
    # the identity term saw rows 2, 3 with rows 0, 1's conditions: cos(vis_2, c_0) = 1/sqrt(14)
    cos_vis = torch.tensor([1 / 3, 1.0, 1 / math.sqrt(14), 1.0])
    expected = 1.1 * LN2 + (1 - cos_vis) + 2.0 / 3
    assert stats["Loss/G/loss"][0].flatten().tolist() == pytest.approx(expected.tolist(), rel=1e-6)
    # the hinge's gradient reaches G: d/ds of λ mean(τ − s|Δ|/|Δz|) over the pairs = −2 * (1/3 + 0) / 2
    without = _loss(StubG(), LinearD(0.0), LinearD(0.0), identity=_flat_unit, nir_loss_weight=0.1,
                    identity_weight=1.0)
    without.accumulate_gradients("Gmain", REAL_VIS, REAL_NIR, None, z, paired_conditions(c), gain=1)
    assert G.s.grad.item() - without.G.s.grad.item() == pytest.approx(-1 / 3, abs=1e-6)


REAL_VIS = torch.tensor([1.0, 2.0, 3.0, -1.0, 0.0, 0.5]).view(2, 3, 1, 1)
REAL_NIR = torch.tensor([2.0, -3.0]).view(2, 1, 1, 1)


@pytest.mark.parametrize("nir_r1", [True, False])
def test_r1_on_both_discriminators(nir_r1):
    D, D_nir, stats = LinearD(2.0), LinearD(-3.0), {}
    loss = _loss(StubG(), D, D_nir, stats, r1_gamma=10.0, r1_gamma_nir=4.0, nir_r1=nir_r1)
    loss.accumulate_gradients("Dreg", REAL_VIS, REAL_NIR, None, torch.zeros(2, 4), None, gain=16)
    # grad_x D = a at every pixel: penalty = a^2 * pixels; loss = gamma/2 * penalty; d/da = gamma * a * pixels
    assert [t.tolist() for t in stats["Loss/r1_penalty"]] == [[12.0, 12.0]]  # 2^2 * 3 pixels
    assert D.a.grad.item() == pytest.approx(16 * 10.0 * 2.0 * 3)
    if nir_r1:
        assert [t.tolist() for t in stats["Loss/r1_penalty_nir"]] == [[9.0, 9.0]]  # (-3)^2 * 1 pixel
        assert D_nir.a.grad.item() == pytest.approx(16 * 4.0 * -3.0 * 1)
    else:  # the original's behaviour: the NIR D gets no R1 at all
        assert "Loss/r1_penalty_nir" not in stats and D_nir.a.grad is None


def test_r1_is_taken_through_the_augment_pipe_with_respect_to_the_real_images():
    D, D_nir, stats, pipe = LinearD(2.0), LinearD(-3.0), {}, Doubler()
    loss = _loss(StubG(), D, D_nir, stats, pipe=pipe, r1_gamma=1.0)
    loss.accumulate_gradients("Dreg", REAL_VIS, REAL_NIR, None, torch.zeros(2, 4), None, gain=1)
    assert pipe.calls == [(3, 1)]  # one call, VIS and NIR together
    assert stats["Loss/r1_penalty"][0].tolist() == [48.0, 48.0]  # (2 * 2)^2 * 3
    assert stats["Loss/r1_penalty_nir"][0].tolist() == [36.0, 36.0]  # (2 * -3)^2


class RecordingD(LinearD):
    """LinearD that keeps what it was shown."""

    def __init__(self, a=0.0):
        super().__init__(a)
        self.seen = []

    def forward(self, img, c=None):
        self.seen.append(img.detach().clone())
        return super().forward(img, c)


def test_the_paired_nir_d_sees_the_nir_image_beside_the_vis_luminance():
    vis = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]).view(2, 3, 1, 1)  # pure red, pure green
    nir = torch.tensor([0.5, -0.5]).view(2, 1, 1, 1)
    assert nir_pair_input(nir, vis).flatten().tolist() == pytest.approx([0.5, 0.299, -0.5, 0.587])
    # Gmain: D_NIR reads [nir, Y(vis)] and its gradient reaches G through both channels.
    z = torch.tensor([[1.0, 2.0, 2.0, 4.0], [0.0, 3.0, -4.0, -2.0]])
    for pair in (False, True):
        G, D_nir = StubG(), RecordingD(1.0)
        _loss(G, LinearD(0.0), D_nir, nir_loss_weight=1.0, nir_pair=pair).accumulate_gradients(
            "Gmain", REAL_VIS, REAL_NIR, None, z, None, gain=1)
        fake_vis, fake_nir = z[:, :3].view(2, 3, 1, 1), z[:, 3:].view(2, 1, 1, 1)
        expected = nir_pair_input(fake_nir, fake_vis) if pair else fake_nir
        assert torch.equal(D_nir.seen[0], expected)
        # d/ds of mean softplus(-D_NIR) = -mean(sigmoid(-logit) * Y(vis)) with vis = s * z[:3]; none unpaired
        logits = expected.sum([1, 2, 3])
        lum = nir_pair_input(fake_nir, fake_vis)[:, 1].flatten()
        want = -(torch.sigmoid(-logits) * lum).mean().item() if pair else 0.0
        assert G.s.grad.item() == pytest.approx(want, abs=1e-6)


def test_r1_of_the_paired_nir_d_is_taken_on_the_nir_image_only():
    D, D_nir, stats = LinearD(2.0), RecordingD(-3.0), {}
    loss = _loss(StubG(), D, D_nir, stats, r1_gamma=10.0, r1_gamma_nir=4.0, nir_pair=True)
    loss.accumulate_gradients("Dreg", REAL_VIS, REAL_NIR, None, torch.zeros(2, 4), None, gain=1)
    assert D_nir.seen[0].shape == (2, 2, 1, 1)
    # as unpaired: the VIS D's penalty gets nothing from D_NIR's path through the luminance
    assert stats["Loss/r1_penalty"][0].tolist() == [12.0, 12.0]
    assert stats["Loss/r1_penalty_nir"][0].tolist() == [9.0, 9.0]  # (-3)^2 * 1 NIR pixel


def test_discriminator_main_losses_and_gradients():
    # D's start at a = 0: every logit is 0, each loss term is ln 2 and sigmoid = 1/2.
    G, D, D_nir, stats = StubG(), LinearD(0.0), LinearD(0.0), {}
    z = torch.tensor([[1.0, 1.0, 1.0, 4.0], [0.0, 2.0, -1.0, 2.0]])
    loss = _loss(G, D, D_nir, stats, nir_loss_weight=0.1)
    real_logits = loss.accumulate_gradients("Dmain", REAL_VIS, REAL_NIR, None, z, None, gain=1)
    assert real_logits.tolist() == [[0.0], [0.0]]
    assert stats["Loss/D/loss"][0].flatten().tolist() == pytest.approx([2 * LN2] * 2)
    assert stats["Loss/D_NIR/loss"][0].flatten().tolist() == pytest.approx([2 * LN2] * 2)
    # dL/da = 1/2 mean(sum fake) - 1/2 mean(sum real); fake sums 3, 1; real sums 6, -0.5
    assert D.a.grad.item() == pytest.approx(0.5 * 2.0 - 0.5 * 2.75)
    # the NIR D's loss is NOT weighted by λ_NIR: fake 4, 2; real 2, -3
    assert D_nir.a.grad.item() == pytest.approx(0.5 * 3.0 - 0.5 * -0.5)
    assert G.s.grad is None and G.t.grad is None  # no graph through G in the D step


@pytest.mark.parametrize("nir_weight", [0.0, 0.1, 0.5])
def test_generator_main_gradient_scales_the_nir_term(nir_weight):
    # vis = s*z[:3], nir = t*z[3]; D(vis) = a*sum(vis), D_nir(nir) = b*nir at s = t = 1
    G, a, b = StubG(), 0.5, -0.25
    z = torch.tensor([[1.0, 1.0, 1.0, 4.0], [0.0, 2.0, -1.0, 2.0]])
    stats = {}
    loss = _loss(G, LinearD(a), LinearD(b), stats, nir_loss_weight=nir_weight)
    loss.accumulate_gradients("Gmain", REAL_VIS, REAL_NIR, None, z, None, gain=1)
    sv, sn = z[:, :3].sum(1), z[:, 3]
    # d/ds mean softplus(-a s Sv) = mean(-sigmoid(-a Sv) a Sv); same for t with λ in front
    assert G.s.grad.item() == pytest.approx((-torch.sigmoid(-a * sv) * a * sv).mean().item(), rel=1e-6)
    expected_t = nir_weight * (-torch.sigmoid(-b * sn) * b * sn).mean().item()
    assert G.t.grad.item() == pytest.approx(expected_t, rel=1e-6, abs=1e-12)
    expected_loss = generator_loss(a * sv.view(2, 1), b * sn.view(2, 1), nir_weight)
    assert torch.allclose(stats["Loss/G/loss"][0], expected_loss)


def test_path_length_phase_penalty_matches_the_summed_jacobian():
    # Stub: vis = s*w0[:3], nir = t*w1[3]; the summed gradient per ws row is [s*n_vis, 0] and [0, t*n_nir].
    G, stats = StubG(2.0, -1.0), {}
    loss = _loss(G, LinearD(), LinearD(), stats, pl_weight=2.0, pl_batch_shrink=2, pl_decay=0.5)
    z = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [0.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    torch.manual_seed(3)
    loss.accumulate_gradients("Greg", REAL_VIS, REAL_NIR, None, z, None, gain=4)
    torch.manual_seed(3)  # the same noise draws, in the same order (VIS then NIR)
    n_vis, n_nir = torch.randn(2, 3, 1, 1), torch.randn(2, 1, 1, 1)  # 1x1 images: scale 1/sqrt(1)
    # grad wrt ws row 0 = s * n_vis (dims 0-2), row 1 = t * n_nir (dim 3); mean over the 2 rows
    lengths = ((2.0**2 * n_vis.view(2, 3).square().sum(1) + (-1.0) ** 2 * n_nir.view(2).square()) / 2).sqrt()
    pl_mean = 0.5 * lengths.mean()  # lerp(0, mean, 0.5)
    assert loss.pl_mean.item() == pytest.approx(pl_mean.item(), rel=1e-6)
    assert torch.allclose(stats["Loss/pl_penalty"][0], (lengths - pl_mean).square(), rtol=1e-5)


def test_style_mixing_switches_to_the_second_latent_after_the_cutoff():
    G = Generator(GeneratorConfig(z_dim=8, c_dim=0, w_dim=8, img_resolution=16, mapping_layers=1,
                                  channel_base=64, channel_max=8, num_fp16_res=0))
    loss = ArcBiFaceLoss(G, None, None, LossConfig(style_mixing_prob=1.0))
    z = torch.randn(3, 8)
    torch.manual_seed(1)
    ws = G.mapping(z, None)
    mixed = loss._mix_styles(ws, z, None)
    torch.manual_seed(1)
    cutoff = int(torch.randint(1, ws.shape[1], []))
    torch.rand([])
    other = G.mapping(torch.randn_like(z), None)
    assert torch.equal(mixed[:, :cutoff], ws[:, :cutoff]) and torch.equal(mixed[:, cutoff:], other[:, cutoff:])


def test_lambda_nir_is_linear_in_the_generator_gradient_of_the_real_networks():
    """On the real G and D's: grad(λ) = grad_vis + λ grad_nir, and grad(0) is the VIS-only loss's."""
    torch.manual_seed(0)
    G = Generator(GeneratorConfig(z_dim=8, c_dim=4, w_dim=8, img_resolution=16, mapping_layers=1,
                                  channel_base=64, channel_max=8, num_fp16_res=0))
    D = Discriminator(DiscriminatorConfig(c_dim=4, img_resolution=16, channel_base=64, channel_max=8,
                                          num_fp16_res=0, mapping_layers=1))
    D_nir = Discriminator(DiscriminatorConfig(c_dim=0, img_channels=1, img_resolution=16, channel_base=64,
                                              channel_max=8, num_fp16_res=0))
    z, c = torch.randn(4, 8), torch.randn(4, 4)

    def grads(weight, vis_only=False):
        G.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        loss = ArcBiFaceLoss(G, D, D_nir if not vis_only else None, LossConfig(nir_loss_weight=weight))
        loss.accumulate_gradients("Gmain", None, None, None, z, c, gain=1)
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in G.parameters()])

    g0, g01, g1 = grads(0.0), grads(0.1), grads(1.0)
    assert torch.allclose(g1 - g0, 10 * (g01 - g0), atol=1e-6, rtol=1e-4)
    assert (g1 - g0).abs().max() > 1e-4  # the NIR term does reach G
    # λ = 0 leaves exactly the VIS loss (the NIR heads get zero gradient)
    assert torch.allclose(g0, grads(0.0, vis_only=True), atol=1e-7)


@pytest.mark.parametrize("noise", [True, False])
def test_training_without_noise_inputs_leaves_their_strengths_untouched(noise):
    G = Generator(GeneratorConfig(z_dim=8, c_dim=0, w_dim=8, img_resolution=16, mapping_layers=1,
                                  channel_base=64, channel_max=8, num_fp16_res=0))
    D = Discriminator(DiscriminatorConfig(c_dim=0, img_resolution=16, img_channels=3, channel_base=64,
                                          channel_max=8, num_fp16_res=0, mbstd_group_size=2))
    loss = ArcBiFaceLoss(G, D, None, LossConfig(style_mixing_prob=0.0, noise=noise))
    torch.manual_seed(0)
    loss.accumulate_gradients("Gmain", None, None, None, torch.randn(2, 8), None, gain=1)
    strengths = [p for name, p in G.named_parameters() if name.endswith("noise_strength")]
    assert len(strengths) == 5  # conv1 at 4x4; conv0 and conv1 at 8x8 and 16x16
    if noise:
        assert all(p.grad is not None for p in strengths) and any(p.grad.abs().item() > 0 for p in strengths)
    else:
        assert all(p.grad is None for p in strengths)
        # and with the strengths at their initial 0, every noise mode renders the same image
        ws = G.mapping(torch.randn(1, 8), None)
        images = [G.synthesis(ws, noise_mode=mode)[0] for mode in ("const", "random", "none")]
        assert torch.equal(images[0], images[1]) and torch.equal(images[0], images[2])
