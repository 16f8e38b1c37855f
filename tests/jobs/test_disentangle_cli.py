"""`facegen disentangle rank|export|import` on model files."""

from __future__ import annotations

import numpy as np
import pytest

from facegen.engine.anonymise.metric import Metric
from facegen.engine.anonymise.rank import RankJob, rank, read_ranks, top_units
from facegen.jobs.cli import main
from facegen.models.checkpoint import save_native
from facegen.models.loading import load_embedder, load_generator
from facegen.models.rendering import open_latent_spaces
from tests.engine.tiny import tiny_embedder, tiny_generator


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    save_native(tiny_generator(), folder / "G.safetensors")
    save_native(tiny_embedder().module, folder / "E.safetensors")
    return str(folder / "G.safetensors"), str(folder / "E.safetensors")


def test_rank_writes_the_engines_table_and_round_trips_styleid_arrays(models, tmp_path, capsys):
    generator, embedder = models
    out = str(tmp_path / "ranks.parquet")
    args = ["disentangle", "rank", "--generator", generator, "--embedder", embedder, "--out", out,
            "--space", "wplus,style", "--widths", "layer", "--pairs", "2", "--pairs-per-task", "1"]
    assert main(args) == 0
    assert "wplus width layer: top 5" in capsys.readouterr().out
    table = read_ranks(open(out, "rb").read())
    space, emb = open_latent_spaces(load_generator(generator)), load_embedder(embedder)
    job = RankJob(spaces=("wplus", "style"), widths=(0,), pairs=2, pairs_per_task=1, metric=Metric())
    assert table.equals(rank(space, emb, job))

    npy = str(tmp_path / "layer_rank.npy")
    assert main(["disentangle", "export", out, "--generator", generator, "--width", "0", "--out", npy]) == 0
    grid = np.load(npy)
    assert grid.shape == (space.num_ws, 1) and grid.dtype == np.float32
    back = str(tmp_path / "back.parquet")
    assert main(["disentangle", "import", npy, "--generator", generator, "--width", "0", "--out", back]) == 0
    np.testing.assert_array_equal(top_units(read_ranks(open(back, "rb").read()), "wplus", 0, 6),
                                  top_units(table, "wplus", 0, 6))


def test_bad_input_is_one_message_and_exit_2(models, tmp_path, capsys):
    generator, embedder = models
    base = ["disentangle", "rank", "--generator", generator, "--embedder", embedder]
    assert main([*base, "--out", str(tmp_path / "r.parquet"), "--space", "z"]) == 2
    assert "spaces must be among" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "r.parquet"), "--appearance-cap", "0"]) == 2
    assert "appearance_cap must be in (0, 1], got 0.0" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "r.csv")]) == 2
    assert main(["disentangle", "export", str(tmp_path / "missing.parquet"), "--generator", generator,
                 "--out", str(tmp_path / "x.npy")]) == 2
    pickled = tmp_path / "pickled.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert main(["disentangle", "import", str(pickled), "--generator", generator, "--out",
                 str(tmp_path / "y.parquet")]) == 2
    assert "not a plain .npy array" in capsys.readouterr().err
    assert not (tmp_path / "r.parquet").exists() and not (tmp_path / "y.parquet").exists()
