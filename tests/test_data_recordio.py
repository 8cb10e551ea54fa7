"""RecordIO (.rec/.idx) written from the format's description, read back and converted."""

from __future__ import annotations

import io
import json
import struct
import tarfile

import numpy as np
from PIL import Image

from seqface_dist.data import recordio
from seqface_dist.data.build import BuildOptions, build_recordio
from seqface_dist.data.manifest import resolve_shard_set
from seqface_dist.data.verify import verify_shard_set

SIZE = (24, 20)


def jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    arr = (rng.random((SIZE[0], SIZE[1], 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_rec(tmp_path, labels: list[float]) -> tuple[str, str, dict[int, bytes]]:
    rec, idx = str(tmp_path / "train.rec"), str(tmp_path / "train.idx")
    images = {}
    with recordio.RecordIOWriter(rec, idx) as w:
        # insightface-style header record: flag 2, no image (meta, skipped quietly)
        w.write(0, recordio.pack([len(labels) + 1.0, len(labels) + 1.0], b""))
        for k, label in enumerate(labels, start=1):
            img = jpeg(k)
            if k == 2:  # the record magic at a 4-byte boundary: the record is split in parts
                pad = b"\0" * ((-len(img) - 24) % 4)
                img = img + pad + struct.pack("<I", recordio.MAGIC) + b"tail"
            images[k] = img
            w.write(k, recordio.pack(label, img, id_=k))
    return rec, idx, images


def test_records_round_trip_including_split_records(tmp_path):
    labels = [0, 1, 1, 2, 0]
    rec, idx, images = write_rec(tmp_path, labels)
    raw = open(rec, "rb").read()
    assert struct.unpack_from("<I", raw)[0] == recordio.MAGIC
    got = [r for r in recordio.iter_records(rec, idx)]
    assert got[0].flag == 2 and got[0].image == b""
    assert [(r.key, r.label[0], r.id, r.image) for r in got[1:]] == [
        (k, float(labels[k - 1]), k, images[k]) for k in range(1, 6)]
    # Record 2 really was split (continuation flags 1 then 3), and scanning without the
    # .idx finds the same records.
    offset = dict(recordio.read_index(idx))[2]
    assert struct.unpack_from("<I", raw, offset + 4)[0] >> 29 == 1
    with open(rec, "rb") as f:
        assert recordio.scan_offsets(f) == recordio.read_index(idx)


def test_recordio_conversion_keeps_labels_and_image_bytes(tmp_path):
    labels = [0, 3, 1, 2, 3, 0, 1, 2, -1, 2.5]  # the last two are not identity indices
    rec, idx, images = write_rec(tmp_path, labels)
    out = str(tmp_path / "shards")
    rep = build_recordio(rec, out, BuildOptions(image_size=SIZE, max_samples=4, progress=False))
    m = rep.manifest
    assert m.num_classes == 4 and m.num_samples == 8
    assert m.label_map == {"0": 0, "1": 1, "2": 2, "3": 3}
    assert sorted(p.source for p in rep.problems) == ["train.rec#10", "train.rec#9"]
    got = {}
    for s in m.shards:
        with tarfile.open(f"{out}/{s.name}") as t:
            files = {mm.name: t.extractfile(mm).read() for mm in t.getmembers()}
        for name, data in files.items():
            if name.endswith(".json"):
                meta = json.loads(data)
                got[meta["source"]] = (meta["index"], files[name[:-5] + ".jpg"])
    assert got == {f"train.rec#{k}": (int(labels[k - 1]), images[k]) for k in range(1, 9)}
    assert verify_shard_set(out).ok
    assert resolve_shard_set(out).num_samples == 8


def test_lst_names_that_escape_the_root_are_skipped(tmp_path):
    rec, idx, _ = write_rec(tmp_path, [0, 1, 2, 1])
    lst = tmp_path / "train.lst"
    lst.write_text("1\t0\tok/a.jpg\n2\t1\t/etc/passwd\n3\t2\t../../up.jpg\n4\t1\tok/b.jpg\n")
    rep = build_recordio(rec, str(tmp_path / "s"), BuildOptions(image_size=SIZE, progress=False),
                         lst_path=str(lst))
    assert {p.reason for p in rep.problems} == {"escapes the root"}
    assert sorted(p.source for p in rep.problems) == ["train.rec#2 (/etc/passwd)",
                                                       "train.rec#3 (../../up.jpg)"]
    assert rep.manifest.num_samples == 2 and rep.manifest.label_map == {"0": 0, "1": 1}
