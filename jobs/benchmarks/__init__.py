"""`facegen bench` benchmarks, one module each, every one exposing `register(subparsers)`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_record(path: Path | None, record: Any) -> None:
    """A benchmark's `--json PATH` (nothing without one): indented, folders created, values JSON lacks as text."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")


def mib(n: float, decimals: int = 1) -> str:
    return f"{n / 2**20:,.{decimals}f} MiB"
