"""Ray hands actors numpy arrays straight from its object store, read-only; the engine must take them
without torch's "NumPy array is not writable" warning (and without writing into them)."""

import dataclasses
import warnings

import numpy as np

from facegen.engine.expand import expand_shard
from facegen.engine.phases import Identities, Selection, propose
from tests.engine.tiny import make_index, real_population, tiny_bundle, tiny_embedder, tiny_generator, tiny_spec


def read_only(identities: Identities) -> Identities:
    arrays = {}
    for field in dataclasses.fields(identities):
        if field.name == "anchor_search":  # not data: where the anchors are searched
            continue
        value = np.array(getattr(identities, field.name))
        value.setflags(write=False)
        arrays[field.name] = value
    return Identities(**arrays)


def test_expand_takes_read_only_identities_without_warnings(tmp_path):
    generator, embedder = tiny_generator(), tiny_embedder()
    index = make_index(str(tmp_path / "idx"), embedder, real_population(generator, embedder, 20))
    bundle = tiny_bundle(tiny_spec(str(tmp_path / "out")), index, generator, embedder)
    selection = Selection(wanted=2, threshold=bundle.spec.privacy.separability)
    selection.offer(propose(bundle, np.arange(24)))
    identities = Identities.from_selection(selection)
    reference = expand_shard(bundle, identities, np.arange(len(identities)))
    frozen = read_only(identities)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        shard = expand_shard(bundle, frozen, np.arange(len(frozen)))
    assert np.array_equal(shard.vis, reference.vis) and shard.metas == reference.metas
