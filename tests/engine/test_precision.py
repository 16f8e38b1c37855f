"""Reduced-precision embedding with the fp32 recheck: the privacy decisions of a bf16 run (CPU
autocast) equal the fp32 decisions on the same candidates, and the certificate records the margin."""

import numpy as np
import pytest

from facegen.engine.phases import conditions_for
from facegen.engine.precision import DEFAULT_MARGINS, Precision
from facegen.engine.seeding import Stream, draw_keys
from tests.engine.tiny import make_index, real_population, tiny_bundle, tiny_embedder, tiny_generator, tiny_spec


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    generator, embedder = tiny_generator(), tiny_embedder()
    folder = tmp_path_factory.mktemp("precision")
    index = make_index(str(folder / "index"), embedder, real_population(generator, embedder, 60))
    return generator, embedder, index, str(folder / "out")


def evaluate(models, **overrides):
    generator, embedder, index, out = models
    # VIS only, so that the rechecked similarity is the one whose embedding the candidate carries
    # (with NIR certified too, each image is rechecked on its own and the decision takes the larger).
    overrides = {"privacy.check_nir": False, **overrides}
    bundle = tiny_bundle(tiny_spec(out, batch_size=16, **overrides), index, generator, embedder)
    slots = np.arange(32)
    return bundle.evaluate(conditions_for(bundle, slots), draw_keys(0, Stream.LATENT, slots, 0))


@pytest.mark.slow
def test_bf16_decisions_near_the_threshold_are_the_fp32_ones(models):
    exact = evaluate(models)
    raw = evaluate(models, **{"embedder.dtype": "bf16", "privacy.recheck_margin": 0.0})  # no recheck
    assert np.array_equal(raw.vis, exact.vis)  # the same images: only the embedder's precision differs
    change = np.abs(raw.real_sim - exact.real_sim)
    assert 0 < change.max() < DEFAULT_MARGINS["bf16"]
    # A threshold between one candidate's fp32 and bf16 similarity: bf16 alone decides it wrongly.
    worst = int(change.argmax())
    tau = float((raw.real_sim[worst] + exact.real_sim[worst]) / 2)
    raw = evaluate(models, **{"privacy.threshold": tau, "embedder.dtype": "bf16", "privacy.recheck_margin": 0.0})
    assert (raw.real_sim > tau)[worst] != (exact.real_sim > tau)[worst]

    margin = float(2 * change.max())
    got = evaluate(models, **{"privacy.threshold": tau, "embedder.dtype": "bf16", "privacy.recheck_margin": margin})
    assert np.array_equal(got.real_sim > tau, exact.real_sim > tau)
    near = np.abs(exact.real_sim - tau) <= margin / 2  # rechecked: their bf16 value is within the margin
    assert near[worst]
    # rechecked candidates carry the fp32 similarity, row and embedding (to float32 summation order)
    np.testing.assert_allclose(got.real_sim[near], exact.real_sim[near], rtol=0, atol=1e-6)
    assert np.array_equal(got.real_row[near], exact.real_row[near])
    np.testing.assert_allclose(got.embedding[near].numpy(), exact.embedding[near].numpy(), rtol=0, atol=1e-5)
    # the others keep their bf16 values, within the margin of fp32
    assert (np.abs(got.real_sim - exact.real_sim) <= margin).all()


def test_the_certificate_records_the_precision_and_margin():
    assert Precision.of("fp32", None).certificate() == {"embedder_dtype": "fp32", "recheck_margin": 0.0}
    assert Precision.of("bf16", None).certificate() == {"embedder_dtype": "bf16", "recheck_margin": 0.02}
    assert Precision.of("fp16", 0.01).margin == 0.01 and not Precision.of("fp32", None).reduced
