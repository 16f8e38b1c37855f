"""FRDataset and eval-fr pairs over a VIS/NIR image folder as `facegen world render` writes it: labels from
the identity prefix, exact epoch coverage over ranks x workers, modes, images equal to the files."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from facegen.engine.frdata import FRDataset, fr_loader
from facegen.engine.frdata.folder import IDENTITIES_PER_SHARD
from facegen.engine.frdata.pairs import dataset_pairs, load_images
from facegen.engine.storage import Storage
from facegen.engine.world.dataset import render_dataset
from facegen.jobs.cli import main
from facegen.models.checkpoint import save_native
from facegen.models.errors import UserError
from facegen.models.iresnet import IResNet, IResNetConfig

IDENTITIES, SAMPLES = 11, 3  # 11 identities: two virtual shards of 8 and 3


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("world") / "w"
    render_dataset(str(folder), IDENTITIES, SAMPLES, resolution=16, seed=5, progress=False)
    return str(folder)


def file_keys() -> list[str]:
    return [f"{i:05d}_{k:02d}" for i in range(IDENTITIES) for k in range(SAMPLES)]


def test_folder_is_cut_into_shards_of_whole_identities(world):
    ds = FRDataset(world, image_size=16)
    markers = ds.catalog.markers()
    assert IDENTITIES_PER_SHARD == 8
    assert [m["num_samples"] for m in markers.values()] == [8 * SAMPLES, 3 * SAMPLES]
    assert ds.num_classes == IDENTITIES and ds.num_samples() == IDENTITIES * SAMPLES
    assert FRDataset(world, mode="both", image_size=16).num_samples() == 2 * IDENTITIES * SAMPLES


@pytest.mark.parametrize("world_size,workers", [(1, 0), (1, 2), (2, 2), (3, 1)])  # up to 4 readers, 2 shards
def test_every_file_exactly_once_per_epoch_with_its_identity_label(world, world_size, workers):
    for epoch in (0, 1):
        seen = []
        for rank in range(world_size):
            ds = FRDataset(world, image_size=16, rank=rank, world_size=world_size, seed=3, shuffle_buffer=5,
                           with_keys=True)
            ds.set_epoch(epoch)
            for _, labels, keys in fr_loader(ds, batch_size=4, num_workers=workers):
                seen += [(key, int(label)) for key, label in zip(keys, labels)]
        assert sorted(seen) == [(key, int(key[:5])) for key in file_keys()]


def test_modes_yield_the_files_pixels(world):
    vis = {key: image for image, _, key in FRDataset(world, image_size=16, normalize=False, with_keys=True)}
    both = {key: image for image, _, key in FRDataset(world, mode="both", image_size=16, normalize=False,
                                                      with_keys=True)}
    assert sorted(vis) == file_keys()
    assert sorted(both) == sorted(file_keys() + [k + ":nir" for k in file_keys()])
    key = "00004_01"
    on_disk_vis = np.asarray(Image.open(f"{world}/VIS/{key}.png").convert("RGB")).transpose(2, 0, 1)
    on_disk_nir = np.asarray(Image.open(f"{world}/NIR/{key}.png").convert("RGB")).transpose(2, 0, 1)
    assert np.array_equal(vis[key].numpy(), on_disk_vis)
    assert np.array_equal(both[key].numpy(), on_disk_vis)
    assert np.array_equal(both[key + ":nir"].numpy(), on_disk_nir)


def test_a_folder_cannot_be_followed_and_vis_only_folders_refuse_nir(world, tmp_path):
    with pytest.raises(UserError, match="follow applies"):
        FRDataset(world, follow=True)
    Storage(str(tmp_path)).write_bytes("VIS/3_0.png", Storage(world).read_bytes("VIS/00003_00.png"))
    assert FRDataset(str(tmp_path), image_size=16).num_classes == 1
    with pytest.raises(UserError, match="needs NIR"):
        FRDataset(str(tmp_path), mode="nir")


@pytest.mark.parametrize("mode", ["vis", "nir"])
def test_pairs_from_a_folder_are_drawn_by_identity(world, mode):
    pairs = dataset_pairs(world, genuine=40, impostor=50, seed=1, mode=mode)
    assert len(pairs.issame) == 90 and int(pairs.issame.sum()) == 40
    names = np.array(pairs.images)
    assert all(name.startswith(mode.upper() + "/") for name in names)
    ident = np.array([int(name.split("/")[1][:5]) for name in names])
    same_id = ident[pairs.first] == ident[pairs.second]
    assert np.array_equal(same_id, pairs.issame)
    assert (names[pairs.first] != names[pairs.second]).all()
    images = load_images(pairs, [0], 16, Storage(world))
    with Image.open(io.BytesIO(Storage(world).read_bytes(names[0]))) as image:
        assert np.array_equal(images[0].numpy(), np.asarray(image.convert("RGB")).transpose(2, 0, 1))


def test_train_fr_trains_on_a_world_folder_in_vis_and_nir(world, tmp_path, capsys):
    code = main(["train-fr", "--data", world, "--outdir", str(tmp_path), "--executor", "local", "--steps", "2",
                 "--set", "data.mode=both", "--set", "data.image_size=16", "--set", "model.depth=18",
                 "--set", "model.base_width=8", "--set", "model.embedding_dim=16", "--set", "optim.batch_size=8",
                 "--set", "data.loader_workers=0"])
    assert code == 0
    run = next(tmp_path.iterdir())
    result = json.loads((run / "result.json").read_text())
    assert result["num_classes"] == IDENTITIES and result["step"] == 2
    assert result["probe"]["keys"] == file_keys()[:8] and result["probe"]["shard"] == "VIS"
    stats = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    assert stats[-1]["shards_complete"] == 2 and stats[-1]["read_while_generating"] == 0


def test_eval_fr_on_a_world_folder_with_a_threshold_chosen_elsewhere(world, tmp_path, capsys):
    model = tmp_path / "e.safetensors"
    save_native(IResNet(IResNetConfig(depth=18, embedding_dim=8, input_size=16, base_width=8)), model)

    def evaluate(threshold: float) -> dict:
        out = tmp_path / f"eval{threshold}"
        assert main(["eval-fr", "--model", str(model), "--dataset", world, "--genuine", "30", "--impostor", "20",
                     "--mode", "nir", "--threshold", repr(threshold), "--out", str(out)]) == 0
        return json.loads((out / "metrics.json").read_text())

    accept_all = evaluate(-1.5)
    assert (accept_all["pairs"], accept_all["genuine"]) == (50, 30)
    assert accept_all["at_threshold"] == {"threshold": -1.5, "accuracy": 30 / 50, "far": 1.0, "frr": 0.0}
    best = evaluate(accept_all["best_threshold"])  # the same pairs (same seed): the best is at least as good
    assert best["at_threshold"]["accuracy"] >= 30 / 50
    assert "at threshold" in capsys.readouterr().out
