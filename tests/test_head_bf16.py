"""The bf16 head (``train.head_precision: bf16``) against the float64 oracle.

W and the centers are stored in bf16 (half the memory); the GEMMs run in bf16, and the
row norms, margin, softmax statistics, DSA distances and the loss in fp32. Tolerances,
stated: loss terms within 1e-2 relative, feature gradients within 2e-2 of their largest
entry, W and center rows after one step within 2e-2 of their largest entry (bf16 keeps
8 bits of mantissa: 4e-3 relative per rounding). The updates round stochastically, so a
step far below a bf16 ulp still moves the weights in expectation.
"""

from __future__ import annotations

import pytest
import torch
from head_util import contract_results, load_rows

from seqface_dist.config import CLASS_ROW_MODES, SEQUENCE_MODES, LossConfig
from seqface_dist.losses import chief_loss, chief_rows, dsa_loss
from seqface_dist.parallel import Comm, HeadSpec, PartitionedHead
from seqface_dist.parallel.optim import InPlaceSGD, stochastic_round_

N_ID, N_SEQ, DIM, PER_RANK = 40, 30, 16, 4
LR, MOM, WD = 0.1, 0.9, 5e-4
NEGATIVES = torch.tensor([0, 3, 9, 17, 33, N_ID + 2, N_ID + 11, N_ID + 25])
ROWS = torch.tensor([1, 4, 8, 20, 31, N_ID + 0, N_ID + 3, N_ID + 17])  # for rate < 1


def _cfg(mode: str, rate: float) -> LossConfig:
    return LossConfig(sequence_mode=mode, lambda_base=3.0, lambda_min=3.0, scale=8.0,
                      dsa_weight=0.04, center_lr=0.2, sequence_weight=1.0,
                      sampled_softmax_fraction=rate)


def _bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).double()  # values a bf16 block holds exactly


def _inputs(world: int, mode: str):
    g = torch.Generator().manual_seed(3)
    b = PER_RANK * world
    feats = torch.randn(b, DIM, generator=g, dtype=torch.float64) * 2
    t = torch.randint(0, N_ID + N_SEQ, (b,), generator=g)
    t[0], t[-1] = 2, N_ID + 5
    weight = _bf16(torch.randn(chief_rows(mode, N_ID, N_SEQ), DIM, generator=g) * 0.5)
    centers = _bf16(torch.randn(N_ID + N_SEQ, DIM, generator=g))
    return feats, t, weight, centers


def _dense(world: int, mode: str, rate: float) -> dict:
    cfg = _cfg(mode, rate)
    feats, t, weight, centers = _inputs(world, mode)
    feats.requires_grad_(True)
    rows = torch.arange(weight.shape[0])
    if rate < 1.0:
        positives = t if mode in CLASS_ROW_MODES else t[t < N_ID]
        rows = torch.unique(torch.cat([positives, ROWS]))
        rows = rows[rows < weight.shape[0]]
    w = weight[rows].clone().requires_grad_(True)
    c = torch.nn.Parameter(centers.clone())
    n_id = int((rows < N_ID).sum())
    pos = torch.searchsorted(rows, t)
    tt = pos if mode in CLASS_ROW_MODES else torch.where(t < N_ID, pos, n_id)
    chief = chief_loss(feats, w, tt, n_id, rows.numel() - n_id, mode=mode, scale=cfg.scale,
                       lam=cfg.lambda_min).loss
    dsa = dsa_loss(feats, t, c, N_ID, NEGATIVES)
    loss = chief + cfg.dsa_weight * dsa
    loss.backward()
    new_w = weight.clone()
    with torch.no_grad():  # first step: momentum = gradient (+ weight decay)
        new_w[rows] -= LR * (w.grad + WD * weight[rows])
    torch.optim.SGD([c], lr=cfg.center_lr, momentum=cfg.center_momentum).step()
    return dict(loss=loss.detach(), chief=chief.detach(), feat_grad=feats.grad,
                weight=new_w, centers=c.detach())


def _head(rank: int, world: int, mode: str, rate: float) -> dict:
    feats, t, weight, centers = _inputs(world, mode)
    head = PartitionedHead(HeadSpec(N_ID, N_SEQ, DIM), _cfg(mode, rate), Comm(),
                           dtype=torch.bfloat16)
    id0, id1, sq0, sq1 = load_rows(head, weight, centers, N_ID, rank)
    assert head.weight.dtype == head.centers.dtype == torch.bfloat16
    opt = head.make_optimizer(lr=LR, momentum=MOM, weight_decay=WD)
    sl = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    local = feats[sl].clone().requires_grad_(True)
    out = head(local, t[sl], negatives=NEGATIVES,
               classifier_rows=ROWS if rate < 1.0 else None)
    out.loss.backward()
    opt.step()
    return dict(loss=out.loss.detach().double(), chief=out.chief.double(),
                feat_grad=local.grad, weight=head.weight.detach().double(),
                centers=head.centers.detach().double(),
                rows=torch.tensor([id0, id1, sq0, sq1]))


