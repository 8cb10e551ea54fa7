"""Center indices: validation and the reference code's label encoding.

Inside seqface-dist a sample carries one integer, its *center index* t: the identity y
(0 <= y < N_id) or N_id + q for a sample of sequence q. The Caffe reference encodes
sequence q as label -(q + 1); convert at the edges with `center_index_from_reference_label`.
"""

from __future__ import annotations

import torch


def check_center_index(
    center_index: torch.Tensor, batch: int, upper: int, *, where: str, name: str = "center_index"
) -> None:
    """Raise unless `center_index` is a 1-D integer tensor of `batch` values in [0, upper)."""
    if not isinstance(center_index, torch.Tensor):
        raise TypeError(
            f"{where}: {name} must be a torch.Tensor, got {type(center_index).__name__}")
    if center_index.dtype.is_floating_point or center_index.dtype == torch.bool:
        raise TypeError(f"{where}: {name} must be an integer tensor, got {center_index.dtype}")
    if center_index.dim() != 1 or center_index.shape[0] != batch:
        raise ValueError(
            f"{where}: {name} must have shape ({batch},), got {tuple(center_index.shape)}"
        )
    if batch == 0:
        return
    lo, hi = int(center_index.min()), int(center_index.max())
    if lo < 0 or hi >= upper:
        bad = lo if lo < 0 else hi
        pos = int((center_index == bad).nonzero()[0, 0])
        raise ValueError(f"{where}: {name}[{pos}] = {bad} is outside [0, {upper})")


def is_sequence(center_index: torch.Tensor, num_identities: int) -> torch.Tensor:
    """Boolean mask: which center indices belong to sequences (index >= N_id)."""
    return center_index >= num_identities


def center_index_from_reference_label(label: torch.Tensor, num_identities: int) -> torch.Tensor:
    """Reference labels (y >= 0 identity, -(q + 1) sequence q) -> center indices."""
    label = label.long()
    return torch.where(label >= 0, label, num_identities - 1 - label)


def reference_label_from_center_index(
    center_index: torch.Tensor, num_identities: int
) -> torch.Tensor:
    """Inverse of `center_index_from_reference_label`."""
    center_index = center_index.long()
    return torch.where(center_index < num_identities, center_index,
                       num_identities - 1 - center_index)
