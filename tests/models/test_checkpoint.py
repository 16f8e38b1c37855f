"""Native safetensors checkpoints: exact round trips per family, and every refusal names file and keys."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from facegen.models.checkpoint import (
    FAMILIES,
    FORMAT_VERSION,
    family_of,
    fingerprint_file,
    fingerprint_module,
    load_native,
    read_native_header,
    save_native,
)
from facegen.models.errors import UserError
from facegen.models.iresnet import IResNet, IResNetConfig
from tests.models.stylegan_fixtures import randomize, tiny_discriminator, tiny_generator


def _tiny_iresnet() -> IResNet:
    torch.manual_seed(0)
    return randomize(IResNet(IResNetConfig(depth=18, embedding_dim=32, input_size=32, base_width=8)), 7)


def _outputs(module: torch.nn.Module) -> tuple:
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        if family_of(module) == "arcbiface":
            z, c = torch.randn(2, module.z_dim, generator=gen), torch.randn(2, module.c_dim, generator=gen)
            return module(z, c, truncation_psi=0.5, noise_mode="const")
        if family_of(module) == "discriminator":
            img = torch.randn(2, 3, 16, 16, generator=gen)
            return (module(img, torch.randn(2, module.c_dim, generator=gen)),)
        return (module(torch.randn(2, 3, 32, 32, generator=gen)),)


@pytest.mark.parametrize("make", [tiny_generator, tiny_discriminator, _tiny_iresnet])
def test_round_trip_is_exact(tmp_path, make):
    module = make()
    family = family_of(module)
    path = save_native(module, tmp_path / "sub" / "m.safetensors")
    assert [p.name for p in path.parent.iterdir()] == ["m.safetensors"]  # no temporary left behind
    header = read_native_header(path)
    assert header == {"format": FORMAT_VERSION, "family": family, "config": module.config.to_dict()}
    loaded = load_native(path)
    assert type(loaded) is FAMILIES[family][1] and loaded.config == module.config
    assert not loaded.training
    for a, b in zip(_outputs(loaded), _outputs(module)):
        assert torch.equal(a, b)
    saved = load_file(str(path))
    assert set(saved) == set(module.state_dict())


def test_equal_modules_give_byte_identical_files_and_equal_fingerprints(tmp_path):
    a = save_native(tiny_generator(0), tmp_path / "a.safetensors")
    b = save_native(tiny_generator(0), tmp_path / "b.safetensors")
    c = save_native(tiny_generator(1), tmp_path / "c.safetensors")
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    assert fingerprint_file(a) == fingerprint_file(b) == fingerprint_module(tiny_generator(0))
    assert fingerprint_file(a) != fingerprint_file(c)
    assert fingerprint_file(a).startswith("sha256:") and len(fingerprint_file(a)) == 7 + 64
    other_config = tiny_generator(0, conv_clamp=128)  # same tensors, different config
    assert fingerprint_module(other_config) != fingerprint_file(a)


def _write(path, tensors, **metadata):
    save_file(tensors, str(path), metadata={k: str(v) for k, v in metadata.items()})
    return path


def _good(tmp_path):
    G = tiny_generator(0)
    return G, {k: v.contiguous() for k, v in G.state_dict().items()}, json.dumps(G.config.to_dict())


def test_unknown_family_and_newer_format_are_refused(tmp_path):
    _, tensors, config = _good(tmp_path)
    bad = _write(tmp_path / "x.safetensors", tensors, facegen_format=1, family="os.system", config=config)
    with pytest.raises(UserError, match=r"x\.safetensors: unknown model family 'os\.system'"):
        load_native(bad)
    newer = _write(tmp_path / "n.safetensors", tensors, facegen_format=2, family="arcbiface", config=config)
    with pytest.raises(UserError, match="format 2 is newer"):
        read_native_header(newer)
    bare = _write(tmp_path / "b.safetensors", tensors)
    with pytest.raises(UserError, match="without facegen metadata"):
        load_native(bare)


def test_missing_unexpected_and_mis_shaped_tensors_are_named(tmp_path):
    _, tensors, config = _good(tmp_path)
    meta = dict(facegen_format=1, family="arcbiface", config=config)
    missing = dict(tensors)
    del missing["mapping.w_avg"]
    with pytest.raises(UserError, match=r"m\.safetensors: missing tensors mapping\.w_avg"):
        load_native(_write(tmp_path / "m.safetensors", missing, **meta))
    extra = {**tensors, "mapping.fc9.weight": torch.zeros(2)}
    with pytest.raises(UserError, match=r"unexpected tensors mapping\.fc9\.weight"):
        load_native(_write(tmp_path / "u.safetensors", extra, **meta))
    shaped = {**tensors, "synthesis.b4.const": torch.zeros(16, 5, 5)}
    expected = r"mis-shaped tensors synthesis\.b4\.const \[16, 5, 5\] \(expected \[16, 4, 4\]\)"
    with pytest.raises(UserError, match=expected):
        load_native(_write(tmp_path / "s.safetensors", shaped, **meta))


def test_bad_config_and_not_safetensors(tmp_path):
    _, tensors, _ = _good(tmp_path)
    bad_cfg = _write(tmp_path / "c.safetensors", tensors, facegen_format=1, family="arcbiface",
                     config=json.dumps({"z_dim": 16, "bogus": 1}))
    with pytest.raises(UserError, match=r"c\.safetensors: generator: unknown keys \['bogus'\]"):
        load_native(bad_cfg)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(UserError, match="junk.safetensors: not a safetensors file"):
        load_native(junk)
    with pytest.raises(UserError, match="file not found"):
        load_native(tmp_path / "absent.safetensors")


def test_save_refuses_unregistered_modules(tmp_path):
    with pytest.raises(UserError, match="Linear: not a registered model family"):
        save_native(torch.nn.Linear(2, 2), tmp_path / "l.safetensors")
    with pytest.raises(UserError, match="family 'iresnet'"):
        save_native(tiny_generator(0), tmp_path / "g.safetensors", family="iresnet")


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = save_native(tiny_generator(0), tmp_path / "g.safetensors")
    before = path.read_bytes()

    def broken_save(*args, **kwargs):
        open(args[1], "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("facegen.models.checkpoint.save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_native(tiny_generator(1), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["g.safetensors"]


# ----------------------------------------------------------------------------- format detection


def test_formats_are_detected_from_content_not_names(tmp_path):
    from facegen.models.loading import detect_format, load_generator
    from tests.models.stylegan_fixtures import write_snapshot
    from tests.models.test_rosinality import make_rosinality_state

    G0 = tiny_generator(0)
    pkl = write_snapshot(tmp_path / "snapshot.bin", tmp_path / "executed", G_ema=G0)  # no .pkl suffix
    native = save_native(G0, tmp_path / "model.pt")  # misleading suffix
    legacy = tmp_path / "old.pth"
    torch.save({"g_ema": make_rosinality_state(0)}, legacy, _use_new_zipfile_serialization=False)
    iresnet = tmp_path / "backbone.bin"
    torch.save(_tiny_iresnet().state_dict(), iresnet)
    assert [detect_format(p) for p in (pkl, native, legacy, iresnet)] == [
        "stylegan_pickle", "native", "rosinality", "insightface"]
    ref = _outputs(G0)
    for path in (pkl, native):
        assert all(torch.equal(a, b) for a, b in zip(_outputs(load_generator(path)), ref))
    assert load_generator(legacy).config.img_resolution == 32
    with pytest.raises(UserError, match="holds a 'iresnet' model, not a generator"):
        load_generator(iresnet)
    junk = tmp_path / "notes.txt"
    junk.write_text("hello")
    with pytest.raises(UserError, match="notes.txt: unrecognised checkpoint format"):
        detect_format(junk)
