"""Storage errors are data: every per-shard failure is skipped, counted by reason and,
past a budget, stops the pass with an error naming the shards. A real S3 server on
loopback (moto) with a fault proxy in front of it (``testing.FaultProxy``)."""

from __future__ import annotations

import math
import time
from collections import Counter

import numpy as np
import pytest

from seqface_dist.config import ConfigError, DataConfig
from seqface_dist.data import s3, store, tario
from seqface_dist.data.build import write_shard_set
from seqface_dist.data.faults import ShardBudgetError
from seqface_dist.data.loader import make_train_loader
from seqface_dist.data.manifest import resolve_shard_set
from seqface_dist.data.samples import SampleStream
from seqface_dist.data.stream import ReadOptions, ShardReader, shard_refs
from seqface_dist.data.testing import FaultProxy, local_s3

BIG = (64, 64)  # noise JPEGs of ~7 kB: 400 make a shard of a few reader chunks (1 MB)
SMALL = (32, 32)


def noisy(seed: int, size) -> np.ndarray:
    return (np.random.default_rng(seed).random((*size, 3)) * 255).astype(np.uint8)


def make_set(url: str, shards: int, per_shard: int, size, seed: int = 0) -> None:
    samples = [(i % 5, noisy(seed + i, size)) for i in range(shards * per_shard)]
    write_shard_set(samples, url, "identity", num_classes=5, max_samples=per_shard)


def options(**kw) -> ReadOptions:
    return ReadOptions.from_config(DataConfig(**kw))


def read_all(spec: str, endpoint: str, opts: ReadOptions | None = None):
    """Every (url, key, center, jpg) one reader yields over the set, and the reader."""
    ss = resolve_shard_set(spec, endpoint)
    reader = ShardReader(tuple(ss.manifest.image_size), 3, endpoint, options=opts)
    out = [(ref.url, key, c, jpg) for ref in shard_refs([ss], 0)
           for c, jpg, key in reader.raw_samples(ref)]
    return out, reader


def assert_all_true_and_once(got: list, truth: dict) -> None:
    keys = Counter((u, k) for u, k, _, _ in got)
    assert set(keys.values()) <= {1}, "a sample was yielded twice"
    for url, key, center, jpg in got:
        assert truth[(url, key)] == (center, jpg), f"{url} {key}: not the stored sample"


@pytest.fixture(scope="module")
def s3_faults():
    """moto with a 2-shard set of large shards (400 samples, ~2.9 MB each: the cut comes after a
    few 1 MB reads) and a 6-shard
    set of small ones; yields (endpoint, truth of the large set)."""
    with local_s3("bucket") as endpoint:
        make_set("s3://bucket/big", 2, 400, BIG)
        make_set("s3://bucket/small", 6, 4, SMALL, seed=1000)
        got, _ = read_all("s3://bucket/big", endpoint)
        assert len(got) == 800
        yield endpoint, {(u, k): (c, j) for u, k, c, j in got}


def per_shard(got: list) -> Counter:
    return Counter(u for u, *_ in got)


def test_403_on_the_resumed_read_skips_the_rest_of_the_shard(s3_faults):
    endpoint, truth = s3_faults
    with FaultProxy(endpoint, cut_after=2_300_000, on_resume="forbid") as proxy:
        got, reader = read_all("s3://bucket/big", proxy.url)
        assert proxy.resumes == 2 and proxy.faults == 2
    assert_all_true_and_once(got, truth)
    # The samples of each shard's first 1 MB were yielded; the rest of it was given up.
    assert all(0 < n < 400 for n in per_shard(got).values()) and len(per_shard(got)) == 2
    c = reader.counters.snapshot()
    assert c["bad"] == {"s3_forbidden": 2} and c["failed_shards"] == 2
    assert set(reader.failures.values()) == {"s3_forbidden"}


