"""Every sample of some shard sets exactly once per epoch, for evaluation, checks and
tests (the trainer's mixed batches come from ``loader``)."""

from __future__ import annotations

import random

from torch.utils.data import IterableDataset, get_worker_info

from seqface_dist.data.counters import DataCounters
from seqface_dist.data.manifest import ShardSet
from seqface_dist.data.stream import (
    ReadOptions,
    ShardReader,
    assign_shards,
    kind_stream,
    shard_refs,
)


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
