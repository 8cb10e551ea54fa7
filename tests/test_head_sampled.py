"""The sampled softmax (``loss.sampled_softmax_fraction``) of the partitioned head.

Contract (DESIGN.md §3 for the sampled rows): with the same drawn rows, R = 1..4 give the
loss terms, feature gradients and rows after two optimizer steps of a dense reference
restricted to those rows, in float64: ``chief_loss`` over W's sampled rows (LSR's uniform
target over the sampled identity rows), DSA unchanged, and SGD that touches only the
sampled rows (an unsampled row's momentum neither decays nor moves it); with
``loss.lazy_center_momentum`` the centers likewise (only the batch's centers move).
"""

from __future__ import annotations

import math

import pytest
import torch
from head_util import assert_rank_matches, contract_results, load_rows

from seqface_dist.config import CLASS_ROW_MODES, SEQUENCE_MODES, LossConfig
from seqface_dist.losses import chief_loss, chief_rows, dsa_loss, sample_rows
from seqface_dist.parallel import Comm, HeadSpec, PartitionedHead, SoloComm

N_ID, N_SEQ, DIM, PER_RANK = 9, 6, 5, 3
LR, MOM, WD, CENTER_LR = 0.1, 0.9, 5e-4, 0.3
NEGATIVES = torch.tensor([0, 2, 5, N_ID + 1, N_ID + 4])
# Global W rows drawn per step (identity y, sequence row N_ID + q); the batch's positives
# are added to them. Step 1 leaves rows of step 0 out: their momentum must stay put.
ROWS = (torch.tensor([1, 4, 8, N_ID + 0, N_ID + 3]), torch.tensor([0, 4, 6, N_ID + 5]))
VARIANTS = {"plain": {}, "arcface": {"margin": "arcface"}, "weighted": {"sequence_weight": 0.4},
            "lazy_centers": {"lazy_center_momentum": True}}
CASES = [(m, v) for m in SEQUENCE_MODES for v in VARIANTS]


def _cfg(mode: str, variant: str) -> LossConfig:
    return LossConfig(sequence_mode=mode, lambda_base=3.0, lambda_min=3.0, scale=4.0,
                      dsa_weight=0.04, dsa_lambda=0.3, dsa_alpha=1.5, dsa_beta=2.0,
                      center_lr=CENTER_LR, center_momentum=0.8,
                      sampled_softmax_fraction=0.5, **VARIANTS[variant])


def _inputs(world: int, mode: str):
    g = torch.Generator().manual_seed(11)
    b = PER_RANK * world
    steps = []
    for _ in ROWS:
        feats = torch.randn(b, DIM, generator=g, dtype=torch.float64) * 2
        t = torch.randint(0, N_ID + N_SEQ, (b,), generator=g)
        t[0], t[-1] = 3, N_ID + 2  # one of each kind; rows not in ROWS: added as positives
        steps.append((feats, t))
    weight = torch.randn(chief_rows(mode, N_ID, N_SEQ), DIM, generator=g,
                         dtype=torch.float64) * 1.5
    centers = torch.randn(N_ID + N_SEQ, DIM, generator=g, dtype=torch.float64)
    return steps, weight, centers


def _sampled_global_rows(mode: str, t: torch.Tensor, given: torch.Tensor) -> torch.Tensor:
    positives = t if mode in CLASS_ROW_MODES else t[t < N_ID]
    rows = torch.unique(torch.cat([positives, given]))
    return rows if mode in CLASS_ROW_MODES else rows[rows < N_ID]


