"""Comparing generated datasets byte for byte."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow.parquet as pq


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every shard, manifest, marker and identities.parquet (what must be byte-identical)."""
    folder = Path(folder)
    files = [p for sub in ("shards", "manifest", "done") for p in sorted((folder / sub).iterdir())]
    files.append(folder / "identities.parquet")
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def manifest_keys(folder: Path) -> list[str]:
    table = pq.read_table(sorted((Path(folder) / "manifest").iterdir()))
    return table["key"].to_pylist()


def assert_same_dataset(folder: Path, reference: Path) -> None:
    """Same bytes as the reference, every sample once, no temporary file left behind."""
    assert digests(folder) == digests(reference)
    keys = manifest_keys(folder)
    assert keys == manifest_keys(reference) and len(keys) == len(set(keys))
    leftovers = [p.name for sub in ("shards", "manifest", "done") for p in (Path(folder) / sub).iterdir()
                 if p.name.startswith(".tmp-")]
    assert leftovers == []
