"""Gradient accumulation (``train.gradient_accumulation_steps``) and the head's side of
fp16 loss scaling (``train.precision: fp16``), against the step they must equal.

The contract: with the same seed and the same samples, one step of k micro-batches of b
with accumulation k equals one step of the batch of k * b: W, the centers (moved once,
by the whole batch's update), the feature gradients, and the backbone (the tiny net has
no BatchNorm; a BatchNorm layer normalises each micro-batch by its own statistics, which
no accumulation can make equal). Head alone at R = 1 (float64) and on 2 gloo ranks; the
whole step with a LocalEngine; the backbone through DeepSpeed (ZeRO 0 and 2, 2 ranks).
"""

from __future__ import annotations

import os

import pytest
import torch
from dist_util import run_ranks
from head_util import contract_results

from seqface_dist.config import ConfigError, LossConfig
from seqface_dist.parallel import Comm, HeadSpec, PartitionedHead
from seqface_dist.train.smoke import smoke_config
from seqface_dist.train.step import LocalEngine, local_trainer

N_ID, N_SEQ, DIM = 10, 6, 12


def _inputs(b: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(b, DIM, generator=g, dtype=torch.float64)
    # Identities and sequences, several samples per center (the counts matter).
    t = torch.cat([torch.randint(0, N_ID, (b // 2,), generator=g),
                   N_ID + torch.randint(0, N_SEQ, (b - b // 2,), generator=g)])
    return feats, t


def _head(mode: str, seed: int = 3) -> tuple[PartitionedHead, torch.optim.Optimizer]:
    cfg = LossConfig(sequence_mode=mode, dsa_p=0.6, center_init="xavier", m=2,
                     lambda_min=1.0)
    head = PartitionedHead(HeadSpec(N_ID, N_SEQ, DIM, seed=seed), cfg, Comm(),
                           dtype=torch.float64)
    return head, head.make_optimizer(lr=0.3, momentum=0.9, weight_decay=5e-4)


def _head_case(rank: int, world: int, mode: str, k: int, steps: int = 2, b: int = 12) -> dict:
    """``steps`` steps on this rank's batch of ``b`` samples: whole (k = 1), or as k
    strided micro-batches with the loss scaled by 1/k; everything a step changes."""
    head, opt = _head(mode)
    head.accumulating = k > 1
    grads, losses = [], []
    for step in range(steps):
        feats, t = _inputs(b * world, 100 + step)
        mine = slice(rank * b, (rank + 1) * b)
        f, tt = feats[mine].clone().requires_grad_(True), t[mine]
        total = 0.0
        for j in range(k):
            out = head(f[j::k], tt[j::k], step=step)
            (out.loss / k).backward()
            total += float(out.loss.detach()) / k
            if k > 1:
                head.collect_center_update()
        if k > 1:
            head.finish_accumulation()
        grads.append(f.grad.clone())
        losses.append(total)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {"weight": head.weight.detach().clone(), "centers": head.centers.detach().clone(),
            "feat_grad": torch.stack(grads), "loss": torch.tensor(losses),
            "momentum": [s["momentum_buffer"].clone() for s in opt.state.values()]}


@pytest.mark.parametrize("mode", ["sequence_classes", "lsr", "masked_softmax"])
@pytest.mark.parametrize("world", [1, 2])
def test_head_k_micro_batches_equal_one_batch_of_k_times_b(mode, world):
    k = 3

    def cases(rank, w):
        return {"big": _head_case(rank, w, mode, 1), "acc": _head_case(rank, w, mode, k)}

    for r, res in enumerate(contract_results(cases, world)):
        big, acc = res["big"], res["acc"]
        # The large batch's loss is the mean of the micro-batches' (equal counts).
        torch.testing.assert_close(acc["loss"], big["loss"], rtol=1e-12, atol=1e-12)
        # Feature gradients (strided micro-batches map back onto the batch's order).
        torch.testing.assert_close(acc["feat_grad"], big["feat_grad"] / 1.0, rtol=1e-9,
                                   atol=1e-12, msg=f"rank {r}: feature grad")
        for key in ("weight", "centers"):
            torch.testing.assert_close(acc[key], big[key], rtol=1e-9, atol=1e-12,
                                       msg=f"rank {r}: {key}")
        for a, b in zip(acc["momentum"], big["momentum"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_summing_micro_batch_center_updates_would_not_be_the_large_batch_update():
    """Why the head collects raw sums: k updates, each normalised by its own counts and
    simply added, move a center differently from the large batch's one update."""
    k = 3
    head, opt = _head("sequence_classes")
    feats, t = _inputs(12, 100)
    for j in range(k):  # accumulating stays False: autograd just adds the k updates
        head(feats[j::k], t[j::k], step=0).loss.div(k).backward()
    opt.step()
    naive = head.centers.detach().clone()
    big = _head_case(0, 1, "sequence_classes", 1, steps=1)["centers"]
    assert not torch.allclose(naive, big, rtol=1e-6, atol=1e-9)


def bn_free_backbone(cfg):
    """The tiny net with its BatchNorm layers left out: BatchNorm normalises each
    micro-batch by its own statistics, which no accumulation makes equal."""
    from seqface_dist.models.tiny import TinyNet

    net = TinyNet(in_channels=cfg.in_channels, embedding_dim=cfg.embedding_dim,
                  input_size=list(cfg.input_size))
    net.body = torch.nn.Sequential(*[m for m in net.body
                                     if not isinstance(m, torch.nn.BatchNorm2d)])
    return net


@pytest.fixture(autouse=True)
def _no_batchnorm(monkeypatch):
    import seqface_dist.models

    monkeypatch.setattr(seqface_dist.models, "build_backbone", bn_free_backbone)


def _cfg(k: int, *extra: str):
    return smoke_config(None, [f"train.gradient_accumulation_steps={k}",
                               "data.identities_per_batch=8", "data.sequences_per_batch=8",
                               "loss.sequence_mode=sequence_classes", "loss.dsa_p=0.5",
                               "optim.grad_clip=2.0", *extra])


def _images(step: int, n: int = 16):
    g = torch.Generator().manual_seed(step)
    images = torch.randint(0, 256, (n, 32, 32, 1), generator=g, dtype=torch.uint8)
    t = torch.cat([torch.randint(0, N_ID, (n // 2,), generator=g),
                   N_ID + torch.randint(0, N_SEQ, (n // 2,), generator=g)])
    return images, t


def _flat(trainer) -> dict[str, torch.Tensor]:
    return {"backbone": torch.cat([p.detach().flatten() for p in trainer.module.parameters()]),
            "weight": trainer.head.weight.detach().clone(),
            "centers": trainer.head.centers.detach().clone()}


@pytest.mark.parametrize("k", [2, 4])
def test_the_whole_step_with_accumulation_equals_the_large_batch_step(k):
    """Backbone (tiny: no BatchNorm), head and centers after 3 steps, clipping on."""
    runs = {}
    for kk in (1, k):
        trainer = local_trainer(_cfg(kk), N_ID, N_SEQ)
        res = [trainer.step(*_images(step), step) for step in range(3)]
        runs[kk] = (_flat(trainer), res)
    (big, big_res), (acc, acc_res) = runs[1], runs[k]
    for key in big:
        torch.testing.assert_close(acc[key], big[key], rtol=2e-5, atol=1e-6, msg=key)
    for a, b in zip(acc_res, big_res, strict=True):
        assert a.lr == b.lr and not a.skipped
        assert a.grad_norm == pytest.approx(b.grad_norm, rel=1e-5)
        assert a.losses()["total"] == pytest.approx(b.losses()["total"], rel=1e-5)
    assert any(r.grad_norm > 2.0 for r in big_res)  # clipping did act on the same norm


def test_micro_batches_may_be_given_as_lists_and_a_bad_split_is_refused():
    trainer = local_trainer(_cfg(2), N_ID, N_SEQ)
    images, t = _images(0)
    listed = local_trainer(_cfg(2), N_ID, N_SEQ)
    trainer.step(images, t, 0)
    listed.step([images[0::2], images[1::2]], [t[0::2], t[1::2]], 0)
    for key, v in _flat(trainer).items():
        torch.testing.assert_close(_flat(listed)[key], v, msg=key)
    with pytest.raises(ValueError, match="micro-batches"):
        listed.step([images], [t], 1)
    with pytest.raises(ValueError, match="does not split"):
        trainer.step(images[:15], t[:15], 1)


def test_accumulation_config_is_validated():
    with pytest.raises(ConfigError, match="train.gradient_accumulation_steps"):
        _cfg(0)
    with pytest.raises(ConfigError, match="train.gradient_accumulation_steps: must divide"):
        _cfg(3)  # 16 samples per worker


def test_a_skipped_accumulated_step_drops_every_micro_batch():
    trainer = local_trainer(_cfg(2, "train.max_nonfinite_steps=3"), N_ID, N_SEQ)
    trainer.step(*_images(0), 0)
    before = _flat(trainer)
    images, t = _images(1)
    poisoned = images.float()
    poisoned[1] = float("nan")  # only the second micro-batch
    res = trainer.step(poisoned, t, 1)
    assert res.skipped and trainer.head._center_acc == []
    for key, v in _flat(trainer).items():
        torch.testing.assert_close(v, before[key], rtol=0, atol=0, msg=key)
    assert trainer.head.centers.grad is None and trainer.head.weight.grad is None
    assert not trainer.step(*_images(2), 2).skipped


# --- the backbone through DeepSpeed ------------------------------------------------------


def _ds_case(rank: int, world: int, k: int, stage: int) -> dict:
    import seqface_dist.models
    from seqface_dist.train.worker import deepspeed_trainer

    seqface_dist.models.build_backbone = bn_free_backbone  # a forked rank: its own copy
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    # A small lr: three steps at the smoke lr (grad norm ~180 at first) amplify fp32
    # rounding (~1e-7 after one step) to ~1e-5, which says nothing about accumulation.
    cfg = _cfg(k, f"train.zero_stage={stage}", "optim.grad_clip=0", "optim.lr=0.005")
    trainer, _ = deepspeed_trainer(cfg, 16, N_ID, N_SEQ, world=world,
                                   device=torch.device("cpu"), sequence_weight=1.0)
    assert trainer.engine.gradient_accumulation_steps() == k
    assert trainer.engine.train_micro_batch_size_per_gpu() == 16 // k
    for step in range(3):
        images, t = _images(10 * step + rank)
        assert not trainer.step(images, t, step).skipped
    out = _flat(trainer)
    out["global_steps"] = torch.tensor(trainer.engine.global_steps)
    return out


@pytest.mark.parametrize("stage", [0, 2])
def test_deepspeed_backbone_with_accumulation_equals_the_large_batch(stage):
    got = {k: run_ranks(_ds_case, 2, k, stage, timeout=300) for k in (1, 2)}
    for r in range(2):
        big, acc = got[1][r], got[2][r]
        assert "ok" in big and "ok" in acc, (big.get("trace"), acc.get("trace"))
        big, acc = big["ok"], acc["ok"]
        assert int(acc["global_steps"]) == int(big["global_steps"]) == 3  # optimizer steps
        for key in ("backbone", "weight", "centers"):
            torch.testing.assert_close(acc[key], big[key], rtol=2e-5, atol=1e-6,
                                       msg=f"rank {r} ZeRO {stage}: {key}")


# --- fp16: the head's side of the engine's loss scale -------------------------------------


class Fp16LikeEngine(LocalEngine):
    """What DeepSpeed's fp16 block does, on CPU in fp32: the backward multiplies the loss
    by the dynamic scale S; the step unscales the module's gradients, or on an overflow
    (a non-finite gradient) skips its update and halves S."""

    def __init__(self, module, optimizer, scale: float):
        super().__init__(module, optimizer)
        self.cur_scale, self._applied = scale, False
        self.overflow_next = False  # simulate an fp16 overflow in the next backward
        self.steps = 0

    def fp16_enabled(self) -> bool:
        return True

    def backward(self, loss: torch.Tensor) -> None:
        (loss * self.cur_scale).backward()
        if self.overflow_next:
            next(iter(self.module.parameters())).grad.view(-1)[0] = float("inf")
            self.overflow_next = False

    def step(self) -> None:
        self.steps += 1
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        if not all(bool(torch.isfinite(g).all()) for g in grads):
            self.cur_scale /= 2
            self._applied = False
        else:
            for g in grads:
                g.div_(self.cur_scale)
            self.optimizer.step()
            self._applied = True
        self.optimizer.zero_grad(set_to_none=True)

    def was_step_applied(self) -> bool:
        return self._applied


def _fp16_trainer(k: int, scale: float, *extra: str):
    trainer = local_trainer(_cfg(k, *extra), N_ID, N_SEQ)
    trainer.engine = Fp16LikeEngine(trainer.engine.module, trainer.engine.optimizer, scale)
    trainer.fp16 = True  # what __post_init__ reads off a DeepSpeed engine's fp16_enabled()
    return trainer


@pytest.mark.parametrize("k", [1, 2])
def test_fp16_head_gradient_is_unscaled_by_the_engines_loss_scale(k):
    plain = local_trainer(_cfg(k), N_ID, N_SEQ)
    scaled = _fp16_trainer(k, 1024.0)
    for step in range(3):
        a = plain.step(*_images(step), step)
        b = scaled.step(*_images(step), step)
        assert not b.skipped
        assert b.grad_norm == pytest.approx(a.grad_norm, rel=1e-5)  # unscaled, clipped alike
    for key, v in _flat(plain).items():
        torch.testing.assert_close(_flat(scaled)[key], v, rtol=2e-5, atol=1e-6, msg=key)


def test_fp16_overflow_skips_the_head_step_too_and_lowers_the_scale():
    trainer = _fp16_trainer(2, 1024.0, "train.max_nonfinite_steps=0")
    trainer.step(*_images(0), 0)
    before = _flat(trainer)
    momentum = [s["momentum_buffer"].clone() for s in trainer.head_opt.state.values()]
    trainer.engine.overflow_next = True
    res = trainer.step(*_images(1), 1)
    assert res.skipped and res.nonfinite == ("loss_scale_overflow",)
    assert trainer.engine.cur_scale == 512.0 and trainer.engine.steps == 2  # it saw it
    assert trainer.consecutive_skipped == 0 and trainer.loss_scale_skips == 1  # no divergence
    for key, v in _flat(trainer).items():
        torch.testing.assert_close(v, before[key], rtol=0, atol=0, msg=key)
    for a, b in zip(momentum, [s["momentum_buffer"] for s in trainer.head_opt.state.values()],
                    strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert trainer.head.weight.grad is None and trainer.head.centers.grad is None
    assert not trainer.step(*_images(2), 2).skipped  # goes on at the lower scale


def test_fp16_a_step_the_engine_skips_on_its_own_check_skips_the_head():
    trainer = _fp16_trainer(1, 1024.0)
    trainer.step(*_images(0), 0)
    before = _flat(trainer)
    trainer.engine.was_step_applied = lambda: False  # DeepSpeed found an overflow itself
    trainer.engine.optimizer.step = lambda: None
    res = trainer.step(*_images(1), 1)
    assert res.skipped and res.nonfinite == ("loss_scale_overflow",)
    torch.testing.assert_close(trainer.head.weight, before["weight"], rtol=0, atol=0)
    torch.testing.assert_close(trainer.head.centers, before["centers"], rtol=0, atol=0)


def _bf16_case(rank: int, world: int) -> dict:
    import seqface_dist.models
    from seqface_dist.train.worker import deepspeed_trainer

    seqface_dist.models.build_backbone = _tiny_with_batchnorm  # BatchNorm, on purpose
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    cfg = _cfg(2, "train.precision=bf16", "optim.grad_clip=0")
    trainer, _ = deepspeed_trainer(cfg, 16, N_ID, N_SEQ, world=world,
                                   device=torch.device("cpu"), sequence_weight=1.0)
    before = _flat(trainer)
    res = [trainer.step(*_images(step), step) for step in range(3)]
    after = _flat(trainer)
    return {"skipped": [r.skipped for r in res], "losses": [r.losses()["total"] for r in res],
            "moved": {k: not torch.equal(before[k], after[k]) for k in before},
            "dtypes": sorted({str(b.dtype) for b in trainer.module.buffers()
                              if b.is_floating_point()})}


def _tiny_with_batchnorm(cfg):
    from seqface_dist.models.tiny import TinyNet

    return TinyNet(in_channels=cfg.in_channels, embedding_dim=cfg.embedding_dim,
                   input_size=list(cfg.input_size))


def test_bf16_engine_steps_with_accumulation_and_batchnorm():
    """train.precision: bf16 through DeepSpeed (BatchNorm's running statistics follow the
    bf16 weights; the inputs take the engine's dtype), 2 micro-batches per step."""
    (r,) = run_ranks(_bf16_case, 1, timeout=300)
    assert "ok" in r, r.get("trace")
    got = r["ok"]
    assert got["skipped"] == [False] * 3
    assert all(torch.isfinite(torch.tensor(got["losses"])))
    assert all(got["moved"].values()), got["moved"]
    assert got["dtypes"] == ["torch.bfloat16"]
