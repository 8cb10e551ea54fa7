"""Chief-loss cross entropy with label smoothing regularisation for sequences (DESIGN §2.1)."""

from __future__ import annotations

import torch

from .indices import check_center_index


def lsr_cross_entropy(
    logits: torch.Tensor, center_index: torch.Tensor, num_identities: int
) -> torch.Tensor:
    """Mean over the batch of the per-sample chief loss.

    Identity rows (center_index < N_id): -log softmax(z)_y.
    Sequence rows: the target is uniform over the N_id identity classes, so
    -(1/N_id) sum_c log softmax(z)_c = logsumexp(z) - mean(z).
    logsumexp subtracts the row max, so large scales (64, 128) do not overflow.
    """
    where = "lsr_cross_entropy"
    if logits.dim() != 2 or logits.shape[1] != num_identities:
        raise ValueError(f"{where}: logits must have shape (B, num_identities={num_identities}), "
                         f"got {tuple(logits.shape)}")
    if logits.shape[0] == 0:
        raise ValueError(f"{where}: empty batch")
    check_center_index(center_index, logits.shape[0], 2**62, where=where)
    lse = torch.logsumexp(logits, dim=1)
    is_identity = center_index < num_identities
    # Sequence rows gather a dummy column (0); torch.where drops it.
    safe_target = torch.where(is_identity, center_index, torch.zeros_like(center_index))
    target = logits.gather(1, safe_target.unsqueeze(1)).squeeze(1)
    anchor = torch.where(is_identity, target, logits.mean(dim=1))
    return (lse - anchor).mean()
