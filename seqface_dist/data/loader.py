"""The trainer's input: mixed identity + sequence batches from shard sets.

    from seqface_dist.data.loader import make_train_loader
    loader = make_train_loader(cfg.data, rank=rank, world_size=world, image_size=(112, 96),
                               channels=3, seed=cfg.train.seed)
    loader.layout.num_identities, loader.layout.num_sequences  # sizes of the head
    for epoch in range(...):
        loader.set_epoch(epoch)
        for images, centers in loader:   # len(loader) batches, the same on every rank
            x = normalize(images.to(device))  # uint8 B x H x W x C -> float B x C x H x W
            ...                          # centers: int64 B; identity y, or N_id + sequence q
    loader.counters()                    # {"samples", "shards", "bytes", "s3_reopens",
                                         #  "failed_shards", "bad": {reason: n}} summed
                                         #  over workers

Each batch holds ``identities_per_batch`` identity samples then ``sequences_per_batch``
sequence samples (DESIGN.md §2.3), decoded, flipped/cropped at random, as uint8: the
trainer normalises on its device (``normalize``), which moves a quarter of the bytes
between processes and keeps the float work off the loader's CPUs. ``data.num_workers``
worker processes (:mod:`batchworkers`; 0: the calling process) decode straight into
shared-memory batch slots (:mod:`batchring`); a batch stays valid as long as the caller
holds it (its slot is lent until then; batches held beyond two per worker are copies).

Batches per epoch are decided up front from the manifests, identically on every rank, and
every worker is given a quota it always meets, so no rank can run out first and hang the
others at the epoch end:
- resampled (``data.resampled``): ``samples_per_epoch // batch`` batches (default: all
  samples of all sets / world size), each worker drawing shards with replacement;
- non-resampled: each rank's share of shards, cut to the smallest rank's batch count;
  a worker whose shards turn out to hold bad samples tops up with extra draws.
Batches come round robin from the workers that still have batches to make.

For exact once-per-epoch reading of samples (no mixing) use :class:`SampleStream`.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from seqface_dist.data import s3
from seqface_dist.data.batchring import BatchRing
from seqface_dist.data.batchworkers import BatchWorkers
from seqface_dist.data.counters import ROW_WIDTH, DataCounters
from seqface_dist.data.manifest import ShardSet, resolve_shard_set
from seqface_dist.data.normalize import normalize
from seqface_dist.data.stream import (
    ReadOptions,
    ShardReader,
    ShardRef,
    assign_shards,
    kind_stream,
    shard_refs,
)


@dataclass
class LabelLayout:
    """Where each shard set's indices land among the centers (DESIGN.md §4a)."""

    num_identities: int = 0
    num_sequences: int = 0
    identity_sets: list[dict] = field(default_factory=list)  # {url, offset, num_classes, ...}
    sequence_sets: list[dict] = field(default_factory=list)  # offset counts from 0 (add N_id)

    def to_dict(self) -> dict:
        return {"num_identities": self.num_identities, "num_sequences": self.num_sequences,
                "identity_sets": self.identity_sets, "sequence_sets": self.sequence_sets}


def resolve_sets(specs: list[str], kind: str, endpoint_url: str = "") -> list[ShardSet]:
    sets = [resolve_shard_set(s, endpoint_url) for s in specs]
    for spec, s in zip(specs, sets, strict=True):
        if s.kind != kind:
            raise ValueError(f"{spec}: a {s.kind} shard set listed among the {kind} shards")
    return sets


def label_digest(label_map: dict[str, int]) -> str:
    """sha256 of a set's label map (class name -> index): which people the rows are."""
    canon = json.dumps(sorted(label_map.items()), ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()


def make_layout(id_sets: list[ShardSet], seq_sets: list[ShardSet]) -> LabelLayout:
    lay = LabelLayout()
    for s in id_sets:
        lay.identity_sets.append({"url": s.url, "offset": lay.num_identities,
                                  "num_classes": s.num_classes, "num_samples": s.num_samples,
                                  "label_digest": label_digest(s.manifest.label_map)})
        lay.num_identities += s.num_classes
    for s in seq_sets:
        lay.sequence_sets.append({"url": s.url, "offset": lay.num_sequences,
                                  "num_classes": s.num_classes, "num_samples": s.num_samples,
                                  "label_digest": label_digest(s.manifest.label_map)})
        lay.num_sequences += s.num_classes
    return lay


# --------------------------------------------------------------------------- augmentation


def augment_batch(batch: np.ndarray, mirror: list[bool], rng: random.Random,
                  crop_pad: int) -> None:
    """In place, image by image of a uint8 B x H x W x C batch: a random crop of the image
    padded by ``crop_pad`` zeros, then a horizontal flip where ``mirror`` says so.

    Mirrored images must arrive with their channels reversed (decoded as BGR): reversing
    each row's bytes then flips the pixels and restores RGB in one pass (see
    :func:`_reverse_rows`)."""
    n, h, w, c = batch.shape
    reverse = _reverse_rows(h, w * c)
    for i in range(n):
        if crop_pad > 0:
            img = batch[i].copy()
            dy = rng.randint(0, 2 * crop_pad) - crop_pad
            dx = rng.randint(0, 2 * crop_pad) - crop_pad
            batch[i] = 0  # then batch[i][r, c] = img[r + dy, c + dx] where that exists
            if abs(dy) < h and abs(dx) < w:
                batch[i, max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)] = \
                    img[max(0, dy):h + min(0, dy), max(0, dx):w + min(0, dx)]
        if mirror[i]:
            reverse(batch[i])


