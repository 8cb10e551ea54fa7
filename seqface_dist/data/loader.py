"""The trainer's input: mixed identity + sequence batches from shard sets.

    from seqface_dist.data.loader import make_train_loader
    from seqface_dist.data.normalize import normalize
    loader = make_train_loader(cfg.data, rank=rank, world_size=world, image_size=(112, 96),
                               channels=3, seed=cfg.train.seed)
    loader.layout.num_identities, loader.layout.num_sequences  # sizes of the head
    for epoch in range(...):
        loader.set_epoch(epoch)
        for images, center_index in loader:  # len(loader) batches, the same on every rank
            x = normalize(images.to(device))  # uint8 B x H x W x C -> float B x C x H x W
            ...                          # int64 B: identity y, or N_id + sequence q
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

The pieces: ``layout`` (where each set's classes land among the head's rows), ``plan``
(batch counts and quotas), ``augment`` (crop and mirror), ``stream`` (per-kind sample
streams), ``batchworkers``/``batchring`` (the processes and shared-memory slots); for
exact once-per-epoch reading of samples (no mixing) use ``samples.SampleStream``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from functools import partial

import numpy as np
import torch

from seqface_dist.data import s3
from seqface_dist.data.augment import augment_batch
from seqface_dist.data.batchring import BatchRing
from seqface_dist.data.batchworkers import BatchWorkers
from seqface_dist.data.counters import ROW_WIDTH, DataCounters
from seqface_dist.data.layout import LabelLayout, make_layout, resolve_sets
from seqface_dist.data.plan import LoaderPlan
from seqface_dist.data.stream import (
    ReadOptions,
    ShardReader,
    ShardRef,
    assign_shards,
    kind_stream,
    shard_refs,
)

# claim() -> (token, writable B x H x W x C uint8 images, B int64 center indices), or
# None: stop.
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
            token, out, center_index = claimed
            mirror = [p.flip and aug.random() < 0.5 for _ in range(p.batch_size)]
            for it, rows in fills:
                todo = list(rows)
                while todo:  # rows whose sample did not decode get the next one; counted
                    # All decodes of a batch in one loop: the decoder stays in the caches.
                    samples = [(i, next(it)) for i in todo]
                    todo = []
                    for i, (center, jpg, key, url) in samples:
                        if reader.decode(url, jpg, key, out[i]) is None:
                            todo.append(i)
                        else:
                            center_index[i] = center
            augment_batch(out, mirror, aug, p.crop_pad)
            yield token


def _make_into_ring(plan: LoaderPlan, epoch: int, worker: int, claim: Claim,
                    publish: Callable[[object, list[int]], None]) -> None:
    """A batch worker's whole job (see ``batchworkers.MakeBatches``)."""
    counters = DataCounters()
    for slot in MixedBatches(plan, epoch).batches(worker, counters, claim):
        publish(slot, counters.row())


class TrainLoader:
    """Iterates ``len(self)`` batches ``(images, center_index)`` per epoch; see the module doc."""

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
            center_index = np.empty(p.batch_size, np.int64)
            return (images, center_index), images, center_index

        for images, index in MixedBatches(p, self.epoch).batches(0, counters, claim):
            yield torch.from_numpy(images), torch.from_numpy(index)

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
