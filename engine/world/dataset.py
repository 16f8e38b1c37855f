"""Writing a world population in the original's dataset layout: `VIS/{identity}_{sample}.png` (RGB) and
`NIR/` with the same names (greyscale), plus `world.json` recording what was rendered.

The layout is what `facegen index build --images`, `facegen features` and `facegen train` read. Every
sample is a pure function of (seed, identity, sample), so batches are only a memory bound, an
interrupted render resumes by rendering the files that are missing, and a rerun is byte-identical.
"""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from facegen.engine.progress import progress_bar
from facegen.engine.storage import Storage
from facegen.engine.world import render
from facegen.models.errors import UserError

WORLD_FILE = "world.json"
FORMAT = "facegen-world/1"
RESOLUTIONS = (16, 1024)


def file_names(identities: int, samples: int) -> list[str]:
    """`{identity}_{sample}.png`, zero-padded so plain and natural sort agree, identity-major."""
    iw, sw = max(5, len(str(identities - 1))), max(2, len(str(samples - 1)))
    return [f"{i:0{iw}d}_{k:0{sw}d}.png" for i in range(identities) for k in range(samples)]


def world_record(identities: int, samples: int, resolution: int, seed: int) -> dict:
    return {"format": FORMAT, "identities": identities, "samples": samples, "resolution": resolution,
            "seed": seed}


def check_request(identities: int, samples: int, resolution: int, seed: int) -> None:
    if identities < 1:
        raise UserError(f"--identities: {identities} must be at least 1")
    if samples < 1:
        raise UserError(f"--samples: {samples} must be at least 1")
    if not RESOLUTIONS[0] <= resolution <= RESOLUTIONS[1]:
        raise UserError(f"--resolution: {resolution} must be in [{RESOLUTIONS[0]}, {RESOLUTIONS[1]}]")
    if not 0 <= seed < 2**63:
        raise UserError(f"--seed: {seed} must be a non-negative 64-bit integer")


def open_world(out: Storage, record: dict) -> None:
    """Write world.json into an empty location, or accept the same request's earlier output (resume)."""
    out.check_writable()
    if out.exists(WORLD_FILE):
        try:
            existing = out.read_json(WORLD_FILE)
        except ValueError:
            existing = None
        if existing != record:
            raise UserError(f"{out.url()} holds another world ({out.url(WORLD_FILE)}: {existing}); "
                            f"choose another output")
        return
    leftovers = [name for name in out.list() if not name.startswith(".")] if out.exists() else []
    if leftovers:
        raise UserError(f"{out.url()} is not empty ({', '.join(sorted(leftovers)[:5])}); choose another output")
    out.write_text(WORLD_FILE, json.dumps(record, indent=2, sort_keys=True) + "\n")


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def render_dataset(out: str | Storage, identities: int, samples: int, *, resolution: int = 64, seed: int = 0,
                   batch: int = 64, workers: int = 4, progress: bool = True) -> dict:
    """Render identities x samples VIS/NIR pairs into `out`; returns what was written."""
    check_request(identities, samples, resolution, seed)
    out = out if isinstance(out, Storage) else Storage(str(out))
    record = world_record(identities, samples, resolution, seed)
    open_world(out, record)
    names = np.array(file_names(identities, samples))
    present = set(out.list("VIS")) & set(out.list("NIR")) if out.exists("VIS") and out.exists("NIR") else set()
    todo = np.array([i for i, name in enumerate(names) if name not in present], dtype=np.int64)
    out.makedirs("VIS")
    out.makedirs("NIR")
    with progress_bar(len(names), "world images", "img", progress) as bar, \
            ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        bar.update(len(names) - len(todo))
        for start in range(0, len(todo), batch):
            flat = todo[start:start + batch]
            vis, nir = render(seed, flat // samples, flat % samples, resolution)
            # Each file is written atomically; a resume renders every pair not complete in both folders.
            jobs = [pool.submit(_write, out, f"NIR/{names[j]}", nir[k]) for k, j in enumerate(flat)]
            jobs += [pool.submit(_write, out, f"VIS/{names[j]}", vis[k]) for k, j in enumerate(flat)]
            for job in jobs:
                job.result()
            bar.update(len(flat))
    return {**record, "rendered": int(len(todo)), "already_present": int(len(names) - len(todo)),
            "uri": out.url()}


def _write(out: Storage, relative: str, image: np.ndarray) -> None:
    out.write_bytes(relative, png_bytes(image))
