"""Progress of long work: a tqdm bar on a terminal; elsewhere one plain line every few seconds.

Logs, `nohup`, CI and jobs submitted to a cluster (read back with `facegen logs --follow`) cannot
show a redrawn bar: tqdm there either writes nothing or floods the log with carriage returns. So when
stderr is not a terminal, `progress_bar` prints `facegen: shards 2/6 (33%) 0.41 shard/s ETA 10s`
at most once per FACEGEN_PROGRESS_SECONDS (default 10) and one closing line with the total time.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

INTERVAL_ENV = "FACEGEN_PROGRESS_SECONDS"
DEFAULT_INTERVAL = 10.0


def log_interval() -> float:
    raw = os.environ.get(INTERVAL_ENV, "")
    try:
        return max(0.0, float(raw)) if raw else DEFAULT_INTERVAL
    except ValueError:
        return DEFAULT_INTERVAL


def duration(seconds: float, sep: str = "") -> str:
    """12s, 3m05s, 2h07m05s, 1d02h03m; `sep=" "` gives the training log's (dnnlib.util.format_time's) 3m 05s."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{sep}{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{sep}{s // 60 % 60:02d}m{sep}{s % 60:02d}s"
    return f"{s // 86400}d{sep}{s // 3600 % 24:02d}h{sep}{s // 60 % 60:02d}m"


class LineProgress:
    """The tqdm subset facegen uses (`update`, `n`, `set_postfix`, `close`, a context manager), as
    throttled log lines."""

    def __init__(self, total: int | None, desc: str, unit: str, stream: TextIO, interval: float,
                 clock=time.monotonic):
        self.total, self.desc, self.unit, self.stream, self.interval = total, desc, unit, stream, interval
        self.clock = clock
        self.n = 0
        self.postfix = ""
        self.start = self.last = clock()
        self.shown = -1  # `n` at the last line
        self.closed = False

    @property
    def elapsed(self) -> float:
        return self.clock() - self.start

    def update(self, count: int = 1) -> None:
        self.n += count
        if self.clock() - self.last >= self.interval:
            self._emit()

    def set_postfix(self, refresh: bool = False, **values: Any) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in values.items())

    def line(self) -> str:
        elapsed = max(self.elapsed, 1e-9)
        rate = self.n / elapsed
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        parts = [f"facegen: {self.desc} {done}"]
        if self.total:
            parts.append(f"({100 * self.n / self.total:.0f}%)")
        parts.append(f"{rate:.3g} {self.unit}/s")
        if self.total and self.n < self.total:
            parts.append(f"ETA {duration((self.total - self.n) / rate)}" if rate > 0 else "ETA ?")
        parts.append(f"elapsed {duration(elapsed)}")
        if self.postfix:
            parts.append(self.postfix)
        return " ".join(parts)

    def _emit(self) -> None:
        print(self.line(), file=self.stream, flush=True)
        self.last, self.shown = self.clock(), self.n

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.n != self.shown:  # the closing line, unless the last line already said it
                self._emit()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is None:
            self.close()
        self.closed = True  # interrupted or failed: the caller reports it, no closing line


class _Silent(LineProgress):
    def _emit(self) -> None:
        self.last = self.clock()


class _Bar:
    """tqdm, with the `elapsed` property the line logger has."""

    def __init__(self, **kwargs: Any):
        from tqdm import tqdm

        self._bar = tqdm(**kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._bar, name)

    @property
    def elapsed(self) -> float:
        return float(self._bar.format_dict.get("elapsed") or 0.0)

    def __enter__(self) -> _Bar:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._bar.close()


def progress_bar(total: int | None, desc: str, unit: str, enabled: bool = True, *,
                 stream: TextIO | None = None) -> Any:
    """A tqdm bar when `stream` (stderr) is a terminal, else throttled log lines; nothing when not
    `enabled`. Both have `update(n)`, `n`, `elapsed`, `set_postfix(**kv)` and `close()`."""
    stream = stream or sys.stderr
    if not enabled:
        return _Silent(total, desc, unit, stream, 0.0)
    if stream.isatty():
        return _Bar(total=total, desc=desc, unit=unit, file=stream)
    return LineProgress(total, desc, unit, stream, log_interval())


def progress_callback(desc: str, unit: str, enabled: bool = True, *,
                      stream: TextIO | None = None) -> Callable[[int, int], None]:
    """For code that reports `(done, total)` instead of holding a bar: the same bar or lines, opened on
    the first report and closed when done reaches total."""
    state: dict[str, Any] = {}

    def report(done: int, total: int) -> None:
        bar = state.get("bar")
        if bar is None:
            bar = state["bar"] = progress_bar(total, desc, unit, enabled, stream=stream)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
            state.pop("bar")

    return report
