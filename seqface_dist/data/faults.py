"""Why a shard failed, and how many failures a pass may take before training stops.

Every per-shard failure gets one reason (``classify``), counted like a bad sample
(:mod:`counters`) and shown in the metrics. A failed shard is skipped from the point of
failure: the samples it already gave stay given, nothing is read twice. A reader fails
the pass only past its budget (:class:`FailureBudget`), with an error that names the
failed shards and their reasons.
"""

from __future__ import annotations

from dataclasses import dataclass

# Reasons a whole shard is given up (a subset of counters.REASONS).
SHARD_REASONS = ("shard_open_error", "shard_read_error", "s3_forbidden", "s3_not_found",
                 "s3_precondition", "s3_server_error", "s3_timeout", "s3_connection",
                 "s3_range_ignored", "bad_tar_header", "shard_deadline", "checksum_mismatch")

_FORBIDDEN_CODES = {"AccessDenied", "ExpiredToken", "ExpiredTokenException", "InvalidAccessKeyId",
                    "InvalidToken", "SignatureDoesNotMatch", "TokenRefreshRequired",
                    "AllAccessDisabled", "AccountProblem"}
_NOT_FOUND_CODES = {"NoSuchKey", "NoSuchBucket", "NotFound", "404"}
_SERVER_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
                 "InternalError", "ServiceUnavailable"}


class ShardFailure(Exception):
    """A failure the reader itself detects; ``reason`` is its counter reason.
    Not an OSError on purpose: the S3 reader must not retry these."""

    reason = "shard_read_error"


class RangeIgnored(ShardFailure):
    """A resumed read did not get ``206`` with the requested ``Content-Range``."""

    reason = "s3_range_ignored"


class ShardDeadline(ShardFailure):
    """Reading one shard took longer than ``data.shard_deadline_s``."""

    reason = "shard_deadline"


class ChecksumMismatch(ShardFailure):
    """The shard's bytes do not hash to the manifest's sha256 (``data.verify_checksums``)."""

    reason = "checksum_mismatch"


class ShardBudgetError(RuntimeError):
    """More shards failed in one pass than ``data.max_failed_shard_fraction`` allows."""


def _client_error_reason(exc) -> str | None:
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0
    code = str(exc.response.get("Error", {}).get("Code", ""))
    if status == 403 or code in _FORBIDDEN_CODES:
        return "s3_forbidden"
    if status == 404 or code in _NOT_FOUND_CODES:
        return "s3_not_found"
    if status == 412 or code == "PreconditionFailed":
        return "s3_precondition"
    if status >= 500 or code in _SERVER_CODES:
        return "s3_server_error"
    return None


def _s3_reason(exc: BaseException) -> str | None:
    import urllib3.exceptions as ux
    from botocore import exceptions as bx

    if isinstance(exc, bx.ClientError):
        return _client_error_reason(exc)
    # Timeouts first: botocore's timeout classes are also connection errors.
    if isinstance(exc, (bx.ReadTimeoutError, bx.ConnectTimeoutError, ux.TimeoutError,
                        TimeoutError)):
        return "s3_timeout"
    if isinstance(exc, (bx.EndpointConnectionError, bx.ConnectionClosedError,
                        bx.ResponseStreamingError, bx.IncompleteReadError, bx.HTTPClientError,
                        bx.ConnectionError, ux.HTTPError, ConnectionError)):
        return "s3_connection"
    return None


def classify(exc: BaseException, url: str, opened: bool) -> str:
    """The counter reason of a shard failure; ``opened``: the shard was open (mid-read)."""
    from seqface_dist.data.tario import TarHeaderError

    if isinstance(exc, ShardFailure):
        return exc.reason
    if isinstance(exc, TarHeaderError):
        return "bad_tar_header"
    if url.startswith("s3://"):
        reason = _s3_reason(exc)
        if reason is not None:
            return reason
    return "shard_read_error" if opened else "shard_open_error"


@dataclass(frozen=True)
class FailureBudget:
    """Failed shards one reader (a worker's pass over its shards) tolerates.

    The pass fails once ``failed > allowance`` *and* ``failed > max_fraction * tried``,
    ``tried`` counting every shard the reader began (opened or not) so far. The allowance
    keeps one or two bad shards from stopping a small set (or the start of a pass, where
    ``tried`` is still small)."""

    max_fraction: float
    allowance: int

    def exceeded(self, failed: int, tried: int) -> bool:
        return failed > self.allowance and failed > self.max_fraction * tried

    def error(self, failures: list[tuple[str, str]], tried: int) -> ShardBudgetError:
        shown = ", ".join(f"{url} ({reason})" for url, reason in failures[:20])
        more = f" and {len(failures) - 20} more" if len(failures) > 20 else ""
        return ShardBudgetError(
            f"{len(failures)} of {tried} shards failed in this pass, more than the budget "
            f"(data.max_failed_shard_fraction = {self.max_fraction} of the shards tried, "
            f"data.failed_shard_allowance = {self.allowance} always tolerated): "
            f"{shown}{more}")
