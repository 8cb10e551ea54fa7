"""Sample streams of one kind: shard assignment, robust reading, shuffling, decoding.

A stream reads the shards of one or more shard sets of one kind. Each sample becomes
``(center_index, image)`` where ``image`` is a uint8 H x W x C array, after checks:
the ``json`` must be a dict with the right ``kind`` and an integer ``index`` inside the
set's range, the ``jpg`` must decode to the manifest's size. Anything else is skipped
and counted by reason (:mod:`counters`), with one log line per shard.

Shard assignment (non-resampled): all shards of the kind, shuffled with (seed, epoch) —
the same permutation on every rank — then every ``world_size``-th to this rank, then
every ``num_workers``-th to this worker process. The pieces are disjoint and cover
every shard once. Resampled: each (rank, worker) draws shards with replacement from all
shards, with its own seed, forever; the caller decides how many samples an epoch has.

Only our own ``jpg``/``json`` handlers run on shard data: nothing is ever unpickled.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import orjson

from seqface_dist.data import images, store, tario
from seqface_dist.data.counters import DataCounters
from seqface_dist.data.manifest import ShardSet

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardRef:
    url: str
    count: int  # samples, from the manifest
    kind: str
    num_classes: int  # valid json indices are 0..num_classes-1
    center_offset: int  # center index = center_offset + json index


def shard_refs(sets: list[ShardSet], first_center: int) -> list[ShardRef]:
    """The shards of several sets of one kind, their index ranges concatenated in order."""
    refs, offset = [], first_center
    for s in sets:
        refs += [ShardRef(u, c, s.kind, s.num_classes, offset) for u, c in s.shards]
        offset += s.num_classes
    return refs


def assign_shards(refs: list[ShardRef], rank: int, world_size: int, worker: int,
                  num_workers: int, seed: int, epoch: int, shuffle: bool = True) -> list[ShardRef]:
    order = list(range(len(refs)))
    if shuffle:
        random.Random(f"shards/{seed}/{epoch}").shuffle(order)
    return [refs[i] for i in order[rank::world_size][worker::num_workers]]


class _Counting:
    """Counts the bytes read through a stream."""

    def __init__(self, f, counters: DataCounters):
        self.f, self.counters = f, counters

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.counters.bytes += len(data)
        return data


class ShardReader:
    """Reads and checks the raw samples of shards; one instance per worker process."""

    def __init__(self, image_size: tuple[int, int], channels: int, endpoint_url: str = "",
                 counters: DataCounters | None = None):
        self.image_size = tuple(image_size)
        self.channels = channels
        self.endpoint_url = endpoint_url
        self.counters = counters or DataCounters()
        self.decoder = images.decoder_name()
        self._logged: set[str] = set()  # shards already warned about

    def _problem(self, url: str, reason: str, detail: str) -> None:
        self.counters.bad[reason] += 1
        if url not in self._logged:
            self._logged.add(url)
            log.warning("%s: %s (%s); further problems in this shard are only counted",
                        url, reason, detail)

    def raw_samples(self, ref: ShardRef) -> Iterator[tuple[int, bytes, str]]:
        """(center index, jpg bytes, key) of each sample of one shard whose json is valid."""
        try:
            f = store.open_read(ref.url, self.endpoint_url)
        except Exception as e:  # noqa: BLE001 - any failure to open: skip the shard, counted
            self._problem(ref.url, "shard_open_error", f"{type(e).__name__}: {e}")
            return
        self.counters.shards += 1
        try:
            for sample in tario.iter_samples(_Counting(f, self.counters),
                                             lambda r, d: self._problem(ref.url, r, d)):
                checked = self._check(ref, sample)
                if checked is not None:
                    yield checked
        except OSError as e:  # retries exhausted mid-shard
            self._problem(ref.url, "shard_read_error", f"{type(e).__name__}: {e}")
        finally:
            raw = getattr(f, "raw", None)
            self.counters.s3_reopens += getattr(raw, "reopens", 0)
            f.close()

    def _check(self, ref: ShardRef, sample: dict):
        key = sample["__key__"]
        if "jpg" not in sample:
            self._problem(ref.url, "missing_jpg", key)
            return None
        if "json" not in sample:
            self._problem(ref.url, "missing_json", key)
            return None
        try:
            # orjson: ~5x faster than the json module on these small objects (this runs
            # per sample); it parses UTF-8 bytes and refuses bad bytes (a bad_json).
            meta = orjson.loads(sample["json"])
            index = meta["index"]
            kind = meta["kind"]
            if not isinstance(index, int) or isinstance(index, bool):
                raise TypeError(f"index {index!r} is not an integer")
        except Exception as e:  # noqa: BLE001 - any malformed json is one reason
            self._problem(ref.url, "bad_json", f"{key}: {type(e).__name__}: {e}")
            return None
        if kind != ref.kind:
            self._problem(ref.url, "wrong_kind", f"{key}: {kind!r} in a {ref.kind} set")
            return None
        if not 0 <= index < ref.num_classes:
            self._problem(ref.url, "label_out_of_range",
                          f"{key}: index {index} not in 0..{ref.num_classes - 1}")
            return None
        return ref.center_offset + index, sample["jpg"], key

    def decode(self, ref_url: str, jpg: bytes, key: str, out: np.ndarray | None = None,
               bgr: bool = False) -> np.ndarray | None:
        """The image (in ``out`` when given, see ``images.decode_jpeg``), or None: counted."""
        try:
            img = images.decode_jpeg(jpg, self.channels, self.decoder, out, bgr)
        except images.ImageError as e:
            self._problem(ref_url, "bad_jpeg", f"{key}: {e}")
            return None
        if img.shape[:2] != self.image_size:
            self._problem(ref_url, "bad_image_size", f"{key}: {img.shape[0]}x{img.shape[1]}, "
                          f"the manifest says {self.image_size[0]}x{self.image_size[1]}")
            return None
        self.counters.samples += 1
        return img


def shuffled(it: Iterator, bufsize: int, rng: random.Random) -> Iterator:
    """Shuffle a stream with a buffer of ``bufsize`` items (0 or 1: pass through)."""
    if bufsize <= 1:
        yield from it
        return
    buf: list = []
    for x in it:
        if len(buf) < bufsize:
            buf.append(x)
            continue
        i = rng.randrange(bufsize)
        buf[i], x = x, buf[i]
        yield x
    rng.shuffle(buf)
    yield from buf


def kind_stream(refs: list[ShardRef], mine: list[ShardRef], read, *, resampled: bool,
                endless: bool, shuffle_buffer: int,
                rng: random.Random) -> Iterator[tuple[int, bytes, str, str]]:
    """Raw samples ``(center, jpg bytes, key, url)`` of one kind for one worker, shuffled;
    ``read(ref)`` gives a shard's checked samples (``ShardReader.raw_samples``). The caller
    decodes, so that it can decode straight into its batch.

    Non-resampled: the worker's own shards once; with ``endless`` it then keeps going
    with random draws (from its own shards, or all shards when it has none) so that a
    fixed batch quota is always met even when bad samples thinned the data.
    Resampled: random draws from all shards, forever.
    """

    empty_run = [0]  # consecutive shards that gave no good sample

    def draws() -> Iterator[ShardRef]:
        pool = refs if resampled or not mine else mine
        if not pool:
            return
        while True:
            # Drawing forever from shards that give nothing would hang the epoch: fail loudly.
            if empty_run[0] > max(16, 4 * len(pool)):
                raise RuntimeError(f"{empty_run[0]} shards in a row gave no readable sample "
                                   f"(e.g. {pool[0].url}); see the bad-sample counters")
            yield rng.choice(pool)

    def raw(order: Iterator[ShardRef]) -> Iterator[tuple[int, bytes, str, str]]:
        for ref in order:
            empty_run[0] += 1
            for center, jpg, key in read(ref):
                empty_run[0] = 0
                yield center, jpg, key, ref.url

    # The first pass is shuffled on its own, so its buffer drains completely before any
    # top-up draw: every sample of the pass comes out before a repeated one.
    passes = [iter(mine)] if not resampled else []
    if resampled or endless:
        passes.append(draws())
    for order in passes:
        yield from shuffled(raw(order), shuffle_buffer, rng)
