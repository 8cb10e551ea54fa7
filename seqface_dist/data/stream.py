"""Sample streams of one kind: shard assignment, robust reading, shuffling, decoding.

A stream reads the shards of one or more shard sets of one kind. Each sample becomes
``(center_index, image)`` where ``image`` is a uint8 H x W x C array, after checks:
the ``json`` must be a dict with the right ``kind`` and an integer ``index`` inside the
set's range, the ``jpg`` must decode to the manifest's size. Anything else is skipped
and counted by reason (:mod:`counters`), with one log line per shard.

A shard that fails as a whole (an S3 error after every retry, a tar header that cannot
be parsed, the per-shard deadline, a checksum mismatch) is given up where it failed and
counted by reason (:mod:`faults`); its samples already yielded stay yielded, none is
yielded twice. Past the failure budget (:class:`ReadOptions`) the pass raises
:class:`faults.ShardBudgetError` naming the failed shards.

Shard assignment (non-resampled): all shards of the kind, shuffled with (seed, epoch) —
the same permutation on every rank — then every ``world_size``-th to this rank, then
every ``num_workers``-th to this worker process. The pieces are disjoint and cover
every shard once. Resampled: each (rank, worker) draws shards with replacement from all
shards, with its own seed, forever; the caller decides how many samples an epoch has.

Only our own ``jpg``/``json`` handlers run on shard data: nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import orjson

from seqface_dist.data import images, s3, store, tario
from seqface_dist.data.counters import DataCounters
from seqface_dist.data.faults import ChecksumMismatch, FailureBudget, ShardDeadline, classify
from seqface_dist.data.manifest import ShardSet

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardRef:
    url: str
    count: int  # samples, from the manifest
    kind: str
    num_classes: int  # valid json indices are 0..num_classes-1
    center_offset: int  # center index = center_offset + json index
    sha256: str = ""  # from the manifest; "" = not known (never verified)


def shard_refs(sets: list[ShardSet], first_center: int) -> list[ShardRef]:
    """The shards of several sets of one kind, their index ranges concatenated in order."""
    refs, offset = [], first_center
    for s in sets:
        sums = {store.join(store.dirname(s.url), e.name): e.sha256 for e in s.manifest.shards}
        refs += [ShardRef(u, c, s.kind, s.num_classes, offset, sums.get(u, ""))
                 for u, c in s.shards]
        offset += s.num_classes
    return refs


@dataclass(frozen=True)
class ReadOptions:
    """How a :class:`ShardReader` treats slow and failing shards (``DataConfig`` keys of
    the same names; plain data, so that it may be pickled to worker processes)."""

    timeouts: s3.Timeouts
    shard_deadline_s: float  # 0 = none
    budget: FailureBudget
    verify_checksums: bool

    @classmethod
    def from_config(cls, data_cfg=None) -> ReadOptions:
        """From a DataConfig (None: its defaults, the only place they are written)."""
        from seqface_dist.config import DataConfig

        cfg = data_cfg or DataConfig()
        return cls(s3.Timeouts.from_config(cfg), float(cfg.shard_deadline_s),
                   FailureBudget(float(cfg.max_failed_shard_fraction),
                                 int(cfg.failed_shard_allowance)),
                   bool(cfg.verify_checksums))


def assign_shards(refs: list[ShardRef], rank: int, world_size: int, worker: int,
                  num_workers: int, seed: int, epoch: int, shuffle: bool = True) -> list[ShardRef]:
    order = list(range(len(refs)))
    if shuffle:
        random.Random(f"shards/{seed}/{epoch}").shuffle(order)
    return [refs[i] for i in order[rank::world_size][worker::num_workers]]


class _Counting:
    """Counts the bytes read through a stream; optionally hashes them and enforces a
    deadline (``time.monotonic()`` value) between reads."""

    def __init__(self, f, counters: DataCounters, url: str = "", deadline: float | None = None,
                 hashing: bool = False):
        self.f, self.counters, self.url, self.deadline = f, counters, url, deadline
        self.sha = hashlib.sha256() if hashing else None

    def read(self, n: int = -1) -> bytes:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise ShardDeadline(f"{self.url}: the shard deadline passed")
        data = self.f.read(n)
        self.counters.bytes += len(data)
        if self.sha is not None:
            self.sha.update(data)
        return data


class ShardReader:
    """Reads and checks the raw samples of shards; one instance per worker process."""

    def __init__(self, image_size: tuple[int, int], channels: int, endpoint_url: str = "",
                 counters: DataCounters | None = None, options: ReadOptions | None = None):
        self.image_size = tuple(image_size)
        self.channels = channels
        self.endpoint_url = endpoint_url
        self.counters = counters or DataCounters()
        self.options = options or ReadOptions.from_config()
        self.decoder = images.decoder_name()
        self._logged: set[str] = set()  # shards already warned about
        # For the failure budget, per distinct shard: top-up draws may pick one again.
        self.tried: set[str] = set()  # shards begun by this reader (its pass)
        self.failures: dict[str, str] = {}  # url -> reason of the shards given up

    def _problem(self, url: str, reason: str, detail: str) -> None:
        self.counters.bad[reason] += 1
        if url not in self._logged:
            self._logged.add(url)
            log.warning("%s: %s (%s); further problems in this shard are only counted",
                        url, reason, detail)

    def _failed(self, url: str, exc: BaseException, opened: bool) -> None:
        """Count a shard given up; raise once the pass is over its failure budget."""
        reason = classify(exc, url, opened)
        self.counters.bad[reason] += 1
        self.counters.failed_shards += 1
        self.failures[url] = reason
        log.warning("%s: shard given up: %s (%s: %s)", url, reason, type(exc).__name__, exc)
        budget = self.options.budget
        if budget.exceeded(len(self.failures), len(self.tried)):
            raise budget.error(list(self.failures.items()), len(self.tried))

    def raw_samples(self, ref: ShardRef) -> Iterator[tuple[int, bytes, str]]:
        """(center index, jpg bytes, key) of each sample of one shard whose json is valid.
        A failure of the whole shard ends it (counted, see the module doc); a shard that
        failed once is not tried again by this reader (a redraw would only fail again,
        perhaps after a whole deadline)."""
        if ref.url in self.failures:
            return
        self.tried.add(ref.url)
        opt = self.options
        deadline = time.monotonic() + opt.shard_deadline_s if opt.shard_deadline_s else None
        try:
            f = store.open_read(ref.url, self.endpoint_url, timeouts=opt.timeouts,
                                deadline=deadline)
        except Exception as e:  # noqa: BLE001 - any failure to open: skip the shard, counted
            self._failed(ref.url, e, opened=False)
            return
        self.counters.shards += 1
        src = _Counting(f, self.counters, ref.url, deadline,
                        hashing=opt.verify_checksums and bool(ref.sha256))
        failure: Exception | None = None
        try:
            for sample in tario.iter_samples(src, lambda r, d: self._problem(ref.url, r, d)):
                checked = self._check(ref, sample)
                if checked is not None:
                    yield checked
            if src.sha is not None:
                _check_sha256(src, ref)
        except Exception as e:  # noqa: BLE001 - every per-shard failure: skip the rest, counted
            failure = e
        finally:
            raw = getattr(f, "raw", None)
            self.counters.s3_reopens += getattr(raw, "reopens", 0)
            f.close()
        if failure is not None:
            self._failed(ref.url, failure, opened=True)

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

    def decode(self, ref_url: str, jpg: bytes, key: str,
               out: np.ndarray | None = None) -> np.ndarray | None:
        """The image (in ``out`` when given, see ``images.decode_jpeg``), or None: counted."""
        try:
            img = images.decode_jpeg(jpg, self.channels, self.decoder, out)
        except images.ImageError as e:
            self._problem(ref_url, "bad_jpeg", f"{key}: {e}")
            return None
        if img.shape[:2] != self.image_size:
            self._problem(ref_url, "bad_image_size", f"{key}: {img.shape[0]}x{img.shape[1]}, "
                          f"the manifest says {self.image_size[0]}x{self.image_size[1]}")
            return None
        self.counters.samples += 1
        return img


def _check_sha256(src: _Counting, ref: ShardRef) -> None:
    while src.read(1 << 20):  # the tail after the end-of-archive block is hashed too
        pass
    if src.sha.hexdigest() != ref.sha256:
        raise ChecksumMismatch(f"{ref.url}: sha256 {src.sha.hexdigest()[:16]}... differs from "
                               f"the manifest's {ref.sha256[:16]}... (its samples were "
                               f"already read)")


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
