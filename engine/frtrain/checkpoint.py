"""train-fr checkpoints: one folder, loadable without running code from any file in it.

    backbone.pth   the iResNet as a plain insightface state dict (torch.save of name -> tensor)
    head.pt        every class centre and its momentum, all ranks' shards concatenated in class order
    state.pt       step, epoch, backbone optimiser state, world size; written last (the folder is complete)

All three are read with `torch.load(weights_only=True)`. Storing the head whole (not per rank) lets a
run continue on another number of workers: each rank takes its class range again.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from facegen.engine.storage import Storage
from facegen.models.errors import UserError

BACKBONE_FILE = "backbone.pth"
HEAD_FILE = "head.pt"
STATE_FILE = "state.pt"
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-\d+$")


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:09d}"


def save_backbone(module: torch.nn.Module, path: str | os.PathLike) -> None:
    """insightface's format: `torch.save(backbone.state_dict())`, CPU tensors, no wrapper prefix."""
    state = {name: tensor.detach().to("cpu").clone() for name, tensor in module.state_dict().items()}
    torch.save(state, path)


def save_checkpoint(folder: str | os.PathLike, backbone: torch.nn.Module, head: dict[str, torch.Tensor],
                    state: dict[str, Any]) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_backbone(backbone, folder / BACKBONE_FILE)
    torch.save(head, folder / HEAD_FILE)
    tmp = folder / f".{STATE_FILE}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, folder / STATE_FILE)
    return folder


def _load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # refused pickle, truncated file, ...
        raise UserError(f"{path}: not a readable train-fr checkpoint file ({type(err).__name__}: {err})") from None


def load_checkpoint(folder: str | os.PathLike) -> tuple[dict, dict, dict]:
    """(backbone state dict, head dict, state dict) of a complete checkpoint folder."""
    folder = Path(folder)
    if not (folder / STATE_FILE).is_file():
        raise UserError(f"{folder}: not a complete train-fr checkpoint (no {STATE_FILE})")
    return _load(folder / BACKBONE_FILE), _load(folder / HEAD_FILE), _load(folder / STATE_FILE)


def latest_checkpoint(source: str, storage_options: dict | None = None) -> str:
    """Local folder of the newest complete checkpoint in a run directory or a checkpoint folder
    (copied to a temporary folder first when it lives on object storage)."""
    store = Storage(source, storage_options)
    if store.exists(STATE_FILE):
        found = store
    else:
        names = [n for n in store.list(CHECKPOINT_DIR) if CHECKPOINT_PATTERN.match(n)
                 and store.exists(f"{CHECKPOINT_DIR}/{n}/{STATE_FILE}")]
        if not names:
            raise UserError(f"resume: {source} holds no complete train-fr checkpoint")
        found = store.child(f"{CHECKPOINT_DIR}/{names[-1]}")
    if found.is_local:
        return found.path()
    local = Path(tempfile.mkdtemp(prefix="facegen-fr-resume-"))
    for name in (BACKBONE_FILE, HEAD_FILE, STATE_FILE):
        (local / name).write_bytes(found.read_bytes(name))
    return str(local)
