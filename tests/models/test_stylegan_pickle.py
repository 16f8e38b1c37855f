"""StyleGAN2-ADA / ArcBiFaceGAN snapshot import: exact outputs, no code execution, refusals by name."""

from __future__ import annotations

import builtins
import io
import os
import pickle
import posix
import warnings

import pytest
import torch

from facegen.models.errors import UnsafeCheckpointError, UserError
from facegen.models.importers.stylegan_pickle import load_stylegan_pickle
from tests.models.stylegan_fixtures import (
    fake_upstream_modules,
    g_init_kwargs,
    payload,
    persistent_tree,
    tiny_discriminator,
    tiny_generator,
    write_snapshot,
)


def _g_out(G, seed: int = 5):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(3, G.z_dim, generator=gen)
    c = torch.randn(3, G.c_dim, generator=gen) if G.c_dim else None
    with torch.no_grad():
        return G(z, c, truncation_psi=0.7, noise_mode="const")


def _d_out(D, seed: int = 6):
    gen = torch.Generator().manual_seed(seed)
    img = torch.randn(4, D.img_channels, D.img_resolution, D.img_resolution, generator=gen)
    c = torch.randn(4, D.c_dim, generator=gen) if D.c_dim else None
    with torch.no_grad():
        return D(img, c)


@pytest.fixture
def snapshot(tmp_path):
    nets = {"G_ema": tiny_generator(0), "G": tiny_generator(1), "D": tiny_discriminator(2),
            "D_NIR": tiny_discriminator(3, c_dim=0, img_channels=1)}
    path = write_snapshot(tmp_path / "network-snapshot-000000.pkl", tmp_path / "executed", augment_p=0.25,
                          **nets)
    return path, nets, tmp_path / "executed"


def test_g_ema_loads_with_identical_outputs_and_module_src_never_runs(snapshot):
    path, nets, marker = snapshot
    assert b"module_src was executed" in path.read_bytes()  # the trap is really in the file
    G = load_stylegan_pickle(path)["G_ema"]
    assert G.config == nets["G_ema"].config
    vis, nir = _g_out(G)
    ref_vis, ref_nir = _g_out(nets["G_ema"])
    assert vis.shape == (3, 3, 16, 16) and nir.shape == (3, 1, 16, 16)
    assert torch.equal(vis, ref_vis) and torch.equal(nir, ref_nir)
    assert not marker.exists()


def test_training_state_all_four_networks_and_ada_p(snapshot):
    path, nets, marker = snapshot
    out = load_stylegan_pickle(path, what=("G", "D", "G_ema", "D_NIR"))
    for name in ("G", "G_ema"):
        assert all(torch.equal(a, b) for a, b in zip(_g_out(out[name]), _g_out(nets[name])))
    for name in ("D", "D_NIR"):
        assert out[name].config == nets[name].config
        assert torch.equal(_d_out(out[name]), _d_out(nets[name]))
    assert out["D_NIR"].config.c_dim == 0 and out["D_NIR"].config.img_channels == 1
    assert out["augment_p"] == 0.25
    assert out["training_set_kwargs"]["path"] == "/data/VIS"
    assert not marker.exists()


def test_without_nir_heads_gives_nir_channels_0(tmp_path):
    G0 = tiny_generator(4, nir_channels=0, c_dim=0)
    path = write_snapshot(tmp_path / "g.pkl", tmp_path / "executed", G_ema=G0, protocol=3)
    G = load_stylegan_pickle(path)["G_ema"]
    assert G.config.nir_channels == 0 and G.config.c_dim == 0
    vis, nir = _g_out(G)
    assert nir is None and torch.equal(vis, _g_out(G0)[0])


def test_positional_init_args_and_unprefixed_names(tmp_path):
    G0 = tiny_generator(5)
    cfg = G0.config
    with fake_upstream_modules() as (persistence, util):
        kw = g_init_kwargs(util.EasyDict, cfg)
        args = tuple(kw.pop(k) for k in ("z_dim", "c_dim", "w_dim", "img_resolution", "img_channels"))
        tree = persistent_tree(G0, "Generator", "", persistence._reconstruct_persistent_obj, kw,
                               init_key="init_kwargs", init_args=args)
        (tmp_path / "g.pkl").write_bytes(pickle.dumps({"G_ema": tree}))
    G = load_stylegan_pickle(tmp_path / "g.pkl")["G_ema"]
    assert G.config == cfg and torch.equal(_g_out(G)[0], _g_out(G0)[0])


