"""Privacy repair in generation: rejected anchors and samples get a seeded identity swap and every filter again."""

import numpy as np
import pytest
import torch

from facegen.engine.anonymise.rank import RankJob, rank, ranks_bytes
from facegen.engine.expand import expand_shard
from facegen.engine.phases import Identities, Selection, conditions_for, propose
from facegen.engine.repair import SwapTargets, units_sha256
from facegen.engine.seeding import Stream, draw_keys
from facegen.models.errors import UserError
from facegen.models.rendering import open_latent_spaces
from tests.engine.test_phases import probe_anchors
from tests.engine.tiny import make_index, real_population, tiny_bundle, tiny_embedder, tiny_generator, tiny_spec

CROWDED = 24  # slots whose exact anchors are enrolled as "real people"


@pytest.fixture(scope="module")
def models():
    return tiny_generator(), tiny_embedder()


@pytest.fixture(scope="module")
def ranks(models, tmp_path_factory) -> str:
    """A real rank table of the tiny generator's whole W+ layers (fast: 8 units, 2 face pairs)."""
    generator, embedder = models
    table = rank(open_latent_spaces(generator), embedder, RankJob(widths=(0,), pairs=2, pairs_per_task=2))
    path = tmp_path_factory.mktemp("ranks") / "ranks.parquet"
    path.write_bytes(ranks_bytes(table))
    return str(path)


@pytest.fixture(scope="module")
def crowded_index(models, tmp_path_factory):
    """Enrols the exact anchors of the first CROWDED slots: without repair every one is refused."""
    generator, embedder = models
    probe = tiny_bundle(tiny_spec("unused"), None, generator, embedder)
    planted = probe_anchors(probe, np.arange(CROWDED))
    embeddings = np.concatenate([real_population(generator, embedder, 20), planted])
    return make_index(str(tmp_path_factory.mktemp("crowded") / "idx"), embedder, embeddings)


def repair_settings(ranks: str, n: int = 3, tries: int = 3) -> dict:
    return {"privacy.repair.ranks": ranks, "privacy.repair.n": n, "privacy.repair.tries": tries,
            "privacy.repair.unit_width": 0}


def selected(bundle, slots, wanted=1000) -> tuple[Selection, object]:
    proposals = propose(bundle, slots)
    selection = Selection(wanted=wanted, threshold=bundle.spec.privacy.separability)
    selection.offer(proposals)
    return selection, proposals


def test_repair_raises_the_identity_yield_and_every_anchor_passes(models, ranks, crowded_index, tmp_path):
    slots = np.arange(CROWDED)
    plain = tiny_bundle(tiny_spec(str(tmp_path)), crowded_index, *models)
    without, _ = selected(plain, slots)
    assert without.accepted == 0 and without.verdicts == {"privacy": CROWDED}

    bundle = tiny_bundle(tiny_spec(str(tmp_path), **repair_settings(ranks)), crowded_index, *models)
    with_repair, proposals = selected(bundle, slots)
    threshold = bundle.spec.privacy.value
    assert with_repair.accepted >= CROWDED // 2, with_repair.verdicts
    # Every proposal was repaired (all were rejected), its level is within the tries, and the counts agree.
    assert proposals.repair_tried.all() and set(proposals.repair.tolist()) <= {0, 1, 2}
    assert with_repair.repair_verdicts == with_repair.verdicts
    ok = proposals.verdict == "ok"
    assert (proposals.real_sim[ok] <= threshold).all()
    # A proposal still refused for privacy used up all its tries.
    assert (proposals.repair[proposals.verdict == "privacy"] == 2).all()
    # The repaired anchor is a pure function of (seed, slot, level): rendering it again gives the same image.
    rows = np.flatnonzero(ok)[:4]
    keys = draw_keys(bundle.spec.seed, Stream.LATENT, slots[rows], 0)
    again = bundle.evaluate(conditions_for(bundle, slots[rows]), keys, SwapTargets(slots[rows], proposals.repair[rows]))
    np.testing.assert_allclose(again.embedding.numpy(), proposals.anchor[rows], atol=1e-6)
    np.testing.assert_allclose(again.real_sim, proposals.real_sim[rows], atol=1e-6)


def test_unswapped_rows_render_exactly_as_without_repair(models, ranks, crowded_index, tmp_path):
    bundle = tiny_bundle(tiny_spec(str(tmp_path), **repair_settings(ranks)), crowded_index, *models)
    slots = np.arange(6)
    conditions, keys = conditions_for(bundle, slots), draw_keys(bundle.spec.seed, Stream.LATENT, slots, 3)
    plain, _ = bundle.render(conditions, keys)
    levels = np.array([-1, 0, -1, 2, -1, 1])
    swapped, _ = bundle.render(conditions, keys, SwapTargets(slots, levels))
    assert torch.equal(swapped[levels < 0], plain[levels < 0])
    assert all(not torch.equal(swapped[i], plain[i]) for i in np.flatnonzero(levels >= 0))


