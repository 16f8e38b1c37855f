"""Import rosinality `stylegan2-pytorch` generators (the format StyleID's code uses) into our Generator.

Same StyleGAN2 math, different parameter layout. The exact equivalences (rosinality -> ours):

- Mapping: `style.0` is PixelNorm (= our 2nd-moment normalisation, eps 1e-8); `style.{i+1}` is an
  EqualLinear with lr_mul 0.01: `lrelu(x @ (W*lr_mul/sqrt(in)).T + b*lr_mul) * sqrt(2)`. Our
  FullyConnectedLayer computes exactly that with lr_multiplier 0.01, so `mapping.fc{i}.{weight,bias}`
  take the tensors unchanged. `latent_avg` is our `mapping.w_avg`; both truncate every layer by
  `avg + psi*(w - avg)`.
- Modulated 3x3 convs: rosinality stores `weight` [1, O, I, k, k] and uses `scale*weight*style` with
  `scale = 1/sqrt(I*k*k)` *before* demodulation `rsqrt(sum(.^2) + 1e-8)`; StyleGAN2-ADA demodulates the
  unscaled weight. The scale cancels in the demodulation except inside the epsilon, so we store
  `weight[0] * scale`: then both compute `rsqrt(sum((scale*w*s)^2) + 1e-8) * scale*w*s` exactly.
  `modulation` (EqualLinear, bias_init 1, lr_mul 1) is our `affine`; `activate.bias` (FusedLeakyReLU:
  `lrelu(x + b) * sqrt(2)`) is our conv `bias`; `noise.weight` [1] is our scalar `noise_strength`, added
  before the bias as in ADA; `noises.noise_{j}` [1,1,r,r] are our `noise_const` [r,r], with noise 0 for
  the 4x4 conv and noises 2k-1 / 2k for conv0 / conv1 of the k-th upsampling block.
- Upsampling conv: rosinality runs `conv_transpose2d(stride 2, pad 0)` with the (unflipped) weight, then
  `Blur(kernel=make_kernel([1,3,3,1])*4, pad=(1, 1))`. ADA's conv2d_resample(up=2, padding=1,
  flip_weight=False) runs the same transposed conv and then `upfirdn2d(f, pad=[1,1,1,1], gain=4)` with
  f = the normalised [1,3,3,1] filter (p = 4-2-(3-1) = 0, pad0 = (p+1)//2+1 = 1, pad1 = p//2+1 = 1 on
  rosinality's side; px0 = 1+(4+1)//2-2 = 1, px1 = 1+(4-2)//2-1 = 1 on ADA's). So `blur.kernel / 4` is
  our `conv0.resample_filter`.
- ToRGB: rosinality `scale*weight*style` without demodulation (scale 1/sqrt(I)) equals ADA's
  `weight * (affine(w) * weight_gain)`: `weight[0]` unchanged, `bias` [1,3,1,1] flattened. The skip
  `Upsample(kernel*4, pad=(2, 1), up=2)` is ADA's `upsample2d(f)` (pads (4+1)//2 = 2 and (4-2)//2 = 1,
  gain 4), so `to_rgbs.{k}.upsample.kernel / 4` is the block's `resample_filter`.
- ws indexing is the same: conv1@4 -> w0, to_rgb1 -> w1, block k -> w(2k-1), w(2k), to_rgb w(2k+1).

Rosinality channels are {4..32: 512, 64: 256m, 128: 128m, ...}; they are expressed as
`min(channel_base // res, channel_max)` (channel_max = channels at 4, channel_base = channels at R * R)
and refused if that formula cannot reproduce them.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from facegen.models.checkpoint import load_state_dict_checked
from facegen.models.errors import UnsafeCheckpointError, UserError
from facegen.models.generator import Generator, GeneratorConfig
from facegen.models.importers.safe_pickle import _refusal_core

MAPPING_LR_MULTIPLIER = 0.01  # rosinality's Generator(lr_mlp=0.01); not recoverable from the tensors
W_AVG_SAMPLES = 4096  # rosinality's generate.py: mean_latent(4096), used when latent_avg is absent
BLUR_GAIN = 4.0  # rosinality stores its upsampling kernels multiplied by factor**2


def read_rosinality(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """(g_ema state dict, latent_avg or None) from a rosinality `.pt`, loaded with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        # Training checkpoints also hold `args` (an argparse.Namespace: plain attribute data).
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # Only what was refused: torch's own text goes on to advise weights_only=False, which must never be done.
        raise UnsafeCheckpointError(f"{path}: refused by torch's weights-only loader: {_refusal_core(str(err))}"
                                    ) from None
    except (RuntimeError, EOFError, ValueError, OSError) as err:
        raise UserError(f"{path}: not a torch checkpoint ({err})") from None
    except (MemoryError, OverflowError) as err:
        raise UserError(f"{path}: a tensor in it would need more memory than exists ({type(err).__name__})") from None
    if not isinstance(ckpt, Mapping):
        raise UserError(f"{path}: expected a dict with 'g_ema' or a state dict, got {type(ckpt).__name__}")
    state = ckpt.get("g_ema", ckpt)
    if not isinstance(state, Mapping) or "input.input" not in state or "style.1.weight" not in state:
        raise UserError(f"{path}: no rosinality generator (expected 'g_ema' with 'input.input', 'style.1.weight')")
    latent_avg = state.get("latent_avg", ckpt.get("latent_avg"))
    tensors = {k: v for k, v in state.items() if k != "latent_avg"}
    return tensors, latent_avg


