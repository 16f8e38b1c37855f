"""facegen's native checkpoint: one `.safetensors` file per module, plus a registry of model families.

Layout: the tensors are the module's `state_dict()`; the safetensors metadata (str -> str) holds
`facegen_format` ("1"), `family` (a key of `FAMILIES`) and `config` (JSON of the family's config
dataclass). Loading reads the metadata, builds the module from `FAMILIES[family]` and loads the
tensors with strict key and shape checks. No class is ever chosen by a string outside `FAMILIES`, and
no code is run from the file (safetensors holds only raw tensor bytes).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from facegen.models.discriminator import Discriminator, DiscriminatorConfig
from facegen.models.errors import UserError
from facegen.models.generator import Generator, GeneratorConfig
from facegen.models.iresnet import IResNet, IResNetConfig

FORMAT_VERSION = 1
FORMAT_KEY = "facegen_format"

# family name -> (config dataclass, module class). The only place a class is picked by name.
FAMILIES: dict[str, tuple[type, type[torch.nn.Module]]] = {
    "arcbiface": (GeneratorConfig, Generator),
    "discriminator": (DiscriminatorConfig, Discriminator),
    "iresnet": (IResNetConfig, IResNet),
}

_MAX_NAMED_KEYS = 8  # error messages list at most this many offending tensor names


def family_of(module: torch.nn.Module) -> str:
    """The registry name of `module`'s class; UserError if it is not a registered family."""
    for name, (_, cls) in FAMILIES.items():
        if type(module) is cls:
            return name
    raise UserError(f"{type(module).__name__}: not a registered model family ({sorted(FAMILIES)})")


def _name_keys(keys: list[str]) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - _MAX_NAMED_KEYS} more" if len(keys) > _MAX_NAMED_KEYS else ""
    return ", ".join(keys[:_MAX_NAMED_KEYS]) + more


def save_native(module: torch.nn.Module, path: str | os.PathLike, family: str | None = None) -> Path:
    """Write `module` (with its `config`) to `path` atomically: a temporary name, then os.replace."""
    family = family or family_of(module)
    if family not in FAMILIES:
        raise UserError(f"family '{family}': unknown; expected one of {sorted(FAMILIES)}")
    config_cls, module_cls = FAMILIES[family]
    config = getattr(module, "config", None)
    if not isinstance(module, module_cls) or not isinstance(config, config_cls):
        raise UserError(f"family '{family}': module is a {type(module).__name__} with config "
                        f"{type(config).__name__}, expected {module_cls.__name__}/{config_cls.__name__}")
    # clone(): safetensors refuses tensors that share memory (views, tied weights).
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}
    metadata = {
        FORMAT_KEY: str(FORMAT_VERSION),
        "family": family,
        "config": json.dumps(config.to_dict(), sort_keys=True),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        _canonicalize_header(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _canonicalize_header(path: Path) -> None:
    """Rewrite the JSON header with sorted keys so equal modules give byte-identical files.

    safetensors writes its metadata map in hash order; tensor offsets are relative to the data section,
    so only the 8-byte header length and the header itself change. Padding with spaces to a multiple of
    8 keeps the data aligned, as safetensors itself does.
    """
    raw = path.read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    header = json.dumps(json.loads(raw[8:8 + size]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header + raw[8 + size:])


def read_native_header(path: str | os.PathLike) -> dict[str, Any]:
    """`{"format": int, "family": str, "config": dict}` from the metadata, without reading tensors."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{path}: not a safetensors file ({err})") from None
    if FORMAT_KEY not in metadata:
        raise UserError(f"{path}: safetensors file without facegen metadata ('{FORMAT_KEY}' missing)")
    try:
        version = int(metadata[FORMAT_KEY])
    except ValueError:
        raise UserError(f"{path}: {FORMAT_KEY} '{metadata[FORMAT_KEY]}' is not an integer") from None
    if version > FORMAT_VERSION:
        raise UserError(f"{path}: checkpoint format {version} is newer than this facegen reads "
                        f"({FORMAT_VERSION}); upgrade facegen")
    family = metadata.get("family", "")
    if family not in FAMILIES:
        raise UserError(f"{path}: unknown model family '{family}'; expected one of {sorted(FAMILIES)}")
    try:
        config = json.loads(metadata.get("config", ""))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: config metadata is not JSON ({err})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: config metadata is not a JSON object")
    return {"format": version, "family": family, "config": config}


def build_module(family: str, config: dict[str, Any], where: str = "") -> torch.nn.Module:
    """Instantiate a registered family from a config dict (errors prefixed with `where`)."""
    if family not in FAMILIES:
        raise UserError(f"{where}unknown model family '{family}'; expected one of {sorted(FAMILIES)}")
    config_cls, module_cls = FAMILIES[family]
    try:
        return module_cls(config_cls.from_dict(config))
    except UserError as err:
        raise UserError(f"{where}{err}") from None
    except TypeError as err:
        raise UserError(f"{where}{family} config: {err}") from None


def load_state_dict_checked(module: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """`load_state_dict(strict=True)` after naming missing, unexpected and mis-shaped tensors."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors {_name_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected tensors {_name_keys(unexpected)}")
        raise UserError(f"{source}: {'; '.join(parts)}")
    bad = [f"{k} {list(tensors[k].shape)} (expected {list(v.shape)})"
           for k, v in expected.items() if tensors[k].shape != v.shape]
    if bad:
        raise UserError(f"{source}: mis-shaped tensors {_name_keys(bad)}")
    module.load_state_dict(tensors, strict=True)


def load_native(path: str | os.PathLike) -> torch.nn.Module:
    """Build the module a native checkpoint describes and load its tensors strictly (eval mode, CPU)."""
    path = Path(path)
    header = read_native_header(path)
    module = build_module(header["family"], header["config"], where=f"{path}: ")
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{path}: unreadable tensors ({err})") from None
    load_state_dict_checked(module, tensors, str(path))
    return module.eval()


def _fingerprint(family: str, config: dict[str, Any], tensors: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256(json.dumps({"family": family, "config": config}, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        digest.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return f"sha256:{digest.hexdigest()}"


def fingerprint_module(module: torch.nn.Module) -> str:
    """'sha256:<hex>' of family, config and every tensor: the model's identity, whatever file it came from."""
    config = json.loads(json.dumps(module.config.to_dict()))  # the same JSON types the header holds
    return _fingerprint(family_of(module), config, module.state_dict())


def fingerprint_file(path: str | os.PathLike) -> str:
    """`fingerprint_module` of the model a native file holds, without building the module.

    Content-addressed rather than a hash of the file's bytes, so a model converted from another format
    keeps its fingerprint.
    """
    header = read_native_header(path)
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{path}: unreadable tensors ({err})") from None
    return _fingerprint(header["family"], header["config"], tensors)
