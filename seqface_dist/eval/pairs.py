"""Verification pair lists: LFW's ``pairs.txt`` with an image root, and ``.bin`` files.

    pairs = read_lfw_pairs("lfw/pairs.txt", "lfw/images")   # -> PairList
    bin_set = read_bin("lfw.bin")                           # -> BinSet

**The ``.bin`` files** of the field's reference trainer (insightface) are a pickle of
``(bins, issame)``: ``bins`` a list of encoded images (JPEG/PNG bytes), two per pair,
``issame`` a list (or numpy array) of booleans. Unpickling runs whatever callables the
file names, so :func:`read_bin` uses :class:`SafeBinUnpickler`, whose ``find_class``
refuses every global except a handful it maps to *our own* small stand-ins:

- ``_codecs.encode`` (how Python 3 writes bytes at pickle protocol 2): a function that
  only does ``str.encode("latin1")``;
- numpy's array pickling (``_reconstruct``, ``ndarray``, ``dtype``, ``_frombuffer``,
  ``scalar``, under ``numpy.core`` or ``numpy._core``): stand-ins that collect the
  shape, a dtype from a whitelist (bool and integers) and the raw bytes, and only then
  build the array with ``numpy.frombuffer``.

The real numpy callables are never handed to the unpickler: ``numpy.dtype``'s
``__setstate__`` takes flags from the stream, and ``scalar`` with an object dtype turns
bytes into pointers, so "allow numpy's reconstructors" would not be safe. A hand-written
opcode parser would also work; the stand-ins keep Python's own, well-tested opcode
machine and still let nothing but plain data through. Anything else is refused with an
error that names the global and the file.
"""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from seqface_dist.safepickle import SafeBinUnpickler, UnsafePickleError, unwrap

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff")


@dataclass
class PairList:
    """Pairs of image paths; ``folds[i]`` is pair i's fold (LFW: its set, 0..9)."""

    path1: list[Path]
    path2: list[Path]
    issame: np.ndarray  # (n,) bool
    folds: np.ndarray  # (n,) int

    def __len__(self) -> int:
        return len(self.path1)


# ---------------------------------------------------------------------------------------
# LFW pairs.txt


def lfw_image_path(root: str | Path, name: str, number: int) -> Path:
    """``root/name/name_%04d.jpg``, or the same stem with another image extension."""
    folder = Path(root) / name
    stem = f"{name}_{number:04d}"
    for ext in IMAGE_EXTS:
        p = folder / f"{stem}{ext}"
        if p.exists():
            return p
    for ext in IMAGE_EXTS:  # upper-case extensions (e.g. from Windows tools)
        p = folder / f"{stem}{ext.upper()}"
        if p.exists():
            return p
    return folder / f"{stem}.jpg"


def read_lfw_pairs(pairs_file: str | Path, root: str | Path,
                   check_exists: bool = True) -> PairList:
    """Read LFW's ``pairs.txt`` layout.

    Header ``F N``: F folds, each N matched lines (``name n1 n2``) then N mismatched
    lines (``name1 n1 name2 n2``). A header of one number N (``pairsDevTest.txt``) is
    one set of N matched and N mismatched pairs, cut into 10 contiguous folds. Fields may
    be separated by tabs or spaces. With ``check_exists`` a missing image is an error
    naming the line.
    """
    pairs_file = Path(pairs_file)
    lines = [ln for ln in pairs_file.read_text().splitlines() if ln.strip()]
    if not lines:
        raise ValueError(f"{pairs_file}: empty pairs file")
    head = lines[0].split()
    try:
        nums = [int(h) for h in head]
    except ValueError:
        raise ValueError(f"{pairs_file}:1: header must be 'folds pairs_per_fold' "
                         f"(e.g. '10 300'), got {lines[0]!r}") from None
    if len(nums) == 2:
        n_sets, per = nums
    elif len(nums) == 1:
        n_sets, per = 1, nums[0]
    else:
        raise ValueError(f"{pairs_file}:1: header must be 'folds pairs_per_fold', "
                         f"got {lines[0]!r}")
    if n_sets < 1 or per < 1:
        raise ValueError(f"{pairs_file}:1: header numbers must be >= 1, got {lines[0]!r}")
    body = lines[1:]
    if len(body) != 2 * n_sets * per:
        raise ValueError(f"{pairs_file}: header {lines[0].strip()!r} promises "
                         f"{2 * n_sets * per} pair lines, found {len(body)}")
    p1: list[Path] = []
    p2: list[Path] = []
    same: list[bool] = []
    for i, ln in enumerate(body):
        lineno = i + 2
        f = ln.split()
        try:
            if len(f) == 3:
                a = lfw_image_path(root, f[0], int(f[1]))
                b = lfw_image_path(root, f[0], int(f[2]))
                s = True
            elif len(f) == 4:
                a = lfw_image_path(root, f[0], int(f[1]))
                b = lfw_image_path(root, f[2], int(f[3]))
                s = False
            else:
                raise ValueError
        except ValueError:
            raise ValueError(f"{pairs_file}:{lineno}: expected 'name n1 n2' or "
                             f"'name1 n1 name2 n2', got {ln!r}") from None
        if check_exists:
            for p in (a, b):
                if not p.is_file():
                    raise FileNotFoundError(f"{pairs_file}:{lineno}: image {p} not found "
                                            f"(root {root})")
        p1.append(a)
        p2.append(b)
        same.append(s)
    n = len(same)
    if n_sets > 1:
        folds = np.repeat(np.arange(n_sets), 2 * per)
    else:
        folds = np.concatenate([np.full(len(c), k) for k, c in
                                enumerate(np.array_split(np.arange(n), min(10, n)))])
    return PairList(p1, p2, np.asarray(same, dtype=bool), folds)


