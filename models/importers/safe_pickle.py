"""A pickle reader that resolves only an allow-list of globals and never runs code from the file.

StyleGAN2-ADA / ArcBiFaceGAN snapshots are plain pickles whose networks reduce to
`torch_utils.persistence._reconstruct_persistent_obj(meta)`; the original loader exec()s
`meta['module_src']`. Here that global resolves to `PersistentRecord`, which only keeps the class name
and the state dict and never looks at `module_src`. Every global the file names goes through
`find_class`; anything outside `_ALLOWED` raises `UnsafeCheckpointError` naming it.

Tensors inside such a pickle are ordinary torch pickles: `torch._utils._rebuild_tensor_v2(storage,
offset, size, stride, ...)` whose storage reduces to `torch.storage._load_from_bytes(b)`, where `b` is
a legacy `torch.save` of the storage. torch's own `_load_from_bytes` calls `torch.load(...,
weights_only=False)`; ours loads those bytes with `weights_only=True` and checks the result is a storage.
"""

from __future__ import annotations

import collections
import io
import pickle
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from facegen.models.errors import UnsafeCheckpointError, UserError


@dataclass
class PersistentRecord:
    """What `_reconstruct_persistent_obj(meta)` described: a class name and its instance `__dict__`."""

    class_name: str
    state: dict = field(default_factory=dict)
    version: int | None = None


def _reconstruct_persistent_obj(meta: Any) -> PersistentRecord:
    # Deliberately ignores meta['module_src']: it is never compiled, exec'd or even inspected.
    if not isinstance(meta, dict) or meta.get("type") != "class":
        raise UserError(f"persistent object: expected meta with type 'class', got {type(meta).__name__}")
    class_name = meta.get("class_name")
    state = meta.get("state")
    if not isinstance(class_name, str) or not isinstance(state, dict):
        raise UserError("persistent object: meta lacks a string class_name or a dict state")
    return PersistentRecord(class_name=class_name.rsplit(".", 1)[-1], state=dict(state), version=meta.get("version"))


class EasyDictRecord(dict):
    """Stands in for `dnnlib.util.EasyDict` (a dict subclass); a dict with a `__dict__` so BUILD works."""

    def __setstate__(self, state: Any) -> None:  # EasyDict pickles its (empty) __dict__
        pass


class ModuleRecord:
    """Stands in for a plain `torch.nn.modules.*` object: keeps its pickled `__dict__`, nothing else."""

    class_name = "Module"

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise UserError(f"torch module {self.class_name}: pickled state is not a dict")
        self.state = dict(state)


_MODULE_RECORD_TYPES: dict[str, type] = {}


def _module_record_type(qualified_name: str) -> type:
    """A ModuleRecord subclass per torch.nn class name (never the real class)."""
    if qualified_name not in _MODULE_RECORD_TYPES:
        name = qualified_name.rsplit(".", 1)[-1]
        _MODULE_RECORD_TYPES[qualified_name] = type(name, (ModuleRecord,), {"class_name": name})
    return _MODULE_RECORD_TYPES[qualified_name]


def _storage_from_bytes(data: Any) -> torch.storage.TypedStorage:
    if not isinstance(data, (bytes, bytearray)):
        raise UserError("tensor storage: expected bytes")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # TypedStorage deprecation
        try:
            storage = torch.load(io.BytesIO(bytes(data)), weights_only=True, map_location="cpu")
        except pickle.UnpicklingError as err:
            raise UnsafeCheckpointError(
                f"tensor storage refused by torch's weights-only loader: {_refusal_core(str(err))}") from None
        except (RuntimeError, EOFError, ValueError) as err:
            raise UserError(f"tensor storage: unreadable ({err})") from None
    if not isinstance(storage, torch.storage.TypedStorage):
        raise UserError(f"tensor storage: expected a typed storage, got {type(storage).__name__}")
    return storage


def _refusal_core(message: str) -> str:
    """What torch's weights-only loader refused (e.g. 'Unsupported global: GLOBAL evilmod.Payload').

    torch's full message is a page of advice that includes re-running with weights_only=False, which
    means executing code from the file: never repeated to a user of a tool that must not do that."""
    _, marker, detail = message.partition("WeightsUnpickler error:")
    if marker:
        text = re.split(r" was not an allowed global| Please use|Check the documentation", detail)[0]
    else:
        advice = ("Weights only load failed", "Check the documentation", "Please file an issue")
        paragraphs = [p.strip() for p in message.split("\n\n")]
        text = " ".join(p for p in paragraphs if p and not p.startswith(advice) and "weights_only" not in p)
    return " ".join(text.split()).rstrip(".") or "a disallowed object"


def _is_int_tuple(value: Any) -> bool:
    return isinstance(value, (tuple, list, torch.Size)) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    )


