"""Run checkpoints as an attacker and an unlucky user meet them, without Ray: real
DeepSpeed engines on real gloo ranks write them; planted pickles, cut files and changed
bytes meet the loader; nothing runs and nothing half-written loads."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from dist_util import run_ranks

from seqface_dist.train.checkpoint import (
    STATE_FILE,
    CheckpointError,
    RunState,
    check_complete,
    list_files,
    load_checkpoint,
    write_rank_files,
)
from seqface_dist.train.smoke import smoke_config

N_ID, N_SEQ = 6, 4


class Payload:
    """What an attacker plants: unpickling it runs a shell command that leaves a marker."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _cfg(stage: int, seed: int = 0):
    return smoke_config(None, [f"train.zero_stage={stage}", "optim.grad_clip=0",
                               "loss.sequence_mode=sequence_classes", f"train.seed={seed}",
                               "data.identities_per_batch=4", "data.sequences_per_batch=4"])


def _batch(step: int, rank: int):
    g = torch.Generator().manual_seed(100 * step + rank)
    images = torch.randint(0, 256, (8, 32, 32, 1), generator=g, dtype=torch.uint8)
    return images, torch.tensor([0, 1, 2, 5, 6, 7, 9, 6])


def _trainer(stage: int, world: int, seed: int = 0):
    from seqface_dist.train.worker import deepspeed_trainer

    rank = torch.distributed.get_rank()
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    cfg = _cfg(stage, seed)
    return deepspeed_trainer(cfg, 8, N_ID, N_SEQ, world=world, device=torch.device("cpu"),
                             sequence_weight=1.0)


def _flat(trainer) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten() for p in trainer.module.parameters()] +
                     [trainer.head.weight.detach().flatten()])


def _save(trainer, spec, out: Path, rank: int, world: int, stage: int) -> None:
    """What the worker does, minus Ray: every rank writes into its own folder (listing only
    its files, never another rank's half-written ones), "uploads" it into ``out``, then rank
    0 commits the merged listing."""
    import torch.distributed as dist

    own = out.parent / f"{out.name}-rank{rank}"
    files = write_rank_files(own, engine=trainer.engine, head=trainer.head,
                             head_optimizer=trainer.head_opt, rank=rank)
    shutil.copytree(own, out, dirs_exist_ok=True)
    listings: list = [None] * world
    dist.all_gather_object(listings, files)
    if rank == 0:
        merged = {k: v for f in listings for k, v in f.items()}
        state = RunState(step=2, world_size=world, zero_stage=stage,
                         head={"spec": spec, "layout": {}},
                         config=_cfg(stage).to_dict(), files=merged)
        (out / STATE_FILE).write_bytes(state.to_json())
    dist.barrier()


def _train_save_continue(rank: int, world: int, stage: int, out: str):
    trainer, spec = _trainer(stage, world)
    for step in range(2):
        trainer.step(*_batch(step, rank), step)
    _save(trainer, spec, Path(out), rank, world, stage)
    trainer.step(*_batch(2, rank), 2)
    return _flat(trainer)


def _load_continue(rank: int, world: int, stage: int, out: str):
    trainer, _ = _trainer(stage, world, seed=7)  # another init: the load must replace it
    state = load_checkpoint(out, engine=trainer.engine, head=trainer.head,
                            head_optimizer=trainer.head_opt, rank=rank, world_size=world)
    trainer.step(*_batch(2, rank), state.step)
    return _flat(trainer)


@pytest.mark.slow  # 2 DeepSpeed ranks per ZeRO stage, twice: ~4 s each
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_checkpoints_load_weights_only_and_continue_exactly(stage, tmp_path):
    # Real ZeRO 0/1/2 files through the weights-only loader: the run continues as if
    # never stopped (weights, momentum, ZeRO partitions, head rows and RNG all restored).
    out = tmp_path / "ckpt"
    cont = run_ranks(_train_save_continue, 2, stage, str(out), timeout=300)
    again = run_ranks(_load_continue, 2, stage, str(out), timeout=300)
    for r in range(2):
        assert "ok" in cont[r] and "ok" in again[r], (cont[r], again[r])
        torch.testing.assert_close(again[r]["ok"], cont[r]["ok"], rtol=0, atol=0)
    assert check_complete(out).zero_stage == stage


def _plant_and_load(rank: int, world: int, ckpt: str, marker: str):
    """For each file of the checkpoint in turn: plant a payload, list it as the file's
    true size and hash (an attacker can rewrite state.json too), try to resume."""
    src = Path(ckpt)
    results = {}
    for rel in sorted(list_files(src)):
        if rel == STATE_FILE:
            continue
        work = src.parent / "work"
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(src, work)
        torch.save({"module": Payload(Path(marker))}, work / rel)
        state = json.loads((work / STATE_FILE).read_text())
        state["files"] = {k: v for k, v in list_files(work).items() if k != STATE_FILE}
        (work / STATE_FILE).write_text(json.dumps(state))
        trainer, _ = _trainer(1, world)
        try:
            load_checkpoint(work, engine=trainer.engine, head=trainer.head,
                            head_optimizer=trainer.head_opt, rank=rank, world_size=world)
            results[rel] = "loaded"
        except Exception as e:  # noqa: BLE001 - the test reports which error each got
            results[rel] = f"{type(e).__name__}: {e}"
        results[rel + " ran"] = Path(marker).exists()
    return results


