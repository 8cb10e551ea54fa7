"""Reader counters travel from worker processes as rows of integers: the row format."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from seqface_dist.data import counters
from seqface_dist.data.counters import REASONS, ROW_WIDTH, DataCounters

DATA = Path(counters.__file__).parent


def test_a_row_gives_back_the_snapshot_it_was_made_from():
    c = DataCounters()
    c.samples, c.shards, c.bytes, c.s3_reopens = 7, 2, 12345, 1
    c.bad["bad_jpeg"] += 3
    c.bad["shard_read_error"] += 1
    row = c.row()
    assert len(row) == ROW_WIDTH
    assert DataCounters.from_row(row) == c.snapshot()


def test_a_reason_the_row_cannot_carry_is_refused_by_name():
    c = DataCounters()
    c.bad["brand_new_reason"] += 1
    with pytest.raises(ValueError, match="brand_new_reason"):
        c.row()


def test_every_reason_the_reader_reports_fits_in_a_row():
    # The reasons are string literals passed to a problem callback in the reading code.
    said = set()
    for name in ("stream.py", "tario.py"):
        text = (DATA / name).read_text()
        said |= set(re.findall(r"(?:_problem\(ref(?:_url|\.url)|on_problem\()\s*,?\s*\"(\w+)\"",
                               text))
    assert {"bad_jpeg", "corrupt_tar", "truncated_shard", "duplicate_member"} <= said
    assert said <= set(REASONS), said - set(REASONS)
    doc = counters.__doc__
    assert all(f"``{r}``" in doc for r in REASONS)  # the module doc lists each one
