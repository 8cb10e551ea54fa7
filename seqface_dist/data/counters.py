"""Counters of what the reader did: samples, shards, bytes, and bad samples by reason.

They live in the worker process that reads; after each batch the worker writes them as a
row of integers into shared memory (:class:`seqface_dist.data.batchring.BatchRing`), and
:class:`seqface_dist.data.loader.TrainLoader` sums the rows, so the training process (and
its Prometheus metrics) sees totals without any extra channel between processes.

Bad-sample reasons: ``corrupt_tar``, ``truncated_shard``, ``duplicate_member``,
``missing_jpg``, ``missing_json``, ``bad_json``, ``wrong_kind``, ``label_out_of_range``,
``bad_jpeg``, ``bad_image_size``.

Failed-shard reasons (counted once per shard given up, also in ``failed_shards``; the
samples the shard gave before it failed stay given; :mod:`faults`):
``shard_open_error`` / ``shard_read_error`` (anything else, before / after the open),
``s3_forbidden`` (403: denied, expired or invalid credentials), ``s3_not_found`` (404),
``s3_precondition`` (412: the object was replaced mid-read), ``s3_server_error`` (5xx or
throttling after every retry), ``s3_timeout`` (connect or read timeout after every retry),
``s3_connection`` (refused, reset or cut connections after every retry),
``s3_range_ignored`` (a resumed read did not get ``206`` from the requested byte),
``bad_tar_header`` (a tar size field that is not plain octal), ``shard_deadline``
(``data.shard_deadline_s`` passed), ``checksum_mismatch`` (``data.verify_checksums``: the
bytes differ from the manifest's sha256, found at the end of the shard).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from seqface_dist.data.faults import SHARD_REASONS

FIELDS = ("samples", "shards", "bytes", "s3_reopens", "failed_shards")
REASONS = ("corrupt_tar", "truncated_shard", "duplicate_member", "missing_jpg", "missing_json",
           "bad_json", "wrong_kind", "label_out_of_range", "bad_jpeg", "bad_image_size",
           *SHARD_REASONS)
ROW_WIDTH = len(FIELDS) + len(REASONS)


class DataCounters:
    def __init__(self) -> None:
        self.samples = 0  # good samples delivered
        self.shards = 0  # shards opened
        self.bytes = 0  # shard bytes read
        self.s3_reopens = 0  # ranged resumptions after transient S3 errors
        self.failed_shards = 0  # shards given up (each also counted by reason in ``bad``)
        self.bad: Counter[str] = Counter()

    def snapshot(self) -> dict:
        return {"samples": self.samples, "shards": self.shards, "bytes": self.bytes,
                "s3_reopens": self.s3_reopens, "failed_shards": self.failed_shards,
                "bad": dict(self.bad)}

    def row(self) -> list[int]:
        """The counters as ``ROW_WIDTH`` integers: FIELDS, then REASONS in order."""
        unknown = set(self.bad) - set(REASONS)
        if unknown:
            raise ValueError(f"bad-sample reasons {sorted(unknown)} are not in "
                             f"counters.REASONS; add them there")
        return [self.samples, self.shards, self.bytes, self.s3_reopens, self.failed_shards,
                *(self.bad[r] for r in REASONS)]

    @staticmethod
    def from_row(row: Sequence[int]) -> dict:
        """The snapshot that :meth:`row` was made from (reasons that never happened left out)."""
        row = [int(v) for v in row]
        out: dict = dict(zip(FIELDS, row, strict=False))
        out["bad"] = {r: n for r, n in zip(REASONS, row[len(FIELDS):], strict=True) if n}
        return out

    @staticmethod
    def add(a: dict, b: dict) -> dict:
        """Sum two snapshots."""
        out = {k: a.get(k, 0) + b.get(k, 0) for k in FIELDS}
        bad = Counter(a.get("bad", {}))
        bad.update(b.get("bad", {}))
        out["bad"] = dict(bad)
        return out

    @staticmethod
    def empty() -> dict:
        return DataCounters().snapshot()
