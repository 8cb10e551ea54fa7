"""How many batches a pass has and which worker makes which: decided up front from the
manifests, identically on every rank, so no rank runs out first (see ``loader``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from seqface_dist.data.stream import ReadOptions, ShardRef, assign_shards


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
