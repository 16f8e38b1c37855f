"""Privacy repair: a candidate too close to a real person gets a new identity instead of being discarded.

StyleID (Le & Carlsson, PoPETs 2023) anonymises a face by copying its identity-carrying latent units
from another face; pose, expression and lighting stay. Generation uses the same swap on its own
rejects: a candidate whose maximum similarity to the enrolled people exceeds the privacy threshold is
re-rendered with the top `n` units of a rank table (`facegen disentangle rank`) taken from a fresh
seeded random face, its *repair target*, and goes through every filter again like any candidate.

Target `t` of identity slot `s` is a pure function of (job seed, s, t) (stream `REPAIR_TARGET`:
attempt 2t draws its condition, 2t+1 its latent, like the swap faces of `engine/anonymise`), so a
repaired image is regenerated from (seed, slot, attempt, repair level) and the rank table. A candidate
rendered at level `l` (-1: not swapped) that fails privacy tries levels l+1, l+2, ... below `tries`.
Every sample of an identity whose anchor was repaired at level `t` is rendered at level `t`: the
swapped-in units are the same for all of them, so they stay one person.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from facegen.engine.seeding import Stream, draw_keys, normal, random_directions
from facegen.engine.spec import RepairSpec
from facegen.engine.storage import Storage
from facegen.models.errors import JobFailed, UserError
from facegen.models.latent_space import swap
from facegen.models.rendering import LatentSpaces

if TYPE_CHECKING:
    from facegen.engine.bundle import Bundle, Candidates

NOT_SWAPPED = -1


@dataclass(frozen=True)
class SwapTargets:
    """Per candidate: its identity slot and repair level (-1: rendered as drawn, t >= 0: target t)."""

    slots: np.ndarray  # int64 [N]
    levels: np.ndarray  # int64 [N]

    def take(self, rows: np.ndarray | slice) -> SwapTargets:
        return SwapTargets(self.slots[rows], self.levels[rows])

    @property
    def any(self) -> bool:
        return bool((self.levels > NOT_SWAPPED).any())


class Repair:
    """The loaded repair option of a job: which units are swapped, and the seeded targets."""

    def __init__(self, spec: RepairSpec, units: np.ndarray, mask: torch.Tensor) -> None:
        self.spec, self.units, self.mask = spec, units, mask

    @property
    def tries(self) -> int:
        return self.spec.tries

    @classmethod
    def open(cls, spec: RepairSpec, renderer: object) -> Repair:
        """Read the rank table and pick the top-n units of the spec's space and width; one UserError
        naming `privacy.repair` for anything that cannot work."""
        if not isinstance(renderer, LatentSpaces):
            raise UserError(f"privacy.repair: the generator ({type(renderer).__name__}) has no W+/StyleSpace "
                            "latent space to swap identity units in")
        units = top_units_for(spec, renderer)
        if spec.units_sha256 is not None and spec.units_sha256 != units_sha256(units):
            raise JobFailed(f"privacy.repair.ranks: {spec.ranks} changed since this job started (its top "
                            f"{spec.n} units differ); restore it or start a new job")
        return cls(spec, units, renderer.layout(spec.space).mask(units))

    def target_inputs(self, seed: int, condition_norm: float, targets: SwapTargets, z_dim: int, c_dim: int
                      ) -> tuple[np.ndarray, np.ndarray | None]:
        """(z, c) of the repair targets of the given (slot, level) rows (levels >= 0)."""
        slots, levels = targets.slots, targets.levels
        z = normal(draw_keys(seed, Stream.REPAIR_TARGET, slots, 2 * levels + 1), z_dim)
        c = None
        if c_dim:
            c = random_directions(draw_keys(seed, Stream.REPAIR_TARGET, slots, 2 * levels), c_dim, condition_norm)
        return z, c

    def render(self, renderer: LatentSpaces, z: torch.Tensor, c: torch.Tensor | None,
               noise: dict[str, torch.Tensor] | None, targets: SwapTargets, seed: int, condition_norm: float):
        """Images of a batch in which the rows with a level >= 0 get their target's units. Rows without
        one render exactly as `renderer.render(z, c, noise)` would (the same mapping and synthesis)."""
        space = self.spec.space
        codes = renderer.encode(space, renderer.w_plus(z, c))
        rows = np.flatnonzero(targets.levels > NOT_SWAPPED)
        tz, tc = self.target_inputs(seed, condition_norm, targets.take(rows), renderer.z_dim, renderer.c_dim)
        device = z.device
        target_ws = renderer.w_plus(torch.from_numpy(tz).to(device),
                                    None if tc is None else torch.from_numpy(tc).to(device))
        index = torch.from_numpy(rows).to(device)
        codes = codes.index_copy(0, index, swap(codes[index], renderer.encode(space, target_ws), self.mask))
        return renderer.render_codes(space, codes, noise)


def top_units_for(spec: RepairSpec, renderer: LatentSpaces) -> np.ndarray:
    """The spec's top-n units (layer, start, width), checked against this generator's layout."""
    from facegen.engine.anonymise.rank import read_ranks, select

    folder, _, name = spec.ranks.rpartition("/")
    storage = Storage(folder or ".")
    if not name or not storage.exists(name):
        raise UserError(f"privacy.repair.ranks: {spec.ranks}: file not found (make one with `facegen disentangle "
                        "rank`)")
    table = read_ranks(storage.read_bytes(name), f"privacy.repair.ranks: {spec.ranks}")
    rows = select(table, spec.space, spec.unit_width, f"privacy.repair.ranks: {spec.ranks}")
    if spec.n > rows.num_rows:
        raise UserError(f"privacy.repair.n: {spec.n} is more than the {rows.num_rows} {spec.space} units of width "
                        f"{spec.unit_width} in {spec.ranks}")
    units = np.stack([rows.column(c).to_numpy()[: spec.n] for c in ("layer", "start", "width")], axis=1)
    units = units.astype(np.int64)
    layout = renderer.layout(spec.space)
    known = {tuple(u) for u in layout.units(spec.unit_width or None).tolist()}
    if any(tuple(u) not in known for u in units.tolist()):
        raise UserError(f"privacy.repair.ranks: {spec.ranks} was ranked on another generator (its {spec.space} "
                        f"units do not fit this generator's {layout.num_layers} layers of widths {layout.widths[:4]}…)")
    return units


def units_sha256(units: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(units, np.int64).tobytes()).hexdigest()


def resolve_repair(spec: RepairSpec | None, renderer: object) -> RepairSpec | None:
    """The spec with the digest of the units it swaps (recorded in job.yaml, so a resume whose rank
    table changed is refused by the spec hash)."""
    if spec is None:
        return None
    return spec.model_copy(update={"units_sha256": units_sha256(Repair.open(
        spec.model_copy(update={"units_sha256": None}), renderer).units)})


def is_rejected(real_sim: np.ndarray, threshold: float) -> np.ndarray:
    """Rejected for privacy (not invalid): what a repair can fix."""
    return np.isfinite(real_sim) & (real_sim > threshold)


def repair_rejected(bundle: Bundle, conditions: np.ndarray, latent_keys: np.ndarray, targets: SwapTargets,
                    found: Candidates, *, exact: bool = False) -> tuple[Candidates, np.ndarray, np.ndarray]:
    """Privacy-rejected candidates re-rendered at their next repair levels until one passes privacy or
    the tries run out. Returns the candidates (repaired rows replaced in place), each row's final level
    and which rows were repaired at all. Batched: one `evaluate` per level over the rows still failing."""
    threshold, tries = bundle.spec.privacy.value, bundle.repair.tries
    levels = targets.levels.copy()
    todo = np.flatnonzero(is_rejected(found.real_sim, threshold) & (levels + 1 < tries))
    tried = np.zeros(len(levels), bool)
    tried[todo] = True
    while todo.size:
        levels[todo] += 1
        again = bundle.evaluate(conditions[todo], latent_keys[todo], SwapTargets(targets.slots[todo], levels[todo]),
                                exact=exact)  # fp32 for anchors, as `propose` embeds them
        found.put(todo, again)
        todo = todo[is_rejected(again.real_sim, threshold) & (levels[todo] + 1 < tries)]
    return found, levels, tried
