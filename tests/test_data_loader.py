"""Reading: every kind of bad sample skipped and counted; batch counts equal across ranks
with uneven shards (resampled and not); several sets of one kind get offsets."""

from __future__ import annotations

import io
import json
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from seqface_dist.config import DataConfig
from seqface_dist.data.build import write_shard_set
from seqface_dist.data.loader import make_train_loader
from seqface_dist.data.manifest import Manifest, ShardEntry, resolve_shard_set
from seqface_dist.data.samples import SampleStream
from seqface_dist.data.tario import TarWriter

SIZE = (16, 16)


def jpg(seed: int, size=SIZE) -> bytes:
    arr = (np.random.default_rng(seed).random((*size, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def meta(index: int, kind: str = "identity") -> bytes:
    return json.dumps({"kind": kind, "index": index, "source": "test"}).encode()


def write_tar(path: str, members: list[tuple[str, bytes]]) -> bytes:
    with open(path, "wb") as f:
        w = TarWriter(f)
        for name, data in members:
            w.add(name, data)
        w.close()
    return open(path, "rb").read()


def good(key: str, seed: int, index: int = 0) -> list[tuple[str, bytes]]:
    return [(f"{key}.jpg", jpg(seed)), (f"{key}.json", meta(index))]


@pytest.fixture
def damaged_set(tmp_path):
    """A 4-class identity set whose shards hold every kind of damage the reader must survive.
    Returns (folder, keys of the good samples, expected bad counts by reason)."""
    d = str(tmp_path)
    expect_good = set()
    entries = []

    def add(name: str, data: bytes, count: int) -> None:
        entries.append(ShardEntry(name, count, "", len(data)))

    members = []
    for i in range(5):
        members += good(f"a{i}", i, i % 4)
        expect_good.add(f"a{i}")
    add("s-0.tar", write_tar(f"{d}/s-0.tar", members), 5)

    members = good("b0", 10, 1)
    members += [("b1.jpg", b"\xff\xd8\xff not a jpeg"), ("b1.json", meta(1))]  # bad_jpeg
    members += [("b2.jpg", jpg(12))]  # missing_json
    members += [("b3.jpg", jpg(13)), ("b3.json", b"{not json")]  # bad_json
    members += [("b4.jpg", jpg(14)), ("b4.json", meta(99))]  # label_out_of_range
    members += [("b5.jpg", jpg(15)), ("b5.json", meta(1, "sequence"))]  # wrong_kind
    members += [("b6.json", meta(2))]  # missing_jpg
    members += [("b7.jpg", jpg(17, (20, 16))), ("b7.json", meta(2))]  # bad_image_size
    members += [("b8.jpg", jpg(18)), ("b8.json", json.dumps({"kind": "identity"}).encode())]
    members += good("b9", 19, 3)
    expect_good |= {"b0", "b9"}
    add("s-1.tar", write_tar(f"{d}/s-1.tar", members), 10)

    # A corrupt member header: that member is skipped, the shard goes on after it.
    members = good("c0", 20) + good("c1", 21) + good("c2", 22) + good("c3", 23)
    data = bytearray(write_tar(f"{d}/s-2.tar", members))
    pos = data.find(b"c1.jpg")
    data[pos] = ord("X")  # header checksum no longer matches
    open(f"{d}/s-2.tar", "wb").write(data)
    expect_good |= {"c0", "c2", "c3"}  # c1 lost its jpg: missing_jpg
    add("s-2.tar", bytes(data), 4)

    # A truncated shard: cut in the middle of c2's image.
    members = good("t0", 30) + good("t1", 31) + good("t2", 32) + good("t3", 33)
    data = write_tar(f"{d}/s-3.tar", members)
    cut = data.find(b"t2.jpg") + 700
    open(f"{d}/s-3.tar", "wb").write(data[:cut])
    expect_good |= {"t0", "t1"}
    add("s-4-missing.tar", b"", 3)  # listed, never written: shard_open_error
    add("s-3.tar", data[:cut], 4)

    m = Manifest("identity", 4, list(SIZE), 3, entries, {str(i): i for i in range(4)})
    open(f"{d}/manifest.json", "wb").write(m.to_json())
    bad = {"bad_jpeg": 1, "missing_json": 1, "bad_json": 2, "label_out_of_range": 1,
           "wrong_kind": 1, "missing_jpg": 2, "bad_image_size": 1, "corrupt_tar": 1,
           "truncated_shard": 1, "shard_open_error": 1}
    return d, expect_good, bad


def test_every_kind_of_bad_sample_is_skipped_counted_and_logged_once_per_shard(damaged_set,
                                                                                caplog):
    d, expect_good, bad = damaged_set
    stream = SampleStream([resolve_shard_set(d)], shuffle_buffer=4)
    with caplog.at_level(logging.WARNING, logger="seqface_dist.data.stream"):
        got = list(stream)
    assert sorted(s["key"] for s in got) == sorted(expect_good)
    assert dict(stream.counters.bad) == bad
    assert stream.counters.samples == len(expect_good)
    warned = [r.getMessage().split(":")[0] for r in caplog.records]
    assert sorted(os.path.basename(u) for u in warned) == [
        "s-1.tar", "s-2.tar", "s-3.tar", "s-4-missing.tar"]


def test_decode_into_a_batch_row_tells_bad_from_wrong_size():
    from seqface_dist.data.images import ImageError, decode_jpeg

    out = np.zeros((*SIZE, 3), np.uint8)
    good_jpg = jpg(1)
    assert np.shares_memory(decode_jpeg(good_jpg, 3, "simplejpeg", out), out)
    assert np.array_equal(out, decode_jpeg(good_jpg, 3, "simplejpeg"))
    assert decode_jpeg(jpg(2, (20, 16)), 3, "simplejpeg", out).shape == (20, 16, 3)  # too big
    assert decode_jpeg(jpg(2, (8, 8)), 3, "simplejpeg", out).shape == (8, 8, 3)  # too small
    with pytest.raises(ImageError):  # a valid header of the right size, data cut short
        decode_jpeg(good_jpg[: len(good_jpg) // 2], 3, "simplejpeg", out)
    for decoder in ("pil", "simplejpeg"):
        with pytest.raises(ImageError):
            decode_jpeg(b"\xff\xd8\xff not a jpeg", 3, decoder, out)


def test_counters_reach_the_training_process_from_workers(damaged_set):
    d, expect_good, bad = damaged_set
    cfg = DataConfig(identity_shards=[d], sequence_shards=[], identities_per_batch=1,
                     sequences_per_batch=0, num_workers=2, resampled=False, shuffle_buffer=0)
    loader = make_train_loader(cfg, rank=0, world_size=1, image_size=SIZE, channels=3, seed=0)
    n = sum(1 for _ in loader)
    c = loader.counters()
    assert n == len(loader) and c["samples"] == n
    assert c["bad"] and set(c["bad"]) <= set(bad)
    assert c["shards"] >= 3


def uneven_set(tmp_path, counts: list[int], name: str = "ids", kind: str = "identity") -> str:
    """A set whose k-th shard holds counts[k] samples (one shard per write_shard_set call)."""
    out = str(tmp_path / name)
    samples, k = [], 0
    for c in counts:
        samples += [((k + j) % 3, (np.random.default_rng(k + j).random((*SIZE, 3)) * 255)
                     .astype(np.uint8)) for j in range(c)]
        k += 1
    # One write_shard_set call per shard, then the shards are gathered under one manifest.
    sizes = iter(counts)
    batches, cur = [], []
    left = next(sizes)
    for s in samples:
        cur.append(s)
        left -= 1
        if left == 0:
            batches.append(cur)
            cur = []
            left = next(sizes, 0)
    entries = []
    for b_i, b in enumerate(batches):
        m = write_shard_set(b, f"{out}/part{b_i}", kind, num_classes=3)
        os.replace(f"{out}/part{b_i}/{m.shards[0].name}", f"{out}/s-{b_i:06d}.tar")
        e = m.shards[0]
        e.name = f"s-{b_i:06d}.tar"
        entries.append(e)
    man = Manifest(kind, 3, list(SIZE), 3, entries, {"0": 0, "1": 1, "2": 2})
    open(f"{out}/manifest.json", "wb").write(man.to_json())
    return out


def test_resampled_ranks_with_3_and_5_shards_make_the_same_number_of_batches(tmp_path):
    d = uneven_set(tmp_path, [4, 30, 2, 9, 9, 1, 20, 3])
    lens = []
    for rank, pattern in ((0, "s-{000000..000002}.tar"), (1, "s-{000003..000007}.tar")):
        cfg = DataConfig(identity_shards=[f"{d}/{pattern}"], identities_per_batch=3,
                         sequences_per_batch=0, num_workers=2, resampled=True,
                         samples_per_epoch=45, shuffle_buffer=8)
        loader = make_train_loader(cfg, rank=rank, world_size=2, image_size=SIZE, channels=3,
                                   seed=0)
        assert len(resolve_shard_set(f"{d}/{pattern}").shards) == 3 + 2 * rank
        lens.append((len(loader), sum(1 for _ in loader)))
    assert lens == [(15, 15), (15, 15)]


def test_non_resampled_uneven_ranks_stop_together(tmp_path):
    d = uneven_set(tmp_path, [25, 2, 3, 14, 2, 1, 30])
    cfg = DataConfig(identity_shards=[d], identities_per_batch=2, sequences_per_batch=0,
                     num_workers=2, resampled=False, shuffle_buffer=0)
    loaders = [make_train_loader(cfg, rank=r, world_size=2, image_size=SIZE, channels=3, seed=3)
               for r in range(2)]
    caps = [sum(loaders[0].plan._caps(r, 0)) for r in range(2)]
    assert caps[0] != caps[1]  # the ranks really got different amounts of data
    got = [sum(1 for _ in ld) for ld in loaders]
    assert got == [min(caps), min(caps)] == [len(loaders[0]), len(loaders[1])]


def test_two_sequence_sets_are_concatenated_with_offsets(tmp_path):
    ids = uneven_set(tmp_path, [6], "ids")
    seq_a = uneven_set(tmp_path, [6], "seqa", "sequence")
    seq_b = uneven_set(tmp_path, [6], "seqb", "sequence")
    cfg = DataConfig(identity_shards=[ids], sequence_shards=[seq_a, seq_b],
                     identities_per_batch=1, sequences_per_batch=2, num_workers=0,
                     resampled=False, shuffle_buffer=0, flip=False)
    loader = make_train_loader(cfg, rank=0, world_size=1, image_size=SIZE, channels=3, seed=0)
    lay = loader.layout
    assert (lay.num_identities, lay.num_sequences) == (3, 6)
    assert [s["offset"] for s in lay.sequence_sets] == [0, 3]
    centers = [c for _, cs in loader for c in cs.tolist()]
    seq_centers = sorted(c for i, c in enumerate(centers) if i % 3)
    # Both sets' indices 0..2 appear, shifted by N_id = 3 and by set A's 3 classes.
    assert seq_centers == sorted([3 + k % 3 for k in range(6)] + [6 + k % 3 for k in range(6)])


@pytest.mark.parametrize("h, w", [(6, 5), (6, 8)])
def test_normalise_flip_and_crop(h, w):
    import random

    import torch

    from seqface_dist.data.augment import augment_batch
    from seqface_dist.data.normalize import normalize

    img = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    x = normalize(torch.from_numpy(np.stack([img, img[:, ::-1].copy()])))
    want = (img.astype(np.float64).transpose(2, 0, 1) - 127.5) / 128
    assert x.dtype == torch.float32 and x.shape == (2, 3, h, w)
    assert np.array_equal(x[0].numpy(), want.astype(np.float32))
    assert np.array_equal(x[1].numpy(), want[:, :, ::-1].astype(np.float32))

    def augmented(seed: int, flip: bool, pad: int) -> np.ndarray:
        rng = random.Random(seed)
        mirror = [flip and rng.random() < 0.5 for _ in range(3)]
        batch = np.stack([img] * 3)
        augment_batch(batch, mirror, rng, pad)
        return batch

    rows = np.concatenate([augmented(s, True, 0) for s in range(10)])
    assert {r[0, 0, 0] for r in rows} == {img[0, 0, 0], img[0, -1, 0]}  # both orientations
    assert all(np.array_equal(r, img) or np.array_equal(r, img[:, ::-1]) for r in rows)
    for pad in (2, 9):  # 9: wider than the image, some windows are all zeros
        padded = np.pad(img, ((pad, pad), (pad, pad), (0, 0)))
        crops = {(y, x_) for y in range(2 * pad + 1) for x_ in range(2 * pad + 1)}
        seen = set()
        for r in np.concatenate([augmented(s, False, pad) for s in range(150)]):
            at = {(y, x_) for y, x_ in crops if np.array_equal(r, padded[y:y + h, x_:x_ + w])}
            assert at  # every output is one window of the zero-padded image
            seen |= at
        assert seen == crops if pad == 2 else len(seen) > 100  # and the windows all occur


def unique_set(tmp_path, n: int, kind: str, name: str) -> tuple[str, dict[int, np.ndarray]]:
    """A set of n samples, sample j of class j; returns (folder, class -> decoded image)."""
    imgs = [(np.random.default_rng(j).random((*SIZE, 3)) * 255).astype(np.uint8)
            for j in range(n)]
    out = str(tmp_path / name)
    write_shard_set(list(enumerate(imgs)), out, kind, num_classes=n, max_samples=7)
    decoded = {}
    for s in SampleStream([resolve_shard_set(out)]):
        decoded[s["center"]] = s["image"]
    assert len(decoded) == n
    return out, decoded


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_hold_the_decoded_images_and_can_be_kept(tmp_path, workers):
    """Every row of every batch is its sample's image (flipped or not), also when the caller
    keeps all batches: the shared slots the workers reuse must not leak into them."""
    ids, id_img = unique_set(tmp_path, 40, "identity", "ids")
    seqs, seq_img = unique_set(tmp_path, 60, "sequence", "seqs")
    cfg = DataConfig(identity_shards=[ids], sequence_shards=[seqs], identities_per_batch=2,
                     sequences_per_batch=3, num_workers=workers, resampled=False,
                     shuffle_buffer=5, flip=True)
    loader = make_train_loader(cfg, rank=0, world_size=1, image_size=SIZE, channels=3, seed=0)
    kept = list(loader)
    assert len(kept) == len(loader) >= 12  # more batches than a worker's ring slots
    flipped = 0
    for images, centers in kept:
        assert images.dtype == torch.uint8 and images.shape == (5, *SIZE, 3)
        for row, c in zip(images.numpy(), centers.tolist(), strict=True):
            want = id_img[c] if c < 40 else seq_img[c - 40]
            assert np.array_equal(row, want) or np.array_equal(row, want[:, ::-1]), c
            flipped += not np.array_equal(row, want)
    assert 0 < flipped < 5 * len(kept)


def test_stopping_early_then_a_full_pass(tmp_path):
    ids, _ = unique_set(tmp_path, 40, "identity", "ids")
    cfg = DataConfig(identity_shards=[ids], identities_per_batch=2, sequences_per_batch=0,
                     num_workers=2, resampled=False, shuffle_buffer=0)
    loader = make_train_loader(cfg, rank=0, world_size=1, image_size=SIZE, channels=3, seed=0)
    it = iter(loader)
    next(it)  # stop after one batch while the workers fill their slots
    it.close()
    assert sum(1 for _ in loader) == len(loader) >= 15


def test_batch_ring_lends_slots_until_every_view_is_gone_then_copies():
    import gc
    import threading

    from seqface_dist.data.batchring import BatchRing

    ring = BatchRing(1, 2, (1, 2, 2, 1), lend=1)

    def fill(value: int) -> None:
        claimed = ring.claim(0)
        if claimed is None:  # the main process stopped reading
            slots.append(None)
            return
        slot, images, centers = claimed
        images[...] = value
        centers[...] = value
        ring.publish(0, len(slots), slot)
        slots.append(slot)

    slots: list[int] = []

    def blocked() -> threading.Thread:
        t = threading.Thread(target=fill, args=(9,))
        t.start()
        t.join(0.3)
        return t

    fill(1)
    fill(2)
    waiter = blocked()
    assert waiter.is_alive()  # both slots hold batches the main process has not taken
    assert [ring.wait(0, timeout=0) for _ in range(3)] == [0, 1, None]
    lent, centers = ring.take(0, 0)
    assert centers.tolist() == [1]
    part = lent[0, 1:].permute(1, 0, 2)  # a view the caller keeps
    del lent
    gc.collect()
    waiter.join(0.3)
    assert waiter.is_alive()  # the slot is still in use through the view
    copied, _ = ring.take(0, 1)  # one batch already lent: this one is a copy, slot 1 freed
    waiter.join(10)
    assert not waiter.is_alive() and slots == [0, 1, 1]  # batch 2 went to the freed slot
    assert copied.flatten().tolist() == [2] * 4 and part.flatten().tolist() == [1] * 2
    waiter = blocked()
    assert waiter.is_alive()
    del part
    waiter.join(10)  # the last view of the lent batch is gone: slot 0 is free
    assert not waiter.is_alive() and slots[-1] == 0
    waiter = blocked()
    assert waiter.is_alive()
    ring.unblock()  # the main process stopped reading: the worker must not hang
    waiter.join(10)
    assert not waiter.is_alive() and slots[-1] is None
