"""The two interfaces an output format implements, and the registry `output.format` selects from.

A format is a shard container. Everything around it is shared by every format: the codec
(`codec.py`), the sample units (`samples.py`), the per-shard manifest and completion marker
(`manifest.py`), and the readers over complete shards (`reader.py`). Adding a format (insightface
RecordIO, Parquet images, ...) means one module with a writer and a reader, one entry in `FORMATS`,
and the name in `OutputSpec.format`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

from facegen.engine.dataset.samples import RawSample, Sample, ShardBatch, ShardResult
from facegen.engine.dataset.webdataset import EXTENSION as TAR_EXTENSION
from facegen.engine.dataset.webdataset import WebDatasetReader, WebDatasetWriter
from facegen.engine.storage import Storage
from facegen.models.errors import UserError


class ShardWriter(Protocol):
    """Writes one shard batch and publishes it: shard file, then manifest, then the completion
    marker, each atomic. Rewriting the same batch must give identical bytes. `guard()` is called
    before any marker is removed or written, and raises when this writer may no longer publish."""

    def write(self, storage: Storage, shard_id: int, batch: ShardBatch, *, stats: dict[str, Any] | None = None,
              workers: int | None = None, guard: Callable[[], None] | None = None) -> ShardResult: ...


class ShardReader(Protocol):
    """Iterates one shard's samples: raw members in key order, decoded one sample at a time."""

    extension: str

    def iter_raw(self, storage: Storage, shard_file: str) -> Iterator[RawSample]: ...

    def decode(self, raw: RawSample) -> Sample: ...


# format name -> (writer class, reader, shard file extension). Extensions are distinct, so a reader
# is found from a shard's file name alone (markers and manifests name the file).
FORMATS: dict[str, tuple[type, ShardReader, str]] = {
    "webdataset": (WebDatasetWriter, WebDatasetReader(), TAR_EXTENSION),
}


def shard_writer(output: Any) -> ShardWriter:
    """The writer for an `OutputSpec` (its `format`, `name`, `image_format`, `jpeg_quality`)."""
    if output.format not in FORMATS:
        raise UserError(f"output.format: must be one of {', '.join(FORMATS)}, got {output.format!r}")
    writer_class = FORMATS[output.format][0]
    return writer_class(name=output.name, image_format=output.image_format, jpeg_quality=output.jpeg_quality)


def shard_reader(shard_file: str) -> ShardReader:
    """The reader for a shard file, chosen by its extension."""
    for _, reader, extension in FORMATS.values():
        if shard_file.endswith(extension):
            return reader
    raise UserError(f"{shard_file}: not a shard of any known output format "
                    f"({', '.join(f'{n} ({e})' for n, (_, _, e) in FORMATS.items())})")
