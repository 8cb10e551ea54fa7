"""Training augmentation of decoded uint8 batches, in place: random crop, mirror."""

from __future__ import annotations

import random

import numpy as np
import torch


def augment_batch(batch: np.ndarray, mirror: list[bool], rng: random.Random,
                  crop_pad: int) -> None:
    """In place, image by image of a uint8 B x H x W x C batch: a random crop of the image
    padded by ``crop_pad`` zeros, then a horizontal flip where ``mirror`` says so."""
    n, h, w, _ = batch.shape
    pixels = torch.from_numpy(batch)  # a view: torch flips the pixel axis ~6x faster
    for i in range(n):
        if crop_pad > 0:
            img = batch[i].copy()
            dy = rng.randint(0, 2 * crop_pad) - crop_pad
            dx = rng.randint(0, 2 * crop_pad) - crop_pad
            batch[i] = 0  # then batch[i][r, c] = img[r + dy, c + dx] where that exists
            if abs(dy) < h and abs(dx) < w:
                batch[i, max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)] = \
                    img[max(0, dy):h + min(0, dy), max(0, dx):w + min(0, dx)]
        if mirror[i]:
            pixels[i] = pixels[i].flip(1)
