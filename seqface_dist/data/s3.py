"""S3 access for shards: clients, a resumable ranged reader, multipart uploads.

The reader is the part that matters for training: a shard is one long GET, and a long
GET over a real network gets cut (connection reset, 5xx, throttling). ``S3RangeReader``
remembers how many bytes it has handed out and, on a transient error, reopens the
object with ``Range: bytes=<pos>-`` (and ``If-Match`` on the ETag, so a replaced object
is never stitched onto the old one: a replaced object fails the read with 412). The tar
parser above it never sees the cut, so no sample is lost or read twice. A resumed read
must answer ``206`` with ``Content-Range: bytes <pos>-<size-1>/<size>``; anything else
(a server or proxy that ignores ``Range`` and sends the whole object again) fails the read
with :class:`faults.RangeIgnored` instead of appending the wrong bytes. With a
``deadline`` the reader gives up (:class:`faults.ShardDeadline`) once it passes; it is
checked between socket reads, so it may be overshot by one read timeout at most.

Clients are created lazily *inside* each process (cached per pid): a boto3 client must
not cross a fork (batch workers, DataLoader workers). The endpoint comes from the caller
(``DataConfig.s3_endpoint_url``), else ``AWS_ENDPOINT_URL`` (boto3 reads it itself), else
AWS; credentials from the standard chain. Timeouts (:class:`Timeouts`) come from
``DataConfig.s3_connect_timeout_s`` / ``s3_read_timeout_s``.
"""

from __future__ import annotations

import io
import logging
import os
import random
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlparse

from seqface_dist.data.faults import RangeIgnored, ShardDeadline

log = logging.getLogger(__name__)

_CLIENTS: dict[tuple, object] = {}
# One boto3 session for the process and its forks: a client made from a session that has
# loaded the S3 service model costs ~20 ms of CPU, from a fresh session ~150 ms, and every
# batch worker (new each epoch) makes one. A session holds no connections, so forked
# workers may share it; clients (connection pools) stay per process.
_SESSION = None
_LOCK = threading.Lock()
os.register_at_fork(after_in_child=lambda: globals().update(_LOCK=threading.Lock()))
_DEFAULT_ENDPOINT = ""  # set by configure(); used by the webdataset gopen hook


@dataclass(frozen=True)
class Timeouts:
    """botocore's connect and read timeouts (seconds); the read timeout bounds each wait
    for the next bytes of a response, not a whole object."""

    connect_s: float
    read_s: float

    @classmethod
    def from_config(cls, data_cfg=None) -> Timeouts:
        from seqface_dist.config import DataConfig

        cfg = data_cfg or DataConfig()
        return cls(float(cfg.s3_connect_timeout_s), float(cfg.s3_read_timeout_s))


_DEFAULT_TIMEOUTS: Timeouts | None = None  # set by configure(); None: DataConfig's defaults


@dataclass(frozen=True)
class RetryPolicy:
    """How hard a read tries before a shard is given up (attempts without progress)."""

    max_attempts: int = 8
    base_delay_s: float = 0.05
    max_delay_s: float = 2.0

    def delay(self, attempt: int) -> float:
        # Exponential backoff with full jitter: many workers must not retry in lockstep.
        return random.uniform(0, min(self.max_delay_s, self.base_delay_s * (2 ** attempt)))


