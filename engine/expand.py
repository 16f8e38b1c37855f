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

from facegen.engine.bundle import Bundle
from facegen.engine.phases import ExpandedShard, Identities
from facegen.engine.repair import NOT_SWAPPED, SwapTargets, repair_rejected
from facegen.engine.seeding import Stream, draw_keys


def expand_shard(bundle: Bundle, identities: Identities, labels: np.ndarray) -> ExpandedShard:
    spec, device = bundle.spec, bundle.device
    K, limits = spec.samples_per_identity, spec.filter
    labels = np.asarray(labels, np.int64)
    # torch.tensor copies: under Ray the identities arrive read-only from the object store.
    all_anchors = torch.tensor(identities.anchor, device=device)
    own_anchor = all_anchors[torch.from_numpy(labels).to(device)]
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
        embedding = found.embedding.float()

        # Phase b: the checks that do not depend on other candidates, all at once.
        anchor_sim = (embedding * own_anchor[owner]).sum(dim=1).cpu().numpy()
        others = embedding @ all_anchors.T
        others[torch.arange(len(owner)), torch.from_numpy(labels[owner]).to(device)] = -torch.inf
        separability_sim = (
            others.max(dim=1).values.cpu().numpy() if len(all_anchors) > 1 else np.full(len(owner), -1.0)
        )
        reason = np.full(len(owner), "", dtype=object)
        reason[~bundle.gate(found.vis)] = "quality"
        reason[anchor_sim < limits.same_threshold] = "same"
        reason[separability_sim > spec.privacy.separability] = "separability"
        reason[found.real_sim > spec.privacy.value] = "privacy"
        reason[~np.isfinite(found.real_sim) | ~np.isfinite(anchor_sim)] = "invalid"

        # Phase c: diversity is sequential within an identity: walk attempt positions in order.
        for j in range(int(per_id.max())):
            rows = np.flatnonzero(position == j)
            rows = rows[state.count[owner[rows]] < K]
            if not rows.size:
                break
            state.step(rows, owner, attempt, reason, found, embedding, anchor_sim, limits.diversity_threshold,
                       level, tried)

    return state.result(labels, identities, spec.privacy.value, bundle.index, repair=bundle.repair is not None)


class _ShardState:
    """Accepted samples so far, per shard-local identity, plus counters."""

    def __init__(self, n: int, K: int, dim: int, device: torch.device):
        self.K = K
        self.count = np.zeros(n, np.int64)
        self.next_attempt = np.zeros(n, np.int64)
        self.embeddings = torch.zeros(n, K, dim, device=device)
        self.reasons: Counter = Counter()
        self.attempts = 0
        self.chunks: list[dict[str, np.ndarray]] = []
        # privacy.repair: candidates repaired here, and what became of them ('accepted' or a reason)
        self.repair_outcomes: Counter = Counter()

    def step(self, rows, owner, attempt, reason, found, embedding, anchor_sim, diversity_threshold,
             level=None, tried=None) -> None:
        """Decide one attempt position: `rows` hold at most one candidate per open identity. `level` and
        `tried` (privacy.repair): each candidate's repair level and whether it was repaired here."""
        ids = owner[rows]
        self.attempts += len(rows)
        self.next_attempt[ids] = attempt[rows] + 1
        filled = torch.from_numpy(self.count[ids]).to(embedding.device)
        mask = torch.arange(self.K, device=embedding.device)[None, :] < filled[:, None]
        sims = torch.einsum("bd,bkd->bk", embedding[rows], self.embeddings[ids]).masked_fill(
            ~mask, -torch.inf
        )
        diversity_sim = sims.max(dim=1).values.cpu().numpy()
        passing = reason[rows] == ""
        reason[rows[passing & (diversity_sim > diversity_threshold)]] = "diversity"
        self.reasons.update(r for r in reason[rows] if r)

        accept = reason[rows] == ""
        if tried is not None:
            repaired = rows[tried[rows]]
            self.repair_outcomes.update(reason[r] or "accepted" for r in repaired)
        take, local = rows[accept], ids[accept]
        sample = self.count[local].copy()
        self.embeddings[local, sample] = embedding[take]
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
