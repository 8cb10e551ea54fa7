"""``train.deepspeed_config``: the user's DeepSpeed JSON merged under seqface's keys; keys
that cannot work beside the partitioned head refused by name before any work starts;
every override listed; a real DeepSpeed engine built from the merge."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
from dist_util import run_ranks

from seqface_dist import deepspeed_json as dsc
from seqface_dist.config import ConfigError, load_config
from seqface_dist.train.smoke import smoke_config
from seqface_dist.train.worker import ds_config


def _write(tmp_path: Path, content, name: str = "ds.json") -> Path:
    p = tmp_path / name
    p.write_text(content if isinstance(content, str) else json.dumps(content))
    return p


def _cfg(path, *extra: str):
    return smoke_config(None, [f"train.deepspeed_config={path}", *extra])


def test_without_a_file_the_engine_config_is_seqfaces_own():
    cfg = smoke_config(None, ["train.zero_stage=1", "train.precision=bf16"])
    got, overridden = ds_config(cfg, 8, world=2)
    assert overridden == []
    assert got == {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1,
                   "train_batch_size": 16, "zero_optimization": {"stage": 1},
                   "bf16": {"enabled": True}, "gradient_clipping": 0.0,
                   "zero_allow_untested_optimizer": True, "steps_per_print": 1 << 30,
                   "wall_clock_breakdown": False}
    assert "train_batch_size" not in ds_config(cfg, 8)[0]  # no world: DeepSpeed derives it


def test_user_keys_are_kept_and_seqfaces_win_each_listed(tmp_path):
    user = {"zero_optimization": {"stage": 2, "reduce_bucket_size": 1234,
                                  "overlap_comm": False},
            "train_micro_batch_size_per_gpu": 99, "gradient_accumulation_steps": 1,
            "train_batch_size": 7, "bf16": {"enabled": True}, "steps_per_print": 5,
            "zero_allow_untested_optimizer": False, "communication_data_type": "fp32",
            "fp16": {"enabled": False, "initial_scale_power": 12}}
    cfg = _cfg(_write(tmp_path, user), "train.zero_stage=1",
               "train.gradient_accumulation_steps=2")
    got, overridden = ds_config(cfg, 16, world=2)
    assert got["zero_optimization"] == {"stage": 1, "reduce_bucket_size": 1234,
                                        "overlap_comm": False}
    assert got["steps_per_print"] == 5 and got["communication_data_type"] == "fp32"
    assert got["fp16"] == {"enabled": False, "initial_scale_power": 12}
    assert (got["train_micro_batch_size_per_gpu"], got["gradient_accumulation_steps"],
            got["train_batch_size"]) == (16, 2, 64)
    assert got["bf16"] == {"enabled": False} and got["zero_allow_untested_optimizer"] is True
    assert overridden == [
        "train_micro_batch_size_per_gpu (user 99 -> 16)",
        "gradient_accumulation_steps (user 1 -> 2)",
        "train_batch_size (user 7 -> 64)",
        "zero_optimization.stage (user 2 -> 1)",
        "bf16.enabled (user True -> False)",
        "zero_allow_untested_optimizer (user False -> True)",
    ]
    assert json.loads((tmp_path / "ds.json").read_text()) == user  # the file is untouched


def test_fp16_takes_the_users_loss_scaler_settings(tmp_path):
    path = _write(tmp_path, {"fp16": {"initial_scale_power": 12, "loss_scale_window": 200,
                                      "hysteresis": 2, "min_loss_scale": 1}})
    cfg = _cfg(path, "train.precision=fp16", "train.use_gpu=true", "train.zero_stage=1")
    got = ds_config(cfg, 8)[0]
    assert got["fp16"] == {"enabled": True, "initial_scale_power": 12,
                           "loss_scale_window": 200, "hysteresis": 2, "min_loss_scale": 1}
    assert got["bf16"] == {"enabled": False}
    plain = ds_config(smoke_config(None, ["train.precision=fp16", "train.use_gpu=true",
                                          "train.zero_stage=1"]), 8)[0]
    assert plain["fp16"] == {"enabled": True}  # loss_scale 0 (default): dynamic


@pytest.mark.parametrize("user,key", [
    ({"optimizer": {"type": "Adam", "params": {"lr": 1e-3}}}, "optimizer"),
    ({"scheduler": {"type": "WarmupLR"}}, "scheduler"),
    ({"zero_optimization": {"stage": 3}}, "zero_optimization.stage"),
    ({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}},
     "zero_optimization.offload_optimizer"),
    ({"zero_optimization": {"offload_param": {"device": "nvme"}}},
     "zero_optimization.offload_param"),
    ({"gradient_clipping": 1.0}, "gradient_clipping"),
    ({"amp": {"enabled": True}}, "amp"),
    ({"torch_autocast": {"enabled": True}}, "torch_autocast"),
    ({"nebula": {"enabled": True}}, "nebula"),
    ({"checkpoint": {"writer": {"type": "fast"}}}, "checkpoint.writer"),
])
def test_keys_that_cannot_work_with_the_partitioned_head_are_refused_by_name(tmp_path, user,
                                                                               key):
    with pytest.raises(ConfigError, match=rf"train\.deepspeed_config: .*{key}"):
        _cfg(_write(tmp_path, user))


def test_harmless_forms_of_those_keys_pass(tmp_path):
    user = {"gradient_clipping": 0.0, "zero_optimization": {
        "stage": 2, "offload_optimizer": {"device": "none"}}}
    _cfg(_write(tmp_path, user))


def test_a_missing_unreadable_or_non_object_file_is_refused_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="train.deepspeed_config: .*cannot read"):
        _cfg(tmp_path / "nowhere.json")
    with pytest.raises(ConfigError, match="train.deepspeed_config: .*not valid JSON"):
        _cfg(_write(tmp_path, "{'zero': 1}"))
    with pytest.raises(ConfigError, match="top level must be a JSON object"):
        _cfg(_write(tmp_path, [1, 2]))


def test_a_relative_path_is_made_absolute_for_the_workers(tmp_path, monkeypatch):
    _write(tmp_path, {"steps_per_print": 3})
    monkeypatch.chdir(tmp_path)
    cfg = _cfg("ds.json")
    assert cfg.train.deepspeed_config == str(tmp_path / "ds.json")
    y = tmp_path / "run.yaml"
    y.write_text("train:\n  deepspeed_config: ds.json\n")
    assert load_config(y).train.deepspeed_config == str(tmp_path / "ds.json")


def test_merge_never_unpickles_and_reads_json_only(tmp_path):
    import pickle

    p = tmp_path / "ds.json"
    p.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(dsc.DeepSpeedConfigError, match="not valid JSON"):
        dsc.read_json(str(p))


def _engine_from_user_file(rank: int, world: int, path: str) -> dict:
    from seqface_dist.train.worker import deepspeed_trainer

    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logging.getLogger("seqface").addHandler(Keep())
    logging.getLogger("seqface").setLevel(logging.INFO)
    cfg = _cfg(path, "train.zero_stage=1", "train.gradient_accumulation_steps=2",
               "data.identities_per_batch=4", "data.sequences_per_batch=4")
    trainer, _ = deepspeed_trainer(cfg, 8, 6, 4, world=world, device=torch.device("cpu"),
                                   sequence_weight=1.0)
    e = trainer.engine
    g = torch.Generator().manual_seed(rank)
    images = torch.randint(0, 256, (8, 32, 32, 1), generator=g, dtype=torch.uint8)
    res = trainer.step(images, torch.tensor([0, 1, 2, 5, 6, 7, 9, 6]), 0)
    return {"stage": e.zero_optimization_stage(), "micro": e.train_micro_batch_size_per_gpu(),
            "gas": e.gradient_accumulation_steps(), "batch": e.train_batch_size(),
            "bucket": e.zero_reduce_bucket_size(), "steps_per_print": e.steps_per_print(),
            "log": records, "skipped": res.skipped, "global_steps": e.global_steps}


def test_a_real_engine_runs_from_the_merged_config_and_logs_the_overrides(tmp_path):
    path = _write(tmp_path, {"zero_optimization": {"stage": 2, "reduce_bucket_size": 4096},
                             "train_micro_batch_size_per_gpu": 32, "steps_per_print": 77})
    (r,) = run_ranks(_engine_from_user_file, 1, str(path), timeout=300)
    assert "ok" in r, r.get("trace")
    got = r["ok"]
    assert (got["stage"], got["micro"], got["gas"], got["batch"]) == (1, 4, 2, 8)
    assert got["bucket"] == 4096 and got["steps_per_print"] == 77
    assert not got["skipped"] and got["global_steps"] == 1
    line = [m for m in got["log"] if "deepspeed_config" in m]
    assert line == ["[seqface] deepspeed_config: overridden by seqface: "
                    "train_micro_batch_size_per_gpu (user 32 -> 4), "
                    "zero_optimization.stage (user 2 -> 1)"]


def test_precision_fp16_is_accepted_on_gpus_and_refused_on_cpus():
    assert smoke_config(None, ["train.precision=fp16", "train.use_gpu=true",
                               "train.zero_stage=2"])
    with pytest.raises(ConfigError, match="train.precision: fp16 needs train.use_gpu"):
        smoke_config(None, ["train.precision=fp16", "train.zero_stage=1"])
    # ZeRO 0: DeepSpeed 0.19 unscales gradients it never scaled (PR #8393).
    with pytest.raises(ConfigError, match="train.precision: fp16 needs train.zero_stage 1 or 2"):
        smoke_config(None, ["train.precision=fp16", "train.use_gpu=true"])
    with pytest.raises(ConfigError, match="train.precision"):
        smoke_config(None, ["train.precision=fp8"])
