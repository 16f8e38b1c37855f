"""`FRDataset`: an iterable torch dataset of (image, label) over a generated dataset's complete shards,
or over a VIS/NIR image folder (`facegen world render`'s layout; labels from the identity prefix of
each file name, the folder cut into virtual shards of whole identities: folder.py).

Per DataLoader worker ("party", see split.py) one epoch is: its shares of the seeded shard order,
`open_shards` of them read at once and interleaved at random (shards are sorted by identity, so
reading one at a time gives batches of a handful of identities), then a shuffle buffer of encoded
samples, decoded only when they leave it. Member bytes come from the manifest's byte ranges, a span
of `chunk_samples` samples per read (a ranged GET on object stores), never from unpacking a tar.

With `follow=True` the dataset may still be being generated: a party waits for the job's
identity table, then takes each of its shards as soon as the shard's completion marker exists,
and stops when the job's `report.json` exists and every shard it will still get has been read.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from facegen.engine.dataset.manifest import DONE_DIR, marker_path, shard_id_of
from facegen.engine.frdata.catalog import ShardRows, open_catalog, wait_until
from facegen.engine.frdata.folder import FolderCatalog
from facegen.engine.frdata.images import FRTransform
from facegen.engine.frdata.split import Share, epoch_order, shares_for
from facegen.models.errors import UserError

MODES = ("vis", "nir", "both", "pair")
# (label, vis bytes | None, nir bytes | None, key)
Entry = tuple[int, "bytes | None", "bytes | None", str]


class FRDataset(IterableDataset):
    """(image, label) samples for face-recognition training; see the module docstring.

    mode: `vis` (RGB), `nir` (greyscale as 3 channels), `both` (the NIR image as one more sample of
    the same label) or `pair` (yields `(vis, nir, label)`). Labels are contiguous, 0..num_classes-1.
    rank / world_size default to torch.distributed's (Ray Train and DDP set them up) or 0 / 1.
    Call `set_epoch(e)` before each epoch for a new seeded order (like DistributedSampler).
    """

    def __init__(self, uri: str, *, storage_options: dict | None = None, mode: str = "vis",
                 image_size: int = 112, flip: bool = False, normalize: bool = True, shuffle: bool = True,
                 seed: int = 0, open_shards: int = 4, shuffle_buffer: int = 1024, chunk_samples: int = 64,
                 follow: bool = False, poll_seconds: float = 1.0, follow_timeout: float | None = None,
                 rank: int | None = None, world_size: int | None = None, with_keys: bool = False) -> None:
        if mode not in MODES:
            raise UserError(f"mode: {mode!r} is not one of {list(MODES)}")
        for name, value in (("open_shards", open_shards), ("chunk_samples", chunk_samples)):
            if value < 1:
                raise UserError(f"{name}: must be >= 1, got {value}")
        if shuffle_buffer < 0:
            raise UserError(f"shuffle_buffer: must be >= 0, got {shuffle_buffer}")
        self.catalog = open_catalog(uri, storage_options)
        if follow and isinstance(self.catalog, FolderCatalog):
            raise UserError(f"{uri}: a VIS/NIR image folder is complete when it is read; follow applies to a "
                            "dataset that `facegen generate` is writing")
        self.mode, self.flip, self.shuffle, self.seed = mode, flip, shuffle, seed
        self.transform = FRTransform(size=image_size, normalize=normalize)
        self.open_shards, self.shuffle_buffer, self.chunk_samples = open_shards, shuffle_buffer, chunk_samples
        self.follow, self.poll_seconds, self.follow_timeout = follow, poll_seconds, follow_timeout
        self.rank, self.world_size, self.with_keys = rank, world_size, with_keys
        self.epoch = 0
        self._labels: np.ndarray | None = None
        if not follow:
            markers = self.catalog.markers()
            if not markers:
                raise UserError(f"{self.catalog.storage.uri}: no complete shards (no done/*.json markers) "
                                "and no VIS/ image folder")
            if mode != "vis" and not all(m.get("has_nir") for m in markers.values()):
                raise UserError(f"mode {mode!r} needs NIR images, but {self.catalog.storage.uri} has none")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    # -- labels ---------------------------------------------------------------------------------
    def labels(self) -> np.ndarray:
        """The dataset's identity labels, sorted; contiguous label i stands for labels()[i]."""
        if self._labels is None:
            if self.follow:
                self._wait(self.catalog.has_identity_table, "identities.parquet")
            if self.catalog.has_identity_table():
                self._labels = self.catalog.identity_labels()
            else:  # a dataset written by something other than `facegen generate`
                self._labels = np.unique(np.concatenate(
                    [self.catalog.rows(i, m).labels for i, m in self.catalog.markers().items()]))
        return self._labels

    @property
    def num_classes(self) -> int:
        return len(self.labels())

    def num_samples(self) -> int:
        """Samples per epoch over all parties (complete shards only; `both` counts NIR too)."""
        count = sum(int(m["num_samples"]) for m in self.catalog.markers().values())
        return count * (2 if self.mode == "both" else 1)

    # -- iteration ------------------------------------------------------------------------------
    def party(self) -> tuple[int, int]:
        """(this reader's index, number of readers) over ranks x DataLoader workers."""
        rank, world = self.rank, self.world_size
        if rank is None or world is None:
            initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
            rank = rank if rank is not None else (torch.distributed.get_rank() if initialized else 0)
            world = world if world is not None else (torch.distributed.get_world_size() if initialized else 1)
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return rank * workers + worker, world * workers

    def my_shares(self) -> list[Share]:
        party, parties = self.party()
        if self.follow:
            self._wait(lambda: self.catalog.storage.exists("job.yaml"), "job.yaml")
            self.labels()
            ids = self.catalog.expected_shard_ids()
        else:
            ids = list(self.catalog.markers())
        return shares_for(party, parties, epoch_order(ids, self.seed, self.epoch, self.shuffle))

    def __iter__(self) -> Iterator[tuple]:
        party, _ = self.party()
        rng = np.random.default_rng([self.seed, self.epoch, party, 1])
        entries = self._interleave(self.my_shares(), rng)
        if self.shuffle and self.shuffle_buffer > 1:
            entries = shuffle_buffer(entries, self.shuffle_buffer, rng)
        for entry in entries:
            yield self._emit(entry, bool(self.flip and rng.random() < 0.5))

    def _emit(self, entry: Entry, flip: bool) -> tuple:
        label, vis, nir, key = entry
        out: tuple
        if self.mode == "pair":
            out = (self.transform(vis, flip, key), self.transform(nir, flip, key), label)
        else:
            out = (self.transform(vis if vis is not None else nir, flip, key), label)
        return out + (key,) if self.with_keys else out

    def _interleave(self, shares: list[Share], rng: np.random.Generator) -> Iterator[Entry]:
        """Up to `open_shards` shares read at once, the next sample drawn from a random open one."""
        pending, active = list(shares), []
        while pending or active:
            while pending and len(active) < self.open_shards:
                ready = self._next_ready(pending, block=not active)
                if ready is None:
                    break
                active.append(self._share_entries(*ready))
            if not active:
                return  # following, the job finished, and the shards still pending will never exist
            pick = int(rng.integers(len(active))) if len(active) > 1 else 0
            try:
                yield next(active[pick])
            except StopIteration:
                active.pop(pick)

    def _next_ready(self, pending: list[Share], block: bool) -> tuple[Share, dict] | None:
        """Remove and return the first pending share whose shard is complete (with its marker).

        Not following, every share is complete. Following, `block` waits for one; None when none is
        ready (without `block`) or none ever will be (the job's report exists)."""
        storage = self.catalog.storage
        if not self.follow:
            share = pending.pop(0)
            return share, self.catalog.marker(share.shard_id)
        deadline = None if self.follow_timeout is None else time.monotonic() + self.follow_timeout
        while True:
            finished = self.catalog.finished()  # checked before listing: markers precede the report
            done = {shard_id_of(n) for n in storage.list(DONE_DIR, ".json")}
            for index, share in enumerate(pending):
                if share.shard_id in done:
                    pending.pop(index)
                    return share, storage.read_json(marker_path(share.shard_id))
            if finished:
                pending.clear()
                return None
            if not block:
                return None
            if deadline is not None and time.monotonic() > deadline:
                raise UserError(f"follow: no new shard in {self.follow_timeout:g} s at {storage.uri}")
            time.sleep(self.poll_seconds)

    def _share_entries(self, share: Share, marker: dict) -> Iterator[Entry]:
        rows = self.catalog.rows(share.shard_id, marker)
        if self.mode != "vis" and not rows.has_nir:
            raise UserError(f"mode {self.mode!r} needs NIR images; shard {rows.shard_file} has none")
        contiguous = contiguous_labels(self.labels(), rows.labels, rows.shard_file)
        selected = share.select(len(rows))
        for start in range(0, len(selected), self.chunk_samples):
            yield from self._chunk(rows, selected[start:start + self.chunk_samples], contiguous)

    def _chunk(self, rows: ShardRows, chunk: np.ndarray, contiguous: np.ndarray) -> Iterator[Entry]:
        vis, nir = self.catalog.members(rows, chunk, self.mode != "nir", self.mode != "vis")
        for i, row in enumerate(chunk.tolist()):
            label, key = int(contiguous[row]), str(rows.keys[row])
            if self.mode == "both":
                yield label, vis[i], None, key
                yield label, None, nir[i], key + ":nir"
            else:
                yield label, None if vis is None else vis[i], None if nir is None else nir[i], key

    def _wait(self, ready: Callable[[], bool], what: str) -> None:
        wait_until(ready, f"{what} at {self.catalog.storage.uri}", self.follow_timeout, self.poll_seconds)


def contiguous_labels(labels: np.ndarray, shard_labels: np.ndarray, where: str) -> np.ndarray:
    """Positions of `shard_labels` in the sorted `labels` (0..len-1); a label not there is an error."""
    index = np.minimum(np.searchsorted(labels, shard_labels), len(labels) - 1)
    if len(labels) == 0 or (labels[index] != shard_labels).any():
        raise UserError(f"{where}: labels not in the dataset's identity table")
    return index


def shuffle_buffer(items: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    """Reservoir-style shuffle: fill `size` items, then emit a random one and put the next in its place."""
    buffer: list = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        index = int(rng.integers(size))
        yield buffer[index]
        buffer[index] = item
    order = rng.permutation(len(buffer))
    for index in order:
        yield buffer[index]
