"""``train.init_from``: a new run (step 0, fresh optimizers, fresh head) from a backbone's
weights. Nothing read here is unpickled.

What it reads, by what ``init_from`` names:

* a run folder (its newest committed checkpoint), or a run checkpoint (a folder with
  ``state.json``): the engine's weights, read
  weights-only (``train/export.py: backbone_from``), after the commit's sizes and hashes
  are checked;
* an export (a folder with ``model.json`` + ``backbone.safetensors``, or that
  ``.safetensors`` file): safetensors;
* a ``.safetensors`` file of our backbone's state dict;
* an insightface ``arcface_torch`` iresnet ``.pth``/``.pt`` (``torch.save(state_dict)``):
  read with ``torch.load(weights_only=True)``, torch's restricted unpickler, which
  builds tensors, containers and primitives only and refuses any other global (so no
  code runs: tests/test_init_from.py plants one). Its key names are mapped onto ours by
  :data:`ARCFACE_RULES` (4 rules: the stem's three layers, the stage names; every other
  name is shared), a ``module.`` prefix (DDP) is dropped.

Every key and shape must match this run's backbone (``model.*``): otherwise an
:class:`InitFromError` lists the missing, unexpected and shape-mismatched keys. Sources
with a model config (checkpoints, exports) must name the same backbone.

Note for arcface_torch weights: arcface_torch normalises inputs as (x - 127.5) / 127.5,
seqface as (x - 127.5) / 128 (0.4 % apart; fine-tuning absorbs it), and feeds RGB.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import torch
from torch import nn

from seqface_dist.config import ModelConfig

# arcface_torch iresnet name -> seqface iresnet name (regex, replacement), applied in order
# to each key; the first rule that matches rewrites it.
ARCFACE_RULES: tuple[tuple[str, str], ...] = (
    (r"^conv1\.", "stem.0."),
    (r"^bn1\.", "stem.1."),
    (r"^prelu\.", "stem.2."),
    (r"^layer([1-4])\.", "stages.{}."),  # layerN -> stages.(N - 1)
)


class InitFromError(ValueError):
    """train.init_from names weights that do not fit this run's backbone."""


def arcface_to_seqface(name: str) -> str:
    """One arcface_torch iresnet key as seqface's iresnet names it."""
    for pattern, repl in ARCFACE_RULES:
        m = re.match(pattern, name)
        if m:
            if m.groups():
                return repl.format(int(m.group(1)) - 1) + name[m.end():]
            return repl + name[m.end():]
    return name


def seqface_to_arcface(name: str) -> str:
    """The inverse of :func:`arcface_to_seqface` (tests build arcface layouts with it)."""
    for ours, theirs in (("stem.0.", "conv1."), ("stem.1.", "bn1."), ("stem.2.", "prelu.")):
        if name.startswith(ours):
            return theirs + name[len(ours):]
    m = re.match(r"^stages\.([0-3])\.", name)
    if m:
        return f"layer{int(m.group(1)) + 1}." + name[m.end():]
    return name


def check_fits(state: dict[str, torch.Tensor], want: dict[str, torch.Tensor],
               where: str) -> None:
    """Every key of ``want`` present in ``state`` with its shape, and no other key;
    otherwise an InitFromError listing all three kinds of difference."""
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    shapes = sorted(f"{k} {tuple(state[k].shape)} (the backbone has {tuple(want[k].shape)})"
                    for k in set(want) & set(state) if state[k].shape != want[k].shape)
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected),
                             ("shape mismatch", shapes)):
            if items:
                shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)"
                                                 if len(items) > 8 else "")
                parts.append(f"{len(items)} {label}: {shown}")
        raise InitFromError(f"{where}: the weights do not fit this run's backbone: "
                            + "; ".join(parts))


def _same_model(src: ModelConfig, ours: ModelConfig, where: str) -> None:
    for key in ("backbone", "embedding_dim", "in_channels", "input_size"):
        a, b = getattr(src, key), getattr(ours, key)
        if isinstance(a, (list, tuple)):
            a, b = list(a), list(b)
        if a != b:
            raise InitFromError(f"{where}: its model.{key} is {a!r}, this run's is {b!r}; "
                                f"set model.{key}={a!r} or choose other weights")


