"""The verification sets a training run evaluates (``eval.sets``), local or on S3.

    for spec in cfg.eval.resolved_sets():                  # [{name, path, root?}, ...]
        vset = load_eval_set(spec, cfg.data.s3_endpoint_url)   # a VerificationSet

A set is an insightface ``.bin`` file or an LFW-style ``pairs.txt`` with its image root,
each a plain path, ``file://`` or ``s3://`` URL (through ``AWS_ENDPOINT_URL`` or the
endpoint given). ``.bin`` files are read with the restricted unpickler of
:mod:`seqface_dist.eval.pairs` (nothing they name is run); an S3 ``pairs.txt``'s images are
fetched into memory once (the root is listed once to find each image's extension).
The driver's preflight calls :func:`check_eval_set` on every set before any worker starts
(reachable, parses, has genuine and impostor pairs), rank 0 loads them again at start-up.
"""

from __future__ import annotations

import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from seqface_dist.config import EvalSetConfig, eval_set_kind
from seqface_dist.data import store
from seqface_dist.eval.evaluate import VerificationSet, load_verification_set
from seqface_dist.eval.pairs import IMAGE_EXTS, read_bin, read_lfw_pairs

MIN_PAIRS = 10  # the 10-fold protocol needs a pair per fold
FETCH_THREADS = 8


def load_eval_set(spec: EvalSetConfig, endpoint_url: str = "") -> VerificationSet:
    """The set ``spec`` describes, named ``spec.name``."""
    path = store.local_path(spec.path)
    kind = eval_set_kind(spec.path)
    if path is not None:
        root = store.local_path(spec.root) if spec.root else None
        if spec.root and root is None:
            raise ValueError(f"root {spec.root}: a local pairs list needs a local root")
        vset = load_verification_set(path, root)
    elif not store.is_s3(spec.path):
        raise ValueError(f"{spec.path}: only local paths, file:// and s3:// are supported")
    elif kind == "bin":
        vset = _s3_bin(spec.path, endpoint_url)
    else:
        vset = _s3_pairs(spec, endpoint_url)
    vset.name = spec.name
    return vset


def check_eval_set(spec: EvalSetConfig, endpoint_url: str = "") -> VerificationSet:
    """Load the set and refuse one the protocol cannot score (raises ValueError)."""
    vset = load_eval_set(spec, endpoint_url)
    same = np.asarray(vset.issame, dtype=bool)
    if len(same) < MIN_PAIRS:
        raise ValueError(f"{spec.path}: {len(same)} pairs; the 10-fold protocol needs at "
                         f"least {MIN_PAIRS}")
    if same.all() or not same.any():
        raise ValueError(f"{spec.path}: needs both genuine and impostor pairs "
                         f"({int(same.sum())} genuine of {len(same)})")
    return vset


def _fetch(url: str, endpoint_url: str) -> bytes:
    if store.size(url, endpoint_url) is None:
        raise FileNotFoundError(f"{url}: no such object")
    return store.read_bytes(url, endpoint_url)


def _s3_bin(url: str, endpoint_url: str) -> VerificationSet:
    data = _fetch(url, endpoint_url)
    with tempfile.NamedTemporaryFile(suffix=".bin") as tmp:
        tmp.write(data)
        tmp.flush()
        b = read_bin(tmp.name)
    n = len(b)
    return VerificationSet(url, list(b.images), np.arange(0, 2 * n, 2),
                           np.arange(1, 2 * n, 2), b.issame, None)


def _list_keys(prefix_url: str, endpoint_url: str) -> set[str]:
    """Every key under ``prefix_url/`` (relative to it)."""
    from seqface_dist.data import s3

    bucket, prefix = s3.split_s3_url(prefix_url.rstrip("/") + "/")
    keys: set[str] = set()
    pages = s3.client(endpoint_url).get_paginator("list_objects_v2")
    for page in pages.paginate(Bucket=bucket, Prefix=prefix):
        keys.update(o["Key"][len(prefix):] for o in page.get("Contents", []))
    return keys


def _s3_pairs(spec: EvalSetConfig, endpoint_url: str) -> VerificationSet:
    if not store.is_s3(spec.root):
        raise ValueError(f"root {spec.root!r}: an s3:// pairs list needs an s3:// root")
    text = _fetch(spec.path, endpoint_url)
    keys = _list_keys(spec.root, endpoint_url)
    with tempfile.TemporaryDirectory(prefix="seqface-pairs-") as d:
        (Path(d) / "pairs.txt").write_bytes(text)
        pl = read_lfw_pairs(Path(d) / "pairs.txt", Path(d) / "root", check_exists=False)
        rel = [[str(p.relative_to(Path(d) / "root")) for p in ps] for ps in (pl.path1,
                                                                              pl.path2)]
    found: dict[str, str] = {}
    for r in rel[0] + rel[1]:
        if r in found:
            continue
        stem = r.rsplit(".", 1)[0]
        hit = next((f"{stem}{e}" for e in IMAGE_EXTS + tuple(x.upper() for x in IMAGE_EXTS)
                    if f"{stem}{e}" in keys), None)
        if hit is None:
            raise FileNotFoundError(f"{spec.path}: image {stem}.* not found under {spec.root}")
        found[r] = hit
    index = {k: i for i, k in enumerate(dict.fromkeys(found.values()))}
    with ThreadPoolExecutor(FETCH_THREADS) as pool:  # one GET per image: overlap them
        images = list(pool.map(lambda k: store.read_bytes(store.join(spec.root, k),
                                                          endpoint_url), index))
    return VerificationSet(spec.name, images,
                           np.asarray([index[found[r]] for r in rel[0]]),
                           np.asarray([index[found[r]] for r in rel[1]]), pl.issame, pl.folds)