def _dense(world: int, mode: str, variant: str) -> dict:
    cfg = _cfg(mode, variant)
    steps, weight, centers = _inputs(world, mode)
    w, buf = weight.clone(), torch.zeros_like(weight)
    c = torch.nn.Parameter(centers.clone())
    c_opt = torch.optim.SGD([c], lr=CENTER_LR, momentum=0.8)
    c_buf = torch.zeros_like(centers)
    out = {}
    for step, ((feats, t), given) in enumerate(zip(steps, ROWS, strict=True)):
        feats = feats.clone().requires_grad_(True)
        rows = _sampled_global_rows(mode, t, given)
        sub = w[rows].clone().requires_grad_(True)
        n_id = int((rows < N_ID).sum())
        pos = torch.searchsorted(rows, t)  # position of each target among the sampled rows
        tt = pos if mode in CLASS_ROW_MODES else torch.where(t < N_ID, pos, n_id)
        chief = chief_loss(feats, sub, tt, n_id, rows.numel() - n_id, mode=mode,
                           sequence_weight=1.0 if cfg.sequence_weight < 0 else  # auto: 1
                           cfg.sequence_weight, kind=cfg.margin,
                           scale=cfg.scale, m=cfg.m, lam=cfg.lambda_min).loss
        dsa = dsa_loss(feats, t, c, N_ID, NEGATIVES, lam=cfg.dsa_lambda, alpha=cfg.dsa_alpha,
                       beta=cfg.dsa_beta)
        loss = chief + cfg.dsa_weight * dsa
        loss.backward()
        with torch.no_grad():  # SGD on the sampled rows only
            g = sub.grad + WD * w[rows]
            buf[rows] = MOM * buf[rows] + g
            w[rows] -= LR * buf[rows]
        if cfg.lazy_center_momentum:  # only the batch's centers, their momentum included
            with torch.no_grad():
                own = torch.unique(t)
                c_buf[own] = 0.8 * c_buf[own] + c.grad[own]
                c[own] -= CENTER_LR * c_buf[own]
            c.grad = None
        else:
            c_opt.step()
            c_opt.zero_grad(set_to_none=True)
        out[f"loss{step}"], out[f"chief{step}"] = loss.detach(), chief.detach()
        out[f"grad{step}"] = feats.grad
    return dict(out, weight=w, centers=c.detach())


def _head(rank: int, world: int, mode: str, variant: str) -> dict:
    steps, weight, centers = _inputs(world, mode)
    head = PartitionedHead(HeadSpec(N_ID, N_SEQ, DIM), _cfg(mode, variant), Comm(),
                           dtype=torch.float64)
    id0, id1, sq0, sq1 = load_rows(head, weight, centers, N_ID, rank)
    opt = head.make_optimizer(lr=LR, momentum=MOM, weight_decay=WD)
    sl = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    got = {}
    for step, ((feats, t), given) in enumerate(zip(steps, ROWS, strict=True)):
        local = feats[sl].clone().requires_grad_(True)
        out = head(local, t[sl], step=step, negatives=NEGATIVES, classifier_rows=given)
        out.loss.backward()
        assert head.weight.grad.is_sparse
        opt.step()
        opt.zero_grad(set_to_none=True)
        got[f"loss{step}"], got[f"chief{step}"] = out.loss.detach(), out.chief
        got[f"grad{step}"] = local.grad
    return dict(got, weight=head.weight.detach().clone(),
                centers=head.centers.detach().clone(), rows=torch.tensor([id0, id1, sq0, sq1]))


def _all_cases(rank: int, world: int) -> dict:
    return {f"{m}/{v}": _head(rank, world, m, v) for m, v in CASES}


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_sampled_softmax_contract(world):
    results = contract_results(_all_cases, world)
    for key in results[0]:
        mode, variant = key.split("/")
        ref = _dense(world, mode, variant)
        for rank, got in enumerate(results):
            where = f"{key} R={world} rank {rank}"
            for step in range(len(ROWS)):  # both steps' terms and feature gradients
                one = dict(got[key], loss=got[key][f"loss{step}"],
                           chief=got[key][f"chief{step}"], feat_grad=got[key][f"grad{step}"])
                want = dict(ref, loss=ref[f"loss{step}"], chief=ref[f"chief{step}"],
                            feat_grad=ref[f"grad{step}"])
                assert_rank_matches(one, want, rank, PER_RANK, N_ID, ("loss", "chief"),
                                    f"{where} step {step}")