def test_planted_pickles_in_every_checkpoint_file_never_run(tmp_path):
    out = tmp_path / "ckpt"
    assert "ok" in run_ranks(_train_save_continue, 1, 1, str(out), timeout=300)[0]
    marker = tmp_path / "pwned"
    res = run_ranks(_plant_and_load, 1, str(out), str(marker), timeout=300)[0]["ok"]
    planted = [k for k in res if not k.endswith(" ran")]
    assert any(k.endswith("model_states.pt") for k in planted)
    assert any("optim_states" in k for k in planted)  # ZeRO 1's partition
    assert any(k.startswith("head-rank") for k in planted)
    assert any(k.startswith("rng-rank") for k in planted)
    for rel in planted:
        assert res[rel + " ran"] is False, rel
        # DeepSpeed's recovery script (engine/zero_to_fp32.py) is copied, never read.
        assert res[rel] != "loaded" or rel.endswith(".py"), rel
    assert "refused to load" in res[next(k for k in planted if k.endswith(".pt"))]
    assert not marker.exists()
    # The control: the stock (weights_only=False) loader would have run it.
    evil = tmp_path / "evil.pt"
    torch.save({"module": Payload(marker)}, evil)
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    TorchCheckpointEngine().load(str(evil))
    assert marker.exists()


def test_a_changed_or_cut_file_is_refused_by_name(tmp_path):
    out = tmp_path / "ckpt"
    assert "ok" in run_ranks(_train_save_continue, 1, 0, str(out), timeout=300)[0]
    check_complete(out)
    engine_file = next(p for p in out.rglob("*.pt"))
    data = engine_file.read_bytes()
    engine_file.write_bytes(data[: len(data) // 2])  # a full disk cut it
    with pytest.raises(CheckpointError, match=rf"{engine_file.name} has .* bytes.*cut"):
        check_complete(out)
    engine_file.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, other bytes
    with pytest.raises(CheckpointError, match=rf"{engine_file.name} does not match its sha256"):
        check_complete(out)
    engine_file.write_bytes(data)
    (out / STATE_FILE).write_text((out / STATE_FILE).read_text()[:50])
    with pytest.raises(CheckpointError, match="not JSON"):
        check_complete(out)
    state = json.loads(RunState().to_json())
    state["surprise"] = 1
    (out / STATE_FILE).write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match="unknown keys"):
        check_complete(out)


def _backbone_state(trainer) -> dict:
    """Parameters and whole momentum (gathered over the ranks: a collective)."""
    from seqface_dist.train.checkpoint import gather_backbone_momentum

    return {"params": {n: p.detach().clone() for n, p in trainer.module.named_parameters()},
            "momentum": gather_backbone_momentum(trainer.engine)}


def _train_save_zero(rank: int, world: int, stage: int, out: str):
    trainer, spec = _trainer(stage, world)
    losses = [float(trainer.step(*_batch(step, rank), step).out.loss) for step in range(3)]
    saved = _backbone_state(trainer)
    _save(trainer, spec, Path(out), rank, world, stage)
    return dict(saved, losses=losses)


def _load_zero(rank: int, world: int, stage: int, out: str):
    trainer, _ = _trainer(stage, world, seed=7)
    state = load_checkpoint(out, engine=trainer.engine, head=trainer.head,
                            head_optimizer=trainer.head_opt, rank=rank, world_size=world)
    loaded = _backbone_state(trainer)
    loss = float(trainer.step(*_batch(3, rank), state.step).out.loss)
    return dict(loaded, loss=loss)


@pytest.mark.slow  # DeepSpeed groups saved and resumed on another size
@pytest.mark.parametrize("stage,saved_on,resumed_on", [(1, 2, 1), (1, 1, 2), (2, 2, 1),
                                                       (2, 1, 2)])
def test_zero_resume_on_another_world_size_keeps_the_momentum(stage, saved_on, resumed_on,
                                                              tmp_path):
    # ZeRO 1/2 split the backbone's momentum per rank; the checkpoint also holds it whole,
    # so a resume on another number of ranks re-splits it: after the load the gathered
    # parameters and momentum equal the saved ones, and the next step trains on.
    out = tmp_path / "ckpt"
    saved = run_ranks(_train_save_zero, saved_on, stage, str(out), timeout=300)
    loaded = run_ranks(_load_zero, resumed_on, stage, str(out), timeout=300)
    assert all("ok" in r for r in saved + loaded), (saved, loaded)
    want, got = saved[0]["ok"], loaded[0]["ok"]
    assert want["momentum"] is not None and set(got["momentum"]) == set(want["momentum"])
    for name, m in want["momentum"].items():
        assert m.abs().sum() > 0, name  # three steps made a momentum to keep
        torch.testing.assert_close(got["momentum"][name], m, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(got["params"][name], want["params"][name], rtol=0, atol=0)
    losses = want["losses"]
    assert torch.isfinite(torch.tensor(got["loss"]))
    assert got["loss"] < 1.5 * max(losses), (got["loss"], losses)  # trains on, no restart jolt