@pytest.mark.parametrize("func,args,name", [
    (os.system, None, "posix.system"),
    (posix.system, None, "posix.system"),
    (builtins.eval, "__import__('os').system('touch {m}')", "builtins.eval"),
    (builtins.exec, "open('{m}', 'w').write('x')", "builtins.exec"),
])
def test_malicious_reduce_is_refused_by_name(tmp_path, func, args, name):
    marker = tmp_path / "pwned"
    args = (args or "touch {m}").format(m=marker)
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"G_ema": payload(func, args)}))
    with pytest.raises(UnsafeCheckpointError, match=f"'{name}'") as err:
        load_stylegan_pickle(path)
    assert str(path) in str(err.value)
    assert not marker.exists()


def test_protocol0_os_system_global_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(f"cos\nsystem\n(S'touch {marker}'\ntR.".encode())
    with pytest.raises(UnsafeCheckpointError, match="'os.system'"):
        load_stylegan_pickle(path)
    assert not marker.exists()


def test_payload_nested_inside_a_network_state_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    G0 = tiny_generator(0)
    path = write_snapshot(tmp_path / "evil.pkl", tmp_path / "executed", G_ema=G0,
                          extra={"training_set_kwargs": {"x": payload(os.system, f"touch {marker}")}})
    with pytest.raises(UnsafeCheckpointError, match="posix.system"):
        load_stylegan_pickle(path)
    assert not marker.exists()


def test_storage_bytes_with_a_malicious_inner_pickle_are_refused(tmp_path):
    """The bytes handed to torch.storage._load_from_bytes go through torch's weights-only loader."""
    marker = tmp_path / "pwned"
    inner = io.BytesIO()
    pickle.dump(payload(os.system, f"touch {marker}"), inner, protocol=2)
    evil_storage = payload(torch.storage._load_from_bytes, inner.getvalue())
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"G_ema": payload(torch._utils._rebuild_tensor_v2, evil_storage, 0, (1,),
                                                    (1,), False, None)}))
    with pytest.raises(UnsafeCheckpointError, match="posix.system"):
        load_stylegan_pickle(path)
    assert not marker.exists()


def test_tensor_view_past_its_storage_is_refused(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # TypedStorage deprecation
        storage = torch.arange(4.0).storage()
    path = tmp_path / "oob.pkl"
    path.write_bytes(pickle.dumps({"G_ema": payload(torch._utils._rebuild_tensor_v2, storage, 2, (10,), (1,),
                                                    False, None)}))
    with pytest.raises(UserError, match="runs past its storage"):
        load_stylegan_pickle(path)


def test_missing_entry_and_mis_shaped_tensor_are_named(tmp_path):
    G0 = tiny_generator(0)
    path = write_snapshot(tmp_path / "g.pkl", tmp_path / "executed", G_ema=G0)
    with pytest.raises(UserError, match=r"no \['D_NIR'\]"):
        load_stylegan_pickle(path, what=("D_NIR",))
    with torch.no_grad():
        G0.synthesis.b8.conv1.bias = torch.nn.Parameter(torch.zeros(5))
    bad = write_snapshot(tmp_path / "bad.pkl", tmp_path / "executed", G_ema=G0)
    with pytest.raises(UserError, match=r"synthesis\.b8\.conv1\.bias \[5\]"):
        load_stylegan_pickle(bad)


def test_unsupported_architecture_is_refused_by_key(tmp_path):
    G0 = tiny_generator(0)
    with fake_upstream_modules() as (persistence, util):
        kw = g_init_kwargs(util.EasyDict, G0.config)
        kw["synthesis_kwargs"]["architecture"] = "resnet"
        tree = persistent_tree(G0, "Generator", "", persistence._reconstruct_persistent_obj, kw)
        (tmp_path / "g.pkl").write_bytes(pickle.dumps({"G_ema": tree}))
    with pytest.raises(UserError, match="synthesis_kwargs.architecture='resnet'"):
        load_stylegan_pickle(tmp_path / "g.pkl")


def test_not_a_pickle_is_a_user_error(tmp_path):
    path = tmp_path / "junk.pkl"
    path.write_bytes(b"\x00\x01not a pickle")
    with pytest.raises(UserError, match="junk.pkl"):
        load_stylegan_pickle(path)


def test_cyclic_module_tree_is_a_user_error(tmp_path):
    G0 = tiny_generator(0)
    with fake_upstream_modules() as (persistence, util):
        tree = persistent_tree(G0, "Generator", "", persistence._reconstruct_persistent_obj,
                               g_init_kwargs(util.EasyDict, G0.config))
        modules = tree.meta["state"]["_modules"]
        # A sub-module whose own _modules is its parent's dict: the pickle memo turns this into a cycle.
        modules["mapping"].meta["state"]["_modules"] = modules
        (tmp_path / "cyc.pkl").write_bytes(pickle.dumps({"G_ema": tree}))
    with pytest.raises(UserError, match="nested too deeply"):
        load_stylegan_pickle(tmp_path / "cyc.pkl")
