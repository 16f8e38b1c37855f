"""Phase 3 as a two-stage pipeline: the device computes shard k+1 while the CPU encodes and writes
shard k, so the device never waits for PNG encoding.

`ShardPipeline.submit` hands a computed shard (`engine.job.PreparedShard`) to one writer thread and
returns at once, unless the previous shard is still being written: then it waits, and that wait is
what the device loses to encoding. The encoder itself is a thread pool (`engine.dataset.codec`:
Pillow and zlib release the GIL), so one writer thread keeps every core the process may use busy.
At most two shards are in memory: the one being written and the one being computed.

Bytes do not depend on the overlap: a shard's content is fixed before it is handed over, and each
shard is published (file, manifest, marker) by one call, in submission order.

`StageTimes` is what the pipeline measured: seconds computing (render + embed + decide), writing
(encode + tar + manifest + marker, on the writer thread) and waiting for the writer; executors
expose it (`report["executor"]["stages"]`, `facegen bench suite`'s overlap rows).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class StageTimes:
    shards: int = 0
    compute_s: float = 0.0  # render + embed + decide (`prepare_shard`)
    write_s: float = 0.0  # encode + write + publish (`publish_shard`), on the writer thread when overlapped
    wait_s: float = 0.0  # computing stopped to wait for the writer (the device idles this long)
    wall_s: float = 0.0

    def add(self, other: StageTimes | dict) -> StageTimes:
        other = other if isinstance(other, StageTimes) else StageTimes(**other)
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)
        return self

    def as_dict(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


class ShardPipeline:
    """Computes with `prepare` in the caller's thread and writes with `publish` on one writer thread
    (or inline, `overlap=False`). `on_written(marker)` runs in the caller's thread, in order."""

    def __init__(self, prepare: Callable[[int], Any], publish: Callable[[Any], dict], *, overlap: bool = True,
                 on_written: Callable[[dict], None] | None = None):
        self.prepare, self.publish, self.overlap = prepare, publish, overlap
        self.on_written = on_written or (lambda marker: None)
        self.times = StageTimes()
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="shard-writer") if overlap else None
        self._pending: Future | None = None
        self._started = time.perf_counter()

    def run(self, shard_ids: list[int]) -> StageTimes:
        """Every shard of `shard_ids`, in order; returns the stage times. On an error the shard being
        written is finished (or fails) before this returns: nothing is left half-published."""
        try:
            for shard_id in shard_ids:
                start = time.perf_counter()
                prepared = self.prepare(shard_id)
                self.times.compute_s += time.perf_counter() - start
                self._hand_over(prepared)
        finally:
            self._drain()
        return self.times

    def _hand_over(self, prepared: Any) -> None:
        if self._writer is None:
            self.on_written(self._timed_publish(prepared))
            return
        if self._pending is not None:
            start = time.perf_counter()
            marker = self._pending.result()  # a write error surfaces here, before more work starts
            self.times.wait_s += time.perf_counter() - start
            self._pending = None
            self.on_written(marker)
        self._pending = self._writer.submit(self._timed_publish, prepared)

    def _timed_publish(self, prepared: Any) -> dict:
        start = time.perf_counter()
        marker = self.publish(prepared)
        self.times.write_s += time.perf_counter() - start
        self.times.shards += 1
        return marker

    def _drain(self) -> None:
        try:
            if self._pending is not None:
                start = time.perf_counter()
                pending, self._pending = self._pending, None
                marker = pending.result()
                self.times.wait_s += time.perf_counter() - start
                self.on_written(marker)
        finally:
            if self._writer is not None:
                self._writer.shutdown(wait=True)
            self.times.wall_s = time.perf_counter() - self._started


class OverlapLocks:
    """The same overlap inside a threaded Ray actor (two tasks at a time): one task computes while the
    other writes. Computing is serialised (one device), writing is serialised (one encoder pool)."""

    def __init__(self):
        self.compute, self.write = threading.Lock(), threading.Lock()
        self.times = StageTimes()
        self._count = threading.Lock()

    def add(self, **seconds: float) -> None:
        with self._count:
            self.times.add(StageTimes(**seconds))
