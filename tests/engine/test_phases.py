import numpy as np
import pytest
import torch

from facegen.engine.expand import expand_shard
from facegen.engine.phases import Identities, Selection, propose
from facegen.engine.seeding import Stream, draw_keys
from facegen.models.embedder import TorchEmbedder
from tests.engine.tiny import make_index, real_population, tiny_bundle, tiny_embedder, tiny_generator, tiny_spec


@pytest.fixture(scope="module")
def models():
    return tiny_generator(), tiny_embedder()


@pytest.fixture(scope="module")
def population_index(models, tmp_path_factory):
    generator, embedder = models
    folder = str(tmp_path_factory.mktemp("index") / "idx")
    return make_index(folder, embedder, real_population(generator, embedder, 40))


def select_all(bundle, slots, wanted):
    selection = Selection(wanted=wanted, threshold=bundle.spec.privacy.separability)
    selection.offer(propose(bundle, slots))
    return selection


def test_selection_equals_a_sequential_reference(models, population_index, tmp_path):
    bundle = tiny_bundle(tiny_spec(str(tmp_path)), population_index, *models)
    proposals = propose(bundle, np.arange(60))
    tau = bundle.spec.privacy.separability
    # Reference: the original's loop, one candidate at a time against every accepted anchor.
    accepted = []
    for i in range(60):
        if proposals.verdict[i] == "ok" and all(proposals.anchor[i] @ proposals.anchor[j] <= tau for j in accepted):
            accepted.append(i)
    got = Selection(wanted=1000, threshold=tau)
    got.offer(proposals)
    assert [int(s) for p in got.rows for s in p.slot] == accepted
    # Offering in pieces (any chunking) gives the same decisions.
    pieces = Selection(wanted=1000, threshold=tau)
    for start in range(0, 60, 7):
        pieces.offer(propose(bundle, np.arange(start, min(start + 7, 60))))
    assert [int(s) for p in pieces.rows for s in p.slot] == accepted
    assert pieces.verdicts == got.verdicts
    assert 0 < len(accepted) < 60, "thresholds should make the test discriminate"


def test_planted_real_faces_are_rejected_for_privacy(models, tmp_path):
    generator, embedder = models
    spec = tiny_spec(str(tmp_path))
    probe = tiny_bundle(spec, None, generator, embedder)
    # Enrol the exact anchors of slots 2 and 5 among unrelated people: both must be refused.
    planted = probe_anchors(probe, np.array([2, 5]))
    embeddings = np.concatenate([real_population(generator, embedder, 20), planted])
    bundle = tiny_bundle(spec, make_index(str(tmp_path / "idx"), embedder, embeddings), generator, embedder)
    proposals = propose(bundle, np.arange(8))
    assert list(proposals.verdict[[2, 5]]) == ["privacy", "privacy"]
    assert proposals.real_sim[[2, 5]] == pytest.approx([1.0, 1.0], abs=1e-5)
    assert list(proposals.real_identity[[2, 5]]) == ["20", "21"]
    assert (proposals.real_sim[proposals.verdict == "ok"] <= spec.privacy.threshold).all()


def probe_anchors(bundle, slots):
    from facegen.engine.phases import conditions_for

    keys = draw_keys(bundle.spec.seed, Stream.LATENT, slots, 0)
    vis, _ = bundle.render(conditions_for(bundle, slots), keys)
    return bundle.embedder.embed(vis).numpy()


def identities_for(bundle, wanted=4):
    return Identities.from_selection(select_all(bundle, np.arange(40), wanted))


DECISION_KEYS = ("identity", "sample", "slot", "attempt")


def test_expand_decisions_do_not_depend_on_batch_size(models, population_index, tmp_path):
    # Batch size may move similarities by an ulp (it is hashed for that reason); decisions must not move.
    results = []
    for batch in (3, 16):
        spec = tiny_spec(str(tmp_path), **{"batch_size": batch})
        bundle = tiny_bundle(spec, population_index, *models)
        identities = identities_for(bundle)
        results.append(expand_shard(bundle, identities, np.arange(len(identities))))
    small, large = results
    assert [{k: m[k] for k in DECISION_KEYS} for m in small.metas] == [
        {k: m[k] for k in DECISION_KEYS} for m in large.metas
    ]
    # The nearest real identity stays out of the released metadata; it travels separately (private/).
    assert not any(k.startswith("privacy_nearest") for m in small.metas for k in m)
    assert small.nearest.tolist() == large.nearest.tolist() and len(small.nearest) == len(small.metas)
    for a, b in zip(small.metas, large.metas):
        assert a["anchor_sim"] == pytest.approx(b["anchor_sim"], abs=1e-3)
    assert {k: v for k, v in small.stats.items() if k != "max_real_sim"} == {
        k: v for k, v in large.stats.items() if k != "max_real_sim"
    }
    # Pixels may differ by one rounding level where a batched convolution sums in another order.
    assert np.abs(small.vis.astype(int) - large.vis).max() <= 1
    assert np.abs(small.nir.astype(int) - large.nir).max() <= 1


