"""Every int and float config key (outside ``data``, whose keys another part owns) has a
stated range: a value outside it is refused before any work starts, naming the key, the
range and the value; the ends of each range are accepted."""

from __future__ import annotations

import dataclasses
import re
import typing

import pytest

from seqface_dist.config import Config, ConfigError, load_config

# key -> values outside its range (each refused on its own).
BAD: dict[str, list] = {
    "model.embedding_dim": [0, -4],
    "model.in_channels": [2, 0],
    "loss.m": [0, 5],
    "loss.scale": [0.0, -1.0],
    "loss.lambda_base": [-0.5],
    "loss.lambda_gamma": [-0.1],
    "loss.lambda_power": [-1.0],
    "loss.lambda_min": [-1.0],
    "loss.arcface_margin": [-0.1, 3.1416],
    "loss.cosface_margin": [-0.1, 2.0],
    "loss.sequence_weight": [1.5],
    "loss.sampled_softmax_fraction": [0.0, 1.5],
    "loss.dsa_lambda": [-0.1, 1.1],
    "loss.dsa_alpha": [0.5],
    "loss.dsa_beta": [-1.0],
    "loss.dsa_p": [-0.01, 1.5],
    "loss.dsa_normalize_scale": [-1.0],
    "loss.center_lr": [10.5],
    "loss.center_momentum": [1.0, -0.1],
    "loss.chief_weight": [-1.0],
    "loss.dsa_weight": [-0.04],
    "optim.lr": [0.0, -0.1, 11.0],
    "optim.momentum": [1.0, -0.5],
    "optim.weight_decay": [-1e-4, 1.0],
    "optim.milestones": [[-5, 10], [20, 10]],
    "optim.gamma": [0.0, 1.5],
    "optim.warmup_steps": [-1],
    "optim.max_steps": [0],
    "optim.grad_clip": [-1.0],
    "train.num_workers": [0],
    "train.cpus_per_worker": [0],
    "train.zero_stage": [3, -1],
    "train.seed": [-1, 2**32],
    "train.log_every": [0],
    "train.checkpoint_every": [0],
    "train.keep_checkpoints": [0],
    "train.max_failures": [-1],
    "train.max_nonfinite_steps": [-1],
    "train.gradient_accumulation_steps": [0, -2],
    "metrics.port": [-1, 65536],
    "eval.every_steps": [-1],
}

# key -> values at the ends of its range, all accepted.
EDGES: dict[str, list] = {
    "loss.scale": [1e-3], "loss.lambda_min": [0.0], "loss.arcface_margin": [0.0, 3.14],
    "loss.cosface_margin": [1.99], "loss.sequence_weight": [0.0, 1.0, -1.0],
    "loss.dsa_lambda": [0.0, 1.0], "loss.dsa_alpha": [1.0], "loss.dsa_p": [0.0, 1.0],
    "loss.center_lr": [0.0, 10.0, -1.0], "loss.center_momentum": [0.0, 0.999],
    "loss.dsa_weight": [0.0], "optim.lr": [1e-8, 10.0], "optim.momentum": [0.0],
    "optim.weight_decay": [0.0, 0.5], "optim.milestones": [[0, 0, 3], []],
    "optim.gamma": [1.0], "optim.max_steps": [1], "train.seed": [0, 2**32 - 1],
    "train.max_failures": [0], "train.max_nonfinite_steps": [0],
    "metrics.port": [0, 65534],  # a base port: 65534 + 1 for the default 2 workers
    "train.gradient_accumulation_steps": [1, 64],
    "eval.every_steps": [0],
}


def _numeric_keys() -> set[str]:
    """Every int, float and list-of-int key of every section but data."""
    keys = set()
    cfg = Config()
    for section in dataclasses.fields(cfg):
        if section.name == "data":
            continue
        hints = typing.get_type_hints(type(getattr(cfg, section.name)))
        keys |= {f"{section.name}.{n}" for n, tp in hints.items()
                 if tp in (int, float, list[int], list[float])}
    return keys


def test_every_numeric_key_outside_data_has_bad_values_here():
    assert _numeric_keys() - {"model.input_size"} == set(BAD)  # input_size: its own test


@pytest.mark.parametrize(("key", "value"), [(k, v) for k, vs in BAD.items() for v in vs])
def test_a_value_outside_its_range_is_refused_naming_key_range_and_value(key, value):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"{key}={value}"])
    msg = str(e.value)
    assert msg.startswith(f"{key}: must be"), msg
    assert f"(got {value!r})" in msg or f"(got {float(value)!r})" in msg, msg


def test_the_input_size_and_the_loss_weights_are_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"^model\.input_size: .*each >= 8 \(got \[4, 96\]\)"):
        load_config(None, ["model.input_size=[4, 96]"])
    with pytest.raises(ConfigError, match=r"^loss\.chief_weight: .*both 0"):
        load_config(None, ["loss.chief_weight=0", "loss.dsa_weight=0"])


@pytest.mark.parametrize(("key", "value"), [(k, v) for k, vs in EDGES.items() for v in vs])
def test_the_ends_of_each_range_are_accepted(key, value):
    section, name = key.split(".")
    cfg = load_config(None, [f"{key}={value}"])
    assert getattr(getattr(cfg, section), name) == value


def test_the_message_states_the_range_in_interval_notation():
    cases = {"optim.lr=11": "optim.lr: must be in (0, 10] (got 11.0)",
             "loss.center_momentum=1": "loss.center_momentum: must be in [0, 1) (got 1.0)",
             "train.seed=-1": "train.seed: must be in [0, 4294967295] (got -1)",
             "loss.scale=0": "loss.scale: must be > 0 (got 0.0)",
             "train.max_nonfinite_steps=-2": "train.max_nonfinite_steps: must be >= 0 (got -2)"}
    for override, want in cases.items():
        with pytest.raises(ConfigError, match=f"^{re.escape(want)}$"):
            load_config(None, [override])


def test_the_new_train_keys_default_to_skip_ten_and_check_resources():
    t = Config().train
    assert (t.max_nonfinite_steps, t.wait_for_resources) == (10, False)
