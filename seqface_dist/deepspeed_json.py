"""``train.deepspeed_config``: the user's own DeepSpeed JSON, merged under seqface's keys.

Torch-free (the config's validation reads it). The file is read with ``json`` (never
pickle), from a local path or ``s3://`` (pyarrow's filesystem, like the checkpoints).

What the user's file may hold is everything DeepSpeed tunes on its own (ZeRO bucket
sizes, ``overlap_comm``, ``contiguous_gradients``, ``communication_data_type``, the fp16
loss scaler's ``initial_scale_power`` / ``loss_scale_window`` / ``hysteresis`` /
``min_loss_scale``, ``steps_per_print``, ``wall_clock_breakdown``, the flops profiler,
...). Three kinds of keys are not the user's:

* **seqface's** (:data:`OWNED`): set from the seqface config every run; a user value that
  differs is *overridden* and the worker logs each one (``deepspeed_config: overridden by
  seqface: zero_optimization.stage (user 1 -> 0), ...``): the batch sizes (``data.*``,
  ``train.gradient_accumulation_steps``, the number of workers), ``zero_optimization.stage``
  (``train.zero_stage``), ``bf16.enabled`` / ``fp16.enabled`` (``train.precision``),
  ``zero_allow_untested_optimizer`` (the backbone's optimizer is torch's SGD).
* **refused** (:func:`refusals`): keys that cannot work beside the row-partitioned head,
  which lives outside the engine with its own optimizer and schedule; a
  :class:`~seqface_dist.config.ConfigError` names them before any work starts:
  ``optimizer`` and ``scheduler`` (the backbone's SGD and the lr schedule over backbone and
  head are built from ``optim.*``; a DeepSpeed scheduler would move the backbone's lr
  only), ``gradient_clipping`` other than 0 (the clip norm is taken over backbone *and*
  head: ``optim.grad_clip``), ZeRO stage 3 (it partitions the backbone's parameters: the
  step's global gradient norm, skipped steps and our checkpoints read them whole),
  ``zero_optimization.offload_optimizer`` / ``offload_param`` (DeepSpeed's offload needs its
  own CPU optimizers, not the torch SGD passed in; ``offload_param`` is stage 3 only),
  ``amp`` and ``torch_autocast`` (the precision is ``train.precision``), ``nebula`` and a
  non-torch ``checkpoint.writer`` (checkpoints must be DeepSpeed's torch engine: they
  are read back weights-only, ``train/safe_load.py``).
"""

from __future__ import annotations

import json
from typing import Any

# Top-level keys refused, and why (what to set instead).
REFUSED_TOP = {
    "optimizer": "the backbone's optimizer is seqface's (torch SGD from optim.lr, "
                 "optim.momentum, optim.weight_decay), and the head has its own beside it",
    "scheduler": "the lr schedule is seqface's (optim.schedule, optim.warmup_steps, "
                 "optim.milestones) and moves backbone and head together",
    "amp": "the precision is train.precision (fp32, bf16 or fp16)",
    "torch_autocast": "the precision is train.precision (fp32, bf16 or fp16)",
    "nebula": "checkpoints must use DeepSpeed's torch engine (read back weights-only)",
}
REFUSED_ZERO = {
    "offload_optimizer": "ZeRO-Offload needs DeepSpeed's own CPU optimizers, not the torch "
                         "SGD seqface passes in",
    "offload_param": "parameter offload is ZeRO stage 3 only, which seqface refuses",
}


class DeepSpeedConfigError(ValueError):
    """The user's DeepSpeed JSON cannot be read, or holds a key seqface cannot run with."""


