"""export (RecordIO read back by an independent reader written here from the format's description,
image folders), eval-fr (LFW pairs.txt over a folder, pairs from shards) and eval-data, end to end."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from facegen.engine.dataset.reader import iter_dataset
from facegen.engine.evaluation import kfold_accuracy
from facegen.engine.frtrain.checkpoint import save_backbone
from facegen.engine.storage import Storage
from facegen.jobs.cli import main
from facegen.models.iresnet import IResNet, IResNetConfig
from facegen.models.loading import load_embedder
from tests.frdata.shards_tiny import write_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ds")
    write_dataset(folder, num_shards=2, ids_per_shard=3, samples_per_id=4, size=32)  # 6 identities x 4
    return str(folder)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "backbone.pth"
    save_backbone(IResNet(IResNetConfig(depth=18, embedding_dim=16, input_size=32, base_width=8)).eval(), path)
    return str(path)


def read_recordio(folder: str) -> dict:
    """An independent reader, from the public description of dmlc RecordIO and mxnet.recordio.pack:
    magic 0xced7230a, uint32 length (low 29 bits) and flag (high 3), payload padded to 4 bytes;
    payload = IRHeader struct 'IfQQ' (flag, label, id, id2) [+ flag float32 labels] + image bytes."""
    data = open(os.path.join(folder, "train.rec"), "rb").read()
    records, position = [], 0
    while position < len(data):
        magic, lrecord = struct.unpack_from("<II", data, position)
        assert magic == 0xCED7230A and lrecord >> 29 == 0
        length = lrecord & ((1 << 29) - 1)
        payload = data[position + 8:position + 8 + length]
        records.append((position, payload))
        position += 8 + length + (-length % 4)
    assert position == len(data)
    offsets = dict(tuple(int(v) for v in line.split("\t")) for line in open(os.path.join(folder, "train.idx")))
    by_index = {}
    for index, offset in offsets.items():
        payload = dict(records)[offset]
        flag, label, rid, _ = struct.unpack_from("<IfQQ", payload)
        rest = payload[24:]
        if flag > 0:
            label = struct.unpack_from(f"<{flag}f", rest)
            rest = rest[4 * flag:]
        assert rid == index
        by_index[index] = (label, rest)
    return {"records": by_index, "count": len(records),
            "property": open(os.path.join(folder, "property")).read().strip()}


def test_export_insightface_recordio_round_trip(dataset, tmp_path):
    out = str(tmp_path / "rec")
    assert main(["export", dataset, "--to", "insightface", out, "--image-size", "32", "--format", "png"]) == 0
    rec = read_recordio(out)
    records = rec["records"]
    # insightface's MXFaceDataset: header0 = record 0's labels; images are records 1 .. header0[0]-1
    images_end, ids_end = (int(v) for v in records[0][0])
    assert (images_end, ids_end) == (25, 31) and rec["count"] == 31 and rec["property"] == "6,32,32"
    expected = list(iter_dataset(Storage(dataset)))
    for index, sample in zip(range(1, images_end), expected):
        label, image = records[index]
        assert label == sample.label
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(image))), sample.vis)
    # identity records: (first image, one past the last) of each identity, in label order
    assert [records[i][0] for i in range(images_end, ids_end)] == [(1 + 4 * k, 5 + 4 * k) for k in range(6)]


def test_export_folder_and_refusals(dataset, tmp_path, capsys):
    out = tmp_path / "folder"
    assert main(["export", dataset, "--to", "folder", str(out), "--image-size", "0"]) == 0
    assert sorted(os.listdir(out)) == [f"{k:08d}" for k in range(6)]
    assert sorted(os.listdir(out / "00000002")) == ["000.png", "001.png", "002.png", "003.png"]
    sample = next(s for s in iter_dataset(Storage(dataset)) if s.key == "00000002_001")
    assert np.array_equal(np.asarray(Image.open(out / "00000002" / "001.png")), sample.vis)
    assert main(["export", dataset, "--to", "folder", str(out)]) == 2  # not empty
    assert "not empty" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nothing"), "--to", "folder", str(tmp_path / "x")]) == 2


def test_eval_fr_on_lfw_pairs_and_on_dataset_pairs(dataset, model, tmp_path):
    # An LFW-layout folder (name/name_0001.png) from the dataset, and a pairs.txt with a header line
    lfw = tmp_path / "lfw"
    for s in iter_dataset(Storage(dataset)):
        name = f"id{s.label}"
        os.makedirs(lfw / name, exist_ok=True)
        Image.fromarray(s.vis).save(lfw / name / f"{name}_{s.sample + 1:04d}.png")
    lines = ["2\t10"]
    rng = np.random.default_rng(0)
    truth = []
    for k in range(20):
        a = int(rng.integers(6))
        if k % 2 == 0:
            lines.append(f"id{a}\t1\t{2 + k % 3}")
        else:
            lines.append(f"id{a}\t1\tid{(a + 1) % 6}\t2")
        truth.append(k % 2 == 0)
    (tmp_path / "pairs.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "eval"
    assert main(["eval-fr", "--model", model, "--pairs", str(tmp_path / "pairs.txt"), "--images", str(lfw),
                 "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["pairs"] == 20 and metrics["genuine"] == 10
    # the same scores computed here from the images give the same 10-fold accuracy
    embedder = load_embedder(model)

    def load(name, n):
        return torch.from_numpy(np.array(Image.open(lfw / name / f"{name}_{n:04d}.png"))).permute(2, 0, 1)

    scores = []
    for line in lines[1:]:
        f = line.split("\t")
        a, b = ((f[0], int(f[1])), (f[0], int(f[2]))) if len(f) == 3 else ((f[0], int(f[1])), (f[2], int(f[3])))
        e = embedder.embed(torch.stack([load(*a), load(*b)]))
        scores.append(float(e[0] @ e[1]))
    assert metrics["accuracy"] == pytest.approx(kfold_accuracy(np.array(scores), np.array(truth)).accuracy)
    assert Image.open(out / "roc.png").format == "PNG"

    out2 = tmp_path / "eval2"
    assert main(["eval-fr", "--model", model, "--dataset", dataset, "--genuine", "30", "--impostor", "30",
                 "--out", str(out2)]) == 0
    metrics2 = json.loads((out2 / "metrics.json").read_text())
    assert metrics2["pairs"] == 60 and metrics2["genuine"] == 30
    assert set(metrics2["tar_at_far"]) == {"0.001", "0.0001"} and 0 <= metrics2["eer"]["eer"] <= 1
    assert main(["eval-fr", "--model", model, "--out", str(out2)]) == 2  # no pairs source


def test_eval_data_figures_by_hand(dataset, model, tmp_path):
    out = tmp_path / "data"
    assert main(["eval-data", dataset, "--embedder", model, "--out", str(out)]) == 0
    figures = json.loads((out / "eval-data.json").read_text())
    # 6 identities x 4 samples: 6 x C(4,2) = 36 genuine pairs, C(24,2) - 36 = 240 impostor pairs
    assert figures["genuine_pairs"] == 36 and figures["impostor_pairs"] == 240
    assert figures["samples"] == 24 and figures["identities"] == 6
    embedder = load_embedder(model)
    samples = list(iter_dataset(Storage(dataset)))
    emb = embedder.embed(torch.from_numpy(np.stack([s.vis for s in samples])).permute(0, 3, 1, 2)).double().numpy()
    labels = np.array([s.label for s in samples])
    sims = emb @ emb.T
    i, j = np.triu_indices(24, 1)
    genuine = sims[i, j][labels[i] == labels[j]]
    assert figures["genuine"]["mean"] == pytest.approx(genuine.mean(), abs=1e-6)
    own0 = sims[np.ix_(labels == 0, labels == 0)][np.triu_indices(4, 1)]
    worst = {w["label"]: w for w in figures["worst_identities"]}
    assert worst[0]["mean_similarity"] == pytest.approx(own0.mean(), abs=1e-6)
    assert worst[0]["min_similarity"] == pytest.approx(own0.min(), abs=1e-6)
    html = (out / "eval-data.html").read_text()
    assert "Identity separability" in html and "data:image/png;base64," in html
    assert Image.open(out / "scores.png").format == "PNG"
    shutil.rmtree(out)
