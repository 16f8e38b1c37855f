"""FRDataset: exact epoch coverage over ranks x workers (more workers than shards too), modes, labels,
transform, seeded order, identity mixing."""

from __future__ import annotations

import collections

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from facegen.engine.frdata import FRDataset, fr_loader, identity_counts, shares_for
from facegen.engine.frdata.split import epoch_order
from facegen.models.errors import UserError
from tests.frdata.shards_tiny import identity_images, write_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    # 3 shards x 4 identities x 5 samples = 60 samples; labels 0, 3, 6, ... (gaps on purpose)
    folder = tmp_path_factory.mktemp("fr")
    write_dataset(folder, num_shards=3, ids_per_shard=4, samples_per_id=5, label_step=3)
    return str(folder)


def manifest_keys(folder: str) -> list[str]:
    return sorted(pq.read_table(f"{folder}/manifest")["key"].to_pylist())


@pytest.mark.parametrize("parties,shards", [(1, 3), (2, 3), (3, 3), (4, 3), (7, 3), (8, 2), (5, 1)])
def test_shares_cover_every_row_exactly_once(parties, shards):
    rows = 10
    order = epoch_order(list(range(shards)), seed=1, epoch=2)
    seen = collections.Counter()
    for party in range(parties):
        for share in shares_for(party, parties, order):
            seen.update((share.shard_id, int(r)) for r in share.select(rows))
    assert seen == collections.Counter({(s, r): 1 for s in range(shards) for r in range(rows)})


# 3 shards; up to 6 readers (more loader workers than this machine's cores, on purpose: torch warns)
@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")
@pytest.mark.parametrize("world,workers", [(1, 0), (1, 2), (2, 3), (3, 2)])
def test_every_sample_exactly_once_per_epoch_across_ranks_and_workers(dataset, world, workers):
    for epoch in (0, 1):
        keys = []
        for rank in range(world):
            ds = FRDataset(dataset, image_size=16, rank=rank, world_size=world, seed=7, shuffle_buffer=8,
                           open_shards=2, with_keys=True)
            ds.set_epoch(epoch)
            for _, _, batch_keys in fr_loader(ds, batch_size=4, num_workers=workers):
                keys += list(batch_keys)
        assert len(keys) == 60
        assert sorted(keys) == manifest_keys(dataset)


def test_labels_are_contiguous_and_match_the_shards(dataset):
    ds = FRDataset(dataset, image_size=16, with_keys=True)
    assert ds.num_classes == 12 and ds.labels().tolist() == list(range(0, 36, 3))
    pairs = {key: int(label) for _, label, key in ds}
    assert {key: label * 3 for key, label in pairs.items()} == {k: int(k[:8]) for k in pairs}
    assert set(pairs.values()) == set(range(12))


def test_transform_is_insightface_normalisation_of_the_stored_pixels(tmp_path):
    write_dataset(tmp_path, num_shards=1, ids_per_shard=2, samples_per_id=2, size=16)
    expected_vis, expected_nir = identity_images(np.repeat(np.arange(2), 2), 16, seed=0)
    ds = FRDataset(str(tmp_path), image_size=16, shuffle=False, mode="pair", with_keys=True)
    for vis, nir, label, key in ds:
        i = int(key[:8]) * 2 + int(key[-3:])
        assert torch.equal(vis, (torch.from_numpy(expected_vis[i]).permute(2, 0, 1).float() / 255 - 0.5) / 0.5)
        assert torch.equal(nir, (torch.from_numpy(expected_nir[i]).float() / 255 - 0.5).div(0.5).expand(3, -1, -1))
        assert label == int(key[:8])
    raw = next(iter(FRDataset(str(tmp_path), image_size=16, shuffle=False, normalize=False)))[0]
    assert raw.dtype == torch.uint8 and torch.equal(raw, torch.from_numpy(expected_vis[0]).permute(2, 0, 1))
    flipped = next(iter(FRDataset(str(tmp_path), image_size=16, shuffle=False, normalize=False, flip=True)))[0]
    assert torch.equal(flipped, raw.flip(2)) or torch.equal(flipped, raw)
    resized = next(iter(FRDataset(str(tmp_path), shuffle=False)))[0]
    assert resized.shape == (3, 112, 112) and -1 <= resized.min() and resized.max() <= 1


def test_modes_both_and_nir(dataset):
    both = [key for _, _, key in FRDataset(dataset, image_size=8, mode="both", with_keys=True)]
    assert len(both) == 120 and sorted(k for k in both if not k.endswith(":nir")) == manifest_keys(dataset)
    assert FRDataset(dataset, mode="both").num_samples() == 120
    nir = next(iter(FRDataset(dataset, image_size=8, mode="nir")))[0]
    assert torch.equal(nir[0], nir[1]) and torch.equal(nir[1], nir[2])


def test_seeded_order_repeats_and_differs_between_epochs(dataset):
    def order(epoch, seed=3):
        ds = FRDataset(dataset, image_size=8, seed=seed, with_keys=True)
        ds.set_epoch(epoch)
        return [key for _, _, key in ds]

    assert order(0) == order(0)
    assert order(0) != order(1) and sorted(order(0)) == sorted(order(1))
    assert order(0) != order(0, seed=4)


def test_identity_mixing_reported_per_batch(tmp_path):
    # 8 identity-sorted shards of 4 identities x 8 samples: a batch of 32 read in order holds 4 identities
    write_dataset(tmp_path, num_shards=8, ids_per_shard=4, samples_per_id=8, size=8)
    plain = FRDataset(str(tmp_path), image_size=8, shuffle=False, open_shards=1)
    mixed = FRDataset(str(tmp_path), image_size=8, open_shards=4, shuffle_buffer=128, seed=0)
    plain_counts = identity_counts(labels for _, labels in fr_loader(plain, 32, num_workers=0))
    mixed_counts = identity_counts(labels for _, labels in fr_loader(mixed, 32, num_workers=0))
    print(f"identities per batch of 32: in order {plain_counts.tolist()}, mixed {mixed_counts.tolist()}")
    assert plain_counts.tolist() == [4] * 8
    assert mixed_counts.mean() >= 12  # at least 3x the identities of an in-order batch


def test_bad_input_is_one_clear_error(tmp_path, dataset):
    with pytest.raises(UserError, match="no complete shards"):
        FRDataset(str(tmp_path))
    with pytest.raises(UserError, match="mode"):
        FRDataset(dataset, mode="ir")
    write_dataset(tmp_path / "visonly", num_shards=1, ids_per_shard=1, samples_per_id=2, nir=False)
    with pytest.raises(UserError, match="needs NIR"):
        FRDataset(str(tmp_path / "visonly"), mode="pair")
