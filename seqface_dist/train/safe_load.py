"""DeepSpeed's checkpoint files read without running code from them.

DeepSpeed keeps its own format (torch.save pickles: the backbone, its optimizer, the ZeRO
partitions) and its stock checkpoint engine reads them with ``torch.load(...,
weights_only=False)``: a planted payload runs in the worker. :func:`install` swaps the
engine's checkpoint engine for one that loads with ``weights_only=True``, torch's
restricted unpickler: tensors, containers and primitives, plus the few plain-data classes
DeepSpeed 0.19 writes into ZeRO 1/2 optimizer files (listed below; none runs code when
rebuilt: a loss-scaler record, an enum, a dataclass). Anything else is refused before it
is built.
"""

from __future__ import annotations

import pickle

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint file holds something other than weights and plain data."""


def allowed_globals() -> list:
    """The plain-data classes of DeepSpeed's own files (found by loading real ZeRO 0/1/2
    checkpoints in fp32 and bf16; tests/test_checkpoint_safety.py keeps the list honest)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def weights_only_load(path: str, map_location=None):
    """``torch.load`` that refuses, naming the file, anything but weights and plain data."""
    with torch.serialization.safe_globals(allowed_globals()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            first = str(e).strip().splitlines()
            why = next((line.strip() for line in first if "GLOBAL" in line), first[0] if first
                       else "")
            raise UnsafeCheckpointError(
                f"{path}: refused to load, it holds more than weights ({why}); a checkpoint "
                "file was replaced or written by something else") from None


class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, loading with ``weights_only=True``."""

    def load(self, path: str, map_location=None):
        return weights_only_load(path, map_location)


def install(engine) -> None:
    """Make ``engine`` (a DeepSpeedEngine) read its checkpoints through
    :class:`WeightsOnlyCheckpointEngine`; refuses engines configured for another format."""
    current = engine.checkpoint_engine
    if type(current) is not TorchCheckpointEngine:
        raise ValueError(f"DeepSpeed checkpoint engine {type(current).__name__}: only the "
                         "torch engine is supported (its loads are made weights-only)")
    safe = WeightsOnlyCheckpointEngine(engine._config)
    engine.checkpoint_engine = safe