def read_torch_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A ``torch.save``d state dict read weights-only (a wrapping {"state_dict": ...} or
    {"model": ...} and a DDP ``module.`` prefix are undone)."""
    import pickle

    try:
        raw = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise InitFromError(f"{path}: refused: it holds more than weights ({why})") from None
    except (OSError, RuntimeError, EOFError) as e:
        raise InitFromError(f"{path}: not a torch state dict ({e})") from None
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(raw, dict) and isinstance(raw.get(wrapper), dict) and not any(
                isinstance(v, torch.Tensor) for v in raw.values()):
            raw = raw[wrapper]
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise InitFromError(f"{path}: not a state dict (name -> tensor)")
    if raw and all(k.startswith("module.") for k in raw):
        raw = {k[len("module."):]: v for k, v in raw.items()}
    return raw


def _from_file(path: Path, want: dict[str, torch.Tensor]) -> tuple[dict, str]:
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path)), "safetensors"
        except (SafetensorError, OSError) as e:
            raise InitFromError(f"{path}: unreadable safetensors ({e})") from None
    state = read_torch_state_dict(path)
    if set(state) == set(want):
        return state, "torch state dict"
    mapped = {arcface_to_seqface(k): v for k, v in state.items()}
    if len(set(mapped) & set(want)) > len(set(state) & set(want)):
        return mapped, "arcface_torch iresnet"
    return state, "torch state dict"


def init_state_dict(uri: str, model_cfg: ModelConfig, backbone: nn.Module
                    ) -> tuple[dict[str, torch.Tensor], str]:
    """(the state dict for ``backbone`` from ``uri``, what kind of source it was)."""
    if "://" in uri:  # s3:// and friends: fetched into a temporary folder, then read
        import pyarrow.fs as pafs

        fs, path = pafs.FileSystem.from_uri(uri)
        with tempfile.TemporaryDirectory(prefix="seqface-init-") as tmp:
            dest = Path(tmp) / Path(path.rstrip("/")).name
            if fs.get_file_info(path).type == pafs.FileType.Directory:
                dest.mkdir()  # pyarrow copies a folder's files into an existing folder
            pafs.copy_files(path, str(dest), source_filesystem=fs,
                            destination_filesystem=pafs.LocalFileSystem())
            return init_state_dict(str(dest), model_cfg, backbone)
    src = Path(uri)
    want = backbone.state_dict()
    if not src.exists():
        raise InitFromError(f"{uri}: does not exist")
    is_export = (src.is_dir() and (src / "model.json").is_file()) or (
        src.is_file() and src.suffix == ".safetensors" and (src.parent / "model.json").is_file())
    is_run = src.is_dir() and any(src.glob("checkpoint-*/state.json"))
    if (src / "state.json").is_file() or is_export or is_run:
        from seqface_dist.train.export import backbone_from

        net, src_cfg = backbone_from(src)  # a run folder: its newest committed checkpoint
        _same_model(src_cfg, model_cfg, uri)
        kind = ("export" if is_export else
                "run checkpoint" if (src / "state.json").is_file() else "run")
        return net.state_dict(), kind
    if src.is_dir():
        raise InitFromError(f"{uri}: neither a run (no checkpoint-*/state.json), a run "
                            "checkpoint (no state.json) nor an export (no model.json)")
    return _from_file(src, want)


def load_init_from(backbone: nn.Module, uri: str, model_cfg: ModelConfig) -> str:
    """Load ``uri``'s weights into ``backbone`` (every key and shape checked); returns a
    line saying what was loaded."""
    state, kind = init_state_dict(uri, model_cfg, backbone)
    want = backbone.state_dict()
    check_fits(state, want, f"train.init_from {uri} ({kind})")
    with torch.no_grad():
        backbone.load_state_dict({k: v.to(want[k].dtype) for k, v in state.items()},
                                 strict=True)
    return (f"init_from: backbone weights from {uri} ({kind}, {len(state)} tensors); a new "
            "run: step 0, fresh optimizers and head")
