"""Export the trained embedding network for use without Ray or DeepSpeed.

    export/backbone.safetensors   weights (+ the model config as metadata)
    export/embedding.pt2          a torch.export program, batch size dynamic
    export/model.json             the model config (backbone, input size, channels, dim) and
                                  the input normalisation, (x - 127.5) / 128

Load with ``seqface_dist.eval.embed.load_model("export")``: it builds the backbone named
in model.json and loads the safetensors weights, unpickling nothing. The ``.pt2`` program
serves runtimes without this package (``torch.export.load(...).module()``); torch's loader
may unpickle parts of it, so load it only from a source you trust (``--trust-model``).
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from seqface_dist.config import ModelConfig
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