CASES = [(m, r) for m in SEQUENCE_MODES for r in (1.0, 0.5)]


def _all_cases(rank: int, world: int) -> dict:
    return {f"{m}/{r}": _head(rank, world, m, r) for m, r in CASES}


def _close(got, want, rel: float, what: str) -> None:
    err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))
    assert err <= rel, f"{what}: error {err:.2e} > {rel:g} of the largest entry"


@pytest.mark.parametrize("world", [1, 2])
def test_bf16_head_within_stated_tolerances(world):
    results = contract_results(_all_cases, world)
    for key in results[0]:
        mode, rate = key.split("/")
        ref = _dense(world, mode, float(rate))
        for rank, got in enumerate(results):
            g, where = got[key], f"{key} R={world} rank {rank}"
            for term in ("loss", "chief"):
                _close(g[term], ref[term], 1e-2, f"{where}: {term}")
            sl = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
            _close(g["feat_grad"], ref["feat_grad"][sl], 2e-2, f"{where}: feature grad")
            id0, id1, sq0, sq1 = g["rows"].tolist()
            want_w = [ref["weight"][id0:id1]]
            if ref["weight"].shape[0] > N_ID:
                want_w.append(ref["weight"][N_ID + sq0:N_ID + sq1])
            _close(g["weight"], torch.cat(want_w), 2e-2, f"{where}: W rows")
            want_c = torch.cat([ref["centers"][id0:id1], ref["centers"][N_ID + sq0:N_ID + sq1]])
            _close(g["centers"], want_c, 2e-2, f"{where}: centers")


def test_stochastic_rounding_applies_steps_below_an_ulp():
    # lr * wd = 5e-5 of the weight per step, far below bf16's ulp of 1 (2^-7): rounded to
    # nearest nothing would move; rounded stochastically the mean decays as in fp32.
    p = torch.nn.Parameter(torch.ones(20_000, 8, dtype=torch.bfloat16))
    opt = InPlaceSGD([{"params": [p], "stochastic_rounding": True}], lr=0.1,
                     weight_decay=5e-4)
    for _ in range(200):
        p.grad = torch.zeros_like(p)
        opt.step()
    want = (1 - 0.1 * 5e-4) ** 200  # 0.990
    got = float(p.detach().float().mean())
    assert abs(got - want) < 5e-4, got
    nearest = torch.ones(8, dtype=torch.bfloat16)
    for _ in range(200):
        nearest = (nearest.float() * (1 - 0.1 * 5e-4)).to(torch.bfloat16)
    assert float(nearest.float().mean()) == 1.0  # the control: round-to-nearest stalls


def test_stochastic_round_is_unbiased():
    x = torch.full((100_000,), 1.0 + 3 * 2**-10)  # between two bf16 neighbours
    out = torch.empty_like(x, dtype=torch.bfloat16)
    stochastic_round_(out, x, torch.Generator().manual_seed(0))
    assert set(out.float().unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert abs(float(out.float().mean()) - float(x[0])) < 6e-5  # 5 standard errors


def test_a_resumed_run_rounds_exactly_as_the_uninterrupted_one():
    # The rounding stream is keyed to the training step: after a "checkpoint" at step 2,
    # a fresh optimizer (as a resumed run builds) continues bit for bit.
    gen = torch.Generator().manual_seed(1)
    w0 = torch.randn(512, 16, generator=gen).to(torch.bfloat16)
    grads = [(torch.randn(512, 16, generator=gen) * 1e-3).to(torch.bfloat16)
             for _ in range(5)]

    def optimizer(p):
        return InPlaceSGD([{"params": [p], "stochastic_rounding": True, "momentum": 0.9}],
                          lr=0.1, weight_decay=5e-4, seed=7)

    def train(p, opt, steps):
        for s in steps:
            p.grad = grads[s].clone()
            opt.seed_rounding(s)
            opt.step()

    whole = torch.nn.Parameter(w0.clone())
    opt = optimizer(whole)
    train(whole, opt, range(5))

    first = torch.nn.Parameter(w0.clone())
    opt1 = optimizer(first)
    train(first, opt1, range(2))
    resumed = torch.nn.Parameter(first.detach().clone())
    opt2 = optimizer(resumed)
    opt2.state[resumed]["momentum_buffer"] = opt1.state[first]["momentum_buffer"].clone()
    train(resumed, opt2, range(2, 5))
    assert torch.equal(resumed, whole)
