"""MXNet RecordIO (``.rec`` + ``.idx``), read and written directly from the format.

Record framing (dmlc-core recordio): uint32 magic 0xced7230a, uint32 ``lrecord`` whose
upper 3 bits are a continuation flag (0 whole, 1 first, 2 middle, 3 last part: a payload
containing the magic at a 4-byte boundary is split there, the magic itself dropped) and
lower 29 bits the part length; the part, then zero padding to 4 bytes.

Payload (mxnet.recordio.pack): the IRHeader struct ``<IfQQ`` = flag, label, id, id2; when
flag > 0 the label is instead ``flag`` float32 values following the header; then the image
bytes. ``.idx`` lines are ``key<TAB>byte offset``. insightface's face sets also hold meta
records without an image (record 0: counts; identity ranges): those are skipped quietly.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_IR = struct.Struct("<IfQQ")


class RecordIOError(ValueError):
    """A malformed record, named by file and offset."""


@dataclass
class Record:
    key: int
    offset: int
    flag: int
    label: list[float]  # one value when flag == 0
    id: int
    id2: int
    image: bytes


def read_payload(f: BinaryIO, offset: int, where: str) -> bytes:
    """The (reassembled) payload of the record that starts at ``offset``."""
    f.seek(offset)
    parts: list[bytes] = []
    while True:
        head = f.read(8)
        if len(head) < 8:
            raise RecordIOError(f"{where}: record at byte {offset} is truncated")
        magic, lrec = struct.unpack("<II", head)
        if magic != MAGIC:
            raise RecordIOError(f"{where}: no record magic at byte {f.tell() - 8}")
        cflag, length = lrec >> 29, lrec & ((1 << 29) - 1)
        data = f.read(length)
        if len(data) < length:
            raise RecordIOError(f"{where}: record at byte {offset} is truncated")
        f.read((4 - length % 4) % 4)
        parts.append(data)
        if cflag in (0, 3):
            return _MAGIC_BYTES.join(parts)
        if cflag not in (1, 2):
            raise RecordIOError(f"{where}: bad continuation flag {cflag} at byte {offset}")


def unpack(payload: bytes, key: int, offset: int, where: str) -> Record:
    if len(payload) < _IR.size:
        raise RecordIOError(f"{where}: record {key} is shorter than its header")
    flag, label, id_, id2 = _IR.unpack_from(payload)
    body = payload[_IR.size:]
    labels = [label]
    if flag > 0:
        if len(body) < 4 * flag:
            raise RecordIOError(f"{where}: record {key} declares {flag} labels but is too short")
        labels = list(struct.unpack_from(f"<{flag}f", body))
        body = body[4 * flag:]
    return Record(key, offset, flag, labels, id_, id2, body)


def read_index(idx_path: str) -> list[tuple[int, int]]:
    """``.idx`` -> [(key, offset)] in file order."""
    out = []
    with open(idx_path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                k, off = line.split("\t")
                out.append((int(k), int(off)))
            except ValueError:
                raise RecordIOError(f"{idx_path}:{n}: expected 'key<TAB>offset'") from None
    return out


def scan_offsets(f: BinaryIO) -> list[tuple[int, int]]:
    """Without an ``.idx``: walk the records; keys are their ordinal numbers."""
    out, pos, key, start = [], 0, 0, None
    while True:
        f.seek(pos)
        head = f.read(8)
        if len(head) < 8:
            return out
        magic, lrec = struct.unpack("<II", head)
        if magic != MAGIC:
            raise RecordIOError(f"no record magic at byte {pos}")
        cflag, length = lrec >> 29, lrec & ((1 << 29) - 1)
        if cflag in (0, 1):
            start = pos
        if cflag in (0, 3):
            out.append((key, start))
            key += 1
        pos += 8 + length + (4 - length % 4) % 4


def iter_records(rec_path: str, idx_path: str | None = None) -> Iterator[Record | RecordIOError]:
    """Every record of a ``.rec``; a malformed one is yielded as its error (callers skip it)."""
    with open(rec_path, "rb") as f:
        index = read_index(idx_path) if idx_path else scan_offsets(f)
        for key, offset in index:
            try:
                yield unpack(read_payload(f, offset, rec_path), key, offset, rec_path)
            except RecordIOError as e:
                yield e


# --------------------------------------------------------------------------- writing


def pack(label: float | list[float], image: bytes, id_: int = 0, id2: int = 0) -> bytes:
    if isinstance(label, (list, tuple)):
        return _IR.pack(len(label), 0.0, id_, id2) + struct.pack(f"<{len(label)}f", *label) + image
    return _IR.pack(0, float(label), id_, id2) + image


class RecordIOWriter:
    """Writes ``.rec`` + ``.idx`` like ``mxnet.recordio.MXIndexedRecordIO``."""

    def __init__(self, rec_path: str, idx_path: str):
        self._rec = open(rec_path, "wb")
        self._idx = open(idx_path, "w")

    def write(self, key: int, payload: bytes) -> None:
        self._idx.write(f"{key}\t{self._rec.tell()}\n")
        # Split at every 4-byte-aligned occurrence of the magic, as dmlc does.
        cuts, i = [], 0
        while True:
            i = payload.find(_MAGIC_BYTES, i)
            if i < 0:
                break
            if i % 4 == 0:
                cuts.append(i)
            i += 1
        pieces, start = [], 0
        for c in cuts:
            pieces.append(payload[start:c])
            start = c + 4
        pieces.append(payload[start:])
        for n, piece in enumerate(pieces):
            if len(pieces) == 1:
                cflag = 0
            else:
                cflag = 1 if n == 0 else (3 if n == len(pieces) - 1 else 2)
            self._rec.write(struct.pack("<II", MAGIC, (cflag << 29) | len(piece)))
            self._rec.write(piece + b"\0" * ((4 - len(piece) % 4) % 4))

    def close(self) -> None:
        self._rec.close()
        self._idx.close()

    def __enter__(self) -> RecordIOWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
