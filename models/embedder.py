"""Face embedders behind one interface: images in, L2-normalised float32 embeddings out.

`FaceEmbedder.embed` takes NCHW uint8 images in [0, 255] or the generator's float images in [-1, 1],
VIS (3 channels, RGB) or NIR (1 channel, replicated). Float input is quantised exactly like the
original's PNG conversion, so the embedding of a generated tensor equals the embedding of the PNG
saved from it. Backends: `TorchEmbedder` (any nn.Module, e.g. `IResNet`) and `OnnxEmbedder`
(onnxruntime; onnx and onnxruntime are imported only when one is built, so torch-only installs work).
"""

from __future__ import annotations

import atexit
import hashlib
import json
import weakref
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from facegen.models.errors import UserError
from facegen.models.netconfig import config_from_dict

RESIZE_MODES = ("bilinear_antialias", "bilinear", "bicubic_antialias", "area", "nearest")
CHANNEL_ORDERS = ("RGB", "BGR")


@dataclass(frozen=True)
class Preprocessing:
    """How uint8 pixels become model input: resize, channel order, then `(x/255 - mean) / std`.

    mean/std are on the [0, 1] scale (insightface: 0.5/0.5). The arithmetic is done as
    `(x - 255*mean) / (255*std)`, which is exact for raw-pixel models (mean 0, std 1/255: SFace).
    """

    input_size: int = 112
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    channel_order: str = "RGB"
    resize_mode: str = "bilinear_antialias"

    def __post_init__(self) -> None:
        # Lists from JSON become tuples so equal settings compare (and hash) equal.
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if self.input_size <= 0:
            raise UserError(f"preprocessing.input_size: {self.input_size} must be positive")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise UserError("preprocessing.mean/std: need exactly 3 values (one per channel)")
        if any(s <= 0 for s in self.std):
            raise UserError(f"preprocessing.std: {self.std} must be positive")
        if self.channel_order not in CHANNEL_ORDERS:
            raise UserError(f"preprocessing.channel_order: {self.channel_order!r} not in {CHANNEL_ORDERS}")
        if self.resize_mode not in RESIZE_MODES:
            raise UserError(f"preprocessing.resize_mode: {self.resize_mode!r} not in {RESIZE_MODES}")

    def to_dict(self) -> dict:
        data = asdict(self)
        data["mean"], data["std"] = list(self.mean), list(self.std)
        return data

    def to_json(self) -> str:
        """Canonical JSON (sorted keys), the form that enters the fingerprint."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Mapping) -> Preprocessing:
        return config_from_dict(cls, dict(data), "preprocessing")


def to_uint8_values(images: torch.Tensor) -> torch.Tensor:
    """Pixel values as float32 integers in [0, 255], exactly as the original saves them.

    uint8 input passes through; float input in [-1, 1] goes through the original's
    `(x * 127.5 + 128).clamp(0, 255)` then truncation (floor, since the value is non-negative).
    """
    if images.dtype == torch.uint8:
        return images.float()
    if not images.is_floating_point():
        raise UserError(f"embed: images must be uint8 or float, got {images.dtype}")
    return (images.float() * 127.5 + 128).clamp(0, 255).floor()


def resize(images: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """Resize float NCHW to size x size; a no-op (bit-exact) when already that size."""
    if images.shape[-2:] == (size, size):
        return images
    if mode in ("area", "nearest"):
        return F.interpolate(images, size=(size, size), mode=mode)
    base, _, antialias = mode.partition("_")
    return F.interpolate(images, size=(size, size), mode=base, align_corners=False, antialias=bool(antialias))


def preprocess(images: torch.Tensor, pre: Preprocessing, *, quantize: bool = True) -> torch.Tensor:
    """uint8 / [-1, 1] float NCHW (1 or 3 channels, RGB) -> normalised float32 model input."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise UserError(f"embed: images must be NCHW with 1 (NIR) or 3 (RGB) channels, got {tuple(images.shape)}")
    if quantize:
        x = to_uint8_values(images)
    else:
        # Differentiable path: same affine map to the [0, 255] scale, without the rounding.
        x = images.float() * 127.5 + 127.5 if images.is_floating_point() else images.float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    x = resize(x, pre.input_size, pre.resize_mode)
    if pre.channel_order == "BGR":
        x = x.flip(1)
    mean = torch.tensor(pre.mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(pre.std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1) * 255.0
    return (x - mean) / std


PREPROCESSING_KEYS = ("input_size", "mean", "std", "channel_order", "resize_mode")
RAW_PIXELS = {"mean": (0.0, 0.0, 0.0), "std": (1 / 255, 1 / 255, 1 / 255)}


def weights_hash(weight_chunks: Iterable[bytes | memoryview]):
    """A running sha256 over the weights (streamed, never copied whole)."""
    digest = hashlib.sha256()
    for chunk in weight_chunks:
        digest.update(chunk)
    return digest


def fingerprint_from(weights, pre: Preprocessing) -> str:
    """The embedder fingerprint: the weights' running hash continued with the canonical preprocessing JSON."""
    digest = weights.copy()
    digest.update(pre.to_json().encode())
    return digest.hexdigest()


def fingerprint_of(weight_chunks: Iterable[bytes | memoryview], pre: Preprocessing) -> str:
    """sha256 over the weights (streamed, never copied whole) and the canonical preprocessing JSON."""
    return fingerprint_from(weights_hash(weight_chunks), pre)


def parse_preprocessing(pairs: Iterable[str]) -> dict:
    """`--preprocessing KEY=VALUE` flags -> a dict of Preprocessing overrides.

    input_size is an integer; mean and std are one value (all channels) or three, comma-separated,
    on the [0, 1] scale; channel_order and resize_mode are names. Values are checked here, so a
    typo fails before any model is loaded."""
    out: dict = {}
    for pair in pairs:
        key, sep, raw = str(pair).partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep or key not in PREPROCESSING_KEYS:
            raise UserError(f"--preprocessing {pair!r}: expected KEY=VALUE with KEY one of "
                            f"{', '.join(PREPROCESSING_KEYS)}")
        try:
            if key == "input_size":
                out[key] = int(raw)
            elif key in ("mean", "std"):
                values = [float(v) for v in raw.split(",")]
                if len(values) not in (1, 3):
                    raise ValueError("one value or three")
                out[key] = values * 3 if len(values) == 1 else values
            else:
                out[key] = raw.upper() if key == "channel_order" else raw
        except ValueError as err:
            raise UserError(f"--preprocessing {pair!r}: {err}") from None
    Preprocessing.from_dict({**Preprocessing().to_dict(), **out})  # validates every value now
    return out


def preprocessing_diff(a: Preprocessing, b: Preprocessing) -> list[str]:
    """Names of the fields in which two preprocessings differ, e.g. ['mean', 'std']."""
    da, db = a.to_dict(), b.to_dict()
    return [key for key in PREPROCESSING_KEYS if da[key] != db[key]]


class FaceEmbedder(ABC):
    """Common front end: input checks, quantisation, resize, normalisation, chunking, L2 norm."""

    dim: int
    input_size: int
    preprocessing: Preprocessing
    fingerprint: str  # weights + preprocessing: what makes two embedders' outputs comparable
    weights_fingerprint: str  # the weights alone: tells "other model" from "same model, other input"
    device: torch.device = torch.device("cpu")
    # How the preprocessing was chosen (graph detection, an index, flags): for the user to read.
    notes: list[str]
    _weights = None  # running sha256 of the weights, continued by every fingerprint

    def _set_weights(self, chunks: Iterable[bytes | memoryview]) -> None:
        self._weights = weights_hash(chunks)
        self.weights_fingerprint = self._weights.hexdigest()
        self.fingerprint = fingerprint_from(self._weights, self.preprocessing)

    def __getstate__(self) -> dict:
        # The running weights hash cannot be pickled; a copy sent to another process (a Ray actor)
        # keeps its fingerprints but cannot switch preprocessing any more.
        state = self.__dict__.copy()
        state.pop("_weights", None)
        return state

    def _check_input_size(self, size: int) -> None:  # noqa: B027 - most backends take any size
        """Backends with a fixed input resolution refuse another one."""

    def set_preprocessing(self, pre: Preprocessing, note: str | None = None) -> FaceEmbedder:
        """Use another preprocessing with the same weights (the fingerprint follows)."""
        if self._weights is None:
            raise RuntimeError("set the preprocessing before the embedder is sent to another process")
        self._check_input_size(pre.input_size)
        self.preprocessing, self.input_size = pre, pre.input_size
        self.fingerprint = fingerprint_from(self._weights, pre)
        if note:
            self.notes.append(note)
        return self

    @abstractmethod
    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised float32 input [N, 3, S, S] on self.device -> raw features [N, dim]."""

    def to(self, device: torch.device | str) -> FaceEmbedder:
        self.device = torch.device(device)
        return self

    def embed(self, images: torch.Tensor | np.ndarray, batch_size: int | None = None) -> torch.Tensor:
        """Images (NCHW uint8 [0, 255] or float [-1, 1]) -> float32 [N, dim], unit L2 norm, on self.device."""
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(images)
        if images.shape[0] == 0:
            return torch.empty(0, self.dim, device=self.device)
        chunks = [images] if not batch_size or images.shape[0] <= batch_size else images.split(batch_size)
        # no_grad, not inference_mode: callers may edit or reuse the embeddings under autograd.
        with torch.no_grad():
            out = [self._embed_chunk(chunk.to(self.device, non_blocking=True)) for chunk in chunks]
        return out[0] if len(out) == 1 else torch.cat(out)

    def _embed_chunk(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self._raw_chunk(images), dim=1)

    def _raw_chunk(self, images: torch.Tensor) -> torch.Tensor:
        return self._forward(preprocess(images, self.preprocessing)).float()

    def raw_features(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Like `embed` without the final L2 normalisation: the network's own output, float32 [N, dim].

        The original's identity_features.json stores these (the generator's embed layer normalises)."""
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(images)
        with torch.no_grad():
            return self._raw_chunk(images.to(self.device, non_blocking=True))


def state_dict_chunks(module: nn.Module) -> Iterator[bytes | memoryview]:
    """Name, dtype, shape and raw bytes of every tensor of a state dict, in sorted key order.

    BatchNorm's `num_batches_tracked` counters are left out: they never change the output, and
    insightface checkpoints may or may not carry them.
    """
    for name, tensor in sorted(module.state_dict().items()):
        if name.endswith("num_batches_tracked"):
            continue
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        yield f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode()
        yield memoryview(flat.view(torch.uint8).numpy())


class TorchEmbedder(FaceEmbedder):
    """Any nn.Module mapping normalised NCHW input to raw features (e.g. `IResNet`).

    The fingerprint is taken from the weights at construction: treat the wrapped module as frozen.
    `autocast_dtype` (e.g. torch.float16 on CUDA, as ArcBiFaceGAN runs ArcFace) runs the module under
    autocast; the output is always float32.
    """

    def __init__(
        self,
        module: nn.Module,
        preprocessing: Preprocessing | None = None,
        *,
        autocast_dtype: torch.dtype | None = None,
        dim: int | None = None,
    ):
        self.module = module.eval()
        self.preprocessing = preprocessing or Preprocessing()
        self.input_size = self.preprocessing.input_size
        self.autocast_dtype = autocast_dtype
        self.device = next(module.parameters(), torch.empty(0)).device
        self.notes = []
        self._set_weights(state_dict_chunks(module))
        self.dim = dim if dim is not None else self._probe_dim()

    def _probe_dim(self) -> int:
        config = getattr(self.module, "config", None)
        if getattr(config, "embedding_dim", None):
            return int(config.embedding_dim)
        with torch.inference_mode():
            probe = torch.zeros(1, 3, self.input_size, self.input_size, device=self.device)
            return int(self.module(probe).shape[-1])

    def to(self, device: torch.device | str) -> TorchEmbedder:
        self.module.to(device)
        return super().to(device)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        enabled = self.autocast_dtype is not None
        dtype = self.autocast_dtype or torch.float32
        with torch.autocast(self.device.type, dtype=dtype, enabled=enabled):
            return self.module(x)

    def embed_differentiable(self, images: torch.Tensor) -> torch.Tensor:
        """Like `embed` for float [-1, 1] images but without uint8 rounding, so gradients flow (losses)."""
        x = preprocess(images.to(self.device), self.preprocessing, quantize=False)
        return F.normalize(self._forward(x).float(), dim=1)


# --------------------------------------------------------------------------- ONNX backend


def _import_onnx():
    try:
        import onnx
        import onnxruntime
    except ImportError as err:
        raise UserError(f"ONNX embedder: the '{err.name}' package is missing: pip install facegen[onnx]") from None
    return onnx, onnxruntime


def _names_read(graph) -> set[str]:
    """Every tensor name a node reads, in the graph and in every subgraph (If/Loop bodies), plus outputs."""
    names = {output.name for output in graph.output}
    for node in graph.node:
        names.update(node.input)
        for attr in node.attribute:
            subgraphs = list(attr.graphs) + ([attr.g] if attr.HasField("g") else [])
            for sub in subgraphs:
                names |= _names_read(sub)
    return names


def prune_onnx_inputs(model) -> None:
    """Leave only the real data inputs of an ONNX model (in place).

    Why: exporters and quantisers leave debris that onnxruntime rejects or handles badly.
    OpenCV-zoo's int8 SFace declares its original float weights as graph inputs although no node
    reads them any more (the DequantizeLinear'd int8 copies replaced them), and onnxruntime then
    demands them in every feed ("Required inputs ... are missing"). Older exporters also list every
    initializer as a graph input, which makes it overridable and blocks constant folding. So:
    drop initializers no node reads, inputs no node reads, and (IR >= 4, where it is legal)
    the graph-input entries of initializers.
    """
    graph = model.graph
    used = _names_read(graph)
    initializers = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    constant = {init.name for init in initializers} if model.ir_version >= 4 else set()
    inputs = [value for value in graph.input if value.name in used and value.name not in constant]
    del graph.input[:]
    graph.input.extend(inputs)


def make_batch_dynamic(model) -> None:
    """Turn dim 0 of every graph input and output into a symbolic 'batch' (in place)."""
    graph = model.graph
    for value in list(graph.input) + list(graph.output):
        dims = value.type.tensor_type.shape.dim
        if len(dims):
            dims[0].dim_param = "batch"  # a oneof: this clears any fixed dim_value
    # Intermediate shapes recorded for batch 1 would contradict the new input; let ORT re-infer them.
    del graph.value_info[:]


def _file_chunks(path: str) -> Iterator[bytes]:
    yield b"onnx|"
    with open(path, "rb") as handle:
        yield from iter(lambda: handle.read(1 << 22), b"")


# onnxruntime sessions own C++ thread pools. One still alive when the interpreter finalises is
# destroyed in whatever order module teardown and C++ static destructors happen to run, and a
# joinable std::thread destroyed then aborts the process ("terminate called without an active
# exception", exit 134) after the command already succeeded. Closing every live session from an
# atexit hook releases them while the runtime is whole.
_LIVE_SESSIONS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_sessions() -> None:
    for embedder in list(_LIVE_SESSIONS):
        embedder.close()


class OnnxEmbedder(FaceEmbedder):
    """An ONNX face-recognition model run by onnxruntime (insightface packs, OpenCV-zoo SFace, ...).

    The graph is cleaned in memory (`prune_onnx_inputs`) and its batch dim made dynamic; if the
    model still only runs at its fixed batch size (a reshape hard-codes it), images are run in
    chunks of that size. The fingerprint hashes the file as shipped, plus the preprocessing.
    """

    def __init__(self, path: str, preprocessing: Preprocessing | None = None, providers: list[str] | None = None,
                 *, overrides: Mapping | None = None):
        """`preprocessing` as given; or, when it is None, read from the graph (`graph_preprocessing`)
        with `overrides` (single fields, e.g. from --preprocessing) on top."""
        onnx, ort = _import_onnx()
        self.path = str(path)
        self.notes = []
        try:
            model = onnx.load(self.path)
        except FileNotFoundError:
            raise UserError(f"{self.path}: ONNX model file not found") from None
        except Exception as err:  # protobuf decode errors have no common public base class
            raise UserError(f"{self.path}: not a readable ONNX model ({type(err).__name__}: {err})") from None
        if preprocessing is None:
            fields, note = graph_preprocessing(model)
            self.notes.append(f"{self.path}: {note}")
            if overrides:
                fields.update(overrides)
                self.notes.append(f"{self.path}: preprocessing given explicitly: {fields_text(overrides)}")
            preprocessing = Preprocessing.from_dict({**Preprocessing().to_dict(), **fields})
        self.preprocessing = preprocessing
        self.input_size = self.preprocessing.input_size
        try:
            self._set_weights(_file_chunks(self.path))
        except OSError as err:
            raise UserError(f"{self.path}: cannot read the ONNX model ({err})") from None
        prune_onnx_inputs(model)
        self._check_input(model)
        self.input_dtype = onnx.helper.tensor_dtype_to_np_dtype(model.graph.input[0].type.tensor_type.elem_type)
        self.providers = providers or [
            p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()
        ]
        self._open_session(model)
        _LIVE_SESSIONS.add(self)

    def close(self) -> None:
        """Release the onnxruntime session (and its intra-op thread pool) now."""
        self.session = None

    def _check_input(self, model) -> None:
        inputs = model.graph.input
        if len(inputs) != 1:
            raise UserError(f"{self.path}: expected one image input, found {[v.name for v in inputs]}")
        dims = inputs[0].type.tensor_type.shape.dim
        shape = [d.dim_value if d.HasField("dim_value") else None for d in dims]
        if len(shape) != 4 or shape[1] not in (3, None):
            raise UserError(f"{self.path}: input '{inputs[0].name}' has shape {shape}, expected [N, 3, H, W]")
        self.graph_hw = tuple(shape[2:])
        self._check_input_size(self.input_size)
        self.input_name = inputs[0].name
        self.fixed_batch = shape[0] if shape[0] else None

    def _check_input_size(self, size: int) -> None:
        for side in getattr(self, "graph_hw", ()):
            if side is not None and side != size:
                raise UserError(f"{self.path}: model input is {self.graph_hw[0]}x{self.graph_hw[1]} but "
                                f"preprocessing.input_size is {size}")

    def _new_session(self, model, ort):
        options = ort.SessionOptions()
        options.log_severity_level = 3  # warnings about benign graph details would repeat per worker
        try:
            return ort.InferenceSession(model.SerializeToString(), options, providers=self.providers)
        except Exception as err:
            raise UserError(f"{self.path}: onnxruntime cannot load the model ({err})") from None

    def _open_session(self, model) -> None:
        """Prefer a dynamic batch; keep the fixed one only if the graph really depends on it."""
        _, ort = _import_onnx()
        if self.fixed_batch is not None:
            dynamic = model.__class__()
            dynamic.CopyFrom(model)
            make_batch_dynamic(dynamic)
            session = self._new_session(dynamic, ort)
            try:
                out = self._run(session, np.zeros((2, 3, self.input_size, self.input_size), np.float32))
                if out.shape[0] == 2:
                    self.session, self.fixed_batch, self.dim = session, None, int(out.shape[1])
                    return
            except Exception:  # the graph hard-codes its batch size somewhere (e.g. a Reshape)
                pass
        self.session = self._new_session(model, ort)
        probe = np.zeros((self.fixed_batch or 1, 3, self.input_size, self.input_size), np.float32)
        self.dim = int(self._run(self.session, probe).shape[1])

    def _run(self, session, x: np.ndarray) -> np.ndarray:
        out = session.run(None, {self.input_name: x.astype(self.input_dtype, copy=False)})[0]
        return out.reshape(out.shape[0], -1).astype(np.float32, copy=False)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.detach().to("cpu", torch.float32).contiguous().numpy()
        if self.fixed_batch is None:
            return torch.from_numpy(self._run(self.session, batch)).to(self.device)
        # Fixed-batch model: run in its batch size, padding the last chunk with zeros.
        count, step = batch.shape[0], self.fixed_batch
        padded = np.zeros((-(-count // step) * step, *batch.shape[1:]), np.float32)
        padded[:count] = batch
        outs = [self._run(self.session, padded[i : i + step]) for i in range(0, padded.shape[0], step)]
        return torch.from_numpy(np.concatenate(outs)[:count]).to(self.device)


# ------------------------------------------------------------------- preprocessing from the graph
_AFFINE_OPS = ("Sub", "Mul", "Div", "Add")


def _constant_names(graph) -> set[str]:
    names = {init.name for init in graph.initializer}
    names.update(out for node in graph.node if node.op_type == "Constant" for out in node.output)
    return names


def leading_affine_ops(model) -> list[str]:
    """Op types of the element-wise chain (Sub/Mul/Div/Add with a constant) the image input goes
    through first, following the data, e.g. ['Sub', 'Mul'] for OpenCV-zoo's SFace."""
    graph = model.graph
    constants = _constant_names(graph)
    data = [value.name for value in graph.input if value.name not in constants]
    if not data:
        return []
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    ops, tensor = [], data[0]
    while len(readers.get(tensor, [])) == 1:
        node = readers[tensor][0]
        others = [name for name in node.input if name != tensor]
        if node.op_type not in _AFFINE_OPS or not others or any(name not in constants for name in others):
            break
        ops.append(node.op_type)
        tensor = node.output[0]
    return ops


def graph_preprocessing(model) -> tuple[dict, str]:
    """Preprocessing fields an ONNX graph implies, and a sentence saying why.

    Like insightface's model zoo (`ArcFaceONNX`: a Sub and a Mul among the first nodes means
    input_mean 0, input_std 1): a model that subtracts and scales its input inside the graph takes
    raw 0..255 pixels, anything else gets insightface's (x/255 - 0.5)/0.5. The input size comes from
    the graph when it is fixed. Channel order cannot be read from a graph: RGB, as insightface and
    OpenCV's FaceRecognizerSF (swapRB) feed them.
    """
    fields: dict = {}
    dims = model.graph.input[0].type.tensor_type.shape.dim if model.graph.input else []
    sides = [d.dim_value for d in dims[2:4] if d.HasField("dim_value")] if len(dims) == 4 else []
    if len(sides) == 2 and sides[0] == sides[1] and sides[0] > 0:
        fields["input_size"] = int(sides[0])
    ops = leading_affine_ops(model)
    if ("Sub" in ops or "Add" in ops) and ("Mul" in ops or "Div" in ops):
        fields.update({k: list(v) for k, v in RAW_PIXELS.items()})
        note = (f"the graph normalises its input ({'/'.join(ops)} first), so it gets raw 0..255 RGB pixels "
                "(mean 0, std 1/255)")
    else:
        note = "no normalisation in the graph, so insightface's (x/255 - 0.5)/0.5 on RGB"
    return fields, note + f"; input size {fields.get('input_size', Preprocessing().input_size)}"


def fields_text(fields: Mapping) -> str:
    return ", ".join(f"{key}={','.join(f'{v:g}' for v in value) if isinstance(value, (list, tuple)) else value}"
                     for key, value in fields.items())