def split_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ("bucket", "a/b")."""
    pr = urlparse(url)
    if pr.scheme != "s3" or not pr.netloc:
        raise ValueError(f"{url}: not an s3://bucket/key URL")
    return pr.netloc, pr.path.lstrip("/")


def configure(endpoint_url: str = "", timeouts: Timeouts | None = None) -> None:
    """Set the endpoint and timeouts the ``webdataset`` ``s3:`` opener (and every client
    made without its own) uses, and register the opener."""
    global _DEFAULT_ENDPOINT, _DEFAULT_TIMEOUTS
    _DEFAULT_ENDPOINT = endpoint_url or ""
    _DEFAULT_TIMEOUTS = timeouts
    register_gopen()


def client(endpoint_url: str = "", timeouts: Timeouts | None = None):
    """A boto3 S3 client for this process (cached per pid, endpoint and timeouts)."""
    endpoint = endpoint_url or _DEFAULT_ENDPOINT or os.environ.get("AWS_ENDPOINT_URL", "")
    timeouts = timeouts or _DEFAULT_TIMEOUTS or Timeouts.from_config()
    key = (os.getpid(), endpoint, timeouts)
    c = _CLIENTS.get(key)
    if c is None:
        global _SESSION
        import boto3
        from botocore.config import Config

        cfg = Config(retries={"max_attempts": 5, "mode": "standard"},
                     connect_timeout=timeouts.connect_s, read_timeout=timeouts.read_s,
                     max_pool_connections=16)
        with _LOCK:  # sessions may not make clients from two threads at once
            _SESSION = _SESSION or boto3.session.Session()
            c = _CLIENTS.get(key) or _SESSION.client("s3", endpoint_url=endpoint or None,
                                                     config=cfg)
        _CLIENTS[key] = c
    return c


def _is_transient(exc: BaseException) -> bool:
    from botocore.exceptions import BotoCoreError, ClientError

    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return status >= 500 or err.get("Code") in {
            "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
            "RequestTimeTooSkewed", "InternalError", "ServiceUnavailable"}
    # Connection resets, read timeouts, incomplete reads: botocore wraps most of these,
    # raw urllib3/socket errors can still surface from the streaming body.
    import urllib3.exceptions

    return isinstance(exc, (BotoCoreError, urllib3.exceptions.HTTPError, OSError))


class S3RangeReader(io.RawIOBase):
    """A read-only, forward-only file over one S3 object that survives cut connections."""

    def __init__(self, url: str, endpoint_url: str = "", retry: RetryPolicy | None = None,
                 timeouts: Timeouts | None = None, deadline: float | None = None):
        """``deadline``: a ``time.monotonic()`` value after which reading gives up."""
        super().__init__()
        self.url = url
        self.bucket, self.key = split_s3_url(url)
        self.endpoint_url = endpoint_url
        self.retry = retry or RetryPolicy()
        self.pos = 0
        self.size: int | None = None
        self.etag: str | None = None
        self.reopens = 0  # resumptions after a transient error (for metrics and tests)
        self.timeouts, self.deadline = timeouts, deadline
        self._body = None
        self._with_retries(self._open_if_closed)

    def readable(self) -> bool:
        return True

    def _open(self) -> None:
        kw = {"Bucket": self.bucket, "Key": self.key}
        if self.pos:
            kw["Range"] = f"bytes={self.pos}-"
        if self.etag:
            kw["IfMatch"] = self.etag
        resp = client(self.endpoint_url, self.timeouts).get_object(**kw)
        if self.size is None:
            self.size = int(resp["ContentLength"])
            self.etag = resp.get("ETag")
        elif self.pos:
            self._check_range(resp)
        self._body = resp["Body"]

    def _check_range(self, resp: dict) -> None:
        # Without this, a server that ignores Range (200 + the whole object) would have
        # its first bytes appended at the resume point. Failing is the honest answer:
        # re-reading from byte 0 would re-parse what the caller already has.
        status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
        want = f"bytes {self.pos}-{self.size - 1}/{self.size}"
        got = resp.get("ContentRange", "")
        if status != 206 or got != want:
            resp["Body"].close()
            raise RangeIgnored(f"{self.url}: resuming at byte {self.pos} got HTTP {status} "
                               f"with Content-Range {got!r}, not 206 with {want!r}")

    def _check_deadline(self) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise ShardDeadline(f"{self.url}: the shard deadline passed at byte {self.pos} "
                                f"of {self.size}")

    def _open_if_closed(self) -> None:
        if self._body is None:
            self._open()

    def _drop_body(self) -> None:
        if self._body is not None:
            try:
                self._body.close()
            except Exception:  # noqa: BLE001 - the connection is already broken
                pass
            self._body = None

    def _with_retries(self, fn):
        attempt = 0
        while True:
            try:
                return fn()
            except Exception as exc:
                if not _is_transient(exc) or attempt + 1 >= self.retry.max_attempts:
                    raise
                log.debug("%s: transient error at byte %d (%s); retrying", self.url, self.pos, exc)
                self._drop_body()
                self._check_deadline()
                time.sleep(self.retry.delay(attempt))
                attempt += 1
                self.reopens += 1  # fn() reopens at self.pos: the body is gone

    def readinto(self, b) -> int:
        if self.size is not None and self.pos >= self.size:
            return 0
        want = len(b)

        def once() -> bytes:
            self._check_deadline()
            if self._body is None:
                self._open()
            chunk = self._read_some(want)
            if not chunk and self.pos < (self.size or 0):
                # A clean EOF before Content-Length: the server or a proxy hung up.
                raise ConnectionResetError(f"{self.url}: stream ended at byte {self.pos}")
            return chunk

        chunk = self._with_retries(once)
        n = len(chunk)
        b[:n] = chunk
        self.pos += n
        return n

    def _read_some(self, want: int) -> bytes:
        # One socket read at most (urllib3's read1), not "until ``want`` bytes": a server
        # trickling bytes then cannot hold a 1 MB read past the deadline.
        raw = getattr(self._body, "_raw_stream", None)
        if raw is not None and hasattr(raw, "read1"):
            return raw.read1(want)
        return self._body.read(want)

    def close(self) -> None:
        self._drop_body()
        super().close()


def open_s3(url: str, endpoint_url: str = "", buffer_size: int = 1 << 20, *,
            timeouts: Timeouts | None = None, deadline: float | None = None) -> io.BufferedReader:
    """Open ``s3://bucket/key`` for streaming reads with byte-range resumption."""
    raw = S3RangeReader(url, endpoint_url, timeouts=timeouts, deadline=deadline)
    return io.BufferedReader(raw, buffer_size=buffer_size)


def gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
    """The ``webdataset.gopen_schemes["s3"]`` opener (read only)."""
    if mode != "rb":
        raise ValueError(f"{url}: the s3 opener only reads (mode {mode!r})")
    return open_s3(url, _DEFAULT_ENDPOINT)


def register_gopen() -> None:
    """Let plain ``webdataset`` pipelines read ``s3://`` URLs through :func:`gopen_s3`."""
    import importlib

    # importlib: the package re-exports a *function* named gopen over the module's name.
    importlib.import_module("webdataset.gopen").gopen_schemes["s3"] = gopen_s3


# --------------------------------------------------------------------------- writing


def put_bytes(url: str, data: bytes, endpoint_url: str = "") -> None:
    bucket, key = split_s3_url(url)
    client(endpoint_url).put_object(Bucket=bucket, Key=key, Body=data)


def put_file(path: str, url: str, endpoint_url: str = "", part_size: int = 64 << 20,
             concurrency: int = 4) -> None:
    """Upload a local file; multipart above ``part_size`` with a few parts in flight."""
    from boto3.s3.transfer import TransferConfig

    bucket, key = split_s3_url(url)
    cfg = TransferConfig(multipart_threshold=part_size, multipart_chunksize=part_size,
                         max_concurrency=concurrency, use_threads=concurrency > 1)
    client(endpoint_url).upload_file(path, bucket, key, Config=cfg)


def get_bytes(url: str, endpoint_url: str = "") -> bytes:
    with open_s3(url, endpoint_url) as f:
        return f.read()


def head(url: str, endpoint_url: str = "") -> int | None:
    """The object's size, or None when it does not exist."""
    from botocore.exceptions import ClientError

    bucket, key = split_s3_url(url)
    try:
        return int(client(endpoint_url).head_object(Bucket=bucket, Key=key)["ContentLength"])
    except ClientError as e:
        if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
            return None
        raise


def delete(url: str, endpoint_url: str = "") -> None:
    bucket, key = split_s3_url(url)
    client(endpoint_url).delete_object(Bucket=bucket, Key=key)
