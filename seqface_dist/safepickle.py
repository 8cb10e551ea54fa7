"""Unpickling without running code: the allow-list unpickler of the ``.bin`` verification
sets (``seqface_dist.eval.pairs``) and of the MNIST file (``seqface_dist.data.mnist``).

It builds lists, tuples, bytes, bools, ints and plain numeric numpy arrays, through
stand-ins for the few numpy globals such pickles name; any other global is refused
before it is built. Neither ``data`` nor ``eval`` owns it: both import it from here.
"""

from __future__ import annotations

import functools
import io
import pickle

import numpy as np


class UnsafePickleError(pickle.UnpicklingError):
    """The file names a global that a verification ``.bin`` has no business with."""


INTEGER_DTYPES = {"b1", "?", "bool", "u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8"}
_MAX_ITEMS = 1 << 31


class _DType:
    """Stand-in for ``numpy.dtype(spec, align, copy)``; only whitelisted specs."""

    def __init__(self, spec: object, align: object = False, copy: object = False, *,
                 allowed: frozenset[str] = frozenset(INTEGER_DTYPES)) -> None:
        if isinstance(spec, bytes):
            spec = spec.decode("latin1")
        if not isinstance(spec, str) or spec.lstrip("<>|=") not in allowed:
            raise UnsafePickleError(f"numpy dtype {spec!r} refused (allowed: {sorted(allowed)})")
        self.spec = spec.lstrip("<>|=")
        self.byteorder = "|"

    def __setstate__(self, state: object) -> None:
        # (version, byteorder, subarray, names, fields, elsize, alignment, flags): only
        # the byte order matters for plain scalar dtypes; anything structured is refused.
        if not isinstance(state, tuple) or len(state) < 2:
            raise UnsafePickleError(f"numpy dtype state {state!r} refused")
        bo = state[1].decode("latin1") if isinstance(state[1], bytes) else state[1]
        if bo not in ("|", "<", ">", "=") or any(x is not None for x in state[2:5]):
            raise UnsafePickleError(f"numpy dtype state {state!r} refused (structured)")
        self.byteorder = bo

    def real(self) -> np.dtype:
        dt = np.dtype(self.spec)
        return dt.newbyteorder(">") if self.byteorder == ">" and dt.itemsize > 1 else dt


def _array_from(buf: object, dtype: object, shape: object) -> np.ndarray:
    if not isinstance(dtype, _DType):
        raise UnsafePickleError(f"numpy array with dtype {dtype!r} refused")
    if isinstance(buf, str):  # Python 2 pickles read with encoding="latin1"
        buf = buf.encode("latin1")
    if not isinstance(buf, (bytes, bytearray)):
        raise UnsafePickleError(f"numpy array data of type {type(buf).__name__} refused")
    if not (isinstance(shape, tuple) and all(isinstance(s, int) and 0 <= s < _MAX_ITEMS
                                             for s in shape)):
        raise UnsafePickleError(f"numpy array shape {shape!r} refused")
    dt = dtype.real()
    n = int(np.prod(shape, dtype=np.int64))
    if len(buf) != n * dt.itemsize:
        raise pickle.UnpicklingError(f"numpy array: {len(buf)} bytes for shape {shape} "
                                     f"of {dt}")
    return np.frombuffer(bytes(buf), dtype=dt).reshape(shape).copy()


class _NdarrayType:
    """Stand-in for the ``numpy.ndarray`` class argument of ``_reconstruct``."""


class _Array:
    """Stand-in for ``_reconstruct(ndarray, (0,), b'b')``; the array arrives by BUILD."""

    def __init__(self, subtype: object, shape: object, code: object) -> None:
        if subtype is not _NdarrayType:
            raise UnsafePickleError(f"numpy _reconstruct of {subtype!r} refused")
        self.value: np.ndarray | None = None

    def __setstate__(self, state: object) -> None:
        # (version, shape, dtype, is_fortran, rawdata), version 1; older: no version.
        if isinstance(state, tuple) and len(state) == 5:
            state = state[1:]
        if not (isinstance(state, tuple) and len(state) == 4):
            raise UnsafePickleError("numpy array state refused (unexpected layout)")
        shape, dtype, fortran, raw = state
        arr = _array_from(raw, dtype, tuple(shape) if isinstance(shape, list) else shape)
        self.value = np.asfortranarray(arr) if fortran else arr


def _frombuffer(buf: object, dtype: object, shape: object, order: object = "C") -> np.ndarray:
    if isinstance(buf, pickle.PickleBuffer):
        buf = bytes(buf.raw())
    arr = _array_from(buf, dtype, shape)
    return np.asfortranarray(arr) if order == "F" else arr


def _scalar(dtype: object, data: object = None) -> object:
    return _array_from(data, dtype, (1,))[0].item()


def _latin1_encode(text: object, encoding: object = "utf-8") -> bytes:
    # Python 3 writes bytes at protocol 2 as _codecs.encode(str, "latin1"); nothing else.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"_codecs.encode with encoding {encoding!r} refused")
    return text.encode("latin1")


# (module, name) -> our stand-in. numpy moved its internals from numpy.core to numpy._core
# in 2.0; files written by either are accepted.
_GLOBALS: dict[tuple[str, str], object] = {
    ("_codecs", "encode"): _latin1_encode,
    ("numpy", "ndarray"): _NdarrayType,
    ("numpy", "dtype"): _DType,
}
for _core in ("numpy.core", "numpy._core"):
    _GLOBALS[(f"{_core}.multiarray", "_reconstruct")] = _Array
    _GLOBALS[(f"{_core}.multiarray", "scalar")] = _scalar
    _GLOBALS[(f"{_core}.numeric", "_frombuffer")] = _frombuffer


class SafeBinUnpickler(pickle.Unpickler):
    """An unpickler that builds only lists, tuples, bytes, bools, ints and plain arrays."""

    what = "a verification .bin or a dataset file"

    def __init__(self, file: io.BufferedIOBase, source: str = "<bin>",
                 allowed_dtypes: frozenset[str] = frozenset(INTEGER_DTYPES)) -> None:
        # encoding="bytes": Python 2 ``str`` (the JPEG data of old .bin files) stays bytes.
        super().__init__(file, encoding="bytes")
        self.source = source
        self.allowed_dtypes = allowed_dtypes  # plain numeric dtypes only: no object arrays

    def find_class(self, module: str, name: str) -> object:
        if (module, name) == ("numpy", "dtype"):
            return functools.partial(_DType, allowed=self.allowed_dtypes)
        try:
            return _GLOBALS[(module, name)]
        except (KeyError, TypeError):
            raise UnsafePickleError(
                f"{self.source}: refusing to load global {module}.{name}: {self.what} "
                "holds only image bytes, numbers and plain arrays (is this file what it "
                "claims to be?)") from None

    def persistent_load(self, pid: object) -> object:
        raise UnsafePickleError(f"{self.source}: persistent ids are refused")


def unwrap(x: object) -> object:
    """The numpy array a loaded stand-in holds (anything else as it is)."""
    return x.value if isinstance(x, _Array) else x
