"""Negative centers for DSA: one set S per step, shared by the whole batch (DESIGN §2.2)."""

from __future__ import annotations

import math

import torch

SAMPLER_MODES = ("exact", "bernoulli")


def sample_negatives(
    num_centers: int, p: float, *, generator: torch.Generator, mode: str = "exact",
    offset: int = 0,
) -> torch.Tensor:
    """Draw negative center indices (sorted LongTensor on the generator's device).

    - "exact" (reference Caffe layer): floor(num_centers * p) distinct centers, a uniformly
      random subset. The size is computed as in the reference, int(N * p) in floating point.
    - "bernoulli" (the paper): each center independently with probability p.
    `offset` is added to every index, so a rank can draw from its own block of rows.
    """
    where = "sample_negatives"
    if isinstance(num_centers, bool) or not isinstance(num_centers, int) or num_centers < 0:
        raise ValueError(f"{where}: num_centers must be an integer >= 0, got {num_centers!r}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{where}: p must be in [0, 1], got {p}")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"{where}: offset must be an integer >= 0, got {offset!r}")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"{where}: generator must be a torch.Generator (seeded by the caller)")
    device = generator.device
    if mode == "exact":
        k = math.floor(num_centers * p)
        if 4 * k <= num_centers:
            chosen = _distinct_by_rejection(num_centers, k, generator, device)
        else:
            chosen = torch.randperm(num_centers, generator=generator, device=device)[:k]
    elif mode == "bernoulli":
        keep = torch.rand(num_centers, generator=generator, device=device) < p
        chosen = keep.nonzero().squeeze(1)
    else:
        raise ValueError(f"{where}: unknown mode {mode!r}; choose one of {SAMPLER_MODES}")
    return torch.sort(chosen).values + offset


def _distinct_by_rejection(
    n: int, k: int, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """The first k distinct values of an i.i.d. uniform stream over [0, n): a uniformly random
    k-subset, in O(k) instead of the O(n) of a full permutation (p = 1% of millions)."""
    stream = torch.empty(0, dtype=torch.long, device=device)
    while True:
        # k <= n/4 keeps collisions rare: one round nearly always suffices.
        more = torch.randint(n, (k + k // 4 + 16,), generator=generator, device=device)
        stream = torch.cat([stream, more])
        values, inverse = torch.unique(stream, return_inverse=True)
        if values.numel() >= k:
            break
    positions = torch.arange(stream.numel(), device=device)
    first = torch.full_like(values, stream.numel()).scatter_reduce(
        0, inverse, positions, reduce="amin")
    return values[torch.argsort(first)[:k]]


def sample_rows(num_rows: int, positives: torch.Tensor, total: int, *,
                generator: torch.Generator) -> torch.Tensor:
    """The rows of a sampled softmax (Partial FC): every row in ``positives`` plus rows drawn
    uniformly without replacement from the others, ``total`` in all (more only when the
    positives alone exceed it). Returns sorted, distinct row indices in [0, num_rows).

    Uniform over the non-positive rows: a uniformly random ordered draw of
    ``need + len(positives)`` distinct rows holds at least ``need`` non-positive ones, and
    its first ``need`` of them are a uniform ``need``-subset of the non-positive rows.
    """
    where = "sample_rows"
    if num_rows < 0 or total < 0:
        raise ValueError(f"{where}: num_rows and total must be >= 0, got {num_rows}, {total}")
    device = generator.device
    pos = torch.unique(positives.to(device=device, dtype=torch.long))
    if pos.numel() and (int(pos[0]) < 0 or int(pos[-1]) >= num_rows):
        raise ValueError(f"{where}: positive rows must lie in [0, {num_rows})")
    need = min(max(total - pos.numel(), 0), num_rows - pos.numel())
    if need == 0:
        return pos
    k = need + pos.numel()
    if 4 * k <= num_rows:
        drawn = _distinct_by_rejection(num_rows, k, generator, device)
    else:
        drawn = torch.randperm(num_rows, generator=generator, device=device)[:k]
    others = drawn[~torch.isin(drawn, pos)][:need]
    return torch.sort(torch.cat([pos, others])).values
