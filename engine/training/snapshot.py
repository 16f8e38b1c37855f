"""Native training snapshots: one folder per snapshot, safe to load (no code runs from any file in it).

    G.safetensors  G_ema.safetensors  D.safetensors  D_NIR.safetensors    native model files
    snapshot.json                                                          kimg, tick, ADA p (small, readable)
    state.pt                                                               optimisers, counters, ADA, RNG; last

`G_ema.safetensors` is an ordinary native generator file: `facegen generate --generator
RUN/network-snapshot-000200/G_ema.safetensors` uses it directly. `state.pt` is written last and is
the completion marker; it holds only tensors and plain containers and is read with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from facegen.engine.storage import Storage
from facegen.models.checkpoint import load_native, save_native
from facegen.models.discriminator import Discriminator
from facegen.models.errors import UserError
from facegen.models.generator import Generator

FORMAT = 1
NETWORKS = {"G": Generator, "G_ema": Generator, "D": Discriminator, "D_NIR": Discriminator}
INFO_FILE = "snapshot.json"
STATE_FILE = "state.pt"
SNAPSHOT_PATTERN = re.compile(r"^network-snapshot-\d+$")
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-\d+$")


def snapshot_name(cur_nimg: int) -> str:
    return f"network-snapshot-{cur_nimg // 1000:06d}"


def checkpoint_name(cur_nimg: int) -> str:
    return f"checkpoint-{cur_nimg:012d}"  # unique per report, even in tiny runs where kimg stays 0


@dataclass
class Snapshot:
    networks: dict[str, torch.nn.Module]
    state: dict[str, Any]
    info: dict[str, Any]
    source: str


def save_snapshot(folder: str | os.PathLike, networks: dict[str, torch.nn.Module], state: dict[str, Any],
                  info: dict[str, Any]) -> Path:
    """Write a snapshot folder on local disk; `state.pt` goes last, atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    missing = sorted(set(NETWORKS) - set(networks))
    if missing:
        raise ValueError(f"snapshot: networks {missing} missing")
    for name in NETWORKS:
        save_native(networks[name], folder / f"{name}.safetensors")
    (folder / INFO_FILE).write_text(json.dumps({"format": FORMAT, **info}, indent=2, sort_keys=True) + "\n")
    tmp = folder / f".{STATE_FILE}.tmp"
    torch.save({"format": FORMAT, **state}, tmp)
    os.replace(tmp, folder / STATE_FILE)
    return folder


def load_snapshot(folder: str | os.PathLike) -> Snapshot:
    """Networks (CPU, train mode off), the training state and the info of a snapshot folder."""
    folder = Path(folder)
    if not (folder / STATE_FILE).is_file():
        raise UserError(f"{folder}: not a complete facegen snapshot ({STATE_FILE} missing)")
    networks = {}
    for name, cls in NETWORKS.items():
        path = folder / f"{name}.safetensors"
        if not path.is_file():
            raise UserError(f"{path}: file not found (snapshot incomplete)")
        module = load_native(path)
        if not isinstance(module, cls):
            raise UserError(f"{path}: holds a {type(module).__name__}, expected a {cls.__name__}")
        networks[name] = module
    try:
        state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling refusal or corruption
        raise UserError(f"{folder / STATE_FILE}: unreadable training state ({err})") from None
    if not isinstance(state, dict) or state.get("format", 0) > FORMAT:
        raise UserError(f"{folder / STATE_FILE}: unsupported training state format")
    info_path = folder / INFO_FILE
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    return Snapshot(networks, state, info, str(folder))


# -- snapshot folders on any storage ----------------------------------------------------------------
def upload_folder(local: str | os.PathLike, storage: Storage, relative: str) -> None:
    """Copy a local snapshot folder to `storage/relative`, `state.pt` last (the completion marker)."""
    names = sorted(p.name for p in Path(local).iterdir() if p.is_file() and not p.name.startswith("."))
    names.sort(key=lambda n: n == STATE_FILE)
    for name in names:
        storage.write_bytes(posixpath.join(relative, name), (Path(local) / name).read_bytes())


def download_folder(storage: Storage, relative: str, local: str | os.PathLike) -> Path:
    local = Path(local)
    local.mkdir(parents=True, exist_ok=True)
    for name in storage.list(relative):
        (local / name).write_bytes(storage.read_bytes(posixpath.join(relative, name)))
    return local


def _complete(storage: Storage, relative: str) -> dict[str, Any] | None:
    names = storage.list(relative)
    if STATE_FILE not in names or INFO_FILE not in names:
        return None
    return storage.read_json(posixpath.join(relative, INFO_FILE))


def list_snapshots(run: Storage) -> list[tuple[int, str]]:
    """(cur_nimg, relative folder) of every complete snapshot and checkpoint of a run, oldest first."""
    found = []
    candidates = [n for n in run.list() if SNAPSHOT_PATTERN.match(n)]
    candidates += [posixpath.join(CHECKPOINT_DIR, n) for n in run.list(CHECKPOINT_DIR) if CHECKPOINT_PATTERN.match(n)]
    for relative in candidates:
        info = _complete(run, relative)
        if info is not None:
            found.append((int(info["cur_nimg"]), relative))
    # Oldest first; at equal progress a restart checkpoint sorts after (wins over) a network snapshot.
    return sorted(found, key=lambda item: (item[0], item[1].startswith(CHECKPOINT_DIR)))


def latest_snapshot(run: Storage) -> str | None:
    found = list_snapshots(run)
    return found[-1][1] if found else None


def fetch_resume_source(uri: str, storage_options: dict[str, Any] | None, workdir: str
                        ) -> tuple[str, str, str]:
    """(kind, local copy, what it is) for `--resume`: ('snapshot', folder, uri) for a run directory (its
    latest snapshot or checkpoint, named in the third item), a snapshot folder or its state.pt;
    ('pkl', file, uri) for an original `.pkl`."""
    where = Storage(uri, storage_options)
    if uri.endswith(".pkl"):
        if not where.fs.isfile(where.path()):
            raise UserError(f"resume: {uri}: file not found")
        local = Path(workdir) / "resume.pkl"
        local.write_bytes(where.fs.cat_file(where.path()))
        return "pkl", str(local), uri
    if uri.rstrip("/").endswith(STATE_FILE):
        where = Storage(uri.rstrip("/")[: -len(STATE_FILE)].rstrip("/"), storage_options)
    if not where.exists():
        raise UserError(f"resume: {uri}: not found")
    if STATE_FILE in where.list():
        return "snapshot", str(download_folder(where, "", Path(workdir) / "snapshot")), where.uri
    relative = latest_snapshot(where)
    if relative is None:
        raise UserError(f"resume: {uri}: neither a snapshot folder, a run directory with snapshots, nor a .pkl")
    return "snapshot", str(download_folder(where, relative, Path(workdir) / "snapshot")), where.url(relative)


def temporary_folder() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="facegen-snapshot-")