# ---------------------------------------------------------------------------------------
# .bin files, read without unpickling arbitrary objects


@dataclass
class BinSet:
    """A ``.bin`` verification set: ``images[2i]`` and ``images[2i+1]`` form pair i."""

    images: list[bytes]
    issame: np.ndarray  # (n,) bool

    def __len__(self) -> int:
        return len(self.issame)


def read_bin(path: str | Path) -> BinSet:
    """Read an insightface-style ``.bin`` without executing anything it names."""
    path = Path(path)
    with open(path, "rb") as fh:
        try:
            obj = SafeBinUnpickler(fh, str(path)).load()
        except UnsafePickleError:
            raise
        except Exception as e:  # truncated or not a pickle at all
            raise ValueError(f"{path}: not a readable verification .bin ({e})") from e
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        raise ValueError(f"{path}: expected a pair (images, issame), got "
                         f"{type(obj).__name__}")
    bins, issame = unwrap(obj[0]), unwrap(obj[1])
    if isinstance(bins, np.ndarray):
        bins = list(bins)
    if not isinstance(bins, (list, tuple)):
        raise ValueError(f"{path}: images must be a list, got {type(bins).__name__}")
    images: list[bytes] = []
    for i, b in enumerate(bins):
        b = unwrap(b)
        if isinstance(b, np.ndarray) and b.dtype == np.uint8 and b.ndim == 1:
            b = b.tobytes()
        if not isinstance(b, (bytes, bytearray)):
            raise ValueError(f"{path}: image {i} is {type(b).__name__}, not encoded bytes")
        images.append(bytes(b))
    if isinstance(issame, np.ndarray):
        flags = issame.reshape(-1)
    elif isinstance(issame, (list, tuple)):
        flags = np.asarray([unwrap(v) for v in issame], dtype=object)
    else:
        raise ValueError(f"{path}: issame must be a list or array, got "
                         f"{type(issame).__name__}")
    if not all(isinstance(v, (bool, np.bool_)) or (isinstance(v, (int, np.integer))
                                                    and v in (0, 1)) for v in flags):
        raise ValueError(f"{path}: issame must hold booleans")
    flags = flags.astype(bool)
    if len(images) != 2 * len(flags):
        raise ValueError(f"{path}: {len(images)} images for {len(flags)} pairs "
                         f"(need two per pair)")
    return BinSet(images, flags)


def bin_name(path: str | Path) -> str:
    """``lfw`` for ``.../lfw.bin``: a label for logs and metrics."""
    return re.sub(r"\.bin$", "", Path(path).name)


def write_bin(path: str | Path, images: list[bytes], issame: list[bool]) -> None:
    """Write a ``.bin`` in the field's layout: a pickle of (encoded images, issame flags).

    Only bytes, bools and containers go in, so :func:`read_bin` reads it back.
    """
    if len(images) != 2 * len(issame):
        raise ValueError(f"write_bin: {len(images)} images for {len(issame)} pairs")
    with open(path, "wb") as fh:
        pickle.dump(([bytes(b) for b in images], [bool(s) for s in issame]), fh, protocol=4)
