"""Every ``loss.sequence_mode`` of the partitioned head against the dense oracle.

The contract of DESIGN.md §3 for §2.2a: with the same inputs and negative set, R = 1..4
give the same loss terms, feature gradients and rows after one optimizer step as the
single-process ``seqface_dist.losses.chief_loss`` + ``dsa_loss`` with torch's SGD, in
float64. Also the reference recipe's options (the Caffe margin gradient, W renormalised in
every forward, xavier centers) and checkpoints of the sequence rows.
"""

from __future__ import annotations

import pytest
import torch
from dist_util import run_ranks
from head_util import assert_rank_matches, contract_results, load_rows

from seqface_dist.config import SEQUENCE_MODES, ConfigError, LossConfig
from seqface_dist.losses import chief_loss, chief_rows, dsa_loss
from seqface_dist.parallel import (
    Comm,
    HeadCheckpointError,
    HeadSpec,
    PartitionedHead,
    SoloComm,
    load_head,
    save_head,
)

N_ID, N_SEQ, DIM, PER_RANK = 7, 5, 6, 3
LR, MOM, WD, CENTER_LR = 0.1, 0.9, 5e-4, 0.3
NEGATIVES = torch.tensor(sorted({0, 1, 3, 6, N_ID, N_ID + 2, N_ID + 4}))

# (mode, variant): variant sets the options beside the mode.
VARIANTS = {
    "plain": {},
    "arcface": {"margin": "arcface"},
    "weighted": {"sequence_weight": 0.3},
    "reference": {"reference_margin_grad": True, "weight_renorm": True},
}
CASES = [(m, v) for m in SEQUENCE_MODES for v in ("plain", "arcface", "reference", "weighted")]


def _cfg(mode: str, variant: str) -> LossConfig:
    return LossConfig(sequence_mode=mode, lambda_base=3.0, lambda_min=3.0, scale=4.0,
                      dsa_weight=0.04, dsa_lambda=0.3, dsa_alpha=1.5, dsa_beta=2.0,
                      center_lr=CENTER_LR, center_momentum=0.8, **VARIANTS[variant])


