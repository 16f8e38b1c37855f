"""Phase 3: rejection-sample the samples of every identity in one shard, batched across identities.

Per candidate: privacy against the enrolled set, separability from every *other* identity's anchor,
consistency with its own anchor (>= same_threshold), the quality gate, then diversity against the
identity's already accepted samples (<= diversity_threshold). Attempt 0 is the anchor itself, so the
identity's first sample is re-certified on exactly the image that is written.

Attempts are consumed strictly in order per identity; a round computes several attempts per open
identity at once (to fill a batch), and anything computed after an identity completes is discarded
uncounted. So accepted samples and statistics do not depend on the batch size.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from facegen.engine.bundle import Bundle, Candidates
from facegen.engine.index.anchors import best_other, exact_sims, max_other_above, near, settle_above, settle_at_least
from facegen.engine.phases import ExpandedShard, Identities
from facegen.engine.repair import NOT_SWAPPED, SwapTargets, repair_rejected
from facegen.engine.seeding import Stream, draw_keys


def expand_shard(bundle: Bundle, identities: Identities, labels: np.ndarray) -> ExpandedShard:
    spec, device = bundle.spec, bundle.device
    K, limits = spec.samples_per_identity, spec.filter
    labels = np.asarray(labels, np.int64)
    # Only this shard's own anchors as a tensor; every other identity is searched through the anchor
    # index (engine/index/anchors.py), never as a [candidates x identities] matrix.
    own_anchor = torch.tensor(identities.anchor[labels], device=device)
    checks = _Checks(bundle, identities, labels, own_anchor)
    state = _ShardState(len(labels), K, identities.anchor.shape[1], device)

    while True:
        # Phase a: the next attempts of every open identity, enough to fill about one batch.
        active = np.flatnonzero((state.count < K) & (state.next_attempt < limits.max_attempts))
        if not active.size:
            break
        per_id = np.minimum(
            -(-spec.batch_size // len(active)), limits.max_attempts - state.next_attempt[active]
        )
        owner = np.repeat(active, per_id)
        position = np.arange(len(owner)) - np.repeat(np.cumsum(per_id) - per_id, per_id)
        attempt = state.next_attempt[owner] + position
        slots = identities.slot[labels[owner]]
        conditions, keys = identities.condition[labels[owner]], draw_keys(spec.seed, Stream.LATENT, slots, attempt)
        targets = None
        if bundle.repair is not None:
            # Every sample of an identity at its anchor's repair level: the same swapped-in identity units.
            base = NOT_SWAPPED if identities.repair is None else identities.repair[labels[owner]]
            targets = SwapTargets(slots, np.broadcast_to(np.asarray(base, np.int64), slots.shape).copy())
        found = bundle.evaluate(conditions, keys, targets)
        level, tried = None, None
        if targets is not None:
            found, level, tried = repair_rejected(bundle, conditions, keys, targets, found)

        # Phase b: the checks that do not depend on other candidates, all at once.
        anchor_sim, too_close = checks.same_and_separability(found, owner)
        reason = np.full(len(owner), "", dtype=object)
        reason[~bundle.gate(found.vis)] = "quality"
        reason[anchor_sim < limits.same_threshold] = "same"
        reason[too_close] = "separability"
        reason[found.real_sim > spec.privacy.value] = "privacy"
        reason[~np.isfinite(found.real_sim) | ~np.isfinite(anchor_sim)] = "invalid"

        # Phase c: diversity is sequential within an identity: walk attempt positions in order.
        for j in range(int(per_id.max())):
            rows = np.flatnonzero(position == j)
            rows = rows[state.count[owner[rows]] < K]
            if not rows.size:
                break
            state.step(rows, owner, attempt, reason, found, anchor_sim, limits.diversity_threshold, checks,
                       level, tried)

    return state.result(labels, identities, spec.privacy.value, bundle.index, repair=bundle.repair is not None)


class _Checks:
    """Same-identity, separability and diversity decisions that equal an fp32 run's and do not depend on
    the search's sharding: a reduced-precision candidate within the embedder's margin δ of a threshold
    is re-embedded in fp32 first (`Bundle.embed_exact`, as the privacy recheck does), then any float32
    similarity within the summation-order window is decided in float64 (engine/index/anchors.py)."""

    def __init__(self, bundle: Bundle, identities: Identities, labels: np.ndarray, own_anchor: torch.Tensor):
        self.bundle, self.identities, self.labels, self.own_anchor = bundle, identities, labels, own_anchor
        self.margin = bundle.precision.margin if bundle.precision.reduced else 0.0
        self.dim = identities.anchor.shape[1]
        self.search = identities.searcher(str(bundle.device)) if len(identities) > 1 else None
        self.same = bundle.spec.filter.same_threshold
        self.separability = bundle.spec.privacy.separability

    def near(self, sims: np.ndarray, threshold: float, extra: float | np.ndarray = 0.0) -> np.ndarray:
        return near(sims, threshold, extra, dim=self.dim)

    def make_exact(self, found: Candidates, rows: np.ndarray) -> np.ndarray:
        """Re-embed the reduced-precision candidates among `rows` in fp32; returns the ones it changed."""
        rows = rows[~found.exact[rows]]
        if len(rows):
            exact = self.bundle.embed_exact(found.vis[rows])
            found.embedding[torch.from_numpy(rows).to(found.embedding.device)] = exact
            found.exact[rows] = True
        return rows

    def same_and_separability(self, found: Candidates, owner: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(similarity to the own anchor, settled at the same-identity threshold; too close to another
        identity's anchor) per candidate."""
        labels = self.labels[owner]
        anchor_sim = self._anchor_sim(found, owner)
        best = self._best_other(found.embedding, labels)
        if self.margin:
            unsure = self.near(anchor_sim, self.same, self.margin) | self.near(best, self.separability, self.margin)
            changed = self.make_exact(found, np.flatnonzero(unsure))
            if len(changed):
                anchor_sim[changed] = self._anchor_sim(found, owner, changed)
                best[changed] = self._best_other(found.embedding[torch.from_numpy(changed).to(self.bundle.device)],
                                                 labels[changed])
        close = np.flatnonzero(self.near(anchor_sim, self.same))
        if len(close):
            index = torch.from_numpy(close).to(found.embedding.device)
            exact = exact_sims(found.embedding[index].cpu().numpy(), self.identities.anchor[labels[close]])
            anchor_sim[close] = settle_at_least(exact, self.same)
        if self.search is None:
            return anchor_sim, np.zeros(len(owner), bool)
        _, too_close = max_other_above(self.search.search, self.identities_vectors,
                                       found.embedding.cpu().numpy(), self.separability, exclude=labels, best=best)
        return anchor_sim, too_close

    def identities_vectors(self, rows: np.ndarray) -> np.ndarray:
        return self.identities.anchor[np.asarray(rows, np.int64)]

    def _anchor_sim(self, found: Candidates, owner: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        embedding, anchors = found.embedding, self.own_anchor[torch.from_numpy(owner).to(self.own_anchor.device)]
        if rows is not None:
            index = torch.from_numpy(rows).to(embedding.device)
            embedding, anchors = embedding[index], anchors[index]
        return (embedding.float() * anchors).sum(dim=1).cpu().numpy()

    def _best_other(self, embedding: torch.Tensor, labels: np.ndarray) -> np.ndarray:
        if self.search is None:  # a single identity has no other
            return np.full(len(labels), -np.inf, np.float32)
        return best_other(*self.search.search(embedding.float().cpu().numpy(), 2), labels)


class _ShardState:
    """Accepted samples so far, per shard-local identity, plus counters."""

    def __init__(self, n: int, K: int, dim: int, device: torch.device):
        self.K = K
        self.count = np.zeros(n, np.int64)
        self.next_attempt = np.zeros(n, np.int64)
        self.embeddings = torch.zeros(n, K, dim, device=device)
        self.exact = np.zeros((n, K), bool)  # is the accepted sample's embedding the fp32 one
        self.images: dict[tuple[int, int], np.ndarray] = {}  # (identity, sample) -> VIS, for fp32 rechecks
        self.reasons: Counter = Counter()
        self.attempts = 0
        self.chunks: list[dict[str, np.ndarray]] = []
        # privacy.repair: candidates repaired here, and what became of them ('accepted' or a reason)
        self.repair_outcomes: Counter = Counter()

    def diversity(self, rows, owner, found: Candidates, checks: _Checks, threshold: float) -> np.ndarray:
        """Max similarity of each candidate in `rows` to its identity's accepted samples (-inf: none):
        a pair within the margin of the threshold is compared in fp32 on both sides, one within the
        float32 window in float64 (and settled on its side of the threshold)."""
        ids = owner[rows]
        device = found.embedding.device
        index = torch.from_numpy(rows).to(device)
        filled = (np.arange(self.K)[None, :] < self.count[ids][:, None])

        def pair_sims() -> np.ndarray:
            sims = torch.einsum("bd,bkd->bk", found.embedding[index], self.embeddings[ids])
            return np.where(filled, sims.cpu().numpy(), np.float32(-np.inf))

        sims = pair_sims()
        if checks.margin:  # the pair's margin: δ for each side still in reduced precision
            sides = (~found.exact[rows])[:, None].astype(np.int64) + (~self.exact[ids]).astype(np.int64)
            unsure = checks.near(sims, threshold, checks.margin * sides) & filled & (sides > 0)
            if unsure.any():
                checks.make_exact(found, rows[unsure.any(axis=1)])
                b, k = np.nonzero(unsure & ~self.exact[ids])
                if len(b):
                    vis = np.stack([self.images[(int(ids[i]), int(j))] for i, j in zip(b, k)])
                    self.embeddings[torch.from_numpy(ids[b]), torch.from_numpy(k)] = checks.bundle.embed_exact(vis)
                    self.exact[ids[b], k] = True
                sims = pair_sims()
        b, k = np.nonzero(checks.near(sims, threshold) & filled)
        if len(b):
            candidate = found.embedding[torch.from_numpy(rows[b]).to(device)].cpu().numpy()
            accepted = self.embeddings[torch.from_numpy(ids[b]), torch.from_numpy(k)].cpu().numpy()
            sims[b, k] = settle_above(exact_sims(candidate, accepted), threshold)
        return sims.max(axis=1)

    def step(self, rows, owner, attempt, reason, found, anchor_sim, diversity_threshold, checks,
             level=None, tried=None) -> None:
        """Decide one attempt position: `rows` hold at most one candidate per open identity. `level` and
        `tried` (privacy.repair): each candidate's repair level and whether it was repaired here."""
        ids = owner[rows]
        self.attempts += len(rows)
        self.next_attempt[ids] = attempt[rows] + 1
        diversity_sim = self.diversity(rows, owner, found, checks, diversity_threshold)
        passing = reason[rows] == ""
        reason[rows[passing & (diversity_sim > diversity_threshold)]] = "diversity"
        self.reasons.update(r for r in reason[rows] if r)

        accept = reason[rows] == ""
        if tried is not None:
            repaired = rows[tried[rows]]
            self.repair_outcomes.update(reason[r] or "accepted" for r in repaired)
        take, local = rows[accept], ids[accept]
        sample = self.count[local].copy()
        self.embeddings[local, sample] = found.embedding[take]
        self.exact[local, sample] = found.exact[take]
        if checks.margin:
            self.images.update({(int(i), int(s)): found.vis[t] for i, s, t in zip(local, sample, take)})
        self.count[local] += 1
        self.chunks.append(
            {
                "local": local,
                "sample": sample,
                "attempt": attempt[take],
                "vis": found.vis[take],
                "nir": None if found.nir is None else found.nir[take],
                "real_sim": found.real_sim[take],
                "real_row": found.real_row[take],
                "anchor_sim": anchor_sim[take],
                "diversity_sim": diversity_sim[accept],
                "repair": np.full(len(take), -1, np.int64) if level is None else level[take],
            }
        )

    def result(self, labels, identities: Identities, threshold: float, index, repair: bool = False) -> ExpandedShard:
        cols = {k: np.concatenate([c[k] for c in self.chunks]) for k in self.chunks[0] if k != "nir"}
        order = np.lexsort((cols["sample"], cols["local"]))
        cols = {k: v[order] for k, v in cols.items()}
        nir = (
            None if self.chunks[0]["nir"] is None else np.concatenate([c["nir"] for c in self.chunks])[order]
        )
        label = labels[cols["local"]]
        nearest = index.identity_of(cols["real_row"])
        metas = [
            {
                "identity": int(label[k]),
                "sample": int(cols["sample"][k]),
                "slot": int(identities.slot[label[k]]),
                "attempt": int(cols["attempt"][k]),
                "privacy_max_sim": float(cols["real_sim"][k]),
                "anchor_sim": float(cols["anchor_sim"][k]),
                "diversity_max_sim": float(cols["diversity_sim"][k]) if cols["sample"][k] else None,
                # with privacy.repair: the repair target whose identity units the sample carries (-1: none)
                **({"repair": int(cols["repair"][k])} if repair else {}),
            }
            for k in range(len(order))
        ]
        stats = {
            "identities": len(labels),
            "samples": len(order),
            "attempts": self.attempts,
            "rejected": dict(sorted(self.reasons.items())),
            "exhausted_identities": int((self.count < self.K).sum()),
            "max_real_sim": float(cols["real_sim"].max()) if len(order) else None,
            "violations": int((cols["real_sim"] > threshold).sum()),
        }
        if repair:
            outcomes = self.repair_outcomes
            stats["repair"] = {"tried": sum(outcomes.values()), "accepted": outcomes.get("accepted", 0),
                               "rejected": {k: v for k, v in sorted(outcomes.items()) if k != "accepted"},
                               "written_swapped": int((cols["repair"] >= 0).sum())}
        return ExpandedShard(label, cols["sample"], cols["vis"], nir, metas, stats, nearest=nearest)