def test_expanded_samples_satisfy_every_filter(models, population_index, tmp_path):
    spec = tiny_spec(str(tmp_path))
    bundle = tiny_bundle(spec, population_index, *models)
    identities = identities_for(bundle)
    shard = expand_shard(bundle, identities, np.arange(len(identities)))
    emb = bundle.embedder.embed(shard.vis.transpose(0, 3, 1, 2).copy()).numpy()
    real = population_index.max_similarity(emb)[0]
    # Recomputed from the images themselves: the certificate holds for what is written.
    np.testing.assert_allclose(real, [m["privacy_max_sim"] for m in shard.metas], atol=1e-5)
    assert (real <= spec.privacy.threshold).all()
    for label in np.unique(shard.labels):
        rows = np.flatnonzero(shard.labels == label)
        assert list(shard.samples[rows]) == list(range(len(rows)))
        own = emb[rows]
        assert (own @ identities.anchor[label] >= spec.filter.same_threshold - 1e-6).all()
        pair = own @ own.T
        assert (pair[np.triu_indices(len(rows), 1)] <= spec.filter.diversity_threshold + 1e-6).all()
        others = np.delete(identities.anchor, label, axis=0)
        assert (own @ others.T <= spec.privacy.separability + 1e-6).all()
    stats = shard.stats
    assert stats["samples"] == len(shard.metas) == stats["identities"] * 3 - _missing(shard, 3)
    assert stats["attempts"] == stats["samples"] + sum(stats["rejected"].values())
    assert stats["violations"] == 0


def _missing(shard, K):
    counts = np.bincount(shard.labels - shard.labels.min())
    return int((K - counts).sum())


def test_attempt_budget_bounds_the_work(models, population_index, tmp_path):
    # An impossible diversity threshold: only the anchor is ever accepted, every attempt is counted.
    spec = tiny_spec(str(tmp_path), **{"filter.diversity_threshold": 0.01, "filter.max_attempts": 5})
    bundle = tiny_bundle(spec, population_index, *models)
    identities = identities_for(bundle, wanted=2)
    shard = expand_shard(bundle, identities, np.arange(2))
    assert list(shard.samples) == [0, 0]
    assert shard.stats["attempts"] == 10
    assert shard.stats["exhausted_identities"] == 2
    assert sum(shard.stats["rejected"].values()) == 8


def test_nir_privacy_check_rejects_a_planted_nir_face(models, tmp_path):
    generator, embedder = models
    probe = tiny_bundle(tiny_spec(str(tmp_path)), None, generator, embedder)
    from facegen.engine.phases import conditions_for

    slots = np.array([3])
    _, nir = probe.render(conditions_for(probe, slots), draw_keys(0, Stream.LATENT, slots, 0))
    planted = embedder.embed(nir).numpy()  # the NIR face of slot 3 is "a real person"
    embeddings = np.concatenate([real_population(generator, embedder, 20), planted])
    index = make_index(str(tmp_path / "idx"), embedder, embeddings)
    vis_only = propose(tiny_bundle(tiny_spec(str(tmp_path), **{"privacy.check_nir": "false"}), index, generator,
                                   embedder), np.arange(5))
    with_nir = propose(tiny_bundle(tiny_spec(str(tmp_path)), index, generator, embedder), np.arange(5))  # default
    assert with_nir.verdict[3] == "privacy" and with_nir.real_identity[3] == "20"
    assert with_nir.real_sim[3] == pytest.approx(1.0, abs=1e-5)
    assert vis_only.real_sim[3] < 1.0 - 1e-3
    assert (with_nir.real_sim >= vis_only.real_sim - 1e-6).all()


class _NanOnGrey(torch.nn.Module):
    """An embedder module that fails (NaN features) on grey input: every NIR twin, never a VIS face."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        out = self.module(x)
        grey = (x[:, :1] == x).flatten(1).all(dim=1)
        return torch.where(grey[:, None], torch.full_like(out, float("nan")), out)


def test_a_nan_nir_embedding_refuses_the_candidate(models, population_index, tmp_path):
    generator, embedder = models
    failing = TorchEmbedder(_NanOnGrey(embedder.module), embedder.preprocessing)
    vis_only = propose(tiny_bundle(tiny_spec(str(tmp_path), **{"privacy.check_nir": "false"}), population_index,
                                   generator, failing), np.arange(6))
    with_nir = propose(tiny_bundle(tiny_spec(str(tmp_path)), population_index, generator, failing), np.arange(6))
    assert (vis_only.verdict != "invalid").all() and np.isfinite(vis_only.real_sim).all()
    assert (with_nir.verdict == "invalid").all() and np.isnan(with_nir.real_sim).all()


def test_frontal_heuristic_matches_the_original_formula():
    from facegen.engine.quality import frontal_heuristic

    # Nose centred between the eyes: frontal. Nose next to one eye: turned away.
    left, right, nose = np.array([30.0, 30.0, 30.0]), np.array([70.0, 70.0, 70.0]), np.array([50.0, 62.0, 45.0])
    dl, dr = left - nose, right - nose
    expected = np.abs(dl + dr) < (np.abs(dl) + np.abs(dr)) / 3
    np.testing.assert_array_equal(frontal_heuristic(left, right, nose), expected)
    assert list(expected) == [True, False, True]