def _reverse_rows(h: int, row_bytes: int) -> Callable[[np.ndarray], None]:
    """A function that reverses the bytes of each row of a contiguous uint8 image in place.

    With rows a multiple of 8 bytes (112 x 3 = 336), the row is reversed as 8-byte words
    and each word's bytes are swapped (one SIMD pass): 0.65-0.8x the time of torch flipping
    the bytes, itself ~1.5x faster than torch flipping the pixel axis of H x W x 3 and ~10x
    faster than numpy doing it (``bench/bench_loader_parts.py``)."""
    if row_bytes % 8:
        def reverse(img: np.ndarray) -> None:
            rows = torch.from_numpy(img).view(h, row_bytes)
            rows.copy_(rows.flip(1))
        return reverse
    tmp = np.empty((h, row_bytes // 8), np.uint64)

    def reverse_words(img: np.ndarray) -> None:
        words = img.reshape(h, row_bytes).view(np.uint64)
        np.copyto(tmp, words[:, ::-1])
        tmp.byteswap(inplace=True)
        words[...] = tmp
    return reverse_words


def to_tensor(batch: list[np.ndarray]) -> torch.Tensor:
    """uint8 H x W x C arrays -> float B x C x H x W, (x - 127.5) / 128."""
    return normalize(torch.from_numpy(np.stack(batch)))


# --------------------------------------------------------------------------- batch plan


@dataclass
class LoaderPlan:
    """Everything a batch worker needs (plain data: it may be pickled to workers)."""

    id_refs: list[ShardRef]
    seq_refs: list[ShardRef]
    ids_per_batch: int
    seqs_per_batch: int
    image_size: tuple[int, int]
    channels: int
    rank: int
    world_size: int
    num_workers: int
    seed: int
    resampled: bool
    samples_per_epoch: int  # per rank (resampled); 0 = all samples / world size
    shuffle_buffer: int
    flip: bool
    crop_pad: int
    endpoint_url: str
    read: ReadOptions = field(default_factory=ReadOptions.from_config)  # timeouts, budget...

    @property
    def batch_size(self) -> int:
        return self.ids_per_batch + self.seqs_per_batch

    @property
    def splits(self) -> int:
        """Readers per rank: the worker processes, or the main process when there are none."""
        return max(1, self.num_workers)

    def _caps(self, rank: int, epoch: int) -> list[int]:
        """Batches each worker of ``rank`` can make from its own shards (manifest counts)."""
        caps = []
        for w in range(self.splits):
            c = []
            for refs, per in ((self.id_refs, self.ids_per_batch),
                              (self.seq_refs, self.seqs_per_batch)):
                if per:
                    mine = assign_shards(refs, rank, self.world_size, w, self.splits,
                                         self.seed, epoch)
                    c.append(sum(r.count for r in mine) // per)
            caps.append(min(c))
        return caps

    def num_batches(self, epoch: int) -> int:
        """Batches per rank this epoch: the same number on every rank."""
        if self.resampled:
            total = sum(r.count for r in self.id_refs + self.seq_refs)
            spe = self.samples_per_epoch or total // self.world_size
            return spe // self.batch_size
        return min(sum(self._caps(r, epoch)) for r in range(self.world_size))

    def quota(self, worker: int, epoch: int) -> int:
        """Batches this rank's worker ``worker`` makes (they add up to num_batches)."""
        n = self.num_batches(epoch)
        if self.resampled:
            return n // self.splits + (worker < n % self.splits)
        caps = self._caps(self.rank, epoch)
        # Lower the largest caps until they add up to n (water-filling, deterministic).
        lo, hi = 0, max(caps, default=0)
        while lo < hi:
            mid = (lo + hi) // 2
            if sum(min(c, mid) for c in caps) >= n:
                hi = mid
            else:
                lo = mid + 1
        quotas = [min(c, lo - 1) if lo else 0 for c in caps]
        extra = n - sum(quotas)
        for w, c in enumerate(caps):
            if extra and c >= lo:
                quotas[w] += 1
                extra -= 1
        return quotas[worker]


# claim() -> (token, writable B x H x W x C uint8 images, B int64 centers), or None: stop.
Claim = Callable[[], "tuple[object, np.ndarray, np.ndarray] | None"]


class MixedBatches:
    """Makes the batches of one pass (``plan``, ``epoch``) that one worker is due."""

    def __init__(self, plan: LoaderPlan, epoch: int = 0):
        self.plan, self.epoch = plan, epoch

    def _stream(self, refs: list[ShardRef], kind: str, reader: ShardReader,
                worker: int) -> Iterator:
        p = self.plan
        rng = random.Random(f"{kind}/{p.seed}/{self.epoch}/{p.rank}/{worker}")
        mine = assign_shards(refs, p.rank, p.world_size, worker, p.splits, p.seed, self.epoch)
        return kind_stream(refs, mine, reader.raw_samples, resampled=p.resampled, endless=True,
                           shuffle_buffer=p.shuffle_buffer, rng=rng)

    def batches(self, worker: int, counters: DataCounters, claim: Claim) -> Iterator[object]:
        """Fills ``plan.quota(worker, epoch)`` batches, each where ``claim()`` says, and
        yields each one's token once it is filled; stops early if ``claim()`` gives None."""
        p = self.plan
        reader = ShardReader(p.image_size, p.channels, p.endpoint_url, counters, p.read)
        aug = random.Random(f"augment/{p.seed}/{self.epoch}/{p.rank}/{worker}")
        fills = []  # (stream, rows of the batch it fills)
        row = 0
        for refs, kind, per in ((p.id_refs, "identity", p.ids_per_batch),
                                (p.seq_refs, "sequence", p.seqs_per_batch)):
            if per:
                fills.append((self._stream(refs, kind, reader, worker), range(row, row + per)))
                row += per
        for _ in range(p.quota(worker, self.epoch)):
            claimed = claim()
            if claimed is None:
                return
            token, out, centers = claimed
            mirror = [p.flip and aug.random() < 0.5 for _ in range(p.batch_size)]
            for it, rows in fills:
                todo = list(rows)
                while todo:  # rows whose sample did not decode get the next one; counted
                    # All decodes of a batch in one loop: the decoder stays in the caches.
                    samples = [(i, next(it)) for i in todo]
                    todo = []
                    for i, (center, jpg, key, url) in samples:
                        if reader.decode(url, jpg, key, out[i], bgr=mirror[i]) is None:
                            todo.append(i)
                        else:
                            centers[i] = center
            augment_batch(out, mirror, aug, p.crop_pad)
            yield token


def _make_into_ring(plan: LoaderPlan, epoch: int, worker: int, claim: Claim,
                    publish: Callable[[object, list[int]], None]) -> None:
    """A batch worker's whole job (see ``batchworkers.MakeBatches``)."""
    counters = DataCounters()
    for slot in MixedBatches(plan, epoch).batches(worker, counters, claim):
        publish(slot, counters.row())


class TrainLoader:
    """Iterates ``len(self)`` batches ``(images, centers)`` per epoch; see the module doc."""

    ring_slots = 6  # per worker: 4 batches made ahead + the 2 a caller may hold (lend)

    def __init__(self, plan: LoaderPlan, layout: LabelLayout, epoch: int = 0):
        self.plan, self.layout, self.epoch = plan, layout, epoch
        self._done = DataCounters.empty()  # finished passes
        self._live = lambda: []  # snapshots of the pass under way, one per worker

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def batch_size(self) -> int:
        return self.plan.batch_size

    def __len__(self) -> int:
        return self.plan.num_batches(self.epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        p = self.plan
        try:
            yield from (self._in_workers() if p.num_workers else self._in_process())
        finally:
            for snap in self._live():
                self._done = DataCounters.add(self._done, snap)
            self._live = lambda: []

    def _in_process(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        p = self.plan
        counters = DataCounters()
        self._live = lambda: [counters.snapshot()]

        def claim():
            images = np.empty((p.batch_size, *p.image_size, p.channels), np.uint8)
            centers = np.empty(p.batch_size, np.int64)
            return (images, centers), images, centers

        for images, centers in MixedBatches(p, self.epoch).batches(0, counters, claim):
            yield torch.from_numpy(images), torch.from_numpy(centers)

    def _in_workers(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        p = self.plan
        # A ring per pass: its workers are started with it and gone when the pass ends.
        ring = BatchRing(p.num_workers, self.ring_slots,
                         (p.batch_size, *p.image_size, p.channels), stats_width=ROW_WIDTH)
        stats = ring.stats.numpy()
        self._live = lambda: [DataCounters.from_row(row) for row in stats]
        quotas = [p.quota(w, self.epoch) for w in range(p.num_workers)]
        with BatchWorkers(partial(_make_into_ring, p, self.epoch), ring, quotas) as workers:
            for w, slot in workers:
                yield ring.take(w, slot)

    def counters(self) -> dict:
        total = self._done
        for snap in self._live():
            total = DataCounters.add(total, snap)
        return total


def make_train_loader(data_cfg, *, rank: int, world_size: int, image_size: tuple[int, int],
                      channels: int, seed: int, epoch: int = 0,
                      num_workers: int | None = None) -> TrainLoader:
    """Build the loader for one training worker from ``cfg.data`` (a DataConfig)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
    endpoint = data_cfg.s3_endpoint_url
    read = ReadOptions.from_config(data_cfg)
    s3.configure(endpoint, read.timeouts)
    id_sets = resolve_sets(list(data_cfg.identity_shards), "identity", endpoint)
    seq_sets = resolve_sets(list(data_cfg.sequence_shards), "sequence", endpoint)
    for name, sets, field_ in (("identity", id_sets, "identities_per_batch"),
                               ("sequence", seq_sets, "sequences_per_batch")):
        if getattr(data_cfg, field_) and not sets:
            raise ValueError(f"data.{name}_shards is empty but data.{field_} = "
                             f"{getattr(data_cfg, field_)}")
    for s in id_sets + seq_sets:
        if list(s.manifest.image_size) != list(image_size):
            raise ValueError(f"{s.url}: images are {s.manifest.image_size[0]}x"
                             f"{s.manifest.image_size[1]}, the model wants "
                             f"{image_size[0]}x{image_size[1]}; rebuild the shards at that size")
    layout = make_layout(id_sets, seq_sets)
    plan = LoaderPlan(
        id_refs=shard_refs(id_sets, 0), seq_refs=shard_refs(seq_sets, layout.num_identities),
        ids_per_batch=data_cfg.identities_per_batch, seqs_per_batch=data_cfg.sequences_per_batch,
        image_size=tuple(image_size), channels=channels, rank=rank, world_size=world_size,
        num_workers=data_cfg.num_workers if num_workers is None else num_workers, seed=seed,
        resampled=data_cfg.resampled, samples_per_epoch=data_cfg.samples_per_epoch,
        shuffle_buffer=data_cfg.shuffle_buffer, flip=data_cfg.flip,
        crop_pad=data_cfg.random_crop, endpoint_url=endpoint, read=read)
    return TrainLoader(plan, layout, epoch)


# --------------------------------------------------------------------------- plain samples


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class SampleStream(IterableDataset):
    """Every sample of the given sets exactly once per epoch, split over ranks and workers.

    Yields dicts ``{"center", "image" (uint8 H x W x C), "key", "url", "rank", "worker"}``;
    for evaluation, checks and tests (use ``DataLoader(stream, batch_size=None, ...)``).
    """

    def __init__(self, sets: list[ShardSet], *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, epoch: int = 0, shuffle_buffer: int = 0,
                 first_center: int = 0, endpoint_url: str = "",
                 options: ReadOptions | None = None):
        if len({s.kind for s in sets}) > 1:
            raise ValueError("SampleStream reads shard sets of one kind")
        self.refs = shard_refs(sets, first_center)
        self.image_size = tuple(sets[0].manifest.image_size)
        self.channels = sets[0].manifest.channels
        self.rank, self.world_size, self.seed, self.epoch = rank, world_size, seed, epoch
        self.shuffle_buffer, self.endpoint_url = shuffle_buffer, endpoint_url
        self.options = options or ReadOptions.from_config()
        self.counters = DataCounters()  # of the in-process iteration (num_workers=0)

    def __iter__(self):
        w, nw = _worker()
        reader = ShardReader(self.image_size, self.channels, self.endpoint_url, self.counters,
                             self.options)
        mine = assign_shards(self.refs, self.rank, self.world_size, w, nw, self.seed, self.epoch)
        rng = random.Random(f"samples/{self.seed}/{self.epoch}/{self.rank}/{w}")
        for center, jpg, key, url in kind_stream(self.refs, mine, reader.raw_samples,
                                                 resampled=False, endless=False,
                                                 shuffle_buffer=self.shuffle_buffer, rng=rng):
            img = reader.decode(url, jpg, key)
            if img is not None:
                yield {"center": center, "image": img, "key": key, "url": url,
                       "rank": self.rank, "worker": w}