def read_json(uri: str) -> dict[str, Any]:
    """The JSON object at a local path or ``s3://`` URI (json only, never pickle)."""
    try:
        if "://" in uri:
            import pyarrow.fs as pafs

            fs, path = pafs.FileSystem.from_uri(uri)
            with fs.open_input_stream(path) as f:
                data = f.read()
        else:
            with open(uri, "rb") as f:
                data = f.read()
    except (OSError, ValueError) as e:  # pyarrow raises OSError subclasses / ArrowInvalid
        raise DeepSpeedConfigError(f"{uri}: cannot read it ({e})") from None
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise DeepSpeedConfigError(f"{uri}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise DeepSpeedConfigError(f"{uri}: the top level must be a JSON object, got "
                                   f"{type(raw).__name__}")
    return raw


def refusals(user: dict[str, Any]) -> list[str]:
    """Every key of ``user`` seqface cannot run with, as 'key: why' (empty: none)."""
    out = [f"{k}: {why}" for k, why in REFUSED_TOP.items() if k in user]
    clip = user.get("gradient_clipping", 0)
    if clip not in (0, 0.0, None):
        out.append(f"gradient_clipping: must be 0 (got {clip!r}); clipping covers backbone "
                   "and head together: set optim.grad_clip instead")
    zero = user.get("zero_optimization", {})
    if zero is not None and not isinstance(zero, dict):
        out.append(f"zero_optimization: must be an object (got {zero!r})")
        zero = {}
    zero = zero or {}
    stage = zero.get("stage")
    if stage is not None and stage not in (0, 1, 2):
        out.append(f"zero_optimization.stage: {stage!r} cannot work with the partitioned head "
                   "(stage 3 partitions the backbone's parameters; seqface needs them whole "
                   "for the global gradient norm and its checkpoints): use train.zero_stage "
                   "0, 1 or 2")
    for k, why in REFUSED_ZERO.items():
        v = zero.get(k)
        if v and not (isinstance(v, dict) and v.get("device", "cpu") in ("none", None)):
            out.append(f"zero_optimization.{k}: {why}")
    checkpoint = user.get("checkpoint")
    if isinstance(checkpoint, dict) and checkpoint.get("writer"):
        out.append("checkpoint.writer: checkpoints must use DeepSpeed's torch engine (read "
                   "back weights-only)")
    return out


def owned(*, micro_batch: int, accumulation: int, world: int, zero_stage: int,
          precision: str) -> dict[str, Any]:
    """seqface's own keys, flattened ('a.b' -> value): these always win."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro_batch * accumulation * world,
        "zero_optimization.stage": zero_stage,
        "bf16.enabled": precision == "bf16",
        "fp16.enabled": precision == "fp16",
        # Clipping covers backbone *and* head: done in train/step.py, never by the engine.
        "gradient_clipping": 0.0,
        # ZeRO 1/2 accept only DeepSpeed's own optimizers unless told: ours is torch's SGD
        # with momentum (the reference solver), which ZeRO partitions like any other.
        "zero_allow_untested_optimizer": True,
    }


# Defaults seqface sets that the user's file may change (quiet engine logs).
DEFAULTS = {"steps_per_print": 1 << 30, "wall_clock_breakdown": False}


def merge(user: dict[str, Any] | None, ours: dict[str, Any]
          ) -> tuple[dict[str, Any], list[str]]:
    """(the merged DeepSpeed config, every user key seqface overrode as 'key (user a -> b)').

    ``ours`` is :func:`owned`'s flattened dict; the user's file is taken whole, then ours
    written over it key by key (nested blocks merged, never replaced: a user's
    ``fp16.initial_scale_power`` stays beside seqface's ``fp16.enabled``). The fp16 block is
    left out when fp16 is off and the user gave none.
    """
    merged = json.loads(json.dumps({**DEFAULTS, **(user or {})}))  # a deep copy
    overridden = []
    for dotted, value in ours.items():
        *parents, leaf = dotted.split(".")
        node = merged
        for p in parents:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        if leaf in node and node[leaf] != value:
            overridden.append(f"{dotted} (user {node[leaf]!r} -> {value!r})")
        node[leaf] = value
    if not merged.get("fp16", {}).get("enabled") and "fp16" not in (user or {}):
        merged.pop("fp16", None)
    return merged, overridden
