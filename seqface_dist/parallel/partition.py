"""How the head's rows are split over ranks — pure arithmetic, no process group.

Rank r of R owns a contiguous block of identity rows (of W and of the identity centers)
and a contiguous block of sequence centers. Blocks are as even as possible: the first
``N mod R`` ranks hold one row more. Because the layout is independent of any process
group, one rank's block can be built and measured alone (see bench/bench_head.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RowPartition:
    """``num_rows`` rows split into ``world_size`` contiguous, near-even blocks."""

    num_rows: int
    world_size: int

    def __post_init__(self) -> None:
        if self.num_rows < 0 or self.world_size < 1:
            raise ValueError(f"bad partition: {self.num_rows} rows over {self.world_size} ranks")

    def bounds(self, rank: int) -> tuple[int, int]:
        """The global row range [start, stop) owned by ``rank``."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside [0, {self.world_size})")
        q, rem = divmod(self.num_rows, self.world_size)
        start = rank * q + min(rank, rem)
        return start, start + q + (1 if rank < rem else 0)

    def owner(self, rows: torch.Tensor) -> torch.Tensor:
        """The rank owning each global row index (vectorised)."""
        q, rem = divmod(self.num_rows, self.world_size)
        big = rem * (q + 1)  # rows held by the ranks with one extra row
        in_big = rows < big
        small = rem + (rows - big) // max(q, 1)
        return torch.where(in_big, rows // (q + 1), small)


@dataclass(frozen=True)
class HeadLayout:
    """The head's rows: W and identity centers share one split, sequence centers another.

    Center index convention (DESIGN.md §4a): t < num_identities is identity t,
    t >= num_identities is sequence t - num_identities.
    """

    num_identities: int
    num_sequences: int
    world_size: int

    @property
    def identities(self) -> RowPartition:
        return RowPartition(self.num_identities, self.world_size)

    @property
    def sequences(self) -> RowPartition:
        return RowPartition(self.num_sequences, self.world_size)

    @property
    def num_centers(self) -> int:
        return self.num_identities + self.num_sequences

    def local_rows(self, rank: int) -> tuple[int, int, int, int]:
        """(id_start, id_stop, seq_start, seq_stop) of ``rank``, in kind-local indices."""
        return (*self.identities.bounds(rank), *self.sequences.bounds(rank))

    def local_center_row(self, center_index: torch.Tensor, rank: int) -> torch.Tensor:
        """Row of each center in ``rank``'s local center block, or -1 where another rank owns it.

        The local block stacks this rank's identity centers, then its sequence centers.
        """
        id0, id1, sq0, sq1 = self.local_rows(rank)
        n_id = self.num_identities
        is_id = center_index < n_id
        seq = center_index - n_id
        id_row = center_index - id0
        seq_row = (id1 - id0) + seq - sq0
        mine_id = is_id & (center_index >= id0) & (center_index < id1)
        mine_seq = ~is_id & (seq >= sq0) & (seq < sq1)
        out = torch.full_like(center_index, -1)
        out = torch.where(mine_id, id_row, out)
        return torch.where(mine_seq, seq_row, out)
