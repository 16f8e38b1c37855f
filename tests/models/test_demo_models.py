"""The demo models shipped in facegen/models/demo/: found through `demo_model_paths()`, exactly the files
demo.json describes, and measured here on world identities they were never trained on."""

from __future__ import annotations

import hashlib

import pytest

from facegen.engine.evaluation import accuracy_at
from facegen.engine.world import measure
from facegen.jobs.demo_models import measure_models
from facegen.models.demo import FILES, HERE, demo_facts, demo_model_paths
from facegen.models.loading import load_embedder, load_generator

IDENTITIES, SAMPLES, PAIRS = 40, 3, 300


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def embedder():
    return load_embedder(demo_model_paths()["embedder"])


@pytest.fixture(scope="module")
def heldout():
    """40 identities x 3 samples of the held-out test population (another seed than training)."""
    world = demo_facts()["heldout_worlds"]["world-test"]
    assert world["seed"] != demo_facts()["world"]["seed"]
    return measure.population(world["seed"], IDENTITIES, SAMPLES, world["resolution"])


def test_paths_name_only_files_that_exist_and_match_their_recorded_hashes():
    paths = demo_model_paths()
    assert {"embedder", "facts"} <= set(paths) <= set(FILES)
    assert all(path.is_file() and path.parent == HERE for path in paths.values())
    facts = demo_facts()
    for role in ("embedder", "generator"):
        assert (role in paths) == ("sha256" in facts.get(role, {}))
        if role in paths:
            assert sha256(paths[role]) == facts[role]["sha256"]
    assert sum(path.stat().st_size for path in paths.values()) < 20 * 2**20


def test_embedder_is_what_demo_json_says(embedder):
    facts = demo_facts()["embedder"]
    assert embedder.preprocessing.input_size == facts["input_size"]
    assert embedder.dim == facts["embedding_dim"]


@pytest.mark.parametrize("mode", ["vis", "nir"])
def test_embedder_verifies_heldout_world_pairs_at_its_calibrated_threshold(embedder, heldout, mode):
    ids, vis, nir = heldout
    calibrated = demo_facts()["embedder"]["verification"][mode]
    scores, same = measure.verification(measure.embed(embedder, vis if mode == "vis" else nir), ids, PAIRS, seed=4)
    accuracy = accuracy_at(scores, same, calibrated["threshold"])
    # demo.json's figure is on 4,000 pairs of 200 identities; 600 pairs of 40 must come within 4 points
    assert accuracy >= calibrated["accuracy"] - 0.04, (accuracy, calibrated)
    assert accuracy >= 0.9


def test_generator_figures_in_demo_json_are_reproduced_from_the_shipped_files():
    """The generator's figures (identity match of its samples, NIR alignment, distinctness) recomputed
    from the shipped files on the probe demo.json records them for: a regression check of the model
    files and of the measuring code, whatever the figures are (docs/demo-models.md reads them)."""
    paths = demo_model_paths()
    if "generator" not in paths:
        pytest.skip("no demo generator shipped")
    facts = demo_facts()
    probe = facts["generator"]["probe"]
    generator = load_generator(paths["generator"])
    assert (generator.img_resolution, generator.c_dim) == (facts["generator"]["resolution"],
                                                            facts["embedder"]["embedding_dim"])
    measured = measure_models(paths["embedder"], paths["generator"], facts["heldout_worlds"]["world-test"],
                              identities=probe["identities"], samples=probe["samples"], detect=False)["generator"]
    one_sample = 1 / (probe["identities"] * probe["samples"])  # another CPU may sum in another order
    for key in ("identity_match_vis", "identity_match_nir"):
        assert measured[key]["rate"] == pytest.approx(probe[key]["rate"], abs=one_sample + 1e-9)
        assert measured[key]["mean_own_similarity"] == pytest.approx(probe[key]["mean_own_similarity"], abs=1e-3)
    assert measured["nir_alignment"]["mean_correlation"] == pytest.approx(
        probe["nir_alignment"]["mean_correlation"], abs=1e-3)
    for key in ("whole", "centre"):
        assert measured["sample_variation"][key] == pytest.approx(probe["sample_variation"][key], abs=0.05)
    # the samples of different identities are not one picture
    assert measured["other_condition_similarity"] < 0.99
