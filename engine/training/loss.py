"""ArcBiFaceGAN losses: StyleGAN2-ADA's non-saturating loss (training/loss.py), extended to a VIS+NIR pair.

    L_G    = softplus(-D(G_vis, c)) + λ_NIR · softplus(-D_NIR(G_nir))
    L_D    = softplus(D(fake)) + softplus(-D(real))                      (VIS D, conditional)
    L_DNIR = softplus(D_NIR(fake)) + softplus(-D_NIR(real))              (NIR D, unconditional)
             D_NIR(nir) is D_NIR([nir, Y(vis)]) with `nir_pair` (Y = the VIS image's luminance)
    R1     = γ/2 · ‖∇_x D(real)‖²  on the VIS D *and* on the NIR D (lazy, every `d_reg_interval`)
    PL     = w · (‖J_vis^T n_vis + J_nir^T n_nir‖ − a)²  (one JVP of the *summed* VIS+NIR outputs)
    L_ID   = λ_ID · (1 − cos(E(G_vis), c)) + λ_ID,NIR · (1 − cos(E(G_nir), c))   (optional, facegen's)
    L_DIV  = λ_DIV · max(0, τ − d(G(z₁, c), G(z₂, c)) / d(z₁, z₂))                (optional, facegen's)

The identity term is not the original's: with a frozen face embedder E (the one whose features are the
conditions c), it pulls every sample straight towards its condition's identity instead of waiting for
the conditional D to teach that, which is what lets a small generator's samples carry their identity
after a short CPU run. Off (weights 0) unless an embedder is given. E sees the image after a [1 2 1]² binomial blur
(`identity_blur`), which has zero response at the pixel-level checkerboard: a small embedder
over-reads such patterns, and the term should reward the face's shape, not a texture. (The speckle the
demo generator did learn came from its noise inputs, not from this term: `noise`.)

The diversity term (`diversity_weight`, also facegen's) asks two samples of one condition to differ
in proportion to their latents: G's step pairs its batch (rows i and i + N/2 get the same condition)
and penalises each pair whose mean absolute VIS difference over the image's central half (where the
face is) is less than τ times the mean absolute difference of their z. A single-image D cannot see
that every sample of a condition looks alike, and the identity term rewards exactly that; this hinge
makes z carry pose, expression and lighting, and stops pushing once a pair differs by τ.

The paired NIR D (`nir_pair`, also facegen's) sees each NIR image beside the luminance of the VIS image
it belongs to: an unpaired NIR D only asks that the NIR image look like *some* NIR face, so nothing but
the shared synthesis layers keeps the twin aligned with its VIS image; a paired one rejects a twin whose
detail does not match. The luminance is a condition, not what is judged: R1 penalises D_NIR's gradient
with respect to the NIR image only.

The pure functions below are the terms; `ArcBiFaceLoss.accumulate_gradients` runs one training
phase (Gmain, Greg, Dmain, Dreg) and calls `backward()`, as StyleGAN2-ADA's `StyleGAN2Loss` does.
The original's NIR D never got R1 (a phase-name typo); `nir_r1=False` reproduces that.

`original=True` reproduces three side effects of the original ArcBiFaceGAN `loss.py` that change the
training state but not the loss values:
- it runs G once more in every phase (a `run_G` outside the phase's own branch), so `w_avg` moves on
  `ORIGINAL_EXTRA_MAPPING_CALLS` more mapping calls per phase (its D and D_NIR phases each count);
- its path-length backward adds `vis[:, 0, 0, 0] * 0 + nir[:, 0, 0, 0] * 0`, which gives the parameters
  that do not reach the penalty (the output biases) zero gradients instead of none, so Adam still
  decays their second moments and counts the step;
- its R1 phase reports the VIS D's real signs too, so they count in ADA's statistic.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

PHASES = ("Gmain", "Greg", "Dmain", "Dreg")
# The original's extra G runs per facegen phase: one in each G phase; its Dmain's fakes come from that
# run, plus one for its separate D_NIRmain phase; its Dreg and D_NIRreg phases run G once each.
ORIGINAL_EXTRA_MAPPING_CALLS = {"Gmain": 1, "Greg": 1, "Dmain": 1, "Dreg": 2}
StatFn = Callable[[str, torch.Tensor], None]


@dataclass(frozen=True)
class LossConfig:
    r1_gamma: float = 10.0
    r1_gamma_nir: float | None = None  # None = r1_gamma
    nir_r1: bool = True  # False = the original's missing NIR R1
    nir_loss_weight: float = 0.1  # λ_NIR: scales only the generator's NIR term
    pl_weight: float = 2.0
    pl_batch_shrink: int = 2
    pl_decay: float = 0.01
    style_mixing_prob: float = 0.9
    original: bool = False  # reproduce the original's w_avg updates, zero bias gradients and ADA signs
    identity_weight: float = 0.0  # λ_ID on the VIS image (needs an identity embedder)
    identity_nir_weight: float = 0.0  # λ_ID,NIR on the NIR image, seen as grey RGB
    identity_blur: bool = True  # the embedder sees a binomial blur of the image
    noise: bool = True  # G's per-pixel noise inputs during training (False: never used, strengths stay 0)
    nir_pair: bool = False  # the NIR D reads [NIR, luminance of the VIS image]
    diversity_weight: float = 0.0  # λ_DIV: samples of one condition must differ with their z
    diversity_target: float = 0.1  # τ: the image/latent distance ratio a pair is pushed up to

    @property
    def gamma_nir(self) -> float:
        return self.r1_gamma if self.r1_gamma_nir is None else self.r1_gamma_nir


# -- the terms ---------------------------------------------------------------------------------
def generator_loss(fake_logits: torch.Tensor, fake_logits_nir: torch.Tensor | None,
                   nir_weight: float) -> torch.Tensor:
    """Per-sample non-saturating G loss; λ_NIR multiplies only the NIR term."""
    loss = F.softplus(-fake_logits)
    if fake_logits_nir is not None:
        loss = loss + nir_weight * F.softplus(-fake_logits_nir)
    return loss


def binomial_blur(images: torch.Tensor) -> torch.Tensor:
    """[1 2 1]²/16 per channel, edges replicated: zero response at the pixel-level checkerboard."""
    taps = torch.tensor([1.0, 2.0, 1.0], device=images.device, dtype=images.dtype)
    kernel = (taps[:, None] * taps[None, :] / 16).expand(images.shape[1], 1, 3, 3)
    return F.conv2d(F.pad(images, [1, 1, 1, 1], mode="replicate"), kernel, groups=images.shape[1])


def identity_loss(embed: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                  conditions: torch.Tensor, blur: bool = False) -> torch.Tensor:
    """Per-sample 1 − cos(E(images), c); `embed` returns unit rows, a 1-channel image is seen as grey RGB."""
    if blur:
        images = binomial_blur(images)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return 1 - (embed(images) * F.normalize(conditions, dim=1)).sum(dim=1, keepdim=True)


def paired_conditions(c: torch.Tensor) -> torch.Tensor:
    """Rows i and i + N//2 share row i's condition (an odd last row keeps its own)."""
    half = c.shape[0] // 2
    return torch.cat([c[:half], c[:half], c[2 * half:]])


