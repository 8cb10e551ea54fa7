"""The partitioned head against the single-process losses, on real gloo process groups.

The contract (DESIGN.md §3): with the same inputs and negative set, R = 1, 2, 3, 4 give the
same loss terms, the same feature gradients and the same rows after one optimizer step
as the plain single-process implementation, in float64. Here in the paper's mode (lsr,
written with the dense margin_logits + lsr_cross_entropy); every other sequence mode is
held to the oracle chief_loss in tests/test_head_modes.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from dist_util import run_ranks
from head_util import assert_rank_matches, contract_results

from seqface_dist.config import LossConfig
from seqface_dist.losses import dsa_loss, lsr_cross_entropy, margin_logits
from seqface_dist.parallel import (
    Comm,
    HeadCheckpointError,
    HeadLayout,
    HeadSpec,
    PartitionedHead,
    RowPartition,
    SoloComm,
    load_head,
    save_head,
)

N_ID, N_SEQ, DIM, PER_RANK = 7, 5, 6, 3
LR, MOM, WD, CENTER_LR = 0.1, 0.9, 5e-4, 0.3
CHIEF_W, DSA_W = 1.0, 0.04  # a DSA weight != 1 shows the center update ignores it


def _loss_cfg(margin: str = "sphereface") -> LossConfig:
    return LossConfig(sequence_mode="lsr", margin=margin, lambda_base=3.0, lambda_min=3.0,
                      scale=4.0,
                      chief_weight=CHIEF_W, dsa_weight=DSA_W, dsa_lambda=0.3, dsa_alpha=1.5,
                      dsa_beta=2.0, center_lr=CENTER_LR, center_momentum=0.8)


def _case(kind: str, world: int, seed: int):
    """Inputs of one case: global features, center indices, W, C, negatives."""
    g = torch.Generator().manual_seed(seed)
    b = PER_RANK * world
    feats = torch.randn(b, DIM, generator=g, dtype=torch.float64) * 2
    if kind == "mixed":
        t = torch.randint(0, N_ID + N_SEQ, (b,), generator=g)
        t[0], t[-1] = 1, N_ID + 2  # at least one of each kind
    elif kind == "identities":
        t = torch.randint(0, N_ID, (b,), generator=g)
    elif kind == "sequences":
        t = torch.randint(N_ID, N_ID + N_SEQ, (b,), generator=g)
    elif kind == "one_owner":  # every target in rank 0's blocks: other ranks own no positive
        t = torch.tensor([0, 1, N_ID] * world)[:b]
    else:
        raise ValueError(kind)
    weight = torch.randn(N_ID, DIM, generator=g, dtype=torch.float64)
    centers = torch.randn(N_ID + N_SEQ, DIM, generator=g, dtype=torch.float64)
    # Negatives include the samples' own centers and sequence centers (skip rules).
    negatives = torch.tensor(sorted({0, 1, 3, 6, N_ID, N_ID + 2, N_ID + 4}))
    return feats, t, weight, centers, negatives


def _reference(kind: str, world: int, seed: int, margin: str):
    """Plain single-process step with the foundation's losses and torch's SGD."""
    cfg = _loss_cfg(margin)
    feats, t, weight, centers, negatives = _case(kind, world, seed)
    feats.requires_grad_(True)
    w = torch.nn.Parameter(weight.clone())
    c = torch.nn.Parameter(centers.clone())
    logits = margin_logits(feats, w, t, N_ID, kind=margin, scale=cfg.scale, m=cfg.m,
                           lam=cfg.lambda_min, arcface_margin=cfg.arcface_margin,
                           cosface_margin=cfg.cosface_margin)
    chief = lsr_cross_entropy(logits, t, N_ID)
    dsa = dsa_loss(feats, t, c, N_ID, negatives, lam=cfg.dsa_lambda, alpha=cfg.dsa_alpha,
                   beta=cfg.dsa_beta)
    loss = CHIEF_W * chief + DSA_W * dsa
    loss.backward()
    opt = torch.optim.SGD([{"params": [w], "lr": LR, "momentum": MOM, "weight_decay": WD},
                           {"params": [c], "lr": CENTER_LR, "momentum": 0.8}], lr=LR)
    opt.step()
    return dict(loss=loss.detach(), chief=chief.detach(), dsa=dsa.detach(),
                feat_grad=feats.grad, weight=w.detach(), centers=c.detach())


def _head_step(rank: int, world: int, kind: str, seed: int, margin: str):
    """One rank's step of the partitioned head on the case's inputs."""
    feats, t, weight, centers, negatives = _case(kind, world, seed)
    head = PartitionedHead(HeadSpec(N_ID, N_SEQ, DIM), _loss_cfg(margin), Comm(),
                           dtype=torch.float64)
    id0, id1, sq0, sq1 = head.layout.local_rows(rank)
    with torch.no_grad():
        head.weight.copy_(weight[id0:id1])
        head.centers.copy_(torch.cat([centers[id0:id1], centers[N_ID + sq0:N_ID + sq1]]))
    opt = head.make_optimizer(lr=LR, momentum=MOM, weight_decay=WD)
    sl = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    local = feats[sl].clone().requires_grad_(True)
    out = head(local, t[sl], step=0, negatives=negatives)
    out.loss.backward()
    opt.step()
    return dict(loss=out.loss.detach(), chief=out.chief, dsa=out.dsa, feat_grad=local.grad,
                weight=head.weight.detach().clone(), centers=head.centers.detach().clone(),
                rows=torch.tensor([id0, id1, sq0, sq1]))


def _contract_all_cases(rank: int, world: int):
    return {f"{k}/{m}": _head_step(rank, world, k, 11, m)
            for k in ("mixed", "identities", "sequences", "one_owner")
            for m in ("sphereface", "arcface", "cosface")}


def _check_against_reference(results: list[dict], world: int) -> None:
    for key in results[0]:
        kind, margin = key.split("/")
        ref = _reference(kind, world, 11, margin)
        for rank, res in enumerate(results):
            assert_rank_matches(res[key], ref, rank, PER_RANK, N_ID, ("loss", "chief", "dsa"),
                                f"{key} rank {rank}")


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_contract(world):
    _check_against_reference(contract_results(_contract_all_cases, world), world)


def test_reference_differs_when_negatives_differ():
    # The contract check can fail: a different negative set changes the DSA loss.
    _, t, *_ = _case("mixed", 2, 11)
    a = _reference("mixed", 2, 11, "sphereface")
    head = PartitionedHead(HeadSpec(N_ID, N_SEQ, DIM), _loss_cfg(), Comm(), dtype=torch.float64)
    feats, t, weight, centers, _ = _case("mixed", 2, 11)
    with torch.no_grad():
        head.weight.copy_(weight)
        head.centers.copy_(centers)
    out = head(feats, t, negatives=torch.tensor([2, N_ID + 1]))
    assert not torch.allclose(out.dsa, a["dsa"])


def test_row_partition_is_even_and_owner_matches():
    for n in (0, 1, 7, 10, 13):
        for world in (1, 2, 3, 4, 8):
            part = RowPartition(n, world)
            sizes = [b - a for a, b in (part.bounds(r) for r in range(world))]
            assert sum(sizes) == n and max(sizes) - min(sizes) <= 1
            if n:
                rows = torch.arange(n)
                want = torch.tensor([r for r in range(world)
                                     for _ in range(sizes[r])])
                assert torch.equal(part.owner(rows), want)


def test_negative_draw_per_rank_stays_in_block_and_has_expected_size():
    spec = HeadSpec(num_identities=1000, num_sequences=3001, dim=4)
    world = 3
    for mode, p in (("exact", 0.01), ("bernoulli", 0.05)):
        cfg = LossConfig(sequence_mode="lsr", dsa_p=p, dsa_sampler=mode)
        counts = []
        for rank in range(world):
            head = PartitionedHead(spec, cfg, SoloComm(rank, world))
            (id0, id1), (sq0, sq1) = head.id_rows, head.seq_rows
            n_local = (id1 - id0) + (sq1 - sq0)
            sizes = []
            for step in range(200):
                rows = head.draw_negatives(step)
                idx = head.global_index_of_rows(rows)
                in_block = ((idx >= id0) & (idx < id1)) | \
                    ((idx >= 1000 + sq0) & (idx < 1000 + sq1))
                assert bool(in_block.all()), f"rank {rank} drew outside its block"
                assert rows.unique().numel() == rows.numel()
                sizes.append(rows.numel())
            if mode == "exact":
                assert set(sizes) == {math.floor(n_local * p)}
            else:
                mean = sum(sizes) / len(sizes)
                sd = math.sqrt(n_local * p * (1 - p) / len(sizes))
                assert abs(mean - n_local * p) < 6 * sd, (rank, mean, n_local * p)
            counts.append(sizes)
        # Different ranks draw independently (seeded by rank): not the same sequence.
        assert counts[0] != counts[1] or mode == "exact"


def _disagree(rank: int, world: int):
    spec = HeadSpec(num_identities=10 + rank, num_sequences=4, dim=3)
    PartitionedHead(spec, LossConfig(sequence_mode="lsr"), Comm())


def test_ranks_that_disagree_fail_at_construction():
    results = run_ranks(_disagree, 2)
    for r in results:
        assert "error" in r
        assert "num_identities" in r["error"] and "disagree" in r["error"]


def _bad_index(rank: int, world: int):
    head = PartitionedHead(HeadSpec(4, 2, 3), LossConfig(sequence_mode="lsr"), Comm())
    t = torch.tensor([0, 5]) if rank == 0 else torch.tensor([1, 17])
    head(torch.randn(2, 3), t)


def test_out_of_range_center_index_is_named_on_every_rank():
    for r in run_ranks(_bad_index, 2):
        assert "error" in r
        assert "17" in r["error"] and "sample 1 on rank 1" in r["error"]
        assert "[0, 6)" in r["error"]


def _save_blocks(rank: int, world: int, directory: str, steps: int):
    """Train a few steps on R ranks, then save; return the saved rows for comparison."""
    spec = HeadSpec(num_identities=11, num_sequences=7, dim=5, seed=3)
    head = PartitionedHead(spec, LossConfig(sequence_mode="lsr", dsa_p=0.5), Comm(),
                           dtype=torch.float64)
    opt = head.make_optimizer(lr=0.05)
    g = torch.Generator().manual_seed(100 + rank)
    for step in range(steps):
        f = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
        t = torch.randint(0, 18, (4,), generator=g)
        head(f, t, step=step).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    save_head(head, opt, directory)


def _reload_and_save(rank: int, world: int, src: str, dst: str):
    spec = HeadSpec(num_identities=11, num_sequences=7, dim=5, seed=3)
    head = PartitionedHead(spec, LossConfig(sequence_mode="lsr", dsa_p=0.5), Comm(),
                           dtype=torch.float64)
    opt = head.make_optimizer(lr=0.05)
    load_head(head, opt, src)
    save_head(head, opt, dst)


def _gather_checkpoint(directory) -> dict[str, torch.Tensor]:
    """Full matrices assembled from a checkpoint folder (test-only, small sizes)."""
    from safetensors import safe_open

    from seqface_dist.parallel import read_head_metadata

    parts: dict[str, list] = {}
    for f, meta in read_head_metadata(directory):
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():
                key = "id_rows" if not name.startswith("seq") else "seq_rows"
                parts.setdefault(name, []).append((meta[key][0], sf.get_tensor(name)))
    return {k: torch.cat([t for _, t in sorted(v, key=lambda x: x[0])]) for k, v in parts.items()}


def test_checkpoint_reshards_2_to_3_to_1_bit_for_bit(tmp_path):
    a, b, c = tmp_path / "r2", tmp_path / "r3", tmp_path / "r1"
    for r in run_ranks(_save_blocks, 2, str(a), 3):
        assert "ok" in r, r.get("trace")
    for r in run_ranks(_reload_and_save, 3, str(a), str(b)):
        assert "ok" in r, r.get("trace")
    _reload_and_save(0, 1, str(b), str(c))  # R = 1 without a process group
    full_a, full_c = _gather_checkpoint(a), _gather_checkpoint(c)
    assert set(full_a) == {"weight", "id_centers", "seq_centers", "weight.momentum",
                           "id_centers.momentum", "seq_centers.momentum"}
    assert set(full_c) == set(full_a)
    for name in full_a:
        assert torch.equal(full_a[name], full_c[name]), name
    assert full_a["weight"].shape == (11, 5) and full_a["seq_centers"].shape == (7, 5)
    # Centers moved away from their zero init, so the comparison is not vacuous.
    assert full_a["id_centers"].abs().sum() > 0 and full_a["seq_centers"].abs().sum() > 0


def test_checkpoint_mismatch_is_refused(tmp_path):
    head = PartitionedHead(HeadSpec(11, 7, 5), LossConfig(sequence_mode="lsr"), Comm())
    save_head(head, None, tmp_path)
    other = PartitionedHead(HeadSpec(12, 7, 5), LossConfig(sequence_mode="lsr"), Comm())
    with pytest.raises(HeadCheckpointError, match="num_identities=11"):
        load_head(other, None, tmp_path)
    other = PartitionedHead(HeadSpec(11, 7, 6), LossConfig(sequence_mode="lsr"), Comm())
    with pytest.raises(HeadCheckpointError, match="dim=5"):
        load_head(other, None, tmp_path)
    # A missing block (rows not covered) is refused, never silently re-initialised.
    for rank in range(2):
        save_head(PartitionedHead(HeadSpec(11, 7, 5), LossConfig(sequence_mode="lsr"),
                                  SoloComm(rank, 2)), None,
                  tmp_path / "two")
    (tmp_path / "two" / "head-rank00001-of-00002.safetensors").unlink()
    with pytest.raises(HeadCheckpointError, match="missing"):
        load_head(head, None, tmp_path / "two")
    with pytest.raises(HeadCheckpointError, match="no head blocks"):
        load_head(head, None, tmp_path / "empty")


def test_init_is_independent_of_world_size():
    spec = HeadSpec(num_identities=9000, num_sequences=10, dim=4, seed=5)
    whole = PartitionedHead(spec, LossConfig(sequence_mode="lsr"), SoloComm(0, 1)).weight.detach()
    parts = [PartitionedHead(spec, LossConfig(sequence_mode="lsr"), SoloComm(r, 3)).weight.detach()
             for r in range(3)]
    assert torch.equal(torch.cat(parts), whole)


def test_layout_local_rows():
    lay = HeadLayout(num_identities=5, num_sequences=3, world_size=2)
    assert lay.local_rows(0) == (0, 3, 0, 2) and lay.local_rows(1) == (3, 5, 2, 3)
    t = torch.tensor([0, 2, 3, 4, 5, 6, 7])
    assert lay.local_center_row(t, 0).tolist() == [0, 2, -1, -1, 3, 4, -1]
    assert lay.local_center_row(t, 1).tolist() == [-1, -1, 0, 1, -1, -1, 2]


@pytest.mark.parametrize("field,value", [("dsa_normalize_scale", 8.0)])
def test_head_refuses_options_it_does_not_implement(field, value):
    # The config refuses them by key (before Ray starts); the head validates the same way.
    from seqface_dist.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=f"loss.{field}"):
        load_config(None, [f"loss.{field}={value}"])
    with pytest.raises(ValueError, match=f"loss.{field}"):
        PartitionedHead(HeadSpec(4, 2, 3), LossConfig(**{field: value}), Comm())
