"""A generated dataset as the FR loader sees it: shard markers, manifest rows, labels, byte ranges.

Reads only the dataset contract (docs/dataset-format.md): `done/NNNNNN.json` markers decide which
shards exist, `manifest/NNNNNN.parquet` gives each sample's label and member byte ranges, and
`identities.parquet` + `job.yaml` tell a follower how many identities and shards the job will write
before it has written them. `report.json` is written last: once it exists, no shard will follow.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq

from facegen.engine.dataset.manifest import DONE_DIR, completed_shards, manifest_path, marker_path, shard_path
from facegen.engine.storage import Storage
from facegen.models.errors import UserError

IDENTITIES_FILE = "identities.parquet"
JOB_FILE = "job.yaml"
REPORT_FILE = "report.json"
_COLUMNS = ["key", "label", "vis_offset", "vis_size", "nir_offset", "nir_size"]


@dataclass
class ShardRows:
    """The manifest rows of one shard (one numpy array per column, in shard order)."""

    shard_file: str
    keys: np.ndarray
    labels: np.ndarray
    vis_offset: np.ndarray
    vis_size: np.ndarray
    nir_offset: np.ndarray | None
    nir_size: np.ndarray | None

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def has_nir(self) -> bool:
        return self.nir_offset is not None


class Catalog:
    def __init__(self, uri: str, storage_options: dict | None = None) -> None:
        self.storage = Storage(uri, storage_options)

    def __reduce__(self):
        return (Catalog, (self.storage.uri, self.storage.storage_options))

    # -- what exists ----------------------------------------------------------------------------
    def markers(self) -> dict[int, dict]:
        return completed_shards(self.storage)

    def marker(self, shard_id: int) -> dict:
        return self.storage.read_json(marker_path(shard_id))

    def shards_complete(self) -> int:
        return len(self.storage.list(DONE_DIR, ".json"))

    def finished(self) -> bool:
        """The job wrote its report: every shard it will ever write has its marker."""
        return self.storage.exists(REPORT_FILE)

    def has_identity_table(self) -> bool:
        return self.storage.exists(IDENTITIES_FILE)

    def identity_labels(self) -> np.ndarray:
        """Sorted labels of the job's identities (from identities.parquet, written before any shard)."""
        table = pq.read_table(io.BytesIO(self.storage.read_bytes(IDENTITIES_FILE)), columns=["label"])
        return np.unique(table["label"].to_numpy())

    def expected_shard_ids(self) -> list[int]:
        """Shard ids the job will write: ceil(identities / identities per shard), numbered from 0."""
        from facegen.engine.spec import load_spec_yaml_text

        spec = load_spec_yaml_text(self.storage.read_text(JOB_FILE))
        count = len(self.identity_labels())
        return list(range(-(-count // spec.identities_per_shard)))

    # -- reading --------------------------------------------------------------------------------
    def rows(self, shard_id: int, marker: dict) -> ShardRows:
        data = self.storage.read_bytes(manifest_path(shard_id))
        table = pq.read_table(io.BytesIO(data), columns=_COLUMNS)
        column = {name: table[name].to_numpy(zero_copy_only=False) for name in _COLUMNS[:4]}
        has_nir = table["nir_offset"].null_count == 0 and table.num_rows > 0
        return ShardRows(
            shard_file=marker["shard_file"],
            keys=column["key"],
            labels=column["label"].astype(np.int64),
            vis_offset=column["vis_offset"].astype(np.int64),
            vis_size=column["vis_size"].astype(np.int64),
            nir_offset=table["nir_offset"].to_numpy().astype(np.int64) if has_nir else None,
            nir_size=table["nir_size"].to_numpy().astype(np.int64) if has_nir else None,
        )

    def members(self, rows: ShardRows, chunk: np.ndarray, want_vis: bool,
                want_nir: bool) -> tuple[list[bytes] | None, list[bytes] | None]:
        """The VIS and NIR member bytes of rows `chunk`: one ranged read spanning all of them."""
        ranges = []
        if want_vis:
            ranges.append((rows.vis_offset[chunk], rows.vis_size[chunk]))
        if want_nir:
            ranges.append((rows.nir_offset[chunk], rows.nir_size[chunk]))
        start = int(min(offsets.min() for offsets, _ in ranges))
        end = int(max((offsets + sizes).max() for offsets, sizes in ranges))
        span = memoryview(self.read_span(rows.shard_file, start, end))
        # [begin, end) of each wanted member inside the span, one vectorised pass per member kind
        cut = [[bytes(span[a:b]) for a, b in np.stack([offsets - start, offsets - start + sizes], 1).tolist()]
               for offsets, sizes in ranges]
        return (cut[0] if want_vis else None, cut[-1] if want_nir else None)

    def probe_images(self, count: int) -> tuple[list[str], list[np.ndarray], str]:
        """The first `count` VIS images of the first complete shard (keys, uint8 HxWx3, shard file)."""
        import itertools

        from facegen.engine.dataset.reader import iter_shard

        first = next(iter(self.markers().values()))
        samples = list(itertools.islice(iter_shard(self.storage, first["shard_file"]), count))
        return [s.key for s in samples], [s.vis for s in samples], first["shard_file"]

    def read_span(self, shard_file: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of a shard: one (ranged) read covering several samples' members."""
        path = self.storage.path(shard_path(shard_file))
        data = self.storage.fs.cat_file(path, start=start, end=end)
        if len(data) != end - start:
            raise UserError(f"{self.storage.url(shard_path(shard_file))}: byte range {start}-{end} is past the end")
        return data


def wait_until(ready: Callable[[], bool], what: str, timeout: float | None, poll: float) -> None:
    """Poll `ready` every `poll` seconds; UserError naming `what` after `timeout` seconds (None: forever)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while not ready():
        if deadline is not None and time.monotonic() > deadline:
            raise UserError(f"follow: gave up waiting for {what} after {timeout:g} s")
        time.sleep(poll)


def open_catalog(uri: str, storage_options: dict | None = None):
    """A generated dataset's `Catalog`, or a `FolderCatalog` for a VIS/NIR image folder."""
    from facegen.engine.frdata.folder import FolderCatalog, is_image_folder

    storage = Storage(uri, storage_options)
    if is_image_folder(storage):
        return FolderCatalog(uri, storage_options)
    return Catalog(uri, storage_options)
