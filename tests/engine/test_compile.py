"""`run.compile`: torch.compile (inductor, on this CPU) of the synthesis network and the embedder gives
the eager results up to float rounding, and changes neither the spec hash nor the weights' fingerprints."""

import numpy as np
import pytest
import torch

from facegen.engine.bundle import Bundle
from facegen.engine.phases import conditions_for
from facegen.engine.seeding import Stream, draw_keys
from facegen.engine.spec import spec_hash
from facegen.models.embedder import Preprocessing, TorchEmbedder
from facegen.models.generator import Generator, GeneratorConfig
from tests.engine.tiny import make_index, tiny_spec

DIM = 16


def small_generator() -> Generator:
    """The real synthesis network at 8² (two blocks): few kernels, so inductor builds them quickly."""
    torch.manual_seed(0)
    return Generator(GeneratorConfig(z_dim=16, c_dim=DIM, w_dim=16, img_resolution=8, channel_base=64,
                                     channel_max=16, mapping_layers=1, num_fp16_res=0)).eval().requires_grad_(False)


def small_embedder() -> TorchEmbedder:
    torch.manual_seed(1)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.PReLU(8),
                                 torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, DIM))
    return TorchEmbedder(module.eval().requires_grad_(False), Preprocessing(input_size=8), dim=DIM)


def test_compile_is_off_by_default_and_not_hashed(tmp_path):
    spec = tiny_spec(str(tmp_path))
    assert spec.run.compile is False
    assert spec_hash(tiny_spec(str(tmp_path), **{"run.compile": "true"})) == spec_hash(spec)


@pytest.mark.slow
def test_compiled_networks_give_the_eager_results(tmp_path):
    eager_g, eager_e = small_generator(), small_embedder()
    compiled_g, compiled_e = small_generator(), small_embedder()
    keys_before = list(compiled_g.state_dict())
    fingerprint = compiled_e.fingerprint
    enrolled = torch.nn.functional.normalize(torch.randn(40, DIM, generator=torch.Generator().manual_seed(5)))
    index = make_index(str(tmp_path / "index"), eager_e, enrolled.numpy())
    eager = Bundle(eager_g, eager_e, index, torch.device("cpu"), tiny_spec(str(tmp_path / "a"), batch_size=4))
    compiled = Bundle(compiled_g, compiled_e, index, torch.device("cpu"),
                      tiny_spec(str(tmp_path / "b"), batch_size=4, **{"run.compile": "true"}))
    assert compiled_g.synthesis._compiled_call_impl is not None and compiled_e.module._compiled_call_impl is not None
    assert eager_g.synthesis._compiled_call_impl is None

    slots = np.arange(6)  # batches of 4 and 2: a second shape compiles again
    conditions, keys = conditions_for(eager, slots), draw_keys(0, Stream.LATENT, slots, 0)
    a, b = eager.evaluate(conditions, keys), compiled.evaluate(conditions, keys)
    levels = np.abs(a.vis.astype(np.int16) - b.vis.astype(np.int16))
    assert levels.max() <= 1 and (levels > 0).mean() < 0.01  # a float ulp may cross a uint8 level, rarely
    torch.testing.assert_close(b.embedding, a.embedding, atol=1e-5, rtol=0)
    np.testing.assert_allclose(b.real_sim, a.real_sim, atol=1e-5, rtol=0)

    # The float images before uint8 (same per-sample noise, drawn from the same keys)
    z, c = torch.randn(4, 16), torch.nn.functional.normalize(torch.randn(4, DIM)) * 4
    noise = eager._noise(keys[:4])
    with torch.inference_mode():
        float_a = eager.renderer.render(z, c, noise)
        float_b = compiled.renderer.render(z, c, noise)
    torch.testing.assert_close(float_b[0], float_a[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(float_b[1], float_a[1], atol=1e-5, rtol=0)
    assert list(compiled_g.state_dict()) == keys_before and compiled_e.fingerprint == fingerprint
