"""Shared by the head's contract tests: one rank's results against the dense reference."""

from __future__ import annotations

import torch
from dist_util import run_ranks


def assert_rank_matches(got: dict, ref: dict, rank: int, per_rank: int, num_identities: int,
                        terms: tuple[str, ...], where: str) -> None:
    """Loss terms, this rank's feature gradient, its W rows (identity rows, then sequence
    rows when the reference W has them) and its center rows equal the reference's."""
    for term in terms:
        torch.testing.assert_close(got[term], ref[term], rtol=1e-10, atol=1e-12,
                                   msg=f"{where}: {term}")
    sl = slice(rank * per_rank, (rank + 1) * per_rank)
    torch.testing.assert_close(got["feat_grad"], ref["feat_grad"][sl], rtol=1e-9, atol=1e-12,
                               msg=f"{where}: feature grad")
    id0, id1, sq0, sq1 = got["rows"].tolist()
    n = num_identities
    want_w = [ref["weight"][id0:id1]]
    if ref["weight"].shape[0] > n:
        want_w.append(ref["weight"][n + sq0:n + sq1])
    torch.testing.assert_close(got["weight"], torch.cat(want_w), rtol=1e-9, atol=1e-12,
                               msg=f"{where}: W rows")
    want_c = torch.cat([ref["centers"][id0:id1], ref["centers"][n + sq0:n + sq1]])
    torch.testing.assert_close(got["centers"], want_c, rtol=1e-9, atol=1e-12,
                               msg=f"{where}: centers")


def load_rows(head, weight: torch.Tensor, centers: torch.Tensor, num_identities: int,
              rank: int) -> tuple[int, int, int, int]:
    """Copy ``rank``'s rows of a full W (identity rows, then sequence rows when the head has
    them) and of the full centers into ``head``; returns its (id0, id1, sq0, sq1)."""
    id0, id1, sq0, sq1 = head.layout.local_rows(rank)
    n = num_identities
    with torch.no_grad():
        rows = [weight[id0:id1]] + ([weight[n + sq0:n + sq1]] if head.sequence_rows else [])
        head.weight.copy_(torch.cat(rows))
        head.centers.copy_(torch.cat([centers[id0:id1], centers[n + sq0:n + sq1]]))
    return id0, id1, sq0, sq1


def contract_results(cases, world: int) -> list[dict]:
    """``cases(rank, world)`` on every rank: in this process without any process group at
    R = 1 (``Comm()`` is a world of one, the same code path), on real gloo ranks above."""
    if world == 1:
        return [cases(0, 1)]
    results = run_ranks(cases, world)
    for r in results:
        assert "ok" in r, r.get("trace")
    return [r["ok"] for r in results]
