"""The chief loss in every ``loss.sequence_mode`` (DESIGN.md §2.2a), single-process.

This is the oracle the partitioned head is held to; no training run uses it.

- ``lsr``: W has the N_id identity rows. Identity samples: margin softmax cross entropy.
  Sequence samples: logsumexp_c z_c - mean_c z_c.
- ``none``: as ``lsr`` but sequence samples leave the chief loss; its mean runs over the
  identity samples only.
- ``sequence_classes``: W has N_id + N_seq rows; every sample's target is its center
  index (identity y, or N_id + q), margin on the target, softmax over every row.
- ``separate_heads``: the same rows; identity samples' softmax over the identity rows,
  sequence samples' over the sequence rows.
- ``masked_softmax``: the same rows; identity samples see every row, a sequence sample
  the identity rows and its own row.

In every mode a sequence sample's term is multiplied by ``sequence_weight`` (in ``lsr``
the paper's strength epsilon; 1 = the paper); the mean still divides by the number of
samples that count.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from seqface_dist.config import CLASS_ROW_MODES, SEQUENCE_MODES

from .margins import margin_logits


class ChiefTerms(NamedTuple):
    loss: torch.Tensor  # mean of per_sample over the samples that count
    per_sample: torch.Tensor  # (B,), 0 where a sample does not count
    counts: torch.Tensor  # (B,) bool: the samples the mean runs over


def chief_rows(mode: str, num_identities: int, num_sequences: int) -> int:
    """Rows of W a mode uses: N_id, or N_id + N_seq with one row per sequence."""
    if mode not in SEQUENCE_MODES:
        raise ValueError(f"unknown sequence_mode {mode!r}; choose one of {SEQUENCE_MODES}")
    return num_identities + (num_sequences if mode in CLASS_ROW_MODES else 0)


def visible_rows(mode: str, center_index: torch.Tensor, num_identities: int,
                 num_rows: int) -> torch.Tensor:
    """(B x rows) bool: which rows of W enter each sample's softmax."""
    b = center_index.shape[0]
    is_seq = center_index >= num_identities
    col = torch.arange(num_rows, device=center_index.device)
    seq_col = (col >= num_identities)[None, :].expand(b, num_rows)
    if mode == "separate_heads":
        return seq_col == is_seq[:, None]
    if mode == "masked_softmax":
        own = col[None, :] == center_index[:, None]
        return ~(is_seq[:, None] & seq_col) | own
    return torch.ones(b, num_rows, dtype=torch.bool, device=center_index.device)


def chief_loss(features: torch.Tensor, weight: torch.Tensor, center_index: torch.Tensor,
               num_identities: int, num_sequences: int, *, mode: str = "lsr",
               sequence_weight: float = 1.0, kind: str = "sphereface", scale: float = 32.0,
               m: int = 4, lam: float = 5.0, arcface_margin: float = 0.5,
               cosface_margin: float = 0.35, reference_grad: bool = False) -> ChiefTerms:
    """The chief loss of one batch in ``mode`` (W: ``chief_rows(mode, ...)`` x D)."""
    rows = chief_rows(mode, num_identities, num_sequences)
    t = center_index.long()
    is_seq = t >= num_identities
    margin = dict(kind=kind, scale=scale, m=m, lam=lam, arcface_margin=arcface_margin,
                  cosface_margin=cosface_margin, reference_grad=reference_grad)
    if mode in CLASS_ROW_MODES:
        # Every sample is a classification sample: all rows count as "identities" here.
        z = margin_logits(features, weight, t, rows, **margin)
        z = z.masked_fill(~visible_rows(mode, t, num_identities, rows), float("-inf"))
        per = torch.logsumexp(z, dim=1) - z.gather(1, t[:, None]).squeeze(1)
        counts = torch.ones_like(is_seq)
    else:
        z = margin_logits(features, weight, t, num_identities, **margin)
        lse = torch.logsumexp(z, dim=1)
        target = z.gather(1, torch.where(is_seq, 0, t)[:, None]).squeeze(1)
        lsr = lse - z.mean(dim=1)
        counts = torch.ones_like(is_seq) if mode == "lsr" else ~is_seq
        per = torch.where(is_seq, lsr if mode == "lsr" else torch.zeros_like(lse), lse - target)
    per = torch.where(is_seq, sequence_weight * per, per)
    n = counts.sum()
    loss = per.sum() / n if bool(n > 0) else per.sum() * 0.0
    return ChiefTerms(loss, per, counts)
