"""A VIS/NIR image folder as the FR loader sees it: the original's layout, read like a generated dataset.

`DATA/VIS/{identity}_{sample}.png` and `DATA/NIR/` with the same names (what `facegen world render`
writes and `facegen train` / `facegen features` read). The label is the integer identity prefix of
the name. The loader's unit of work is a shard, so the folder is cut into virtual shards of
`IDENTITIES_PER_SHARD` consecutive identities (every sample of an identity in one shard, as in a
generated dataset); shard order, splitting across readers and mixing then work exactly as for shards.
A folder is complete when it is opened: there is nothing to follow.
"""

from __future__ import annotations

import io
import posixpath

import numpy as np
from PIL import Image

from facegen.engine.features import list_pairs
from facegen.engine.storage import Storage
from facegen.models.errors import UserError

# Small enough that a few hundred identities still give every reader several shards to interleave.
IDENTITIES_PER_SHARD = 8
VIRTUAL_PREFIX = "folder-"


def is_image_folder(storage: Storage) -> bool:
    """The original's layout (VIS/ present) and not a generated dataset (no done/ markers)."""
    return storage.exists("VIS") and not storage.exists("done") and not storage.exists("identities.parquet")


class FolderRows:
    """The files of one virtual shard: names (with extension), keys (names without it), labels."""

    def __init__(self, shard_file: str, names: np.ndarray, labels: np.ndarray, has_nir: bool) -> None:
        self.shard_file, self.names, self.labels, self.has_nir = shard_file, names, labels, has_nir
        self.keys = np.array([posixpath.splitext(n)[0] for n in names.tolist()], dtype=object)

    def __len__(self) -> int:
        return len(self.labels)


class FolderCatalog:
    """Same surface as `catalog.Catalog` (markers, rows, members, labels) over a VIS/NIR folder."""

    def __init__(self, uri: str, storage_options: dict | None = None,
                 listing: tuple[list[str], np.ndarray, bool] | None = None) -> None:
        self.storage = Storage(uri, storage_options)
        if listing is None:
            pairs = list_pairs(self.storage, require_nir=False)
            listing = (pairs.names, pairs.identities, pairs.has_nir)
        names, identities, self.has_nir = listing
        order = np.lexsort((np.arange(len(names)), identities))  # identity-major, natural name order within
        self.names = np.array(names, dtype=object)[order]
        self.identities = np.asarray(identities, np.int64)[order]
        unique = np.unique(self.identities)
        bounds = np.searchsorted(self.identities, unique[::IDENTITIES_PER_SHARD])
        self._bounds = np.append(bounds, len(self.identities))

    def __reduce__(self):
        # DataLoader workers get the listing with the catalog instead of listing the folders again
        return (FolderCatalog, (self.storage.uri, self.storage.storage_options,
                                (self.names.tolist(), self.identities, self.has_nir)))

    # -- what exists ----------------------------------------------------------------------------
    def markers(self) -> dict[int, dict]:
        return {i: self.marker(i) for i in range(len(self._bounds) - 1)}

    def marker(self, shard_id: int) -> dict:
        start, end = int(self._bounds[shard_id]), int(self._bounds[shard_id + 1])
        return {"shard_file": f"{VIRTUAL_PREFIX}{shard_id:06d}", "num_samples": end - start, "has_nir": self.has_nir}

    def shards_complete(self) -> int:
        return len(self._bounds) - 1

    def finished(self) -> bool:
        return True

    def has_identity_table(self) -> bool:
        return True

    def identity_labels(self) -> np.ndarray:
        return np.unique(self.identities)

    # -- reading --------------------------------------------------------------------------------
    def rows(self, shard_id: int, marker: dict) -> FolderRows:
        start, end = int(self._bounds[shard_id]), int(self._bounds[shard_id + 1])
        return FolderRows(marker["shard_file"], self.names[start:end], self.identities[start:end], self.has_nir)

    def members(self, rows: FolderRows, chunk: np.ndarray, want_vis: bool,
                want_nir: bool) -> tuple[list[bytes] | None, list[bytes] | None]:
        """The encoded VIS and NIR files of rows `chunk`, fetched in one batched call per folder."""
        names = rows.names[chunk].tolist()
        return (self._files("VIS", names) if want_vis else None, self._files("NIR", names) if want_nir else None)

    def _files(self, folder: str, names: list[str]) -> list[bytes]:
        paths = [self.storage.path(f"{folder}/{name}") for name in names]
        try:
            found = self.storage.fs.cat(paths)  # one request batch on object stores
        except FileNotFoundError as err:
            raise UserError(f"{self.storage.url(folder)}: a listed image disappeared ({err})") from None
        return [found[p] for p in paths]

    def probe_images(self, count: int) -> tuple[list[str], list[np.ndarray], str]:
        """The first `count` VIS images (keys, uint8 HxWx3, where from): train-fr's probe embeddings."""
        rows = self.rows(0, self.marker(0))
        chunk = np.arange(min(count, len(rows)))
        vis, _ = self.members(rows, chunk, True, False)
        images = [np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) for data in vis]
        return [str(k) for k in rows.keys[chunk]], images, "VIS"
