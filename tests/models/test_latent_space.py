"""W+ and StyleSpace access, one interface for both generator families (ArcBiFaceGAN and rosinality)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from facegen.models.errors import UserError
from facegen.models.latent_space import swap
from facegen.models.loading import load_generator
from facegen.models.rendering import LatentSpaces, open_latent_spaces
from tests.models.stylegan_fixtures import tiny_generator
from tests.models.test_rosinality import make_rosinality_state


def _rosinality(tmp_path, latent_avg: bool = True, **kwargs):
    state = make_rosinality_state(seed=3, **kwargs)
    ckpt = {"g_ema": state}
    if latent_avg:
        ckpt["latent_avg"] = torch.full([state["style.1.weight"].shape[1]], 0.25)
    torch.save(ckpt, tmp_path / "styleid.pt")
    return load_generator(tmp_path / "styleid.pt")


@pytest.fixture(params=["arcbifacegan", "rosinality"])
def space(request, tmp_path):
    generator = tiny_generator(seed=0) if request.param == "arcbifacegan" else _rosinality(tmp_path)
    return open_latent_spaces(generator)


def _ws(space: LatentSpaces, n: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    z = torch.randn(n, space.z_dim, generator=gen)
    c = torch.randn(n, space.c_dim, generator=gen) if space.c_dim else None
    return space.w_plus(z, c, truncation_psi=0.7)


def test_wplus_and_style_codes_render_the_generators_own_images(space):
    ws = _ws(space)
    with torch.no_grad():
        expected_vis, expected_nir = space.generator.synthesis(ws, noise_mode="const", channels_last=True)
        for name in ("wplus", "style"):
            codes = space.encode(name, ws)
            assert codes.shape == (3, space.layout(name).size)
            vis, nir = space.render_codes(name, codes)
            assert torch.equal(vis, expected_vis), name
            assert (nir is None) == (expected_nir is None) == (not space.has_nir)
            if nir is not None:
                assert torch.equal(nir, expected_nir)


def test_layouts_follow_each_family(space):
    wplus, style = space.layout("wplus"), space.layout("style")
    assert wplus.size == space.num_ws * space.w_dim and wplus.num_layers == space.num_ws
    synthesis = space.generator.synthesis
    assert list(style.names) == synthesis.style_names()
    assert any(n.endswith("toseg") for n in style.names) == space.has_nir
    assert style.size == sum(s.shape[1] for s in synthesis.compute_styles(_ws(space, 1)).values())
    with pytest.raises(UserError, match="not one of"):
        space.layout("z")


def test_swapping_every_coordinate_gives_the_target_and_none_the_source(space):
    ws = _ws(space, 4)
    source, target = space.encode("style", ws[:2]), space.encode("style", ws[2:])
    layout = space.layout("style")
    everything = layout.mask(layout.units(None))
    assert everything.all()
    assert torch.equal(swap(source, target, everything), target)
    assert torch.equal(swap(source, target, torch.zeros_like(everything)), source)
    one = layout.units(1)[5:6]
    swapped = swap(source, target, layout.mask(one))
    changed = (swapped != source).any(dim=0).nonzero().flatten().tolist()
    assert changed == [int(layout.offsets[one[0, 0]] + one[0, 1])]


def test_units_masks_and_rank_grids_round_trip():
    from facegen.models.latent_space import Layout

    layout = Layout("style", ("a", "b", "c"), (4, 6, 2))
    units = layout.units(4)
    assert units.tolist() == [[0, 0, 4], [1, 0, 4], [1, 4, 2], [2, 0, 2]]
    masks = layout.unit_masks(units)
    assert masks.sum(dim=1).tolist() == [4, 4, 2, 2] and masks.sum(dim=0).tolist() == [1] * 12
    assert torch.equal(masks.any(dim=0), layout.mask(units))
    values = np.array([3.0, 1.0, 2.0, 0.5])
    grid = layout.to_grid(values, units)
    assert grid.shape == (3, 2) and np.isnan(grid[0, 1]) and np.isnan(grid[2, 1])
    np.testing.assert_array_equal(layout.from_grid(grid, units), values)
    with pytest.raises(UserError, match="needs \\[3, 2\\]"):
        layout.from_grid(np.zeros((2, 2)), units)
    assert layout.units(None).tolist() == [[0, 0, 4], [1, 0, 6], [2, 0, 2]]


def test_rosinality_latent_avg_is_the_projection_start(tmp_path):
    space = open_latent_spaces(_rosinality(tmp_path))
    start = space.mean_ws(2)
    assert start.shape == (2, space.num_ws, space.w_dim)
    assert torch.equal(start, torch.full_like(start, 0.25))


def test_styleid_format_1024_checkpoint_loads_and_runs_on_cpu(tmp_path):
    # StyleID's generator: rosinality g_ema at 1024² (18 ws) with latent_avg. Narrow channels keep the
    # test fast; resolution, layer count and naming are the real ones.
    channels = {2**k: 8 for k in range(2, 11)}
    space = open_latent_spaces(_rosinality(tmp_path, size=1024, channels=channels, style_dim=16, n_mlp=8))
    assert (space.resolution, space.num_ws, space.c_dim, space.has_nir) == (1024, 18, 0, False)
    ws = space.mean_ws(1)
    target = _ws(space, 1)
    # StyleID's whole-layer identity swap at 1024²: layers 5-9.
    layout = space.layout("wplus")
    mask = layout.mask(np.array([[layer, 0, space.w_dim] for layer in range(5, 10)]))
    with torch.no_grad():
        vis, nir = space.render_codes("wplus", swap(space.encode("wplus", ws), space.encode("wplus", target), mask))
    assert vis.shape == (1, 3, 1024, 1024) and nir is None and torch.isfinite(vis).all()
