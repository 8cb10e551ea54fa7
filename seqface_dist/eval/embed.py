"""Embeddings from a model for images given as files, encoded bytes or arrays.

    net = load_model("model.safetensors", model_cfg)     # or a TorchScript file, or a module
    feats = embed_images(net, paths, flip=True)          # (N, D) float32, not normalised

Images are decoded with PIL as RGB (L for 1-channel models), resized to the model's
input size (height, width) if they differ, scaled by (x - 127.5) / 128 and fed as NCHW.
With ``flip`` the features of each image and of its left-right mirror are summed.
The model runs in eval mode without gradients; its train/eval mode is restored after,
so the trainer can call this between steps.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from seqface_dist.data.normalize import INPUT_NORMALIZATION, normalize

if TYPE_CHECKING:
    from seqface_dist.config import ModelConfig

ImageSource = str | Path | bytes


EXPORT_WEIGHTS, EXPORT_META, EXPORT_PROGRAM = "backbone.safetensors", "model.json", \
    "embedding.pt2"


class UntrustedModelError(ValueError):
    """A model file in a format that can run code when loaded, without ``trust_code``."""


def load_model(model: nn.Module | str | Path, model_cfg: ModelConfig | None = None,
               device: str | torch.device = "cpu", *, trust_code: bool = False) -> nn.Module:
    """A module, or a model file loaded without unpickling anything by default.

    - an export folder (``seqface train`` writes ``export/``) or any file in it: the
      backbone named by its ``model.json``, with ``backbone.safetensors``'s weights;
    - ``.safetensors``: weights, for ``model_cfg``'s backbone, else the one named by a
      ``model.json`` beside it or by the file's own metadata;
    - ``.pt2`` (``torch.export``) or TorchScript (anything else): these formats can run
      code when loaded, so only with ``trust_code=True`` (``seqface eval --trust-model``).
    """
    if isinstance(model, nn.Module):
        return model.to(device)
    path = Path(model)
    if path.is_dir():
        path = path / EXPORT_WEIGHTS
    elif path.suffix != ".safetensors" and (path.parent / EXPORT_WEIGHTS).is_file() and \
            (path.parent / EXPORT_META).is_file() and not trust_code:
        path = path.parent / EXPORT_WEIGHTS  # an export: the same weights, no pickle
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} not found")
    if path.suffix == ".safetensors":
        return _load_weights(path, model_cfg).to(device)
    if not trust_code:
        raise UntrustedModelError(
            f"{path}: a {'torch.export' if path.suffix == '.pt2' else 'TorchScript'} file can "
            "run code when loaded; give the export's backbone.safetensors (or its folder), or "
            "pass --trust-model (trust_code=True) if you trust where this file came from")
    if path.suffix == ".pt2":
        try:
            net = _Exported(torch.export.load(str(path)).module().to(device))
        except Exception as e:
            raise ValueError(f"{path}: not a torch.export program: {e}") from e
        meta = path.with_name(EXPORT_META)
        if meta.is_file():
            _set_geometry(net, _read_meta(meta))
        return net
    try:
        return torch.jit.load(str(path), map_location=device)
    except Exception as e:
        raise ValueError(f"{path}: not a TorchScript file (nor .pt2 / .safetensors): {e}") from e


def _read_meta(meta: Path) -> dict:
    """model.json, refused when its input normalisation is not this version's."""
    try:
        cfg = json.loads(meta.read_text())
    except ValueError as e:
        raise ValueError(f"{meta}: not JSON: {e}") from None
    norm = cfg.get("input_normalization", INPUT_NORMALIZATION)
    if norm != INPUT_NORMALIZATION:
        raise ValueError(f"{meta}: input_normalization {norm} is not this version's "
                         f"{INPUT_NORMALIZATION}")
    return cfg


def _set_geometry(net: nn.Module, meta: dict) -> None:
    net.input_size = tuple(meta["input_size"])
    net.in_channels = int(meta["in_channels"])


def _load_weights(path: Path, model_cfg: ModelConfig | None) -> nn.Module:
    from safetensors import safe_open
    from safetensors.torch import load_file

    from seqface_dist.config import model_config_from
    from seqface_dist.models import build_backbone  # lazy: the models pull in torch nets

    if (path.parent / EXPORT_META).is_file():
        meta = _read_meta(path.parent / EXPORT_META)
    else:
        with safe_open(str(path), framework="pt") as sf:
            raw = (sf.metadata() or {}).get("model")
        meta = json.loads(raw) if raw else None
    if model_cfg is None:
        if meta is None:
            raise ValueError(f"{path}: a safetensors file holds only weights and no "
                             f"{EXPORT_META} is beside it; name the backbone (model config / "
                             "--backbone) to build the net")
        model_cfg = model_config_from(meta, str(path.parent / EXPORT_META))
    net = build_backbone(model_cfg)
    state = load_file(str(path))
    # Checkpoints of wrapped modules carry a prefix; strip the common ones.
    for prefix in ("module.", "backbone.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not fit backbone "
                         f"{model_cfg.backbone!r}: {e}") from e
    _set_geometry(net, {"input_size": model_cfg.input_size,
                        "in_channels": model_cfg.in_channels})
    return net


