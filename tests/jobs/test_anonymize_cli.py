"""`facegen anonymize` over generated faces and W+ latents: certified shards, report, resume."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from facegen.engine.anonymise.faces import face_ws
from facegen.engine.anonymise.rank import RankJob, rank, ranks_bytes
from facegen.engine.dataset.reader import iter_dataset, read_manifest
from facegen.engine.seeding import Stream
from facegen.engine.storage import Storage
from facegen.jobs.cli import main
from facegen.models.checkpoint import save_native
from facegen.models.loading import load_embedder, load_generator
from facegen.models.rendering import open_latent_spaces
from tests.engine.tiny import make_index, real_population, tiny_embedder, tiny_generator


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("anon")
    generator, embedder = tiny_generator(), tiny_embedder()
    save_native(generator, folder / "G.safetensors")
    save_native(embedder.module, folder / "E.safetensors")
    make_index(str(folder / "index"), embedder, real_population(generator, embedder, 20))
    space, emb = open_latent_spaces(load_generator(folder / "G.safetensors")), load_embedder(folder / "E.safetensors")
    (folder / "ranks.parquet").write_bytes(ranks_bytes(rank(space, emb, RankJob(widths=(0,), pairs=2))))
    return folder, space, emb


def _args(folder: Path, out: Path, *extra: str) -> list[str]:
    return ["anonymize", "--generator", str(folder / "G.safetensors"), "--embedder", str(folder / "E.safetensors"),
            "--ranks", str(folder / "ranks.parquet"), "--unit-width", "0", "--out", str(out),
            "--samples-per-shard", "3", "--curve-pairs", "2", *extra]


def _audit_args(folder: Path, out: Path) -> list[str]:
    return ["audit", str(out), "--index", str(folder / "index"), "--embedder", str(folder / "E.safetensors"), "--json"]


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix in (".tar", ".parquet")}


@pytest.mark.slow
def test_generated_faces_are_swapped_certified_written_and_resumed(setup, tmp_path, capsys):
    folder, space, emb = setup
    out = tmp_path / "out"
    args = _args(folder, out, "--n", "3", "--count", "5", "--index", str(folder / "index"), "--threshold", "0.9")
    assert main(args) == 0
    manifest = read_manifest(Storage(str(out))).to_pandas()
    report = json.loads((out / "report.json").read_text())
    assert report["totals"]["sources"] == 5 and report["totals"]["written"] == len(manifest)
    assert (manifest.source_similarity <= 0.9).all() and (manifest.real_similarity <= 0.9).all()
    assert report["privacy"]["max_source_similarity"] == pytest.approx(manifest.source_similarity.max())
    assert report["privacy"]["certified"] == ["VIS", "NIR"] and report["totals"]["nir_written"] == len(manifest)
    assert set(report["tradeoff"]) >= {"n=0", "n=3"}
    assert (out / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"
    # The certified similarity is what an auditor computes from the written PNG and the source's render.
    samples = {s.key: s for s in iter_dataset(Storage(str(out)))}
    row = manifest.iloc[0]
    sample = samples[row.key]
    source_ws = face_ws(space, 0, Stream.SWAP_SOURCE, np.array([row.label]), 0, 0.7)
    with torch.no_grad():
        source_emb = emb.embed(space.render_w_plus(source_ws)[0])
    written = emb.embed(torch.from_numpy(sample.vis.copy()).permute(2, 0, 1)[None])
    assert float((written * source_emb).sum()) == pytest.approx(row.source_similarity, abs=1e-5)
    assert sample.nir is not None and sample.meta["target_try"] == row.target_try
    # Rerun: nothing recomputed, same bytes; a lost shard is rewritten identically.
    before = _digest(out)
    args = [*args, "--curve-pairs", "0"]  # the curve is not part of the dataset
    assert main(args) == 0
    assert json.loads((out / "report.json").read_text())["totals"]["shards_resumed"] == 2
    # `facegen audit` reads the plan and the threshold from anonymise.json: complete, clean, exit 0.
    audit = [*_audit_args(folder, out)]
    capsys.readouterr()
    assert main(audit) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["complete"] and summary["violations"] == 0 and summary["samples"] == len(manifest)
    assert summary["threshold"] == 0.9 and summary["threshold_source"] == "given, from anonymise.json"
    assert summary["max_similarity"] == pytest.approx(manifest.real_similarity.max(), abs=1e-5)
    (out / "done" / "000001.json").unlink()
    assert main(audit) == 3  # a shard lost: incomplete, and said which
    assert json.loads(capsys.readouterr().out)["missing"][0].startswith("1 of 2 planned shards are not complete")
    assert main(args) == 0
    assert _digest(out) == before
    # Other settings into the same folder are refused.
    assert main(_args(folder, out, "--n", "2", "--count", "5", "--index", str(folder / "index"),
                      "--threshold", "0.9")) == 2
    assert "other settings" in capsys.readouterr().err


def test_given_latents_and_targets_and_whole_layer_swaps(setup, tmp_path):
    folder, space, _ = setup
    sources = face_ws(space, 7, Stream.SWAP_SOURCE, np.arange(4), 0, 0.7).numpy()
    targets = face_ws(space, 7, Stream.SWAP_TARGET, np.arange(2), 0, 0.7).numpy()
    np.save(tmp_path / "src.npy", sources)
    np.save(tmp_path / "tgt.npy", targets)
    out = tmp_path / "out"
    assert main(_args(folder, out, "--latents", str(tmp_path / "src.npy"), "--targets", str(tmp_path / "tgt.npy"),
                      "--layers", "2,3", "--curve-pairs", "0")) == 0
    samples = list(iter_dataset(Storage(str(out))))
    assert [s.label for s in samples] == [0, 1, 2, 3]
    # Source 2 took layers 2-3 of target 0 (row 2 mod 2): the image is that code's render.
    expected = sources[2].copy()
    expected[2:4] = targets[0][2:4]
    with torch.no_grad():
        vis = space.render_w_plus(torch.from_numpy(expected)[None])[0]
    from facegen.models.generator import images_to_uint8

    assert np.array_equal(samples[2].vis, images_to_uint8(vis)[0].permute(1, 2, 0).numpy())
    assert not (out / "tradeoff.png").exists()


def test_bad_input_is_refused_with_exit_2(setup, tmp_path, capsys):
    folder, _, _ = setup
    out = tmp_path / "never"
    assert main(_args(folder, out, "--count", "2")) == 2  # neither --n nor --layers
    assert main(_args(folder, out, "--count", "2", "--n", "99")) == 2
    assert main(_args(folder, out, "--count", "2", "--n", "1", "--index", str(folder / "index"))) == 2
    np.save(tmp_path / "bad.npy", np.zeros((2, 3), np.float32))
    assert main(_args(folder, out, "--latents", str(tmp_path / "bad.npy"), "--n", "1")) == 2
    assert main(_args(folder, out, "--count", "2", "--layers", "1", "--space", "style")) == 2
    err = capsys.readouterr().err
    assert "must be in [0, 8]" in err and "needs --threshold" in err and "W+ codes" in err
    assert not out.exists()


def test_audit_plan_counts_shards_whose_every_source_was_dropped_as_complete(tmp_path):
    from facegen.engine.anonymise.run import audit_plan
    from facegen.engine.audit import completeness

    out = Storage(str(tmp_path))
    assert audit_plan(out) is None  # not an anonymisation
    out.write_json("anonymise.json", {"job": {"count": 5, "samples_per_shard": 3, "threshold": 0.4}})
    out.write_json("empty/000001.json", {"sources": 2, "written": 0})
    out.write_json("report.json", {})
    plan = audit_plan(out)
    assert plan == {"planned_shards": 2, "empty_shards": {1}, "threshold": 0.4, "threshold_calibration": None}
    markers = {0: {"shard_file": "shards/anonymised-000000.tar"}}
    assert completeness(out, plan["planned_shards"], markers, plan["empty_shards"]) == []
    assert completeness(out, plan["planned_shards"], markers)[0].startswith("1 of 2 planned shards")


def test_sources_that_never_pass_are_dropped_counted_by_reason_and_explained(setup, tmp_path, capsys):
    folder, _, _ = setup
    out = tmp_path / "out"
    # No output can be within -0.99 of anything: every source is dropped, for both reasons.
    assert main(_args(folder, out, "--n", "2", "--count", "4", "--max-tries", "2", "--curve-pairs", "0",
                      "--index", str(folder / "index"), "--threshold", "-0.99")) == 0
    totals = json.loads((out / "report.json").read_text())["totals"]
    assert (totals["sources"], totals["written"], totals["dropped"], totals["retried"]) == (4, 0, 4, 4)
    assert totals["dropped_near_source"] == totals["dropped_near_enrolled"] == 4
    assert totals["max_source_similarity"] is None and totals["max_real_similarity"] is None
    printed = capsys.readouterr()
    assert "anonymised 0 of 4 sources" in printed.out and "to source n/a, to anyone enrolled n/a" in printed.out
    assert ("4 sources had no output at or below the threshold after 2 tries (4 still too close to themselves, "
            "4 to someone enrolled)") in printed.err
    # Without an index nothing is compared with enrolled people: no figure, no such drops.
    plain = tmp_path / "plain"
    assert main(_args(folder, plain, "--n", "2", "--count", "2", "--curve-pairs", "0")) == 0
    totals = json.loads((plain / "report.json").read_text())["totals"]
    assert totals["written"] == 2 and totals["max_real_similarity"] is None and totals["dropped_near_enrolled"] == 0
    printed = capsys.readouterr()
    assert "enrolled" not in printed.out and "threshold n/a" in printed.out and printed.err.count("sources had") == 0


def test_threshold_auto_is_the_index_calibration_for_this_embedder(setup, tmp_path, capsys):
    folder, space, emb = setup
    index = tmp_path / "index"
    make_index(str(index), emb, real_population(load_generator(folder / "G.safetensors"), emb, 20))
    never = tmp_path / "never"
    # Refused before any work: no index to calibrate, or no calibration at that FMR (named flags).
    assert main(_args(folder, never, "--n", "2", "--count", "3", "--threshold", "auto")) == 2
    assert main(_args(folder, never, "--n", "2", "--count", "3", "--index", str(index), "--threshold", "auto")) == 2
    assert main(_args(folder, never, "--n", "2", "--count", "3", "--index", str(index), "--threshold", "auto",
                      "--fmr", "0")) == 2
    assert main(_args(folder, never, "--n", "2", "--count", "3", "--index", str(index), "--threshold", "0.5",
                      "--fmr", "0.1")) == 2
    err = capsys.readouterr().err
    assert err.count("--fmr chooses the calibration of --threshold auto") == 2
    assert "--threshold auto is the --index's calibrated threshold" in err
    assert "--threshold auto: the index" in err and "not calibrated at FMR 0.0001" in err and "calibrate" in err
    assert not never.exists()
    assert main(["index", "calibrate", str(index), "--fmr", "0.1"]) == 0  # 20 people: 190 impostor pairs
    calibrated = json.loads((index / "index.json").read_text())["thresholds"]
    expected = next(t["threshold"] for t in calibrated if t["fmr"] == 0.1)
    out = tmp_path / "out"
    assert main(_args(folder, out, "--n", "2", "--count", "3", "--index", str(index), "--threshold", "auto",
                      "--fmr", "0.1", "--curve-pairs", "0")) == 0
    printed = capsys.readouterr().out
    assert f"threshold: {expected:.6f}, the index's, calibrated at FMR 0.1 on 190 impostor pairs" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["privacy"]["threshold"] == expected
    assert report["privacy"]["threshold_source"] == "calibrated at FMR 0.1 on 190 impostor pairs"
    assert report["totals"]["written"] == 3 and report["privacy"]["violations"] == 0
    assert main(["audit", str(out), "--index", str(index), "--embedder", str(folder / "E.safetensors"), "--json"]) == 0
    audit = json.loads(capsys.readouterr().out)
    assert audit["threshold"] == expected and audit["violations"] == 0 and audit["samples"] == 3
    assert audit["threshold_source"] == "calibrated at FMR 0.1 on 190 impostor pairs, from anonymise.json"


def test_a_written_nir_twin_is_certified_like_its_vis_image(setup, tmp_path, capsys):
    from facegen.models.generator import images_to_uint8

    folder, space, emb = setup
    sources = face_ws(space, 7, Stream.SWAP_SOURCE, np.arange(3), 0, 0.7)
    targets = face_ws(space, 7, Stream.SWAP_TARGET, np.arange(3), 0, 0.7)
    np.save(tmp_path / "src.npy", sources.numpy())
    np.save(tmp_path / "tgt.npy", targets.numpy())
    swapped = sources.clone()
    swapped[:, 2:4] = targets[:, 2:4]
    with torch.no_grad():
        vis, nir = space.render_w_plus(swapped)
    # "Real people" whose photos are exactly the NIR twins the swaps will write; their VIS images are
    # not that close to anyone enrolled.
    nir_people = emb.embed(images_to_uint8(nir)).numpy()
    index = tmp_path / "index"
    make_index(str(index), emb, nir_people)
    assert (emb.embed(images_to_uint8(vis)).numpy() @ nir_people.T).max() < 0.99
    out = tmp_path / "out"
    args = _args(folder, out, "--latents", str(tmp_path / "src.npy"), "--targets", str(tmp_path / "tgt.npy"),
                 "--layers", "2,3", "--curve-pairs", "0", "--index", str(index), "--threshold", "0.99")
    assert main(args) == 0
    totals = json.loads((out / "report.json").read_text())["totals"]
    assert (totals["written"], totals["dropped"], totals["dropped_near_enrolled"]) == (0, 3, 3)
    assert "3 to someone enrolled" in capsys.readouterr().err
