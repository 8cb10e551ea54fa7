"""One small interface over the places shards live: plain paths, ``file://`` and ``s3://``.

Everything else in the data plane speaks URLs and calls these functions, so local and
object-store runs share one code path. Other schemes (http, ...) are read through
``webdataset.gopen`` when a caller needs them.
"""

from __future__ import annotations

import os
import tempfile
from typing import BinaryIO
from urllib.parse import urlparse
from urllib.request import url2pathname

from seqface_dist.data import s3


def is_s3(url: str) -> bool:
    return url.startswith("s3://")


def local_path(url: str) -> str | None:
    """The filesystem path of a plain path or ``file://`` URL; None for remote URLs."""
    pr = urlparse(url)
    if pr.scheme == "file":
        return url2pathname(pr.path)
    if pr.scheme == "" or (len(pr.scheme) == 1 and os.name == "nt"):
        return url
    return None


def join(base: str, name: str) -> str:
    """Join a shard-set folder/prefix URL and a name inside it."""
    return base.rstrip("/") + "/" + name


def dirname(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[0] if "/" in url.rstrip("/") else "."


def open_read(url: str, endpoint_url: str = "", *, timeouts: s3.Timeouts | None = None,
              deadline: float | None = None) -> BinaryIO:
    """A readable binary stream (resumable for s3://; ``timeouts`` and the ``deadline``, a
    ``time.monotonic()`` value, apply to s3:// only: callers check local reads)."""
    path = local_path(url)
    if path is not None:
        return open(path, "rb", buffering=1 << 20)
    if is_s3(url):
        return s3.open_s3(url, endpoint_url, timeouts=timeouts, deadline=deadline)
    import importlib

    return importlib.import_module("webdataset.gopen").gopen(url, "rb")


def read_bytes(url: str, endpoint_url: str = "") -> bytes:
    with open_read(url, endpoint_url) as f:
        return f.read()


def size(url: str, endpoint_url: str = "") -> int | None:
    """Object size in bytes, None when absent."""
    path = local_path(url)
    if path is not None:
        return os.path.getsize(path) if os.path.isfile(path) else None
    if is_s3(url):
        return s3.head(url, endpoint_url)
    raise ValueError(f"{url}: cannot stat this kind of URL")


def write_bytes(url: str, data: bytes, endpoint_url: str = "") -> None:
    """Write atomically: a reader never sees half a file."""
    path = local_path(url)
    if path is None:
        s3.put_bytes(url, data, endpoint_url)
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; shard sets are meant to be shared
    os.replace(tmp, path)


def put_file(src: str, url: str, endpoint_url: str = "", part_size: int = 64 << 20) -> None:
    """Move a finished local file to ``url`` (rename locally, multipart upload to S3)."""
    path = local_path(url)
    if path is None:
        s3.put_file(src, url, endpoint_url, part_size=part_size)
        os.unlink(src)
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    os.chmod(src, 0o644)
    os.replace(src, path)


def delete(url: str, endpoint_url: str = "") -> None:
    path = local_path(url)
    if path is None:
        s3.delete(url, endpoint_url)
    elif os.path.exists(path):
        os.unlink(path)


def scratch_dir(out_url: str) -> str:
    """Where a shard is written before it is moved into place (same disk for local output)."""
    path = local_path(out_url)
    if path is not None:
        os.makedirs(path, exist_ok=True)
        return path
    return tempfile.gettempdir()
