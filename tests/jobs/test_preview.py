"""`facegen preview`: a VIS|NIR grid of a generator's samples, upstream generate.py's seeds."""

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from facegen.engine.sheets import GAP, grid_size
from facegen.jobs.cli import main
from facegen.models.checkpoint import save_native
from facegen.models.generator import images_to_uint8
from tests.models.stylegan_fixtures import tiny_generator, write_snapshot

R = 16  # TINY_G resolution


@pytest.fixture(scope="module")
def generators(tmp_path_factory):
    folder = tmp_path_factory.mktemp("preview")
    G = tiny_generator(0)
    native = save_native(G, folder / "G.safetensors")
    pkl = write_snapshot(folder / "network-snapshot-000010.pkl", folder / "executed", G_ema=G)
    return G, str(native), str(pkl)


def tile(grid: np.ndarray, row: int, column: int) -> tuple[np.ndarray, np.ndarray]:
    """(VIS, NIR) of the pair at (row, column)."""
    top, left = row * (R + GAP), column * (2 * R + GAP)
    pair = grid[top:top + R, left:left + 2 * R]
    return pair[:, :R], pair[:, R:, 0]


def expected(G, seed: int, condition: np.ndarray | None = None, psi: float = 1.0):
    rng = np.random.RandomState(seed)  # upstream generate.py: z = RandomState(seed).randn(1, z_dim)
    z = torch.from_numpy(rng.randn(1, G.z_dim).astype(np.float32))
    if condition is None:
        c = rng.randn(G.c_dim)
        condition = c * (4.0 / np.linalg.norm(c))
    with torch.no_grad():
        vis, nir = G(z, torch.from_numpy(condition.astype(np.float32))[None], truncation_psi=psi)
    return images_to_uint8(vis)[0].permute(1, 2, 0).numpy(), images_to_uint8(nir)[0, 0].numpy()


def test_grid_size_and_tiles_are_the_seeds_samples(generators, tmp_path, capsys):
    G, native, _ = generators
    out = tmp_path / "grid.png"
    assert main(["preview", native, "--seeds", "0-5", "--columns", "4", "--truncation", "0.7", "--out", str(out)]) == 0
    grid = np.asarray(Image.open(out))
    assert grid.shape == (*grid_size(6, 4, R), 3) == (2 * (R + GAP) - GAP, 4 * (2 * R + GAP) - GAP, 3)
    for index, seed in enumerate(range(6)):
        vis, nir = tile(grid, index // 4, index % 4)
        want_vis, want_nir = expected(G, seed, psi=0.7)
        assert np.array_equal(vis, want_vis) and np.array_equal(nir, want_nir)
    assert (grid[R:R + GAP] == 255).all()  # the gap between rows
    assert "6 VIS|NIR pairs" in capsys.readouterr().out


def test_rerun_and_pkl_give_the_same_bytes(generators, tmp_path):
    _, native, pkl = generators
    paths = [tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"]
    for source, path in zip((native, native, pkl), paths):
        assert main(["preview", source, "--seeds", "3,7,9-10", "--out", str(path)]) == 0
    digests = {hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}
    assert len(digests) == 1


def test_given_conditions_are_rows(generators, tmp_path):
    G, native, _ = generators
    conditions = np.random.default_rng(0).normal(size=(3, G.c_dim)).astype(np.float32)
    np.save(tmp_path / "c.npy", conditions)
    out = tmp_path / "rows.png"
    assert main(["preview", native, "--seeds", "0-1", "--condition", str(tmp_path / "c.npy"), "--out", str(out)]) == 0
    grid = np.asarray(Image.open(out))
    assert grid.shape[:2] == grid_size(6, 2, R)
    for row in range(3):
        scaled = conditions[row] * (4.0 / np.linalg.norm(conditions[row]))
        for column, seed in enumerate((0, 1)):
            vis, nir = tile(grid, row, column)
            want_vis, want_nir = expected(G, seed, scaled)
            assert np.array_equal(vis, want_vis) and np.array_equal(nir, want_nir)


@pytest.mark.parametrize("args, message", [
    (["--seeds", "a-b"], "--seeds: 'a-b' is not N or N-M"),
    (["--seeds", "5-2"], "--seeds: range 5-2 is empty"),
    (["--condition", "{tmp}/wrong.npy"], "c_dim is 8"),
    (["--condition", "{tmp}/missing.npy"], "missing.npy: not found"),
    (["--out", "{tmp}/nowhere/grid.png"], "does not exist"),
    (["--out", "{tmp}/grid.jpg"], "must end in .png"),
    (["--columns", "0"], "--columns: 0 must be at least 1"),
])
def test_bad_input_exits_2_and_writes_nothing(generators, tmp_path, capsys, args, message):
    np.save(tmp_path / "wrong.npy", np.ones((2, 5), np.float32))
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "grid.png")]
    assert main(["preview", generators[1], *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("error:") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wrong.npy"]


def test_missing_generator_exits_2(tmp_path, capsys):
    assert main(["preview", str(tmp_path / "G.pkl"), "--out", str(tmp_path / "g.png")]) == 2
    assert "file not found" in capsys.readouterr().err
