"""The original's `identity_features.json` read entry by entry, so enrolling it holds one block of rows.

The file is one flat JSON object `{"<VIS file name>": [floats], ...}`. `json.load` would hold the
whole text plus a Python float object per value (~12 GB for 10^6 rows of 512); here the text is read
in 1 MiB chunks and each `"key": [values]` pair is decoded by the standard library's own decoder
(`json.JSONDecoder.raw_decode`), so what counts as valid JSON is exactly what `json.loads` accepts.
Rows come out in file order, in blocks of float32 rows. A key that appears twice is enrolled twice
(`json.loads` would keep only its last value: both are real embeddings, and enrolling both protects
more, never less).
"""

from __future__ import annotations

import codecs
import json
import posixpath
from collections.abc import Iterator

import fsspec
import numpy as np

from facegen.models.errors import UserError

CHUNK_CHARS = 1 << 20
BLOCK_ROWS = 256  # rows decoded before they become float32: 256 x 512 Python floats are ~4 MiB
_WHITESPACE = " \t\n\r"
Block = tuple[np.ndarray, list[str], list[str]]


def identity_of_name(name: str) -> str | None:
    """'0012_03.png' -> '0012'; None when the name has no '{identity}_' prefix."""
    stem = posixpath.basename(name)
    identity, sep, _ = stem.partition("_")
    return identity if sep and identity else None


class _Text:
    """A JSON text decoded from UTF-8 chunk by chunk, with a read position."""

    def __init__(self, handle, path: str):
        self.handle, self.path = handle, path
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.buffer, self.pos, self.eof = "", 0, False

    def more(self) -> bool:
        """Append the next chunk (dropping what was consumed); False at the end of the file."""
        if self.eof:
            return False
        raw = self.handle.read(CHUNK_CHARS)
        try:
            text = self.decoder.decode(raw, final=not raw)
        except UnicodeDecodeError as err:
            raise UserError(f"{self.path}: not valid JSON ({err})") from None
        self.eof = not raw
        self.buffer, self.pos = self.buffer[self.pos :] + text, 0
        return True

    def peek(self) -> str:
        """The next non-whitespace character ('' at the end of the file), without consuming it."""
        while True:
            while self.pos < len(self.buffer) and self.buffer[self.pos] in _WHITESPACE:
                self.pos += 1
            if self.pos < len(self.buffer):
                return self.buffer[self.pos]
            if not self.more():
                return ""

    def expect(self, chars: str, what: str) -> str:
        found = self.peek()
        if not found or found not in chars:
            raise UserError(f"{self.path}: not valid JSON (expected {what} at character {self.pos}, "
                            f"found {found or 'the end of the file'!r})")
        self.pos += 1
        return found

    def value(self, decoder: json.JSONDecoder):
        """Decode one JSON value at the position, reading more text while it is incomplete."""
        self.peek()
        while True:
            try:
                value, end = decoder.raw_decode(self.buffer, self.pos)
            except json.JSONDecodeError as err:
                if self.more():
                    continue
                raise UserError(f"{self.path}: not valid JSON ({err})") from None
            if end == len(self.buffer) and not self.eof and not isinstance(value, (str, list, dict)):
                self.more()  # a number or literal may continue in the next chunk: decode it again
                continue
            self.pos = end
            return value


def identity_feature_blocks(path: str, storage_options: dict | None = None,
                            block_rows: int = BLOCK_ROWS) -> Iterator[Block]:
    """(float32 [n, dim] raw features, identities, files) blocks of `path`, in file order."""
    try:
        handle = fsspec.open(path, "rb", **(storage_options or {})).open()
    except FileNotFoundError:
        raise UserError(f"{path}: not found") from None
    with handle:
        text, decoder = _Text(handle, path), json.JSONDecoder()
        if text.peek() != "{":
            raise UserError(f"{path}: expected a non-empty JSON object {{file name: [floats]}}")
        text.pos += 1
        if text.peek() == "}":
            raise UserError(f"{path}: expected a non-empty JSON object {{file name: [floats]}}")
        dim, values, files = None, [], []
        while True:
            key = text.value(decoder)
            if not isinstance(key, str):
                raise UserError(f"{path}: not valid JSON (object keys must be strings, found {key!r})")
            if identity_of_name(key) is None:
                raise UserError(f"{path}: keys are not '{{identity}}_{{sample}}' file names, e.g. {[key]}")
            text.expect(":", "':'")
            value = text.value(decoder)
            if dim is None and isinstance(value, list):
                dim = len(value)
            if not isinstance(value, list) or len(value) != dim:
                raise UserError(f"{path}: every value must be a list of {dim} numbers; '{key}' is not")
            values.append(value)
            files.append(key)
            if len(values) == block_rows:
                yield _block(values, files, path)
                values, files = [], []
            if text.expect(",}", "',' or '}'") == "}":
                break
        if text.peek():
            raise UserError(f"{path}: not valid JSON (extra data after the object at character {text.pos})")
        if values:
            yield _block(values, files, path)


def _block(values: list, files: list[str], path: str) -> Block:
    try:
        embeddings = np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise UserError(f"{path}: feature values must be numbers ({err})") from None
    if embeddings.ndim != 2:
        raise UserError(f"{path}: feature values must be numbers (found nested lists)")
    return embeddings, [identity_of_name(f) for f in files], list(files)
