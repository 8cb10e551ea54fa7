"""Tar files for WebDataset shards: a deterministic writer and a tolerant streaming reader.

Writer: fixed mtime/owner/mode, so the same samples give byte-identical shards (and the
same sha256) on every rebuild.

Reader: our own ustar parser instead of ``tarfile``'s stream mode, because that one gives
up on the first bad header and the rest of the shard is lost. Here a member whose header
checksum is wrong is skipped by scanning forward to the next valid header, and a shard that
ends mid-member reports itself truncated. Events are reported through ``on_problem``; the
caller counts them.
"""

from __future__ import annotations

import io
import tarfile
import zlib
from collections.abc import Callable, Iterator
from typing import BinaryIO

BLOCK = 512


class TarWriter:
    """Append ``name -> bytes`` members to a tar stream, deterministically."""

    def __init__(self, fileobj: BinaryIO):
        self._tar = tarfile.open(fileobj=fileobj, mode="w", format=tarfile.USTAR_FORMAT)

    def add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0
        info.mode = 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self._tar.addfile(info, io.BytesIO(data))

    def close(self) -> None:
        self._tar.close()


# The header checksum is the byte sum with the checksum field read as spaces. It is checked
# modulo 65521 through zlib's Adler-32 of the whole block (whose low half is 1 + byte sum
# mod 65521), corrected for the field: ~4x cheaper than summing 512 bytes in Python, and
# this runs twice per sample. A corruption that moves the sum by exactly a multiple of
# 65521 slips through (no single-byte change does); tar's own sum is no stronger against
# reordered bytes anyway.
def _checksum_ok(block: bytes) -> bool:
    field = block[148:156]
    try:
        stored = int(field.split(b"\0", 1)[0].strip() or b"-1", 8)
    except ValueError:
        return False
    if not 0 <= stored <= 255 * BLOCK:
        return False
    expect = (zlib.adler32(block) & 0xFFFF) - sum(field) + 8 * 32  # 1 + sum, field as spaces
    return (1 + stored - expect) % 65521 == 0


class TarHeaderError(ValueError):
    """A header with a valid checksum whose size field cannot be trusted: where the next
    member starts is unknown, so the rest of the shard cannot be read."""


def _octal(field: bytes) -> int:
    """A ustar size field: octal digits, NUL/space padded. GNU base-256 (sizes >= 8 GiB)
    is refused: the writer never makes it, no face image is that large, and a forged huge
    size would make the reader buffer the whole rest of the shard."""
    digits = field.split(b"\0", 1)[0].strip(b" ")  # usually "%011o\0"
    if not digits:
        return 0
    # Only the digits 0-7: int() alone would also take a sign, "0o" and underscores.
    if digits.translate(None, b"01234567") == b"":
        return int(digits, 8)
    raise TarHeaderError(f"tar size field {bytes(field)!r} is not octal")


def _refill(f: BinaryIO, buf: bytes, pos: int, need: int, chunk: int) -> bytes:
    """The unread rest of ``buf`` plus at least ``need`` more bytes from ``f`` if it has them.
    Shards are read ``chunk`` bytes at a time: one ``read`` call per ~200 members."""
    parts, have = [buf[pos:]], len(buf) - pos
    while have < need:
        data = f.read(max(chunk, need - have))
        if not data:
            break
        parts.append(data)
        have += len(data)
    return b"".join(parts)


def _member_name(block: bytes) -> str:
    name = block[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
    if block[345] == 0 or block[257:262] != b"ustar":  # no ustar prefix field
        return name
    return block[345:500].split(b"\0", 1)[0].decode("utf-8", "replace") + "/" + name


_ZERO_BLOCK = b"\0" * BLOCK


def iter_members(f: BinaryIO, on_problem: Callable[[str, str], None],
                 chunk: int = 1 << 20) -> Iterator[tuple[str, bytes | None]]:
    """Yield (name, data) for each regular file; report 'corrupt_tar' / 'truncated_shard'.
    A member cut off by the end of the stream is yielded last as (name, None).
    ``f`` is read ``chunk`` bytes at a time."""
    # The hot loop of the data plane (two members per sample): buffer handling is inline.
    buf, pos = b"", 0
    pending_name: str | None = None  # from a GNU 'L' or pax 'x' long-name header
    resyncing = False
    while True:
        if len(buf) - pos < BLOCK:
            buf, pos = _refill(f, buf, pos, BLOCK, chunk), 0
        block = buf[pos:pos + BLOCK]
        pos += len(block)
        if len(block) < BLOCK:
            if block:
                on_problem("truncated_shard", f"ends inside a header ({len(block)} bytes)")
            else:
                on_problem("truncated_shard", "no end-of-archive marker")
            return
        if block == _ZERO_BLOCK:
            if resyncing:
                continue
            return  # end of archive (the second zero block is not needed)
        if not _checksum_ok(block):
            if not resyncing:
                on_problem("corrupt_tar", "bad tar header checksum; skipping to the next member")
                resyncing = True
            continue
        resyncing = False
        size = _octal(block[124:136])
        padded = (size + BLOCK - 1) // BLOCK * BLOCK
        if len(buf) - pos < padded:
            buf, pos = _refill(f, buf, pos, padded, chunk), 0
        got = min(len(buf) - pos, padded)
        data = buf[pos:pos + min(size, got)]
        pos += got
        if got < size:
            name = pending_name or _member_name(block)
            on_problem("truncated_shard", f"ends inside {name} ({got} of {size} bytes)")
            yield name, None
            return
        kind = block[156]
        if kind == 0x4C:  # 'L': GNU long name of the next member
            pending_name = data.rstrip(b"\0").decode("utf-8", "replace")
            continue
        if kind == 0x78:  # 'x': pax extended header
            for line in data.decode("utf-8", "replace").splitlines():
                _, _, kv = line.partition(" ")
                if kv.startswith("path="):
                    pending_name = kv[5:]
            continue
        if kind != 0x30 and kind != 0:  # '0' or NUL: a regular file
            pending_name = None
            continue  # directories, links, ...: not sample data
        if pending_name is not None:
            name, pending_name = pending_name, None
        else:
            name = _member_name(block)
        yield name, data


def iter_samples(f: BinaryIO, on_problem: Callable[[str, str], None]) -> Iterator[dict]:
    """Group consecutive members by key into samples {"__key__": k, ext: bytes, ...}.
    WebDataset convention: key = the path up to the first dot of the basename, ext = the rest
    (lower-cased); members without a key, or whose basename starts with "__", are not data."""
    current: dict | None = None
    key = None
    for name, data in iter_members(f, on_problem):
        slash = name.rfind("/")
        dot = name.find(".", slash + 1)
        if data is None:
            # Cut off mid-member: the sample it belongs to is part of the truncation event;
            # a sample with another key before it is complete.
            if current is not None and (dot <= slash + 1 or name[:dot] != key):
                yield current
            return
        if dot <= slash + 1 or name.startswith("__", slash + 1):
            continue
        if name[:dot] != key:
            if current is not None:
                yield current
            key = name[:dot]
            current = {"__key__": key}
        ext = name[dot + 1:].lower()
        if ext in current:
            on_problem("duplicate_member", f"{name} appears twice")
            continue
        current[ext] = data
    if current is not None:
        yield current
