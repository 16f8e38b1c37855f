"""`facegen anonymize --images`: project, swap, blend, certify against the index; audit agrees; resume."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from facegen.engine.anonymise.faces import face_ws
from facegen.engine.anonymise.photos import PhotoSettings, ellipse_mask, list_photos, load_photos
from facegen.engine.anonymise.rank import RankJob, rank, ranks_bytes
from facegen.engine.dataset.reader import iter_dataset, read_manifest
from facegen.engine.seeding import Stream
from facegen.engine.storage import Storage
from facegen.jobs.cli import main
from facegen.models.checkpoint import save_native
from facegen.models.generator import images_to_uint8
from facegen.models.rendering import open_latent_spaces
from tests.engine.tiny import make_index, real_population, tiny_embedder, tiny_generator

THRESHOLD = 0.99


@pytest.fixture(scope="module")
def photos_job(tmp_path_factory):
    from skimage import data

    folder = tmp_path_factory.mktemp("photos")
    generator, embedder = tiny_generator(), tiny_embedder()
    save_native(generator, folder / "G.safetensors")
    save_native(embedder.module, folder / "E.safetensors")
    space = open_latent_spaces(generator)
    (folder / "ranks.parquet").write_bytes(ranks_bytes(rank(space, embedder, RankJob(widths=(0,), pairs=1))))
    photos = folder / "photos"
    photos.mkdir()
    Image.fromarray(data.astronaut()).save(photos / "astronaut.png")  # a real portrait, 512²
    with torch.no_grad():
        faces = images_to_uint8(space.render_w_plus(face_ws(space, 11, Stream.SWAP_SOURCE, np.arange(3)))[0])
    for i, face in enumerate(faces):
        Image.fromarray(face.permute(1, 2, 0).numpy()).save(photos / f"face{i}.png")
    # The index enrols the people in the photos (their photo embeddings) among stand-ins.
    people = embedder.embed(load_photos(list_photos(photos), space.resolution)).numpy()
    make_index(str(folder / "index"), embedder, np.concatenate([people, real_population(generator, embedder, 8)]))
    return folder


def _argv(folder, out, *extra):
    return ["anonymize", "--generator", str(folder / "G.safetensors"), "--embedder", str(folder / "E.safetensors"),
            "--ranks", str(folder / "ranks.parquet"), "--unit-width", "0", "--n", "3", "--images",
            str(folder / "photos"), "--index", str(folder / "index"), "--threshold", str(THRESHOLD),
            "--steps", "8", "--learning-rate", "0.1", "--samples-per-shard", "2", "--curve-pairs", "0",
            "--out", str(out), *extra]


@pytest.mark.slow
def test_photos_are_projected_swapped_blended_and_certified(photos_job, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_argv(photos_job, out, "--blend")) == 0
    assert "projection: mean PSNR" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    manifest = read_manifest(Storage(str(out))).to_pandas()
    assert report["totals"]["sources"] == 4 and report["totals"]["written"] == len(manifest) > 0
    assert (manifest.source_similarity <= THRESHOLD).all() and (manifest.real_similarity <= THRESHOLD).all()
    assert np.isfinite(manifest.projection_psnr).all()
    assert report["projection"]["mean_psnr_db"] == pytest.approx(manifest.projection_psnr.mean())
    # An independent audit of the written images against the index agrees, at the threshold the
    # anonymisation certified (from its anonymise.json), and finds the dataset complete.
    capsys.readouterr()
    code = main(["audit", str(out), "--index", str(photos_job / "index"), "--embedder",
                 str(photos_job / "E.safetensors"), "--json"])
    audit = json.loads(capsys.readouterr().out)
    assert code == 0 and audit["violations"] == 0 and audit["samples"] == len(manifest)
    assert audit["threshold"] == THRESHOLD and audit["threshold_source"] == "given, from anonymise.json"
    assert audit["complete"] is True and audit["missing"] == []
    assert audit["max_similarity"] == pytest.approx(manifest.real_similarity.max(), abs=1e-5)
    # Outside the face ellipse every pixel is the photo's own.
    paths = list_photos(photos_job / "photos")
    originals = load_photos(paths, 32)
    outside = (ellipse_mask(32, PhotoSettings()) == 0)[0, 0].numpy()
    for sample in iter_dataset(Storage(str(out))):
        index = [p.name for p in paths].index(sample.meta["source"]["file"])
        original = originals[index].permute(1, 2, 0).numpy()
        assert np.array_equal(sample.vis[outside], original[outside])
        assert not np.array_equal(sample.vis, original)
    # Resume: nothing recomputed, same bytes.
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (out / "shards").iterdir()}
    assert main(_argv(photos_job, out, "--blend")) == 0
    assert json.loads((out / "report.json").read_text())["totals"]["shards_resumed"] == 2
    assert before == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (out / "shards").iterdir()}


def test_photos_need_an_index_and_a_threshold(photos_job, tmp_path, capsys):
    argv = ["anonymize", "--generator", str(photos_job / "G.safetensors"), "--embedder",
            str(photos_job / "E.safetensors"), "--layers", "1", "--images", str(photos_job / "photos"),
            "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    assert "must be certified" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_blend_through_a_user_segmentation_onnx(photos_job, tmp_path, capsys):
    """A real (tiny) segmentation network exported to ONNX decides the blend: the photo's right half, which
    the model calls background, keeps its exact pixels, although the default ellipse covers part of it."""
    from tests.engine.segmentation import export_parser

    parser = export_parser(tmp_path / "parser.onnx", 16)
    out = tmp_path / "out"
    assert main(_argv(photos_job, out, "--blend", "--mask-onnx", parser, "--mask-classes", "1")) == 0
    settings = json.loads((out / "anonymise.json").read_text())
    assert settings["mask_onnx"]["classes"] == [1] and len(settings["mask_onnx"]["sha256"]) == 64
    paths = list_photos(photos_job / "photos")
    originals = load_photos(paths, 32)
    inside_ellipse = (ellipse_mask(32, PhotoSettings()) > 0)[0, 0].numpy()
    assert inside_ellipse[:, 17:].any()  # the ellipse would have changed pixels there
    samples = list(iter_dataset(Storage(str(out))))
    assert samples
    for sample in samples:
        original = originals[[p.name for p in paths].index(sample.meta["source"]["file"])].permute(1, 2, 0).numpy()
        assert np.array_equal(sample.vis[:, 17:], original[:, 17:])
        assert not np.array_equal(sample.vis[:, :15], original[:, :15])
    # Refusals: one message, exit 2, nothing written.
    for extra, message in ((["--mask-onnx", parser], "outputs 3 classes; name the face classes"),
                           (["--mask-onnx", parser, "--mask-classes", "1"], "--mask-onnx is the face mask of "
                                                                           "--images --blend")):
        never = tmp_path / "never"
        args = extra if "--mask-classes" in extra else ["--blend", *extra]
        capsys.readouterr()
        assert main(_argv(photos_job, never, *args)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert not never.exists()
