"""The generator interface: the StyleGAN2 family's renderer, its settings and its latent spaces."""

import pytest
import torch

from facegen.models.errors import UserError
from facegen.models.generator import StyleGAN2Renderer, StyleGAN2Settings
from facegen.models.iresnet import IResNet, IResNetConfig
from facegen.models.rendering import ImageGenerator, LatentSpaces, open_generator
from tests.models.test_generator import inputs, tiny


def equal(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x is None) == (y is None)
        if x is not None:
            torch.testing.assert_close(x, y, rtol=0, atol=0)


def per_sample_noise(G, n: int, seed: int = 3) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(n, 1, h, w, generator=g) for name, (h, w) in G.synthesis.noise_shapes().items()}


@pytest.mark.parametrize("modulated_conv", ["shared", "fused"])
@pytest.mark.parametrize("noise_mode", ["const", "random", "none"])
def test_render_is_the_family_call_it_replaces(modulated_conv, noise_mode):
    """The knobs the bundle used to pass to mapping/synthesis now live in the settings; same pixels."""
    G = tiny()
    z, c = inputs(G)
    settings = {"truncation_psi": 0.7, "truncation_cutoff": 3, "noise_mode": noise_mode,
                "modulated_conv": modulated_conv}
    renderer = open_generator(G, settings)
    assert isinstance(renderer, StyleGAN2Renderer) and isinstance(renderer, ImageGenerator)
    assert isinstance(renderer, LatentSpaces)
    noise = per_sample_noise(G, len(z)) if noise_mode == "random" else None
    assert set(renderer.noise_shapes()) == (set(noise) if noise else set())
    shared = modulated_conv == "shared"
    with torch.inference_mode():
        ws = G.mapping(z, c, truncation_psi=0.7, truncation_cutoff=3)
        expected = G.synthesis(ws, noise_mode="const" if noise else noise_mode, noise=noise, fast=not shared,
                               channels_last=shared)
        equal(renderer.render(z, c, noise), expected)


def test_w_plus_and_style_space_round_trip():
    G = tiny()
    z, c = inputs(G)
    renderer = StyleGAN2Renderer(G, StyleGAN2Settings(truncation_psi=0.5))
    with torch.inference_mode():
        ws = renderer.w_plus(z, c)
        assert ws.shape == (len(z), G.num_ws, G.w_dim)
        images = renderer.render(z, c)
        equal(renderer.render_w_plus(ws), images)
        styles = renderer.style_space(ws)
        assert list(styles) == G.synthesis.style_names()
        equal(renderer.render_w_plus(ws, styles=styles), images)  # its own StyleSpace changes nothing
        channel = styles["b8.conv1"].clone()
        channel[:, 0] += 3.0  # one StyleSpace channel (a uniform scale would be demodulated away)
        edited = dict(styles, **{"b8.conv1": channel})
        assert not torch.equal(renderer.render_w_plus(ws, styles=edited)[0], images[0])


def test_settings_are_checked_by_the_family():
    G = tiny()
    with pytest.raises(UserError, match=r"generator: unknown keys \['psi'\]"):
        open_generator(G, {"psi": 0.7})
    with pytest.raises(UserError, match="generator.noise_mode: must be one of"):
        open_generator(G, {"noise_mode": "loud"})
    with pytest.raises(UserError, match="generator.truncation_psi: must be a number >= 0"):
        open_generator(G, {"truncation_psi": -1})
    embedder = IResNet(IResNetConfig(depth=18, embedding_dim=8, input_size=32, base_width=8))
    with pytest.raises(UserError, match="no generator family renders a IResNet"):
        open_generator(embedder, {})