def test_an_object_replaced_mid_read_is_not_stitched_on(s3_faults):
    endpoint, _ = s3_faults
    make_set("s3://bucket/repl", 1, 400, BIG, seed=5000)
    before, _ = read_all("s3://bucket/repl", endpoint)
    truth = {(u, k): (c, j) for u, k, c, j in before}
    with FaultProxy(endpoint, cut_after=2_300_000, on_resume="replace") as proxy:
        got, reader = read_all("s3://bucket/repl", proxy.url)
        assert proxy.faults == 1
    assert_all_true_and_once(got, truth)
    assert 0 < len(got) < 400
    assert reader.counters.bad == {"s3_precondition": 1}


def test_a_server_that_ignores_range_fails_the_shard_instead_of_appending(s3_faults):
    endpoint, truth = s3_faults
    with FaultProxy(endpoint, cut_after=2_300_000, on_resume="ignore_range") as proxy:
        got, reader = read_all("s3://bucket/big", proxy.url)
        assert proxy.faults == 2
    assert_all_true_and_once(got, truth)
    assert all(0 < n < 400 for n in per_shard(got).values())
    assert reader.counters.bad == {"s3_range_ignored": 2}


def test_cut_connections_alone_still_lose_and_repeat_nothing(s3_faults):
    endpoint, truth = s3_faults
    with FaultProxy(endpoint, cut_after=2_300_000) as proxy:
        got, reader = read_all("s3://bucket/big", proxy.url)
        assert proxy.resumes == 2
    assert_all_true_and_once(got, truth)
    assert len(got) == 800 and reader.counters.bad == {} and reader.counters.s3_reopens == 2


def test_a_trickling_server_is_cut_off_by_the_shard_deadline(s3_faults):
    endpoint, _ = s3_faults
    # 64 B every 50 ms: a ~14 kB shard would take ~11 s; the deadline gives each 0.4 s.
    with FaultProxy(endpoint, trickle=(64, 0.05)) as proxy:
        t0 = time.monotonic()
        got, reader = read_all("s3://bucket/small/ids-{000000..000001}.tar", proxy.url,
                               options(shard_deadline_s=0.4))
        took = time.monotonic() - t0
    assert got == [] and reader.counters.bad == {"shard_deadline": 2}
    assert took < 4, took


def test_too_many_failed_shards_stop_the_pass_naming_them(s3_faults):
    endpoint, _ = s3_faults
    with FaultProxy(endpoint, forbid_all=True) as proxy:
        stream = SampleStream([resolve_shard_set("s3://bucket/small", proxy.url)],
                              endpoint_url=proxy.url)
        with pytest.raises(ShardBudgetError) as e:
            list(stream)
        # 2 failures are within the allowance; the 3rd of 3 tried is past 0.1 of them.
        assert proxy.faults == 3
    msg = str(e.value)
    assert msg.startswith("3 of 3 shards failed") and msg.count("(s3_forbidden)") == 3
    assert "data.max_failed_shard_fraction" in msg and "s3://bucket/small/ids-0000" in msg
    assert stream.counters.bad == {"s3_forbidden": 3}


def test_the_budget_comes_from_the_config_and_failures_reach_the_counters(s3_faults):
    endpoint, _ = s3_faults
    with FaultProxy(endpoint, forbid_all=True) as proxy:
        cfg = DataConfig(identity_shards=["s3://bucket/small"], sequence_shards=[],
                         identities_per_batch=2, sequences_per_batch=0, num_workers=0,
                         resampled=False, shuffle_buffer=0, s3_endpoint_url=proxy.url,
                         max_failed_shard_fraction=1.0)
        loader = make_train_loader(cfg, rank=0, world_size=1, image_size=SMALL, channels=3,
                                   seed=0)
        with pytest.raises(RuntimeError, match="gave no readable sample"):
            list(loader)  # every shard fails: the top-up draws give up, as before
    c = loader.counters()
    assert c["failed_shards"] == 6 and c["bad"] == {"s3_forbidden": 6}
    with FaultProxy(endpoint, forbid_all=True) as proxy:
        cfg.s3_endpoint_url, cfg.max_failed_shard_fraction = proxy.url, 0.5
        loader = make_train_loader(cfg, rank=0, world_size=1, image_size=SMALL, channels=3,
                                   seed=0)
        with pytest.raises(ShardBudgetError, match="3 of 3 shards failed"):
            list(loader)


