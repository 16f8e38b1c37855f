"""One small facade over fsspec: a dataset or index root on local disk or object storage.

Everything the engine persists goes through `Storage`, so local paths and `s3://…` (or any fsspec
protocol) behave the same. Writes are atomic: readers never see a half-written file. Locally that is a
temporary name in the same folder plus `os.replace`; on object stores a single PUT is already atomic,
so the object is uploaded in one piece from a local temporary file.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import tempfile
from collections.abc import Iterator
from typing import IO, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from facegen.models.errors import UserError


class Storage:
    """A folder on any fsspec filesystem; paths given to methods are relative to it."""

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None):
        self.uri = uri.rstrip("/") if uri not in ("/", "") else uri
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = fsspec.core.url_to_fs(self.uri, **self.storage_options)
        self.is_local = isinstance(self.fs, LocalFileSystem)

    def __repr__(self) -> str:
        return f"Storage({self.uri!r})"

    def __reduce__(self):
        # fsspec filesystems are picklable, but rebuilding from the URI keeps Ray payloads small.
        return (Storage, (self.uri, self.storage_options))

    # -- paths -------------------------------------------------------------------------------
    def path(self, relative: str = "") -> str:
        """Filesystem path (no protocol) of `relative` under the root."""
        return posixpath.join(self.root, relative) if relative else self.root

    def url(self, relative: str = "") -> str:
        """Full URI (with protocol) of `relative`, for handing to other libraries."""
        return posixpath.join(self.uri, relative) if relative else self.uri

    def child(self, relative: str) -> Storage:
        return Storage(self.url(relative), self.storage_options)

    # -- reading -----------------------------------------------------------------------------
    def exists(self, relative: str = "") -> bool:
        return self.fs.exists(self.path(relative))

    def read_bytes(self, relative: str) -> bytes:
        try:
            return self.fs.cat_file(self.path(relative))
        except FileNotFoundError as err:
            raise UserError(f"{self.url(relative)}: not found") from err

    def read_text(self, relative: str) -> str:
        return self.read_bytes(relative).decode("utf-8")

    def read_json(self, relative: str) -> Any:
        try:
            return json.loads(self.read_text(relative))
        except json.JSONDecodeError as err:
            raise UserError(f"{self.url(relative)}: not valid JSON ({err})") from err

    def open(self, relative: str, mode: str = "rb") -> IO:
        return self.fs.open(self.path(relative), mode)

    def list(self, relative: str = "", suffix: str = "") -> list[str]:
        """Sorted names (not paths) of the files directly under `relative` ending in `suffix`."""
        folder = self.path(relative)
        if not self.fs.exists(folder):
            return []
        names = [posixpath.basename(p.rstrip("/")) for p in self.fs.ls(folder, detail=False)]
        return sorted(n for n in names if n.endswith(suffix) and not n.startswith(".tmp-"))

    # -- writing -----------------------------------------------------------------------------
    def makedirs(self, relative: str = "") -> None:
        if self.is_local:
            os.makedirs(self.path(relative), exist_ok=True)

    @contextlib.contextmanager
    def atomic_writer(self, relative: str) -> Iterator[IO[bytes]]:
        """Yield a binary file; on clean exit it appears at `relative` whole, else not at all."""
        target = self.path(relative)
        folder = posixpath.dirname(target)
        local_dir = folder if self.is_local else None
        if local_dir:
            os.makedirs(local_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=local_dir)
        try:
            with os.fdopen(fd, "wb") as handle:
                yield handle
            if self.is_local:
                os.replace(tmp, target)
            else:
                self.fs.put_file(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def write_bytes(self, relative: str, data: bytes) -> None:
        with self.atomic_writer(relative) as handle:
            handle.write(data)

    def write_text(self, relative: str, text: str) -> None:
        self.write_bytes(relative, text.encode("utf-8"))

    def write_json(self, relative: str, obj: Any) -> None:
        self.write_text(relative, json.dumps(obj, indent=2, sort_keys=True) + "\n")

    def delete(self, relative: str) -> None:
        if self.exists(relative):
            self.fs.rm(self.path(relative), recursive=True)

    def check_writable(self) -> None:
        """Fail early, with one clear message, if the root cannot be written."""
        probe = ".facegen-write-probe"
        try:
            self.makedirs()
            self.write_bytes(probe, b"ok")
            self.delete(probe)
        except UserError:
            raise
        except Exception as err:  # noqa: BLE001 - any backend error means "not writable"
            raise UserError(f"{self.uri}: output location is not writable ({err})") from err