def test_sampling_changes_the_loss():
    # The contract can fail: the sampled loss differs from the full softmax's.
    steps, weight, _ = _inputs(2, "sequence_classes")
    feats, t = steps[0]
    full = chief_loss(feats, weight, t, N_ID, N_SEQ, mode="sequence_classes", scale=4.0,
                      lam=3.0).loss
    rows = _sampled_global_rows("sequence_classes", t, ROWS[0])
    assert rows.numel() < N_ID + N_SEQ
    sampled = chief_loss(feats, weight[rows], torch.searchsorted(rows, t),
                         int((rows < N_ID).sum()), int((rows >= N_ID).sum()),
                         mode="sequence_classes", scale=4.0, lam=3.0).loss
    assert not torch.isclose(full, sampled)


@pytest.mark.parametrize("mode", ["lsr", "sequence_classes"])
def test_drawn_rows_hold_the_positives_and_only_they_move(mode):
    # Without given rows the head draws its own: ceil(fraction * local rows), positives
    # included, a new draw each step; unsampled rows and their momentum do not move.
    spec = HeadSpec(num_identities=400, num_sequences=300, dim=8, seed=1)
    cfg = LossConfig(sequence_mode=mode, sampled_softmax_fraction=0.1)
    head = PartitionedHead(spec, cfg, SoloComm(1, 2), dtype=torch.float64)
    opt = head.make_optimizer(lr=0.1)
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 700, (8,), generator=g)
    drawn = []
    for step in range(2):
        before = head.weight.detach().clone()
        mom = opt.state[head.weight].get("momentum_buffer")
        mom = None if mom is None else mom.clone()
        # SoloComm: this rank alone, its peers stood in for by copies of its batch.
        f = torch.randn(8, 8, generator=g, dtype=torch.float64, requires_grad=True)
        head(f, t, step=step).loss.backward()
        rows = head.weight.grad.coalesce().indices()[0]
        n = head.weight.shape[0]
        positives = head.local_rows_of(t)
        positives = positives[(positives >= 0) & (positives < n)]
        assert rows.numel() == max(math.ceil(0.1 * n), positives.unique().numel())
        assert bool(torch.isin(positives, rows).all())
        opt.step()
        opt.zero_grad(set_to_none=True)
        moved = (head.weight.detach() != before).any(dim=1).nonzero().squeeze(1)
        assert torch.equal(moved, rows)
        buf = opt.state[head.weight]["momentum_buffer"]
        if mom is not None:
            still = torch.ones(n, dtype=torch.bool)
            still[rows] = False
            assert torch.equal(buf[still], mom[still])
        drawn.append(rows)
    assert not torch.equal(drawn[0], drawn[1])


def test_sample_rows_is_uniform_over_the_non_positive_rows():
    positives = torch.tensor([3, 7, 7, 19])
    counts = torch.zeros(40)
    for seed in range(4000):
        rows = sample_rows(40, positives, 8, generator=torch.Generator().manual_seed(seed))
        assert rows.numel() == 8 and bool(torch.isin(torch.tensor([3, 7, 19]), rows).all())
        assert torch.equal(rows, rows.unique())
        counts[rows] += 1
    others = torch.ones(40, dtype=torch.bool)
    others[[3, 7, 19]] = False
    expected = 4000 * 5 / 37  # 5 of the 37 other rows per draw
    chi2 = float(((counts[others] - expected) ** 2 / expected).sum())
    assert chi2 < 70.0, chi2  # 36 degrees of freedom: p < 1e-3 above ~67
    # More positives than the quota: all of them, nothing else.
    many = torch.arange(0, 40, 3)
    assert torch.equal(sample_rows(40, many, 5, generator=torch.Generator()), many)
