"""JPEG encode/decode and the builder's pass-through-or-resize rule.

Decoding is the data plane's hot loop, so the decoder is chosen for speed:
``simplejpeg`` (libjpeg-turbo, decodes straight into a numpy array) when it is installed,
else Pillow. ``SEQFACE_JPEG_DECODER=pil|simplejpeg`` forces one (the benchmark measures both).
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

try:  # optional: faster decoding
    import simplejpeg as _sj
except ImportError:  # pragma: no cover - depends on the environment
    _sj = None


class ImageError(ValueError):
    """An image that cannot be read, named by its source."""


def decoder_name() -> str:
    forced = os.environ.get("SEQFACE_JPEG_DECODER", "")
    if forced == "pil" or (forced == "" and _sj is None):
        return "pil"
    if _sj is None:
        raise ImageError("SEQFACE_JPEG_DECODER=simplejpeg but simplejpeg is not installed")
    return "simplejpeg"


def decode_jpeg(data: bytes, channels: int, decoder: str | None = None,
                out: np.ndarray | None = None) -> np.ndarray:
    """JPEG bytes -> uint8 array H x W x channels (1 or 3, RGB).
    Raises ImageError.

    With ``out`` (a writable uint8 array), simplejpeg decodes into its memory: no new array
    and no copy into a batch afterwards. The result is then a view of
    ``out`` shaped like the image, which may differ from ``out``'s shape: check it."""
    decoder = decoder or decoder_name()
    try:
        if decoder == "simplejpeg":
            space = "GRAY" if channels == 1 else "RGB"
            return _sj.decode_jpeg(data, colorspace=space, fastdct=False, fastupsample=False,
                                   buffer=out)
        with Image.open(io.BytesIO(data)) as im:
            if im.format != "JPEG":
                raise ImageError(f"not a JPEG ({im.format})")
            arr = np.asarray(im.convert("L" if channels == 1 else "RGB"))
        arr = arr[:, :, None] if channels == 1 else arr
        if out is not None and arr.shape == out.shape:
            out[...] = arr
            return out
        return arr
    except ImageError:
        raise
    except Exception as e:  # every decoder failure is one kind of bad sample
        if out is not None and decoder == "simplejpeg":
            try:
                h, w = _sj.decode_jpeg_header(data)[:2]
            except Exception:  # noqa: BLE001 - not even a header: a bad JPEG
                h = w = 0
            if h * w * channels > out.size:  # valid, but too big for ``out``: say its size
                return np.empty((h, w, channels), np.uint8)
        raise ImageError(f"cannot decode JPEG: {e}") from None


def encode_jpeg(arr: np.ndarray, quality: int = 95) -> bytes:
    """uint8 H x W or H x W x C (C = 1 or 3) -> JPEG bytes."""
    arr = np.ascontiguousarray(arr)
    if arr.dtype != np.uint8:
        raise ImageError(f"expected a uint8 image, got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3):
        raise ImageError(f"expected H x W or H x W x 1/3, got shape {arr.shape}")
    buf = io.BytesIO()
    Image.fromarray(arr, "L" if arr.ndim == 2 else "RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def resize_array(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a uint8 H x W (x C) array to size = (height, width)."""
    squeeze = arr.ndim == 3 and arr.shape[2] == 1
    im = Image.fromarray(arr[:, :, 0] if squeeze else arr)
    out = np.asarray(im.resize((size[1], size[0]), Image.BICUBIC))
    return out[:, :, None] if squeeze else out


def prepare_for_shard(data: bytes, size: tuple[int, int], channels: int,
                      quality: int = 95) -> bytes:
    """Source image bytes -> the JPEG stored in a shard.

    A JPEG already of the right size and channel count passes through untouched (no
    generation loss, no work); anything else is decoded fully, converted, resized and
    encoded once. Raises ImageError for anything unreadable.
    """
    mode = "L" if channels == 1 else "RGB"
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # a truncated or corrupt file fails here, not in training
            if im.format == "JPEG" and im.mode == mode and im.size == (size[1], size[0]):
                return data
            im = im.convert(mode)
            if im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.BICUBIC)
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=quality)
            return buf.getvalue()
    except Exception as e:
        detail = "not a known image format" if type(e).__name__ == "UnidentifiedImageError" else e
        raise ImageError(f"unreadable image: {detail}") from None