class _Exported(nn.Module):
    """A ``torch.export`` module: its train/eval mode was fixed at export and it refuses
    ``.eval()``, so it is held outside the module tree, where ``.eval()`` cannot reach."""

    def __init__(self, gm: nn.Module) -> None:
        super().__init__()
        self._held = (gm,)  # a tuple: not registered as a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._held[0](x)


def _model_geometry(model: nn.Module, input_size: Sequence[int] | None,
                    in_channels: int | None) -> tuple[tuple[int, int], int]:
    size = input_size if input_size is not None else getattr(model, "input_size", None)
    if size is None:
        raise ValueError("input_size unknown: the model has no input_size attribute; pass "
                         "input_size=(height, width)")
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"input_size must be (height, width), got {size!r}")
    ch = in_channels if in_channels is not None else getattr(model, "in_channels", 3)
    if ch not in (1, 3):
        raise ValueError(f"in_channels must be 1 or 3, got {ch!r}")
    return (int(size[0]), int(size[1])), int(ch)


def decode_image(src: ImageSource | np.ndarray, size: tuple[int, int],
                 channels: int = 3) -> np.ndarray:
    """One image as uint8 (H, W, C) at ``size`` = (height, width)."""
    from PIL import Image

    mode = "RGB" if channels == 3 else "L"
    if isinstance(src, np.ndarray):
        arr = src
        if arr.dtype != np.uint8:
            raise ValueError(f"image arrays must be uint8, got {arr.dtype}")
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        img = Image.fromarray(arr)
    else:
        try:
            img = Image.open(io.BytesIO(src) if isinstance(src, bytes) else src)
            img.load()
        except Exception as e:
            where = f"{len(src)} bytes" if isinstance(src, bytes) else str(src)
            raise ValueError(f"cannot decode image ({where}): {e}") from e
    img = img.convert(mode)
    if img.size != (size[1], size[0]):  # PIL sizes are (width, height)
        img = img.resize((size[1], size[0]), Image.BILINEAR)
    out = np.asarray(img, dtype=np.uint8)
    return out[:, :, None] if out.ndim == 2 else out


def to_tensor(batch: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, C) -> float (B, C, H, W): the training input normalisation."""
    return normalize(torch.from_numpy(np.ascontiguousarray(batch)))


@torch.no_grad()
def embed_images(model: nn.Module, images: Sequence[ImageSource] | np.ndarray, *,
                 flip: bool = False, batch_size: int = 64,
                 input_size: Sequence[int] | None = None, in_channels: int | None = None,
                 device: str | torch.device | None = None,
                 progress: bool = True, desc: str = "embed") -> np.ndarray:
    """Features (N, D) float32 for N images (paths, encoded bytes, or uint8 arrays)."""
    from tqdm import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    size, ch = _model_geometry(model, input_size, in_channels)
    if device is None:
        p = next(iter(model.parameters()), None)
        device = p.device if p is not None else torch.device("cpu")
    n = len(images)
    was_training = model.training
    model.eval()
    out: list[np.ndarray] = []
    try:
        for start in tqdm(range(0, n, batch_size), desc=desc, disable=not progress,
                          unit="batch"):
            chunk = images[start:start + batch_size]
            batch = np.stack([decode_image(s, size, ch) for s in chunk])
            x = to_tensor(batch).to(device)
            f = model(x)
            if flip:
                f = f + model(torch.flip(x, dims=[3]))
            if f.ndim != 2 or f.shape[0] != x.shape[0]:
                raise ValueError(f"model returned shape {tuple(f.shape)} for a batch of "
                                 f"{x.shape[0]}; expected (batch, dim)")
            out.append(f.float().cpu().numpy())
    finally:
        model.train(was_training)
    if not out:
        raise ValueError("embed_images: no images")
    return np.concatenate(out)


def embed_folder(model: nn.Module, folder: str | Path, **kw: object) -> tuple[list[Path],
                                                                            np.ndarray]:
    """Every image under ``folder`` (recursively, sorted) and its feature."""
    from seqface_dist.eval.pairs import IMAGE_EXTS

    folder = Path(folder)
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS)
    if not paths:
        raise FileNotFoundError(f"no images under {folder}")
    return paths, embed_images(model, paths, **kw)
