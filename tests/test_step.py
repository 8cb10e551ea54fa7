"""The one training step (`seqface_dist.train.step`): what it does in one process; that a
non-finite step is skipped and changes nothing, and that a diverged run stops with an
error that says what to change, its model still finite."""

from __future__ import annotations

import pytest
import torch

from seqface_dist.data.normalize import normalize
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


def _state(trainer) -> list[torch.Tensor]:
    """Every tensor a step may change: backbone weights and buffers (BatchNorm statistics),
    the head's rows, and both optimizers' momentum."""
    t = [v.detach().clone() for v in trainer.module.state_dict().values()]
    t += [trainer.head.weight.detach().clone(), trainer.head.centers.detach().clone()]
    for opt in (trainer.backbone_opt, trainer.head_opt):
        t += [s["momentum_buffer"].clone() for s in opt.state.values() if "momentum_buffer" in s]
    return t


def _poisoned(seed: int):
    """A batch whose pixels are NaN (float, which the normalisation passes through)."""
    images, t = _batch(seed)
    return torch.full(images.shape, float("nan")), t


def test_a_non_finite_loss_skips_the_step_leaves_everything_as_it_was_and_counts_it():
    cfg = smoke_config()
    trainer = local_trainer(cfg, N_ID, N_SEQ)
    images, t = _batch(0)
    assert not trainer.step(images, t, 0).skipped
    before = _state(trainer)
    res = trainer.step(*_poisoned(1), 1)
    assert res.skipped and res.skipped_steps == 1 and trainer.consecutive_skipped == 1
    assert "chief" in res.nonfinite and res.grad_norm != res.grad_norm
    after = _state(trainer)
    assert len(after) == len(before) > 2 + len(list(trainer.module.parameters()))
    for a, b in zip(before, after, strict=True):
        assert torch.equal(a, b)
    # Nothing of the bad step is left to leak into the next one.
    assert all(p.grad is None for p in trainer.module.parameters())
    assert trainer.head.weight.grad is None and trainer.head.centers.grad is None


def test_a_non_finite_gradient_with_a_finite_loss_skips_the_step():
    # lr at its allowed maximum: by the third step the loss is ~1e27, finite, and its
    # gradient overflows; applying it would have made every weight inf.
    cfg = smoke_config(None, ["optim.lr=10", "optim.momentum=0"])
    trainer = local_trainer(cfg, N_ID, N_SEQ)
    results = []
    for step in range(3):
        before = _state(trainer)
        results.append(trainer.step(*_batch(step), step))
    res = results[-1]
    assert [r.skipped for r in results] == [False, False, True]
    assert res.nonfinite == ("grad_norm",) and torch.isfinite(res.out.loss)
    for a, b in zip(before, _state(trainer), strict=True):
        assert torch.equal(a, b)


def test_after_one_bad_batch_training_goes_on_as_if_it_had_not_come():
    """The skipped step uses up its step number (schedules follow the step number)."""
    cfg = smoke_config(None, ["optim.warmup_steps=6"])
    hit, clean = local_trainer(cfg, N_ID, N_SEQ), local_trainer(cfg, N_ID, N_SEQ)
    for step, seed in ((0, 0), (1, None), (2, 2), (3, 3)):
        res = hit.step(*(_poisoned(9) if seed is None else _batch(seed)), step)
        assert res.skipped == (seed is None)
        if seed is not None:
            ref = clean.step(*_batch(seed), step)
            assert res.lr == ref.lr and not ref.skipped
            torch.testing.assert_close(res.out.loss, ref.out.loss)
    assert res.skipped_steps == 1 and hit.consecutive_skipped == 0
    for a, b in zip(_state(hit), _state(clean), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("limit", [0, 3])
def test_more_non_finite_steps_in_a_row_than_allowed_stop_the_run_naming_what_to_change(limit):
    cfg = smoke_config(None, [f"train.max_nonfinite_steps={limit}"])
    trainer = local_trainer(cfg, N_ID, N_SEQ)
    trainer.step(*_batch(0), 0)
    before = _state(trainer)
    for step in range(1, limit + 1):
        assert trainer.step(*_poisoned(step), step).skipped
    with pytest.raises(NonFiniteLossError, match=(
            rf"step {limit + 1}: not finite: chief, dsa_pull, dsa_push \(loss nan.*"
            rf"{limit + 1} skipped in all.*last good state.*optim\.lr \(now 0\.05\).*"
            r"optim\.warmup_steps \(now 0\).*optim\.grad_clip")):
        trainer.step(*_poisoned(limit + 1), limit + 1)
    for a, b in zip(before, _state(trainer), strict=True):
        assert torch.equal(a, b)


def test_a_good_step_resets_the_run_of_skipped_steps():
    cfg = smoke_config(None, ["train.max_nonfinite_steps=1"])
    trainer = local_trainer(cfg, N_ID, N_SEQ)
    for step in range(6):  # bad, good, bad, good, ...: never two in a row
        res = trainer.step(*(_poisoned(step) if step % 2 == 0 else _batch(step)), step)
    assert res.skipped_steps == 3 and not res.skipped


def test_a_diverged_run_stops_early_at_its_last_good_state_and_its_export_is_finite(tmp_path):
    from safetensors.torch import load_file

    from seqface_dist.train.export import export_embedding

    # The run: an lr the net cannot take, on and on. Now it stops by itself.
    cfg = smoke_config(None, ["optim.lr=2", "train.max_nonfinite_steps=4"])
    trainer = local_trainer(cfg, N_ID, N_SEQ)
    good = None
    with pytest.raises(NonFiniteLossError, match="5 in a row, train.max_nonfinite_steps is 4"):
        for step in range(50):
            if not trainer.step(*_batch(step), step).skipped:
                good = _state(trainer)
    assert good is not None and step < 49  # it trained, then stopped on its own
    for a, b in zip(good, _state(trainer), strict=True):
        assert torch.equal(a, b)
    export_embedding(trainer.module, cfg.model, tmp_path / "export")
    exported = load_file(str(tmp_path / "export" / "backbone.safetensors"))
    assert exported and all(torch.isfinite(v.float()).all() for v in exported.values())
    for k, v in trainer.module.state_dict().items():
        assert torch.equal(exported[k], v), k


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
