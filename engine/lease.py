"""One writer per output: a lease file that a job's driver holds and heartbeats while it runs.

Killing a driver does not stop its workers at once (a Ray generator actor outlives its driver by
seconds and can still publish a shard), so a second `generate` or `--resume` started at once would
race them. The lease settles who may publish:

- The driver takes `.facegen-lease.json` at the output root before it writes anything and renews its
  expiry every `ttl / 4` seconds (`Lease.start_heartbeat`). It carries the owner id, pid, host and
  the expiry time.
- A second run finds a live lease and refuses (exit 2, naming the holder), or waits with a message
  when asked to (`run.lease_wait`). When the holder's process is gone (same host), it waits for the
  expiry instead of refusing: the dead driver's workers may still be running until then.
- An expired lease is taken over: nobody has renewed it for `ttl` seconds.
- Every shard writer checks the lease (`LeaseGuard`) before it touches a shard's marker: the
  owner must still be the one it was started under and the lease must have at least `margin`
  seconds left. A worker whose driver died stops publishing before its lease can expire and be taken
  over; one whose driver lost the lease never publishes.

The file goes through `Storage` (fsspec), so object stores work too; there, taking a lease is
write-then-read-back (no exclusive create), which settles two simultaneous takers because the
loser reads the winner's id after the settle delay. Clocks are compared across hosts, so `margin`
should exceed the clock skew between them (NTP keeps it far below a second).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from facegen.engine.storage import Storage
from facegen.models.errors import JobFailed, UserError

log = logging.getLogger("facegen")

LEASE_FILE = ".facegen-lease.json"
DEFAULT_TTL = 30.0
SETTLE_SECONDS = 0.2  # between writing a lease and reading it back (object stores: last writer wins)


class LeaseLost(JobFailed):
    """This process (or its driver) no longer holds the output's lease: it must not publish."""


@dataclass(frozen=True)
class LeaseInfo:
    owner: str
    pid: int
    host: str
    expires: float
    ttl: float
    command: str = ""

    @classmethod
    def parse(cls, data: bytes) -> LeaseInfo | None:
        try:
            raw = json.loads(data)
            return cls(str(raw["owner"]), int(raw["pid"]), str(raw["host"]), float(raw["expires"]),
                       float(raw["ttl"]), str(raw.get("command", "")))
        except (ValueError, KeyError, TypeError):
            return None  # half-written by a crashed writer on a non-atomic store: treat as absent

    def to_bytes(self) -> bytes:
        return json.dumps({"owner": self.owner, "pid": self.pid, "host": self.host, "expires": self.expires,
                           "ttl": self.ttl, "command": self.command}, sort_keys=True).encode()

    def left(self, now: float | None = None) -> float:
        return self.expires - (time.time() if now is None else now)

    def process_gone(self) -> bool:
        """True when the holder ran on this host and its process no longer exists."""
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def describe(self) -> str:
        return (f"pid {self.pid} on {self.host} (lease {self.owner[:8]}, "
                f"{'expired' if self.left() <= 0 else f'expires in {self.left():.0f} s'})")


def read_lease(out: Storage) -> LeaseInfo | None:
    try:
        return LeaseInfo.parse(out.fs.cat_file(out.path(LEASE_FILE)))
    except FileNotFoundError:
        return None


