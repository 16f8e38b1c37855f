"""insightface's MXNet RecordIO training set (train.rec, train.idx, property), written without MXNet.

Record framing (dmlc-core recordio): each record is `uint32 magic 0xced7230a`, `uint32 lrecord`
(lower 29 bits the payload length, upper 3 bits a continuation flag, 0 for a whole record), the
payload, then zero padding to a multiple of 4 bytes. All little-endian.

Payload (mxnet.recordio.pack): the header `IRHeader` = struct 'IfQQ' (flag, label, id, id2), then,
when flag > 0, `flag` float32 labels, then the encoded image. train.idx has one line per record,
`index<TAB>byte offset`.

insightface's layout (arcface_torch dataset.py MXFaceDataset, and the face2rec tools): record 0 is a
header whose label array is (N + 1, N + 1 + K) for N images and K identities; images are records
1..N, each with its identity as the float label; records N+1 .. N+K hold one identity each, with the
label array (first image index, one past its last). `property` is `K,height,width`.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable

MAGIC = 0xCED7230A
HEADER = struct.Struct("<IfQQ")
_FRAME = struct.Struct("<II")
_LENGTH_MASK = (1 << 29) - 1


def pack(label: float | tuple[float, ...], data: bytes, record_id: int, id2: int = 0) -> bytes:
    """mxnet.recordio.pack: a scalar label in the header, or flag = count and the labels after it."""
    if isinstance(label, tuple):
        return HEADER.pack(len(label), 0.0, record_id, id2) + struct.pack(f"<{len(label)}f", *label) + data
    return HEADER.pack(0, float(label), record_id, id2) + data


class RecordWriter:
    """Writes `.rec` records and the matching `.idx` lines."""

    def __init__(self, rec_path: str, idx_path: str) -> None:
        self.rec = open(rec_path, "wb")
        self.idx = open(idx_path, "w", encoding="ascii")

    def write(self, index: int, payload: bytes) -> None:
        if len(payload) > _LENGTH_MASK:
            raise ValueError(f"record {index}: {len(payload)} bytes is over RecordIO's 2^29 - 1")
        self.idx.write(f"{index}\t{self.rec.tell()}\n")
        self.rec.write(_FRAME.pack(MAGIC, len(payload)))
        self.rec.write(payload)
        self.rec.write(b"\0" * (-len(payload) % 4))

    def close(self) -> None:
        self.rec.close()
        self.idx.close()


def write_insightface_rec(out_dir: str, samples: Iterable[tuple[int, bytes]], image_size: int) -> dict:
    """`samples`: (label, encoded image) sorted by label. Labels become contiguous 0..K-1.

    Record 0 is written last (it needs N and K) and its `.idx` line goes first, as readers look
    records up by index, not by position."""
    os.makedirs(out_dir, exist_ok=True)
    rec_path, idx_path = os.path.join(out_dir, "train.rec"), os.path.join(out_dir, "train.idx")
    body_idx = idx_path + ".part"
    writer = RecordWriter(rec_path, body_idx)
    # Reserve record 0's place at the start with its final size (two float labels, no image).
    header0_size = len(pack((0.0, 0.0), b"", 0))
    writer.rec.write(b"\0" * (_FRAME.size + header0_size + (-header0_size % 4)))
    ranges: list[tuple[int, int]] = []
    previous, index = None, 1
    for label, data in samples:
        if label != previous:
            if previous is not None and label < previous:
                raise ValueError("samples must be sorted by label")
            ranges.append((index, index))
            previous = label
        writer.write(index, pack(float(len(ranges) - 1), data, index))
        ranges[-1] = (ranges[-1][0], index + 1)
        index += 1
    images_end = index
    for start, end in ranges:
        writer.write(index, pack((float(start), float(end)), b"", index))
        index += 1
    writer.close()
    with open(rec_path, "r+b") as rec:
        payload = pack((float(images_end), float(index)), b"", 0)
        rec.write(_FRAME.pack(MAGIC, len(payload)) + payload)
    with open(idx_path, "w", encoding="ascii") as idx, open(body_idx, encoding="ascii") as body:
        idx.write("0\t0\n")
        idx.write(body.read())
    os.remove(body_idx)
    with open(os.path.join(out_dir, "property"), "w", encoding="ascii") as handle:
        handle.write(f"{len(ranges)},{image_size},{image_size}\n")
    return {"images": images_end - 1, "identities": len(ranges), "records": index}