def diversity_loss(images: torch.Tensor, z: torch.Tensor, target: float) -> torch.Tensor:
    """Per pair (rows i, i + N//2): max(0, τ − mean|Δ image| / mean|Δ z|), the image difference over
    the central half of each side."""
    half, size = images.shape[0] // 2, images.shape[-1]
    centre = images[:, :, size // 4:size - size // 4, size // 4:size - size // 4]
    image_gap = (centre[:half] - centre[half:2 * half]).abs().mean(dim=[1, 2, 3])
    latent_gap = (z[:half] - z[half:2 * half]).abs().mean(dim=1)
    return F.relu(target - image_gap / latent_gap).unsqueeze(1)


LUMINANCE = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights of R, G, B


def nir_pair_input(nir: torch.Tensor, vis: torch.Tensor) -> torch.Tensor:
    """[N, 1 + 1, H, W]: the NIR image and its VIS image's luminance (same [-1, 1] range)."""
    weights = torch.tensor(LUMINANCE, device=vis.device, dtype=vis.dtype).view(1, 3, 1, 1)
    return torch.cat([nir, (vis * weights).sum(dim=1, keepdim=True)], dim=1)


def discriminator_fake_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    return F.softplus(fake_logits)  # -log(1 - sigmoid(logits))


def discriminator_real_loss(real_logits: torch.Tensor) -> torch.Tensor:
    return F.softplus(-real_logits)  # -log(sigmoid(logits))


def r1_penalties(logits: list[torch.Tensor], images: list[torch.Tensor]) -> list[torch.Tensor]:
    """‖∇_x D(x)‖² per sample for each (logits, image) pair, in one autograd call (graph kept).

    One call with the summed logits is exact because each D's output depends only on its own input.
    """
    grads = torch.autograd.grad(outputs=[lg.sum() for lg in logits], inputs=images, create_graph=True)
    return [g.square().sum(dim=[1, 2, 3]) for g in grads]


def path_length_noise(img: torch.Tensor) -> torch.Tensor:
    """N(0, 1) / sqrt(H·W): StyleGAN2's random image-space direction for the JVP."""
    return torch.randn_like(img) / math.sqrt(img.shape[2] * img.shape[3])


def path_lengths(vis: torch.Tensor, nir: torch.Tensor | None, ws: torch.Tensor,
                 noise_vis: torch.Tensor, noise_nir: torch.Tensor | None) -> torch.Tensor:
    """‖∇_ws (Σ vis·n_vis + Σ nir·n_nir)‖ per sample: the gradient of the *sum* of both outputs."""
    out = (vis * noise_vis).sum()
    if nir is not None:
        out = out + (nir * noise_nir).sum()
    grads = torch.autograd.grad(outputs=[out], inputs=[ws], create_graph=True)[0]
    return grads.square().sum(dim=2).mean(dim=1).sqrt()


def path_length_penalty(lengths: torch.Tensor, pl_mean: torch.Tensor, decay: float
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """((lengths − a)², a) with a = lerp(pl_mean, mean(lengths), decay), as StyleGAN2-ADA (a not detached)."""
    new_mean = pl_mean.lerp(lengths.mean(), decay)
    return (lengths - new_mean).square(), new_mean


# -- one training phase -----------------------------------------------------------------------
class ArcBiFaceLoss:
    """Runs G, the augment pipe and both D's for one phase and back-propagates its loss.

    `augment_pipe(vis, nir) -> (vis, nir)` applies one geometric transform to both images (None = no
    augmentation). `stat(name, values)` receives detached per-sample values for the tick statistics.
    `identity(images) -> unit embeddings` is the frozen, differentiable embedder of the identity term.
    """

    def __init__(self, G: torch.nn.Module, D: torch.nn.Module, D_nir: torch.nn.Module | None,
                 config: LossConfig, augment_pipe: Callable | None = None, stat: StatFn | None = None,
                 identity: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.G, self.D, self.D_nir = G, D, D_nir
        self.identity = identity
        self.config = config
        self.augment_pipe = augment_pipe
        self.stat = stat or (lambda name, value: None)
        self.pl_mean = torch.zeros([], device=next(G.parameters()).device)

    def run_G(self, z: torch.Tensor, c: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        ws = self.G.mapping(z, c, update_emas=True)
        if self.config.style_mixing_prob > 0:
            ws = self._mix_styles(ws, z, c)
        vis, nir = self.G.synthesis(ws, noise_mode="random" if self.config.noise else "none")
        return vis, nir, ws

    def _mix_styles(self, ws: torch.Tensor, z: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        # One cutoff per batch, as upstream; torch.where instead of slicing avoids a device sync.
        num_ws = ws.shape[1]
        cutoff = torch.randint(1, num_ws, [], device=ws.device)
        mix = torch.rand([], device=ws.device) < self.config.style_mixing_prob
        cutoff = torch.where(mix, cutoff, torch.full_like(cutoff, num_ws))
        other = self.G.mapping(torch.randn_like(z), c, update_emas=False)
        layer = torch.arange(num_ws, device=ws.device).view(1, -1, 1)
        return torch.where(layer < cutoff, ws, other)

    def run_D(self, vis: torch.Tensor, nir: torch.Tensor | None, c: torch.Tensor | None,
              with_nir: bool = True, pair_condition_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Both images go through the augment pipe together (one shared geometric transform), so a
        paired NIR D sees them aligned as G made them. `pair_condition_grad=False`: no gradient flows
        from the NIR D into the VIS image it is paired with (R1 reads each D's own input only)."""
        if self.augment_pipe is not None:
            vis, nir = self.augment_pipe(vis, nir)
        use_nir = with_nir and self.D_nir is not None and nir is not None
        if not use_nir:
            return self.D(vis, c), None
        nir_in = nir_pair_input(nir, vis if pair_condition_grad else vis.detach()) if self.config.nir_pair else nir
        return self.D(vis, c), self.D_nir(nir_in)

    def accumulate_gradients(self, phase: str, real_vis: torch.Tensor, real_nir: torch.Tensor | None,
                             real_c: torch.Tensor | None, gen_z: torch.Tensor, gen_c: torch.Tensor | None,
                             gain: float) -> torch.Tensor | None:
        """Backward of one phase's loss (times `gain`); returns the VIS D's real logits where it scored
        them for ADA (Dmain; Dreg too with `original`), else None."""
        real_logits = None
        if phase == "Gmain":
            self._generator_main(gen_z, gen_c, gain)
        elif phase == "Greg":
            if self.config.pl_weight != 0:
                self._path_length(gen_z, gen_c, gain)
        elif phase == "Dmain":
            real_logits = self._discriminator_main(real_vis, real_nir, real_c, gen_z, gen_c, gain)
        elif phase == "Dreg":
            real_logits = self._r1(real_vis, real_nir, real_c, gain)
            real_logits = real_logits if self.config.original else None
        else:
            raise ValueError(f"unknown phase {phase!r}; expected one of {PHASES}")
        if self.config.original:
            self._original_mapping_calls(ORIGINAL_EXTRA_MAPPING_CALLS[phase], gen_z, gen_c)
        return real_logits

    @torch.no_grad()
    def _original_mapping_calls(self, count: int, z: torch.Tensor, c: torch.Tensor | None) -> None:
        """Only the w_avg update of the original's extra G runs (their images were never used)."""
        for _ in range(count):
            self.G.mapping(z, c, update_emas=True)

    def _generator_main(self, z: torch.Tensor, c: torch.Tensor | None, gain: float) -> None:
        diverse = self.config.diversity_weight != 0 and z.shape[0] >= 2
        if diverse and c is not None:
            c = paired_conditions(c)
        vis, nir, _ = self.run_G(z, c)
        logits, logits_nir = self.run_D(vis, nir, c)
        loss = generator_loss(logits, logits_nir, self.config.nir_loss_weight)
        loss = loss + self._identity_terms(vis, nir, c)
        if diverse:
            term = diversity_loss(vis, z, self.config.diversity_target)
            self.stat("Loss/G/diversity", term)
            loss = loss + self.config.diversity_weight * term.mean()
        self.stat("Loss/scores/fake", logits)
        if logits_nir is not None:
            self.stat("Loss/scores/fake_nir", logits_nir)
        self.stat("Loss/G/loss", loss)
        loss.mean().mul(gain).backward()

    def _identity_terms(self, vis: torch.Tensor, nir: torch.Tensor | None, c: torch.Tensor | None
                        ) -> torch.Tensor | float:
        cfg, total = self.config, 0.0
        if self.identity is None or c is None:
            return total
        for name, images, weight in (("vis", vis, cfg.identity_weight), ("nir", nir, cfg.identity_nir_weight)):
            if weight != 0 and images is not None:
                term = identity_loss(self.identity, images, c, cfg.identity_blur)
                self.stat(f"Loss/G/identity_{name}", term)
                total = total + weight * term
        return total

    def _path_length(self, z: torch.Tensor, c: torch.Tensor | None, gain: float) -> None:
        n = max(z.shape[0] // self.config.pl_batch_shrink, 1)
        vis, nir, ws = self.run_G(z[:n], c[:n] if c is not None else None)
        noise_vis = path_length_noise(vis)
        noise_nir = path_length_noise(nir) if nir is not None else None
        lengths = path_lengths(vis, nir, ws, noise_vis, noise_nir)
        penalty, new_mean = path_length_penalty(lengths, self.pl_mean, self.config.pl_decay)
        self.pl_mean.copy_(new_mean.detach())
        self.stat("Loss/pl_penalty", penalty)
        loss = penalty * self.config.pl_weight
        if self.config.original:  # zero (not absent) gradients for what does not reach the penalty
            loss = vis[:, 0, 0, 0] * 0 + (nir[:, 0, 0, 0] * 0 if nir is not None else 0) + loss
        loss.mean().mul(gain).backward()

    def _discriminator_main(self, real_vis: torch.Tensor, real_nir: torch.Tensor | None,
                            real_c: torch.Tensor | None, z: torch.Tensor, c: torch.Tensor | None,
                            gain: float) -> torch.Tensor:
        with torch.no_grad():  # the D step needs no graph through G
            vis, nir, _ = self.run_G(z, c)
        logits, logits_nir = self.run_D(vis, nir, c)
        loss = discriminator_fake_loss(logits).mean()
        if logits_nir is not None:
            loss = loss + discriminator_fake_loss(logits_nir).mean()
        loss.mul(gain).backward()

        real_logits, real_logits_nir = self.run_D(real_vis, real_nir, real_c)
        loss_real = discriminator_real_loss(real_logits)
        self.stat("Loss/scores/real", real_logits)
        self.stat("Loss/signs/real", real_logits.sign())
        self.stat("Loss/D/loss", discriminator_fake_loss(logits) + loss_real)
        total = loss_real.mean()
        if real_logits_nir is not None:
            loss_real_nir = discriminator_real_loss(real_logits_nir)
            self.stat("Loss/scores/real_nir", real_logits_nir)
            self.stat("Loss/D_NIR/loss", discriminator_fake_loss(logits_nir) + loss_real_nir)
            total = total + loss_real_nir.mean()
        total.mul(gain).backward()
        return real_logits.detach()

    def _r1(self, real_vis: torch.Tensor, real_nir: torch.Tensor | None, real_c: torch.Tensor | None,
            gain: float) -> torch.Tensor | None:
        """Lazy R1 on both D's; returns the VIS D's real logits (None when its gamma is 0)."""
        cfg = self.config
        nir_r1 = cfg.nir_r1 and cfg.gamma_nir != 0 and real_nir is not None and self.D_nir is not None
        if cfg.r1_gamma == 0 and not nir_r1:
            return None
        vis = real_vis.detach().requires_grad_(True)
        nir = real_nir.detach().requires_grad_(nir_r1) if real_nir is not None else None
        logits, logits_nir = self.run_D(vis, nir, real_c, with_nir=nir_r1, pair_condition_grad=False)
        pairs = ([(logits, vis, cfg.r1_gamma, "Loss/r1_penalty")] if cfg.r1_gamma != 0 else []) + (
            [(logits_nir, nir, cfg.gamma_nir, "Loss/r1_penalty_nir")] if nir_r1 else [])
        penalties = r1_penalties([p[0] for p in pairs], [p[1] for p in pairs])
        total = 0
        for (lg, _, gamma, name), penalty in zip(pairs, penalties):
            self.stat(name, penalty)
            # `lg * 0` keeps every D parameter in the graph, as upstream does for DDP.
            total = total + (lg.squeeze(1) * 0 + penalty * (gamma / 2)).mean()
        total.mul(gain).backward()
        return logits.detach() if cfg.r1_gamma != 0 else None
