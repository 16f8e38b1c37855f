"""The three generation phases: propose (an anchor per identity slot), select, expand (the samples).

Each is a function of the job spec, the loaded models and plain arrays; the local and the Ray
executors only decide where and in which order they run. Decisions never depend on batch sizes:
every candidate is a pure function of (seed, slot, attempt), and expand consumes attempts strictly
in order, discarding any computed past the point where an identity is complete.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from facegen.engine.bundle import Bundle
from facegen.engine.index.anchors import AnchorIndex, AnchorShards, exact_sims, max_other_above, near, settle_above
from facegen.engine.repair import NOT_SWAPPED, SwapTargets, repair_rejected
from facegen.engine.seeding import Stream, draw_keys, random_directions

# Rejection reasons, in the order they are checked: a candidate counts under the first it fails.
REASONS = ("invalid", "privacy", "separability", "same", "quality", "diversity")


@dataclass
class Proposals:
    """Phase-1 rows for a range of identity slots."""

    slot: np.ndarray  # int64 [P]
    condition: np.ndarray  # float32 [P, c_dim]
    anchor: np.ndarray  # float32 [P, dim], L2-normalised
    real_sim: np.ndarray  # float32 [P]
    real_identity: np.ndarray  # str [P]
    verdict: np.ndarray  # str [P]: 'ok' or the rejection reason
    # With privacy.repair: the anchor's repair level (-1: as drawn) and whether a repair was tried.
    repair: np.ndarray | None = None  # int64 [P]
    repair_tried: np.ndarray | None = None  # bool [P]


def conditions_for(bundle: Bundle, slots: np.ndarray) -> np.ndarray:
    spec = bundle.spec
    keys = draw_keys(spec.seed, Stream.CONDITION, slots)
    if bundle.c_dim == 0:
        return np.zeros((len(slots), 0), np.float32)
    return random_directions(keys, bundle.c_dim, spec.condition.norm)


def propose(bundle: Bundle, slots: np.ndarray) -> Proposals:
    """Condition + anchor image (attempt 0) per slot, embedded, privacy-queried and quality-gated.
    With privacy.repair, an anchor rejected for privacy is repaired (engine/repair.py) and every
    check runs on the repaired image."""
    spec = bundle.spec
    slots = np.asarray(slots, np.int64)
    conditions = conditions_for(bundle, slots)
    keys = draw_keys(spec.seed, Stream.LATENT, slots, 0)
    # Anchors in fp32 whatever embedder.dtype says: every later decision compares with them, and so
    # identities.parquet (and everything decided against it) is the same as an fp32 run's.
    found = bundle.evaluate(conditions, keys, exact=True)
    level = tried = None
    if bundle.repair is not None:
        unswapped = SwapTargets(slots, np.full(len(slots), NOT_SWAPPED, np.int64))
        found, level, tried = repair_rejected(bundle, conditions, keys, unswapped, found, exact=True)
    verdict = np.full(len(slots), "ok", dtype=object)
    verdict[~bundle.gate(found.vis)] = "quality"
    verdict[found.real_sim > spec.privacy.value] = "privacy"
    verdict[~np.isfinite(found.real_sim)] = "invalid"
    return Proposals(
        slot=slots,
        condition=conditions,
        anchor=found.embedding.float().cpu().numpy(),
        real_sim=found.real_sim,
        real_identity=bundle.index.identity_of(found.real_row).astype(object),
        verdict=verdict,
        repair=level,
        repair_tried=tried,
    )


@dataclass
class Selection:
    """Phase 2, incremental: a deterministic greedy pass over proposals in slot order.

    A passing slot is accepted if its anchor is at most `threshold` similar to every earlier accepted
    anchor. Offering proposals in several calls gives the same result as one call with all of them.
    Earlier anchors are searched through an `AnchorIndex` (the privacy index's exact search, shard by
    shard), and every similarity near the threshold is decided in float64 (engine/index/anchors.py),
    so acceptance never depends on how the search is sharded or batched.
    """

    wanted: int
    threshold: float
    rows: list[Proposals] = field(default_factory=list)
    index: AnchorIndex | None = None  # the accepted anchors, label = row
    verdicts: Counter = field(default_factory=Counter)
    offered: int = 0
    # Verdicts of the proposals whose anchor went through privacy repair ('ok': accepted, repaired).
    repair_verdicts: Counter = field(default_factory=Counter)
    device: str = "cpu"

    @property
    def accepted(self) -> int:
        return 0 if self.index is None else self.index.count

    @property
    def done(self) -> bool:
        return self.accepted >= self.wanted

    def offer(self, proposals: Proposals) -> None:
        order = np.argsort(proposals.slot, kind="stable")
        for start in range(0, len(order), 512):
            if self.done:
                return
            self._offer_block(proposals, order[start : start + 512])

    def _offer_block(self, proposals: Proposals, rows: np.ndarray) -> None:
        verdict = proposals.verdict[rows].copy()
        anchors = proposals.anchor[rows]
        ok = np.flatnonzero(verdict == "ok")
        # Against everything accepted before this block: one exact search.
        if self.accepted and len(ok):
            _, too_close = max_other_above(self.index.search, self.index.vectors, anchors[ok], self.threshold)
            verdict[ok[too_close]] = "separability"
        # Within the block the greedy pass is sequential by nature; it is cheap (block x block).
        close = pairwise_above(anchors, self.threshold)
        taken: list[int] = []
        for i in range(len(rows)):
            if self.accepted + len(taken) >= self.wanted:
                verdict[i:] = "unused"
                break
            if verdict[i] != "ok":
                continue
            if taken and close[i, taken].any():
                verdict[i] = "separability"
                continue
            taken.append(i)
        self.verdicts.update(v for v in verdict if v != "unused")
        if proposals.repair_tried is not None:
            self.repair_verdicts.update(v for v in verdict[proposals.repair_tried[rows]] if v != "unused")
        self.offered += int((verdict != "unused").sum())
        if taken:
            chosen = rows[np.asarray(taken)]
            self.rows.append(_take(proposals, chosen))
            if self.index is None:
                self.index = AnchorIndex(anchors.shape[1], device=self.device)
            self.index.add(proposals.anchor[chosen])


def pairwise_above(vectors: np.ndarray, threshold: float) -> np.ndarray:
    """bool [n, n]: similarity of rows i and j > threshold, decided in float64 near the threshold."""
    sims = vectors @ vectors.T
    i, j = np.nonzero(near(sims, threshold, dim=vectors.shape[1]))
    sims[i, j] = settle_above(exact_sims(vectors[i], vectors[j]), threshold)
    return sims > threshold


def _take(p: Proposals, rows: np.ndarray) -> Proposals:
    return Proposals(
        p.slot[rows],
        p.condition[rows],
        p.anchor[rows],
        p.real_sim[rows],
        p.real_identity[rows],
        p.verdict[rows],
        None if p.repair is None else p.repair[rows],
        None if p.repair_tried is None else p.repair_tried[rows],
    )


@dataclass
class Identities:
    """The phase-2 table: identity label i is row i."""

    slot: np.ndarray  # int64 [N]
    condition: np.ndarray  # float32 [N, c_dim]
    anchor: np.ndarray  # float32 [N, dim]
    anchor_real_sim: np.ndarray  # float32 [N]
    anchor_real_identity: np.ndarray  # str [N]
    # With privacy.repair: the repair level every sample of the identity is rendered at (-1: none).
    repair: np.ndarray | None = None  # int64 [N]
    # Where the anchors are searched for separability (an `AnchorIndex` / `AnchorShards` in this
    # process, or the cluster's `RemoteAnchors`); None: built from `anchor` where first needed.
    anchor_search: Any = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.slot)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if not getattr(state["anchor_search"], "remote", False):
            state["anchor_search"] = None  # a local index stays in its process: the receiver builds its own
        return state

    def searcher(self, device: str = "cpu") -> Any:
        """The anchors' exact search (`search(queries, k)`), built here on first use."""
        if self.anchor_search is None:
            self.anchor_search = AnchorShards(self.anchor, device=str(device))
        return self.anchor_search

    @classmethod
    def from_selection(cls, selection: Selection) -> Identities:
        parts = selection.rows
        cat = (lambda name: np.concatenate([getattr(p, name) for p in parts])) if parts else None
        if not parts:
            raise ValueError("no identity was accepted")
        repair = cat("repair") if parts[0].repair is not None else None
        return cls(cat("slot"), cat("condition"), cat("anchor"), cat("real_sim"), cat("real_identity"), repair,
                   anchor_search=selection.index)


@dataclass
class ExpandedShard:
    """Accepted samples of one shard (in key order) and the shard's statistics."""

    labels: np.ndarray
    samples: np.ndarray
    vis: np.ndarray
    nir: np.ndarray | None
    metas: list[dict]
    stats: dict
    # Not for release: which real identity each sample came closest to (engine.private writes it).
    nearest: np.ndarray | None = None
