"""Validation helpers shared by the network configs (GeneratorConfig, DiscriminatorConfig)."""

from __future__ import annotations

import dataclasses
from typing import Any

from facegen.models.errors import UserError


def config_from_dict(cls: type, d: Any, what: str) -> Any:
    """Build a frozen config dataclass from a JSON dict; unknown keys are refused by name."""
    if not isinstance(d, dict):
        raise UserError(f"{what}: expected a mapping, got {type(d).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise UserError(f"{what}: unknown keys {unknown} (known: {sorted(known)})")
    return cls(**d)


def require(ok: bool, what: str, key: str, message: str) -> None:
    if not ok:
        raise UserError(f"{what}.{key}: {message}")


def is_int(v: Any, minimum: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= minimum


def is_number(v: Any, low: float, high: float = float("inf"), low_inclusive: bool = False) -> bool:
    """A real number (not bool) in (low, high) / [low, high)."""
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not v < high:
        return False
    return v >= low if low_inclusive else v > low


def is_pow2(v: Any, minimum: int = 4) -> bool:
    return is_int(v, minimum) and v & (v - 1) == 0