class Lease:
    """The lease this process holds on `out` (see the module docstring)."""

    def __init__(self, out: Storage, ttl: float = DEFAULT_TTL):
        if ttl <= 0:
            raise UserError(f"run.lease_ttl: must be positive, got {ttl}")
        self.out, self.ttl = out, float(ttl)
        self.owner = uuid.uuid4().hex
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- taking -------------------------------------------------------------------------------
    def acquire(self, wait: float = 0.0, poll: float = 0.5) -> Lease:
        """Take the lease. A live holder: wait up to `wait` seconds, then refuse (UserError). A holder
        whose process is gone: wait for its expiry whatever `wait` says (its workers may publish until
        then). An expired lease is taken over."""
        deadline = time.time() + wait
        announced = None
        while True:
            current = read_lease(self.out)
            if current is None or current.owner == self.owner or current.left() <= 0:
                if current is not None and current.owner != self.owner:
                    log.info("taking over the expired lease of %s", current.describe())
                if self._take(current):
                    return self
                continue  # another taker won the race: look again
            gone = current.process_gone()
            if not gone and time.time() >= deadline:
                raise UserError(
                    f"{self.out.uri} is being written by another facegen run: {current.describe()}"
                    f"{f' ({current.command})' if current.command else ''}. Wait for it to finish, or stop it "
                    f"(kill its process group) and rerun with --resume: its lease then expires within "
                    f"{current.ttl:.0f} s and is taken over; --set run.lease_wait=SECONDS waits instead of "
                    "refusing")
            if announced != current.owner:
                why = ("its process is gone; waiting for its lease to expire so its workers cannot publish"
                       if gone else "waiting (run.lease_wait)")
                print(f"facegen: {self.out.uri} is held by {current.describe()}: {why}", file=sys.stderr, flush=True)
                announced = current.owner
            time.sleep(min(poll, max(0.05, current.left())))

    def _take(self, seen: LeaseInfo | None) -> bool:
        mine = self._info()
        if seen is None and self.out.is_local:
            # Exclusive create: of two processes that both saw no lease, exactly one succeeds.
            self.out.makedirs()
            try:
                fd = os.open(self.out.path(LEASE_FILE), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                time.sleep(SETTLE_SECONDS)  # a run that just created it has written it by now
                if read_lease(self.out) is not None:
                    return False
                # still empty or garbled: left by a run that died between creating and writing it
            else:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(mine.to_bytes())
                # Readers may see the file empty for an instant: LeaseInfo.parse treats that as absent.
                return True
        self.out.write_bytes(LEASE_FILE, mine.to_bytes())
        time.sleep(SETTLE_SECONDS)
        now = read_lease(self.out)
        return now is not None and now.owner == self.owner

    def _info(self) -> LeaseInfo:
        return LeaseInfo(self.owner, os.getpid(), socket.gethostname(), time.time() + self.ttl, self.ttl,
                         " ".join(sys.argv[:3])[:200])

    # -- keeping ------------------------------------------------------------------------------
    def renew(self) -> None:
        """Push the expiry `ttl` seconds ahead; records the loss if another run holds the lease now."""
        current = read_lease(self.out)
        if current is None or current.owner != self.owner:
            self.lost = f"the lease on {self.out.uri} was taken by {current.describe() if current else 'nobody'}"
            return
        self.out.write_bytes(LEASE_FILE, self._info().to_bytes())

    def start_heartbeat(self) -> Lease:
        def beat() -> None:
            while not self._stop.wait(self.ttl / 4):
                try:
                    self.renew()
                except Exception as err:  # noqa: BLE001 - a flaky store: retry at the next beat
                    log.warning("lease heartbeat failed: %s", err)
                if self.lost:
                    log.error("%s", self.lost)
                    return

        self._thread = threading.Thread(target=beat, name="facegen-lease", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with contextlib.suppress(Exception):
            current = read_lease(self.out)
            if current is not None and current.owner == self.owner:
                self.out.delete(LEASE_FILE)

    def guard(self, margin: float | None = None) -> LeaseGuard:
        return LeaseGuard(self.out, self.owner, self.ttl / 4 if margin is None else margin)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


@dataclass(frozen=True)
class LeaseGuard:
    """What a shard writer checks before it touches a marker: picklable, so Ray workers carry it."""

    out: Storage
    owner: str
    margin: float

    def check(self) -> None:
        current = read_lease(self.out)
        if current is None or current.owner != self.owner:
            holder = current.describe() if current else "nobody"
            raise LeaseLost(f"not publishing to {self.out.uri}: this run's lease {self.owner[:8]} is gone "
                            f"(held by {holder}); the run that holds it writes the shard")
        if current.left() < self.margin:
            raise LeaseLost(f"not publishing to {self.out.uri}: this run's lease {self.owner[:8]} expires in "
                            f"{current.left():.1f} s (its driver stopped renewing it)")
