"""The fp32 recheck covers every threshold, not only privacy: with a bf16 embedder (CPU autocast) the
same-identity, separability and diversity decisions of expansion equal an fp32 run's; without the
recheck a threshold placed between a candidate's bf16 and fp32 similarity flips its decision."""

import numpy as np
import pytest
import torch

from facegen.engine.expand import expand_shard
from facegen.engine.phases import Identities, Selection, propose
from facegen.engine.precision import DEFAULT_MARGINS
from facegen.engine.seeding import Stream, draw_keys
from tests.engine.tiny import make_index, real_population, tiny_bundle, tiny_embedder, tiny_generator, tiny_spec

KEYS = ("identity", "sample", "slot", "attempt")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    generator, embedder = tiny_generator(), tiny_embedder()
    folder = tmp_path_factory.mktemp("checks")
    index = make_index(str(folder / "index"), embedder, real_population(generator, embedder, 40))
    bundle = tiny_bundle(tiny_spec(str(folder / "out")), index, generator, embedder)
    selection = Selection(wanted=6, threshold=bundle.spec.privacy.separability)
    selection.offer(propose(bundle, np.arange(40)))
    return generator, embedder, index, str(folder / "out"), Identities.from_selection(selection)


def bundle_for(world, **overrides):
    generator, embedder, index, out, _ = world
    overrides = {"privacy.check_nir": False, "samples_per_identity": 3, **overrides}
    return tiny_bundle(tiny_spec(out, batch_size=8, **overrides), index, generator, embedder)


def first_attempts(bundle, identities):
    """Similarities of attempts 0 and 1 of every identity, as expansion computes them."""
    n = len(identities)
    owner, attempt = np.repeat(np.arange(n), 2), np.tile([0, 1], n)
    found = bundle.evaluate(identities.condition[owner],
                            draw_keys(bundle.spec.seed, Stream.LATENT, identities.slot[owner], attempt))
    embedding = found.embedding.numpy().astype(np.float64)
    anchors = identities.anchor.astype(np.float64)
    others = embedding @ anchors.T
    others[np.arange(2 * n), owner] = -np.inf
    second = slice(1, None, 2)
    return {
        "same": (embedding * anchors[owner]).sum(axis=1)[second],
        "separability": others.max(axis=1)[second],
        "diversity": (embedding[second] * embedding[0::2]).sum(axis=1),
        "privacy": found.real_sim[second],
    }


THRESHOLD_KEYS = {"same": "filter.same_threshold", "separability": "privacy.separability_threshold",
                  "diversity": "filter.diversity_threshold"}


def passes(values, check, thresholds):
    ok = {"same": values["same"] >= thresholds["same"], "separability": values["separability"] <= thresholds[
        "separability"], "diversity": values["diversity"] <= thresholds["diversity"]}
    return np.logical_and.reduce([v for k, v in ok.items() if k != check])


def decisions(shard):
    return [tuple(meta[k] for k in KEYS) for meta in shard.metas], shard.stats["rejected"], shard.stats["attempts"]


@pytest.mark.slow
@pytest.mark.parametrize("check", ["same", "separability", "diversity"])
def test_bf16_expansion_decides_as_fp32(world, check):
    identities = world[4]
    exact = first_attempts(bundle_for(world), identities)
    reduced = first_attempts(bundle_for(world, **{"embedder.dtype": "bf16", "privacy.recheck_margin": 0.0}),
                             identities)
    base = bundle_for(world).spec
    # The other two checks loose (only the one under test decides), privacy as the job has it.
    thresholds = {"same": 0.05, "separability": 0.995, "diversity": 0.995}
    # The candidate (an identity's attempt 1) whose similarity moves most under bf16, among those that
    # pass every other check and privacy in both runs: a threshold between its two values flips it.
    usable = (passes(exact, check, thresholds) & passes(reduced, check, thresholds)
              & (exact["privacy"] <= base.privacy.value) & (reduced["privacy"] <= base.privacy.value))
    change = np.where(usable, np.abs(exact[check] - reduced[check]), 0)
    worst = int(change.argmax())
    assert 1e-4 < change[worst] < DEFAULT_MARGINS["bf16"]
    tau = float((exact[check][worst] + reduced[check][worst]) / 2)
    settings = {THRESHOLD_KEYS[name]: value for name, value in thresholds.items()} | {THRESHOLD_KEYS[check]: tau}
    labels = np.arange(len(identities))

    want = decisions(expand_shard(bundle_for(world, **settings), identities, labels))
    raw = decisions(expand_shard(bundle_for(world, **settings, **{"embedder.dtype": "bf16",
                                                                   "privacy.recheck_margin": 0.0}), identities, labels))
    assert raw != want  # bf16 alone decides that candidate otherwise
    rechecked = bundle_for(world, **settings, **{"embedder.dtype": "bf16"})
    with torch.no_grad():
        got = decisions(expand_shard(rechecked, identities, labels))
    assert got == want