@pytest.mark.slow
def test_expand_keeps_a_repaired_identity_swapped_and_certifies_every_sample(models, ranks, crowded_index, tmp_path):
    bundle = tiny_bundle(tiny_spec(str(tmp_path), **repair_settings(ranks)), crowded_index, *models)
    selection, _ = selected(bundle, np.arange(8), wanted=4)  # all crowded: every identity needs a repair
    identities = Identities.from_selection(selection)
    assert len(identities) == 4 and (identities.repair >= 0).all(), identities.repair
    shard = expand_shard(bundle, identities, np.arange(len(identities)))
    threshold = bundle.spec.privacy.value
    real = crowded_index.max_similarity(bundle.embedder.embed(shard.vis.transpose(0, 3, 1, 2).copy()).numpy())[0]
    np.testing.assert_allclose(real, [m["privacy_max_sim"] for m in shard.metas], atol=1e-5)
    assert (real <= threshold).all() and shard.stats["violations"] == 0
    levels = np.array([m["repair"] for m in shard.metas])
    base = identities.repair[shard.labels]
    # A sample is at its identity's level, or later when it was itself repaired in expand.
    assert (levels >= base).all()
    anchors = [m for m in shard.metas if m["sample"] == 0]
    assert [m["repair"] for m in anchors] == identities.repair[[m["identity"] for m in anchors]].tolist()
    stats = shard.stats["repair"]
    assert stats["written_swapped"] == int((levels >= 0).sum())
    assert stats["tried"] == stats["accepted"] + sum(stats["rejected"].values())
    assert stats["accepted"] == int((levels > base).sum())
    # Every written sample regenerates from (seed, slot, attempt, repair level).
    metas = shard.metas
    slots = np.array([m["slot"] for m in metas])
    keys = draw_keys(bundle.spec.seed, Stream.LATENT, slots, np.array([m["attempt"] for m in metas]))
    vis, _ = bundle.render(identities.condition[shard.labels], keys, SwapTargets(slots, levels))
    assert np.abs(vis.permute(0, 2, 3, 1).numpy().astype(int) - shard.vis).max() <= 1


@pytest.mark.parametrize(("settings", "message"), [
    ({"privacy.repair.ranks": "/no/such/ranks.parquet"},
     "privacy.repair.ranks: /no/such/ranks.parquet: file not found"),
    ({"privacy.repair.n": 9}, "privacy.repair.n: 9 is more than the 8 wplus units of width 0"),
    ({"privacy.repair.unit_width": 4}, "no ranks for space 'wplus' with unit width 4"),
])
def test_unusable_repair_settings_are_one_clear_error(models, ranks, crowded_index, tmp_path, settings, message):
    spec = tiny_spec(str(tmp_path), **{**repair_settings(ranks), **settings})
    with pytest.raises(UserError, match="privacy.repair") as err:
        tiny_bundle(spec, crowded_index, *models)
    assert message in str(err.value)


def test_ranks_of_another_generator_are_refused(models, tmp_path):
    from facegen.engine.anonymise.rank import from_grid
    from facegen.models.generator import Generator, GeneratorConfig

    # A generator whose W+ is 64 wide: its best channel (40) does not exist in the tiny generator's 32.
    wide = Generator(GeneratorConfig(z_dim=32, c_dim=32, w_dim=64, img_resolution=32, channel_base=256,
                                     channel_max=32, mapping_layers=2, num_fp16_res=0))
    grid = np.zeros((8, 64))
    grid[2, 40] = 1.0
    path = tmp_path / "wide.parquet"
    path.write_bytes(ranks_bytes(from_grid(grid, open_latent_spaces(wide), "wplus", 1)))
    spec = tiny_spec(str(tmp_path), **{**repair_settings(str(path), n=1), "privacy.repair.unit_width": 1})
    with pytest.raises(UserError, match="privacy.repair.ranks: .* was ranked on another generator"):
        tiny_bundle(spec, None, *models)


def test_the_units_digest_changes_with_the_units():
    units = np.array([[1, 0, 32], [3, 0, 32]])
    assert units_sha256(units) == units_sha256(units.copy()) != units_sha256(units[::-1])


def test_stylespace_repair_rescues_anchors_too(models, crowded_index, tmp_path):
    generator, embedder = models
    table = rank(open_latent_spaces(generator), embedder,
                 RankJob(spaces=("style",), widths=(0,), pairs=1, pairs_per_task=1))
    path = tmp_path / "style.parquet"
    path.write_bytes(ranks_bytes(table))
    settings = {**repair_settings(str(path), n=6), "privacy.repair.space": "style"}
    bundle = tiny_bundle(tiny_spec(str(tmp_path), **settings), crowded_index, *models)
    selection, proposals = selected(bundle, np.arange(6))
    assert selection.accepted >= 3 and (proposals.real_sim[proposals.verdict == "ok"] <= 0.95).all()
    assert bundle.repair.units[:, 2].tolist() == [
        bundle.renderer.layout("style").widths[layer] for layer in bundle.repair.units[:, 0]]
