"""insightface `arcface_torch` iResNet `.pth` (a plain state dict) -> `IResNet`.

Loaded with `torch.load(weights_only=True)`: the file can only produce tensors and containers,
never run code. The architecture is inferred from the tensors themselves, then loaded strictly.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from facegen.models.errors import UserError
from facegen.models.iresnet import IResNet, iresnet_config_from_state_dict

# DataParallel/DDP wrappers save keys with this prefix; insightface itself saves the bare module.
_WRAPPER_PREFIX = "module."


def _unpickler_reason(err: Exception) -> str:
    """The useful part of torch's weights-only refusal (e.g. 'Unsupported global: GLOBAL builtins.open').

    torch's full message also suggests retrying with weights_only=False, which we must never do.
    """
    text = str(err)
    _, marker, detail = text.partition("WeightsUnpickler error:")
    # Keep the refusal itself; drop torch's advice on allow-listing the global or disabling the check.
    detail = re.split(
        r" was not an allowed global| Please use|Check the documentation", detail if marker else text
    )[0]
    return " ".join(detail.split()) or type(err).__name__


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensor state dict stored in `path`; anything else -> UserError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: insightface checkpoint not found")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UserError(
            f"{path}: refused, not a plain tensor state dict ({_unpickler_reason(err)})"
        ) from None
    except Exception as err:  # truncated zip, random bytes, ...
        raise UserError(f"{path}: not a readable torch checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(loaded, Mapping) or not loaded:
        raise UserError(f"{path}: expected a state dict (name -> tensor), found {type(loaded).__name__}")
    not_tensors = sorted(str(k) for k, v in loaded.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise UserError(f"{path}: expected a state dict of tensors; non-tensor entries {not_tensors[:5]}")
    if all(str(k).startswith(_WRAPPER_PREFIX) for k in loaded):
        loaded = {k[len(_WRAPPER_PREFIX) :]: v for k, v in loaded.items()}
    return dict(loaded)


def load_insightface_pth(path: str | Path) -> IResNet:
    """Build the matching `IResNet` for an insightface `.pth` and load it strictly (eval mode, CPU)."""
    state_dict = read_state_dict(path)
    try:
        config = iresnet_config_from_state_dict(state_dict)
    except UserError as err:
        raise UserError(f"{path}: {err}") from None
    model = IResNet(config)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        detail = " ".join(str(err).split())  # one line: the CLI prints the message once
        raise UserError(f"{path}: does not match an insightface iResNet-{config.depth}: {detail}") from None
    return model.eval()
