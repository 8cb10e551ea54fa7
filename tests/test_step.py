"""The one training step (`seqface_dist.train.step`): what it does in one process, and
that a diverged run stops with an error that says what to change."""

from __future__ import annotations

import pytest
import torch

from seqface_dist.data.loader import normalize
from seqface_dist.models import build_backbone
from seqface_dist.parallel import Comm, HeadSpec, PartitionedHead
from seqface_dist.train.schedule import lr_multiplier
from seqface_dist.train.smoke import smoke_config
from seqface_dist.train.step import NonFiniteLossError, local_trainer

N_ID, N_SEQ = 6, 4


def _batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (8, 32, 32, 1), generator=g, dtype=torch.uint8)
    return images, torch.tensor([0, 1, 2, 5, 6, 7, 9, 6])


def test_step_is_backbone_head_backward_and_both_optimizers_with_the_schedule():
    cfg = smoke_config(None, ["optim.warmup_steps=4", "optim.grad_clip=0",
                              "loss.sequence_mode=sequence_classes"])
    trainer = local_trainer(cfg, N_ID, N_SEQ)
    # The same step written out by hand, from the same initial state.
    torch.manual_seed(cfg.train.seed)
    net = build_backbone(cfg.model)
    head = PartitionedHead(HeadSpec(N_ID, N_SEQ, cfg.model.embedding_dim, seed=cfg.train.seed),
                           cfg.loss, Comm())
    o = cfg.optim
    opt = torch.optim.SGD(net.parameters(), lr=o.lr, momentum=o.momentum,
                          weight_decay=o.weight_decay)
    head_opt = head.make_optimizer(lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    for step in range(3):
        images, t = _batch(step)
        res = trainer.step(images, t, step)
        factor = lr_multiplier(step, o)
        for optim in (opt, head_opt):
            for group, base in zip(optim.param_groups, [o.lr, o.lr], strict=False):
                group["lr"] = base * factor
        out = head(net(normalize(images)), t, step=step)
        out.loss.backward()
        opt.step(), head_opt.step()
        opt.zero_grad(set_to_none=True), head_opt.zero_grad(set_to_none=True)
        assert res.lr == pytest.approx(o.lr * factor) and factor < 1  # in the warm-up
        torch.testing.assert_close(res.out.loss, out.loss.detach())
    for a, b in zip(trainer.module.parameters(), net.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(trainer.head.weight, head.weight)
    torch.testing.assert_close(trainer.head.centers, head.centers)


def test_a_non_finite_loss_stops_the_run_naming_what_to_change():
    cfg = smoke_config()
    trainer = local_trainer(cfg, N_ID, N_SEQ)
    images, t = _batch(0)
    trainer.step(images, t, 0)
    with torch.no_grad():
        trainer.head.weight[0] = float("nan")
    before = [p.detach().clone() for p in trainer.module.parameters()]
    with pytest.raises(NonFiniteLossError, match=r"step 1: the loss is nan.*optim\.lr"):
        trainer.step(images, t, 1)
    # Nothing was updated by the diverged step.
    for a, b in zip(before, trainer.module.parameters(), strict=True):
        assert torch.equal(a, b)


def test_clipping_bounds_the_global_norm_over_backbone_and_head():
    cfg = smoke_config(None, ["optim.grad_clip=0.001"])
    trainer = local_trainer(cfg, N_ID, N_SEQ)
    images, t = _batch(1)
    before = [p.detach().clone() for p in trainer.module.parameters()]
    res = trainer.step(images, t, 0)
    assert res.grad_norm > 0.001  # the norm before clipping is reported
    # SGD's first step moves by lr * (clipped grad + weight decay): tiny with the clip.
    moved = sum(float((a - b.detach()).square().sum()) for a, b in
                zip(before, trainer.module.parameters(), strict=True)) ** 0.5
    wd = sum(float(b.square().sum()) for b in before) ** 0.5 * cfg.optim.weight_decay
    assert moved <= cfg.optim.lr * (0.001 + wd) * 1.01 + 1e-7