def _rebuild_tensor_v2(storage: Any, storage_offset: Any, size: Any, stride: Any, *_ignored: Any) -> torch.Tensor:
    """torch's tensor rebuild, minus hooks/metadata, with the bounds check `Tensor.set_` does not do."""
    if not isinstance(storage, torch.storage.TypedStorage):
        raise UserError("tensor: storage is not a torch storage")
    if not (isinstance(storage_offset, int) and _is_int_tuple(size) and _is_int_tuple(stride)):
        raise UserError("tensor: offset/size/stride are not integers")
    if len(size) != len(stride) or storage_offset < 0 or min([*size, *stride, 0]) < 0:
        raise UserError(f"tensor: invalid geometry size={tuple(size)} stride={tuple(stride)}")
    numel = 1
    for s in size:
        numel *= s
    last = storage_offset + sum((s - 1) * st for s, st in zip(size, stride))
    itemsize = torch.empty((), dtype=storage.dtype).element_size()
    if numel > 0 and last >= storage._untyped_storage.nbytes() // itemsize:
        raise UserError(f"tensor: view of size {tuple(size)} at offset {storage_offset} runs past its storage")
    empty = torch.empty((0,), dtype=storage.dtype)
    return empty.set_(storage._untyped_storage, storage_offset, tuple(size), tuple(stride))


def _rebuild_parameter(data: Any, *_ignored: Any) -> torch.Tensor:
    if not isinstance(data, torch.Tensor):
        raise UserError("parameter: payload is not a tensor")
    return data


# No array in a real snapshot comes near this; a pickle asking for more is malformed or hostile, and
# numpy would otherwise try to allocate it (MemoryError, or the machine swapping) before anything checks.
MAX_ARRAY_BYTES = 1 << 34


def _numpy_core(name: str) -> Callable:
    try:  # numpy >= 2 moved numpy.core to numpy._core; pickles from either name the same functions
        from numpy._core import multiarray
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray
    function = getattr(multiarray, name)
    return _bounded_reconstruct(function) if name == "_reconstruct" else function


def _bounded_reconstruct(reconstruct: Callable) -> Callable:
    """numpy's `_reconstruct(subtype, shape, dtype)` allocates `shape` at once: refuse absurd sizes first."""

    def bounded(subtype: Any, shape: Any, dtype: Any) -> Any:
        dims = (shape,) if isinstance(shape, int) else shape
        if not _is_int_tuple(dims) or min([*dims, 0]) < 0:
            raise UserError(f"numpy array: invalid shape {shape!r}")
        need = int(np.prod([int(d) for d in dims], dtype=object)) * np.dtype(dtype if not isinstance(
            dtype, bytes) else dtype.decode("latin1")).itemsize
        if need > MAX_ARRAY_BYTES:
            raise UserError(f"numpy array of shape {tuple(dims)} would need {need / 2**30:.3g} GiB; not a real "
                            "network snapshot")
        return reconstruct(subtype, shape, dtype)

    return bounded


# Global name -> what it resolves to. Everything here is data construction with no side effects.
_ALLOWED: dict[str, Callable[[], Any]] = {
    "torch_utils.persistence._reconstruct_persistent_obj": lambda: _reconstruct_persistent_obj,
    "dnnlib.util.EasyDict": lambda: EasyDictRecord,
    "dnnlib.EasyDict": lambda: EasyDictRecord,
    "torch._utils._rebuild_tensor_v2": lambda: _rebuild_tensor_v2,
    "torch._utils._rebuild_parameter": lambda: _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": lambda: _rebuild_parameter,
    "torch.storage._load_from_bytes": lambda: _storage_from_bytes,
    "collections.OrderedDict": lambda: collections.OrderedDict,
    "builtins.set": lambda: set,  # pickle protocol < 4 writes sets as set(list)
    "builtins.frozenset": lambda: frozenset,
    "_codecs.encode": lambda: _latin1_bytes,  # protocol 2 writes bytes as _codecs.encode(str, 'latin1')
    "numpy.dtype": lambda: np.dtype,
    "numpy.ndarray": lambda: np.ndarray,
    "numpy.core.multiarray.scalar": lambda: _numpy_core("scalar"),
    "numpy._core.multiarray.scalar": lambda: _numpy_core("scalar"),
    "numpy.core.multiarray._reconstruct": lambda: _numpy_core("_reconstruct"),
    "numpy._core.multiarray._reconstruct": lambda: _numpy_core("_reconstruct"),
}


def _latin1_bytes(text: Any, encoding: Any = "latin1") -> bytes:
    if not isinstance(text, str) or encoding != "latin1":
        raise UserError("pickle: _codecs.encode is only accepted as protocol 2's latin1 bytes encoding")
    return text.encode("latin1")


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only `_ALLOWED` globals (plus stand-ins for plain torch.nn modules)."""

    def find_class(self, module: str, name: str) -> Any:
        qualified = f"{module}.{name}"
        if qualified in _ALLOWED:
            return _ALLOWED[qualified]()
        if module.startswith("torch.nn.modules.") and name.isidentifier():
            return _module_record_type(qualified)
        raise UnsafeCheckpointError(
            f"refusing global '{qualified}': not on the allow-list of a StyleGAN2-ADA/ArcBiFaceGAN pickle"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UserError("pickle uses persistent ids (a torch.save file?), not a StyleGAN2-ADA snapshot")


def load_restricted_pickle(path: str | Path) -> Any:
    """Unpickle `path` with the allow-list; errors name the file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f).load()
    except UnsafeCheckpointError as err:
        raise UnsafeCheckpointError(f"{path}: {err}") from None
    except UserError as err:
        raise UserError(f"{path}: {err}") from None
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError, IndexError) as err:
        raise UserError(f"{path}: not a readable pickle ({type(err).__name__}: {err})") from None
    except (MemoryError, OverflowError) as err:
        raise UserError(f"{path}: an array in it would need more memory than exists ({type(err).__name__}); "
                        "not a real network snapshot") from None
