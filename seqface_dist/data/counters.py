"""Counters of what the reader did: samples, shards, bytes, and bad samples by reason.

They live in the DataLoader worker that reads; every batch carries a snapshot of its
worker's counters, and :class:`seqface_dist.data.loader.TrainLoader` sums the latest
snapshot per worker, so the training process (and its Prometheus metrics) sees totals
without any extra channel between processes.

Bad-sample reasons: ``corrupt_tar``, ``truncated_shard``, ``duplicate_member``,
``missing_jpg``, ``missing_json``, ``bad_json``, ``wrong_kind``, ``label_out_of_range``,
``bad_jpeg``, ``bad_image_size``, ``shard_open_error``, ``shard_read_error``.
"""

from __future__ import annotations

from collections import Counter


class DataCounters:
    def __init__(self) -> None:
        self.samples = 0  # good samples delivered
        self.shards = 0  # shards opened
        self.bytes = 0  # shard bytes read
        self.s3_reopens = 0  # ranged resumptions after transient S3 errors
        self.bad: Counter[str] = Counter()

    def snapshot(self) -> dict:
        return {"samples": self.samples, "shards": self.shards, "bytes": self.bytes,
                "s3_reopens": self.s3_reopens, "bad": dict(self.bad)}

    @staticmethod
    def add(a: dict, b: dict) -> dict:
        """Sum two snapshots."""
        out = {k: a.get(k, 0) + b.get(k, 0) for k in ("samples", "shards", "bytes", "s3_reopens")}
        bad = Counter(a.get("bad", {}))
        bad.update(b.get("bad", {}))
        out["bad"] = dict(bad)
        return out

    @staticmethod
    def empty() -> dict:
        return DataCounters().snapshot()
