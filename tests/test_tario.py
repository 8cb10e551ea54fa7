"""The shard tar reader against Python's tarfile: long names, odd sizes, chunk boundaries,
every truncation point, damaged headers."""

from __future__ import annotations

import io
import tarfile

import pytest

from seqface_dist.data import tario

SIZES = [0, 1, 511, 512, 513, 5000]


def archive(fmt: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        d = tarfile.TarInfo("dir")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)
        for i, n in enumerate(SIZES):
            info = tarfile.TarInfo(f"dir/s{i}.bin")
            info.size = n
            tf.addfile(info, io.BytesIO(bytes((i * 7 + j) % 256 for j in range(n))))
        long = tarfile.TarInfo("deep/" + "x" * 150 + ".jpg")  # needs an 'L' or pax header
        long.size = 3
        tf.addfile(long, io.BytesIO(b"abc"))
        link = tarfile.TarInfo("dir/link")
        link.type = tarfile.SYMTYPE
        link.linkname = "s0.bin"
        tf.addfile(link)
    return buf.getvalue()


def expected(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf if m.isreg()]


def read(data: bytes, chunk: int = 1 << 20) -> tuple[list, list]:
    problems: list = []
    members = list(tario.iter_members(io.BytesIO(data), lambda r, d: problems.append(r),
                                      chunk=chunk))
    return members, problems


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
@pytest.mark.parametrize("chunk", [1, 7, 512, 1 << 20])
def test_members_equal_tarfile(fmt, chunk):
    data = archive(fmt)
    members, problems = read(data, chunk)
    assert members == expected(data)
    assert problems == []


def test_every_truncation_is_reported_and_keeps_complete_members():
    data = archive(tarfile.GNU_FORMAT)
    full = expected(data)
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        end = max(m.offset_data + m.size for m in tf)  # where the last member's data ends
    for cut in range(0, end + 1024, 97):
        members, problems = read(data[:cut], chunk=1000)
        complete = [m for m in members if m[1] is not None]
        assert complete == full[:len(complete)], cut
        if cut < end:  # cut before the last member's data ended
            assert problems == ["truncated_shard"], cut
        assert all(m[1] is not None for m in members[:-1]), cut  # only the last can be cut


def test_damaged_header_skips_that_member_only():
    data = bytearray(archive(tarfile.GNU_FORMAT))
    full = expected(bytes(data))
    second = data.find(b"dir/s1.bin")  # the second regular member's header
    data[second + 2] ^= 0x40
    members, problems = read(bytes(data))
    assert problems == ["corrupt_tar"]
    assert members == [m for m in full if m[0] != "dir/s1.bin"]


def test_any_single_byte_change_in_a_header_fails_the_checksum():
    block = archive(tarfile.GNU_FORMAT)[:tario.BLOCK]
    assert tario._checksum_ok(block)
    for pos in [p for p in range(tario.BLOCK) if not 148 <= p < 156]:
        for delta in (1, 255, 128):
            damaged = bytearray(block)
            damaged[pos] = (damaged[pos] + delta) % 256
            assert not tario._checksum_ok(bytes(damaged)), (pos, delta)