def _count(state: Mapping[str, torch.Tensor], pattern: str) -> int:
    regex = re.compile(pattern)
    return len({m.group(1) for k in state if (m := regex.fullmatch(k))})


def rosinality_config(state: Mapping[str, torch.Tensor], source: str = "rosinality") -> GeneratorConfig:
    """Resolution, widths and mapping depth read from the tensors' names and shapes."""
    n_mlp = _count(state, r"style\.(\d+)\.weight")
    num_blocks = _count(state, r"to_rgbs\.(\d+)\.conv\.weight")
    style_dim = state["style.1.weight"].shape[1]
    resolution = 2 ** (num_blocks + 2)
    channels = {4: state["input.input"].shape[1]}
    for k in range(num_blocks):
        channels[2 ** (k + 3)] = state[f"convs.{2 * k}.conv.weight"].shape[1]
    channel_max, channel_base = channels[4], channels[resolution] * resolution
    derived = {res: min(channel_base // res, channel_max) for res in channels}
    if derived != channels:
        raise UserError(f"{source}: channel widths {channels} are not min(channel_base // res, channel_max) "
                        f"for any channel_base/channel_max")
    return GeneratorConfig(
        z_dim=style_dim, c_dim=0, w_dim=style_dim, img_resolution=resolution,
        img_channels=state["to_rgb1.conv.weight"].shape[1], nir_channels=0, mapping_layers=n_mlp,
        channel_base=channel_base, channel_max=channel_max, num_fp16_res=0, conv_clamp=None,
        mapping_lr_multiplier=MAPPING_LR_MULTIPLIER)


def _conv_tensors(src: str, dst: str, state: Mapping[str, torch.Tensor], noise: str) -> dict[str, torch.Tensor]:
    weight = state[f"{src}.conv.weight"][0]
    fan_in = weight[0].numel()  # I * k * k
    out = {
        f"{dst}.weight": weight * (1 / fan_in**0.5),
        f"{dst}.affine.weight": state[f"{src}.conv.modulation.weight"],
        f"{dst}.affine.bias": state[f"{src}.conv.modulation.bias"],
        f"{dst}.noise_strength": state[f"{src}.noise.weight"].reshape([]),
        f"{dst}.bias": state[f"{src}.activate.bias"],
        f"{dst}.noise_const": state[noise][0, 0],
    }
    if f"{src}.conv.blur.kernel" in state:
        out[f"{dst}.resample_filter"] = state[f"{src}.conv.blur.kernel"] / BLUR_GAIN
    return out


def _rgb_tensors(src: str, dst: str, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        f"{dst}.weight": state[f"{src}.conv.weight"][0],
        f"{dst}.affine.weight": state[f"{src}.conv.modulation.weight"],
        f"{dst}.affine.bias": state[f"{src}.conv.modulation.bias"],
        f"{dst}.bias": state[f"{src}.bias"].reshape(-1),
    }


def convert_state_dict(state: Mapping[str, torch.Tensor], config: GeneratorConfig) -> dict[str, torch.Tensor]:
    """Rosinality tensor names/layout -> ours (see the module docstring for each equivalence)."""
    out = {}
    for i in range(config.mapping_layers):
        out[f"mapping.fc{i}.weight"] = state[f"style.{i + 1}.weight"]
        out[f"mapping.fc{i}.bias"] = state[f"style.{i + 1}.bias"]
    out["synthesis.b4.const"] = state["input.input"][0]
    out.update(_conv_tensors("conv1", "synthesis.b4.conv1", state, "noises.noise_0"))
    out.update(_rgb_tensors("to_rgb1", "synthesis.b4.torgb", state))
    for k in range(len(config_block_resolutions(config)) - 1):
        block = f"synthesis.b{2 ** (k + 3)}"
        out.update(_conv_tensors(f"convs.{2 * k}", f"{block}.conv0", state, f"noises.noise_{2 * k + 1}"))
        out.update(_conv_tensors(f"convs.{2 * k + 1}", f"{block}.conv1", state, f"noises.noise_{2 * k + 2}"))
        out.update(_rgb_tensors(f"to_rgbs.{k}", f"{block}.torgb", state))
        if f"to_rgbs.{k}.upsample.kernel" in state:
            out[f"{block}.resample_filter"] = state[f"to_rgbs.{k}.upsample.kernel"] / BLUR_GAIN
    return out


def config_block_resolutions(config: GeneratorConfig) -> list[int]:
    return [2**i for i in range(2, config.img_resolution.bit_length())]


def _used_keys(config: GeneratorConfig) -> set[str]:
    """Every rosinality tensor name the conversion consumes (the rest would be silently lost)."""
    num_blocks = len(config_block_resolutions(config)) - 1
    conv = ("conv.weight", "conv.modulation.weight", "conv.modulation.bias", "noise.weight", "activate.bias")
    rgb = ("conv.weight", "conv.modulation.weight", "conv.modulation.bias", "bias")
    keys = {f"style.{i}.{p}" for i in range(1, config.mapping_layers + 1) for p in ("weight", "bias")}
    keys |= {"input.input", *(f"conv1.{p}" for p in conv), *(f"to_rgb1.{p}" for p in rgb)}
    keys |= {f"convs.{j}.{p}" for j in range(2 * num_blocks) for p in conv}
    keys |= {f"convs.{2 * k}.conv.blur.kernel" for k in range(num_blocks)}
    keys |= {f"to_rgbs.{k}.{p}" for k in range(num_blocks) for p in (*rgb, "upsample.kernel")}
    keys |= {f"noises.noise_{j}" for j in range(2 * num_blocks + 1)}
    return keys


def load_rosinality(path: str | os.PathLike) -> Generator:
    """A rosinality `.pt` as our Generator (c_dim 0, no NIR heads, fp32, no clamp)."""
    source = str(path)
    state, latent_avg = read_rosinality(path)
    config = rosinality_config(state, source)
    unknown = sorted(set(state) - _used_keys(config))
    missing = sorted(k for k in _used_keys(config) - set(state) if not k.endswith("kernel"))
    if unknown or missing:
        raise UserError(f"{source}: not a rosinality generator layout: unexpected {unknown[:8]}, "
                        f"missing {missing[:8]}")
    G = Generator(config)
    tensors = {**G.state_dict(), **convert_state_dict(state, config)}  # defaults for unused filters
    if latent_avg is not None:
        tensors["mapping.w_avg"] = latent_avg.reshape(-1)
    load_state_dict_checked(G, {k: v.to(torch.float32) for k, v in tensors.items()}, source)
    if latent_avg is None:
        G.mapping.w_avg.copy_(mean_latent(G))
    return G.eval()


@torch.no_grad()
def mean_latent(G: Generator, num_samples: int = W_AVG_SAMPLES, seed: int = 0) -> torch.Tensor:
    """w averaged over `num_samples` z (what rosinality's generate.py truncates toward)."""
    z = torch.randn(num_samples, G.z_dim, generator=torch.Generator().manual_seed(seed))
    return G.mapping(z, None)[:, 0].mean(dim=0)