def tar_with_bad_size(field: bytes) -> bytes:
    """Three samples; the second one's jpg header gets ``field`` as its size (checksum
    recomputed, so only the size is wrong)."""
    import io

    buf = io.BytesIO()
    w = tario.TarWriter(buf)
    for i in range(3):
        w.add(f"k{i}.jpg", b"\xff\xd8" + bytes([i]) * 600)
        w.add(f"k{i}.json", b'{"kind": "identity", "index": 0}')
    w.close()
    data = bytearray(buf.getvalue())
    off = 0
    for _ in range(2):  # skip k0.jpg and k0.json
        size = int(data[off + 124:off + 135], 8)
        off += 512 + (size + 511) // 512 * 512
    assert data[off:off + 6] == b"k1.jpg"
    data[off + 124:off + 136] = field
    data[off + 148:off + 156] = b" " * 8
    data[off + 148:off + 156] = b"%06o\0 " % sum(data[off:off + 512])
    return bytes(data)


@pytest.mark.parametrize("field", [b"0000000x001\0", b"\x80" + b"\0" * 7 + b"\xff" * 4,
                                   b"\xff" * 12, b"-0000000001\0"],
                         ids=["non-octal", "base-256", "base-256-negative", "signed"])
def test_a_tar_size_field_that_is_not_octal_fails_the_shard(tmp_path, field):
    data = tar_with_bad_size(field)
    out = str(tmp_path / "set")
    make_set(out, 1, 2, SMALL)
    ss = resolve_shard_set(out)
    store.write_bytes(ss.shards[0][0], data)
    got, reader = read_all(out, "")
    # Nothing after the bad header (k0, complete before it, is still waiting for its
    # group to close when the header fails, and goes with the shard).
    assert {k for _, k, _, _ in got} <= {"k0"}
    assert reader.counters.bad == {"bad_tar_header": 1} and reader.counters.failed_shards == 1


def test_verify_checksums_counts_a_tampered_shard_at_its_end(tmp_path):
    out = str(tmp_path / "set")
    make_set(out, 2, 4, SMALL)
    url = resolve_shard_set(out).shards[1][0]
    data = bytearray(store.read_bytes(url))
    data[1000] ^= 0xFF  # inside the first JPEG's bytes: the tar stays well formed
    store.write_bytes(url, bytes(data))
    got, reader = read_all(out, "", options(verify_checksums=True))
    # The samples were yielded (they cannot be recalled), the shard is counted failed.
    assert len(got) == 8 and reader.failures == {url: "checksum_mismatch"}
    assert reader.counters.bad == {"checksum_mismatch": 1}
    got, reader = read_all(out, "")  # off by default: nothing is hashed or counted
    assert len(got) == 8 and reader.counters.bad == {}


def test_timeouts_reach_botocore(s3_faults):
    endpoint, _ = s3_faults
    cfg = DataConfig(s3_connect_timeout_s=1.5, s3_read_timeout_s=2.5)
    c = s3.client(endpoint, ReadOptions.from_config(cfg).timeouts)
    assert (c.meta.config.connect_timeout, c.meta.config.read_timeout) == (1.5, 2.5)


@pytest.mark.parametrize("key,value", [
    ("s3_connect_timeout_s", 0.0), ("s3_read_timeout_s", math.inf),
    ("s3_read_timeout_s", math.nan), ("shard_deadline_s", -1.0),
    ("shard_deadline_s", math.inf), ("max_failed_shard_fraction", 1.5),
    ("max_failed_shard_fraction", math.nan), ("failed_shard_allowance", -1)])
def test_bad_fault_settings_are_refused_by_name(key, value):
    with pytest.raises(ConfigError, match=rf"^data\.{key}: "):
        DataConfig(**{key: value}).validate("data")
