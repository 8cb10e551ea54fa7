"""Export the trained embedding network for use without Ray or DeepSpeed.

    export/backbone.safetensors   weights (+ the model config as metadata)
    export/embedding.pt2          a torch.export program, batch size dynamic
    export/model.json             the model config (backbone, input size, channels, dim) and
                                  the input normalisation, (x - 127.5) / 128
    export/embedding.onnx         with ``seqface export --onnx``: input "images" (N x C x H x W,
                                  float32, normalised as model.json says), output "embedding"

Load with ``seqface_dist.eval.embed.load_model("export")``: it builds the backbone named
in model.json and loads the safetensors weights, unpickling nothing. The ``.pt2`` program
serves runtimes without this package, in one line::

    net = torch.export.load("export/embedding.pt2").module()   # already in inference mode

It was exported from ``eval()`` (batch norm on running statistics), and torch refuses
``.eval()``/``.train()`` on exported modules: call it as it is. Torch's loader may unpickle
parts of the file, so load it only from a source you trust (``--trust-model``).

``seqface export SRC --out DIR [--onnx]`` writes these files from a run checkpoint (its
engine's weights read weights-only) or from another export, and with ``--onnx`` the ONNX
graph too, checked against onnxruntime when that is installed (``pip install
seqface-dist[onnx]``).
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from seqface_dist.config import ModelConfig, model_config_from
from seqface_dist.data.normalize import INPUT_NORMALIZATION


def export_embedding(backbone: nn.Module, model_cfg: ModelConfig, out_dir: str | Path) -> Path:
    """Write the three export files into ``out_dir``; returns the .pt2 path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    net = copy.deepcopy(backbone).float().cpu().eval()  # never disturb the training copy
    meta = json.dumps({**asdict(model_cfg), "input_normalization": INPUT_NORMALIZATION})
    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(out / "backbone.safetensors"), metadata={"model": meta})
    (out / "model.json").write_text(meta + "\n")
    h, w = model_cfg.input_size
    example = torch.zeros(2, model_cfg.in_channels, h, w)
    program = torch.export.export(net, (example,),
                                  dynamic_shapes=({0: torch.export.Dim.AUTO},))
    path = out / "embedding.pt2"
    torch.export.save(program, str(path))
    return path


EXPORT_ONNX = "embedding.onnx"


def export_onnx(backbone: nn.Module, model_cfg: ModelConfig, out_dir: str | Path) -> Path:
    """``embedding.onnx`` in ``out_dir`` (torch's dynamo exporter: needs onnx and
    onnxscript); the batch dimension is dynamic."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    net = copy.deepcopy(backbone).float().cpu().eval()
    h, w = model_cfg.input_size
    example = torch.zeros(2, model_cfg.in_channels, h, w)
    path = out / EXPORT_ONNX
    torch.onnx.export(net, (example,), str(path), input_names=["images"],
                      output_names=["embedding"], dynamo=True, verbose=False,
                      dynamic_shapes=({0: torch.export.Dim("batch")},))
    return path


def onnx_max_abs_diff(backbone: nn.Module, onnx_path: str | Path, model_cfg: ModelConfig,
                      batch: int = 3, seed: int = 0) -> float | None:
    """Largest |embedding difference| between the module and onnxruntime on one random
    batch (a batch size the export did not trace); None when onnxruntime is missing."""
    try:
        import onnxruntime
    except ImportError:
        return None
    h, w = model_cfg.input_size
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, model_cfg.in_channels, h, w, generator=g)
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"images": x.numpy()})
    with torch.no_grad():
        want = copy.deepcopy(backbone).float().cpu().eval()(x)
    return float((torch.from_numpy(got) - want).abs().max())


def backbone_from(source: str | Path) -> tuple[nn.Module, ModelConfig]:
    """The backbone of a run folder (its newest committed checkpoint), of a run checkpoint
    (a folder with ``state.json``: its model config and the engine's weights, read
    weights-only) or of an export (folder or ``backbone.safetensors``, beside its
    ``model.json``); nothing is unpickled."""
    from seqface_dist.models import build_backbone
    from seqface_dist.train.checkpoint import ENGINE_DIR, ENGINE_TAG, STATE_FILE

    src = Path(source)
    if src.is_dir() and not (src / STATE_FILE).is_file():  # a run folder: its newest commit
        from seqface_dist.train.commit import filesystem, find_resumable

        latest, _ = find_resumable(*filesystem(str(src)))
        if latest is not None:
            src = Path(latest.path)
    if (src / STATE_FILE).is_file():
        from seqface_dist.train.checkpoint import CheckpointError, check_complete
        from seqface_dist.train.safe_load import weights_only_load

        state = check_complete(src)
        model_cfg = model_config_from(state.config.get("model", {}), f"{src / STATE_FILE}: model")
        files = sorted((src / ENGINE_DIR / ENGINE_TAG).glob("mp_rank_*_model_states.pt"))
        if not files:
            raise CheckpointError(f"{src}: no DeepSpeed model states under "
                                  f"{ENGINE_DIR}/{ENGINE_TAG}")
        module = weights_only_load(str(files[0]), map_location="cpu")["module"]
        net = build_backbone(model_cfg)
        net.load_state_dict({k: v.float() for k, v in module.items()}, strict=True)
        return net, model_cfg
    from seqface_dist.eval.embed import EXPORT_META, load_model

    folder = src if src.is_dir() else src.parent
    if not (folder / EXPORT_META).is_file():
        raise FileNotFoundError(f"{src}: neither a run checkpoint (no {STATE_FILE}) nor an "
                                f"export (no {EXPORT_META})")
    meta = json.loads((folder / EXPORT_META).read_text())
    return load_model(src), model_config_from(meta, str(folder / EXPORT_META))

