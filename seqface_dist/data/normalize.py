"""The one input normalisation of every model this project trains (torch only, so that
evaluation and export import it without the data plane).

The loader hands uint8 B x H x W x C batches; the trainer, the evaluation and whoever loads
an export turn them into float32 B x C x H x W with (x - 127.5) / 128. The export records
``INPUT_NORMALIZATION`` in model.json and `eval.embed.load_model` checks it.
"""

from __future__ import annotations

import torch

INPUT_NORMALIZATION = {"pixels": "uint8 B x H x W x C", "tensor": "float32 B x C x H x W",
                       "mean": 127.5, "scale": 1.0 / 128.0}


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 B x H x W x C -> float32 B x C x H x W, (x - 127.5) / 128, on images' device."""
    x = images.permute(0, 3, 1, 2).contiguous().float()  # transpose while still 1 byte
    return x.sub_(127.5).mul_(1.0 / 128.0)  # exact: a power of two
