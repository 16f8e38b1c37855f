"""Who reads what: a dataset's shards split across (ranks x DataLoader workers) with no overlap and no gap.

Every reader ("party") of an epoch is one DataLoader worker of one rank: party = rank * workers + worker.
All parties compute the same seeded shard order, then:

- at least as many shards as parties: whole shards, dealt round-robin over the order;
- more parties than shards (e.g. 2 ranks x 4 workers on 3 shards): each shard is shared by the parties
  p with p % shards == its position, each taking the rows whose index within the shard is congruent
  to its own rank in that group. Every row still goes to exactly one party.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Share:
    """Rows `j` of shard `shard_id` with `j % stride == offset` (stride 1: the whole shard)."""

    shard_id: int
    stride: int = 1
    offset: int = 0

    def select(self, num_rows: int) -> np.ndarray:
        return np.arange(self.offset, num_rows, self.stride, dtype=np.int64)


def epoch_order(shard_ids: list[int], seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The shard order of one epoch; identical on every party (it depends only on seed and epoch)."""
    ids = sorted(int(i) for i in shard_ids)
    if not shuffle:
        return ids
    rng = np.random.default_rng([seed, epoch, 0x5EED])
    return [ids[i] for i in rng.permutation(len(ids))]


def shares_for(party: int, parties: int, order: list[int]) -> list[Share]:
    """The shares of `party` (0 <= party < parties) given the epoch's shard order."""
    if not 0 <= party < parties:
        raise ValueError(f"party {party} is not in [0, {parties})")
    count = len(order)
    if count == 0:
        return []
    if count >= parties:
        return [Share(order[k]) for k in range(party, count, parties)]
    position = party % count
    group = len(range(position, parties, count))
    return [Share(order[position], stride=group, offset=party // count)]
