"""Batches drawn from in-memory arrays, for the runs that need no shards (`seqface smoke`,
the experiments): the loader's batch layout, sampled with replacement."""

from __future__ import annotations

import torch

from seqface_dist.config import DataConfig


def sample_batch(id_images: torch.Tensor, id_index: torch.Tensor,
                 seq_images: torch.Tensor | None,
                 seq_index: torch.Tensor | None, data: DataConfig,
                 g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``data.identities_per_batch`` identity samples, then ``data.sequences_per_batch``
    sequence samples (uint8 B x H x W x C, drawn with replacement), mirrored with
    probability 1/2 when ``data.flip``: images and center indices."""
    pick = torch.randint(len(id_index), (data.identities_per_batch,), generator=g)
    x, t = id_images[pick], id_index[pick]
    if data.sequences_per_batch:
        pick = torch.randint(len(seq_index), (data.sequences_per_batch,), generator=g)
        x, t = torch.cat([x, seq_images[pick]]), torch.cat([t, seq_index[pick]])
    if data.flip:
        flip = torch.rand(len(t), generator=g) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(2), x)  # W is dim 2
    return x, t