def _inputs(world: int, mode: str, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    b = PER_RANK * world
    feats = torch.randn(b, DIM, generator=g, dtype=torch.float64) * 2
    t = torch.randint(0, N_ID + N_SEQ, (b,), generator=g)
    t[0], t[-1] = 1, N_ID + 2  # at least one of each kind
    if b >= 4:
        t[1] = N_ID + 2  # two samples of one sequence (its center update averages them)
    weight = torch.randn(chief_rows(mode, N_ID, N_SEQ), DIM, generator=g,
                         dtype=torch.float64) * 1.5
    centers = torch.randn(N_ID + N_SEQ, DIM, generator=g, dtype=torch.float64)
    return feats, t, weight, centers


def _dense(world: int, mode: str, variant: str) -> dict:
    cfg = _cfg(mode, variant)
    feats, t, weight, centers = _inputs(world, mode)
    feats.requires_grad_(True)
    if cfg.weight_renorm:
        weight = torch.nn.functional.normalize(weight, dim=1)
    w, c = torch.nn.Parameter(weight.clone()), torch.nn.Parameter(centers.clone())
    weight = cfg.sequence_weight if cfg.sequence_weight >= 0 else 1.0  # auto: 1 (no data)
    chief = chief_loss(feats, w, t, N_ID, N_SEQ, mode=mode, sequence_weight=weight,
                       kind=cfg.margin, scale=cfg.scale, m=cfg.m, lam=cfg.lambda_min,
                       arcface_margin=cfg.arcface_margin, cosface_margin=cfg.cosface_margin,
                       reference_grad=cfg.reference_margin_grad).loss
    dsa = dsa_loss(feats, t, c, N_ID, NEGATIVES, lam=cfg.dsa_lambda, alpha=cfg.dsa_alpha,
                   beta=cfg.dsa_beta)
    loss = chief + cfg.dsa_weight * dsa
    loss.backward()
    torch.optim.SGD([{"params": [w], "lr": LR, "momentum": MOM, "weight_decay": WD},
                     {"params": [c], "lr": CENTER_LR, "momentum": 0.8}], lr=LR).step()
    return dict(loss=loss.detach(), chief=chief.detach(), feat_grad=feats.grad,
                weight=w.detach(), centers=c.detach())


def _head(rank: int, world: int, mode: str, variant: str) -> dict:
    feats, t, weight, centers = _inputs(world, mode)
    head = PartitionedHead(HeadSpec(N_ID, N_SEQ, DIM), _cfg(mode, variant), Comm(),
                           dtype=torch.float64)
    id0, id1, sq0, sq1 = load_rows(head, weight, centers, N_ID, rank)
    opt = head.make_optimizer(lr=LR, momentum=MOM, weight_decay=WD)
    sl = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    local = feats[sl].clone().requires_grad_(True)
    out = head(local, t[sl], step=0, negatives=NEGATIVES)
    out.loss.backward()
    opt.step()
    return dict(loss=out.loss.detach(), chief=out.chief, feat_grad=local.grad,
                weight=head.weight.detach().clone(), centers=head.centers.detach().clone(),
                rows=torch.tensor([id0, id1, sq0, sq1]))


def _all_cases(rank: int, world: int) -> dict:
    return {f"{m}/{v}": _head(rank, world, m, v) for m, v in CASES}


def _check(results: list[dict], world: int) -> None:
    for key in results[0]:
        mode, variant = key.split("/")
        ref = _dense(world, mode, variant)
        for rank, got in enumerate(results):
            assert_rank_matches(got[key], ref, rank, PER_RANK, N_ID, ("loss", "chief"),
                                f"{key} R={world} rank {rank}")


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_modes_contract(world):
    _check(contract_results(_all_cases, world), world)


def test_modes_differ_from_each_other():
    # The contract can fail: each mode is a different loss on the same inputs.
    losses = {m: float(_dense(2, m, "plain")["chief"]) for m in SEQUENCE_MODES}
    assert len({round(v, 9) for v in losses.values()}) == len(SEQUENCE_MODES), losses


def test_reference_gradient_differs_from_the_true_one():
    true = _dense(2, "lsr", "plain")["feat_grad"]
    cfg_ref = _dense(2, "lsr", "reference")["feat_grad"]
    assert not torch.allclose(true, cfg_ref)


def test_masked_softmax_hides_other_sequence_rows_only_from_sequence_samples():
    # A sequence sample's masked loss ignores other sequence rows: moving them changes
    # sequence_classes' loss of that sample but not masked_softmax's.
    feats, t, weight, _ = _inputs(2, "masked_softmax")
    moved = weight.clone()
    other = [N_ID + q for q in range(N_SEQ) if N_ID + q not in t.tolist()]
    moved[other] = moved[other] * -3.0
    kw = dict(scale=4.0, lam=3.0)
    for mode, same in (("masked_softmax", True), ("sequence_classes", False)):
        a = chief_loss(feats, weight, t, N_ID, N_SEQ, mode=mode, **kw).per_sample
        b = chief_loss(feats, moved, t, N_ID, N_SEQ, mode=mode, **kw).per_sample
        seq = t >= N_ID
        assert torch.allclose(a[seq], b[seq]) == same, mode


def test_xavier_centers_are_independent_of_world_size_and_bounded():
    spec = HeadSpec(num_identities=9000, num_sequences=5000, dim=16, seed=2)
    cfg = LossConfig(center_init="xavier")
    whole = PartitionedHead(spec, cfg, SoloComm(0, 1))
    parts = [PartitionedHead(spec, cfg, SoloComm(r, 3)) for r in range(3)]

    def full(heads, attr):  # identity rows of all ranks, then sequence rows of all ranks
        n = [h.id_rows[1] - h.id_rows[0] for h in heads]
        blocks = [getattr(h, attr).detach() for h in heads]
        pairs = list(zip(blocks, n, strict=True))
        return torch.cat([b[:k] for b, k in pairs] + [b[k:] for b, k in pairs])

    assert torch.equal(full(parts, "centers"), full([whole], "centers"))
    bound = (3.0 / 16) ** 0.5
    c = whole.centers.detach()
    assert c.abs().max() <= bound and c.abs().max() > 0.9 * bound
    assert abs(float(c.mean())) < 0.01


def test_sequence_rows_init_is_independent_of_world_size():
    spec = HeadSpec(num_identities=50, num_sequences=9000, dim=4, seed=5)
    cfg = LossConfig(sequence_mode="sequence_classes")
    whole = PartitionedHead(spec, cfg, SoloComm(0, 1)).weight.detach()
    parts = [PartitionedHead(spec, cfg, SoloComm(r, 2)) for r in range(2)]
    n = [h.id_rows[1] - h.id_rows[0] for h in parts]
    ws = [h.weight.detach() for h in parts]
    assert torch.equal(torch.cat([ws[0][:n[0]], ws[1][:n[1]], ws[0][n[0]:], ws[1][n[1]:]]),
                       whole)
    assert whole.shape == (9050, 4)


def _train_save(rank: int, world: int, directory: str):
    head = PartitionedHead(HeadSpec(11, 7, 5, seed=3),
                           LossConfig(sequence_mode="separate_heads", dsa_p=0.5), Comm(),
                           dtype=torch.float64)
    opt = head.make_optimizer(lr=0.05)
    g = torch.Generator().manual_seed(10 + rank)
    for step in range(3):
        f = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
        head(f, torch.randint(0, 18, (4,), generator=g), step=step).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    save_head(head, opt, directory)
    return {"weight": head.weight.detach().clone(),
            "momentum": opt.state[head.weight]["momentum_buffer"].clone()}


def test_sequence_rows_checkpoint_reshards_2_to_1(tmp_path):
    saved = run_ranks(_train_save, 2, str(tmp_path))
    for r in saved:
        assert "ok" in r, r.get("trace")
    one = PartitionedHead(HeadSpec(11, 7, 5, seed=3),
                          LossConfig(sequence_mode="separate_heads", dsa_p=0.5), Comm(),
                          dtype=torch.float64)
    opt = one.make_optimizer(lr=0.05)
    load_head(one, opt, tmp_path)
    a, b = saved[0]["ok"], saved[1]["ok"]
    n0, n1 = 6, 5  # identity rows of rank 0 / 1 (11 over 2)
    for key, got in (("weight", one.weight.detach()),
                     ("momentum", opt.state[one.weight]["momentum_buffer"])):
        want = torch.cat([a[key][:n0], b[key][:n1], a[key][n0:], b[key][n1:]])
        assert torch.equal(got, want), key
    lsr = PartitionedHead(HeadSpec(11, 7, 5, seed=3),
                          LossConfig(sequence_mode="lsr", dsa_p=0.5), Comm(), dtype=torch.float64)
    with pytest.raises(HeadCheckpointError, match="has sequence rows"):
        load_head(lsr, None, tmp_path)


def test_config_refuses_unknown_mode_and_strength_by_key():
    with pytest.raises(ConfigError, match="loss.sequence_mode"):
        LossConfig(sequence_mode="tracks").validate("loss")
    with pytest.raises(ConfigError, match="loss.sequence_weight"):
        LossConfig(sequence_weight=1.5).validate("loss")
    with pytest.raises(ConfigError, match="loss.reference_margin_grad"):
        LossConfig(reference_margin_grad=True, margin="arcface").validate("loss")
