"""Build -> upload -> stream against a real S3 HTTP endpoint (moto's server on loopback),
with and without a proxy that cuts connections mid-object."""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from seqface_dist.config import DataConfig
from seqface_dist.data import s3, store
from seqface_dist.data.build import BuildOptions, build_identity_tree, write_shard_set
from seqface_dist.data.loader import make_train_loader
from seqface_dist.data.manifest import resolve_shard_set
from seqface_dist.data.samples import SampleStream
from seqface_dist.data.testing import CuttingProxy, local_s3
from seqface_dist.data.verify import verify_shard_set

SIZE = (32, 32)


def noisy(seed: int) -> np.ndarray:
    # Noise compresses badly: ~3 kB per JPEG, so a shard spans several proxy cuts.
    return (np.random.default_rng(seed).random((*SIZE, 3)) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def s3_sets(tmp_path_factory):
    """An identity set (from a folder tree) and a sequence set (from arrays) in S3."""
    from PIL import Image

    root = tmp_path_factory.mktemp("tree")
    for i in range(12):
        os.makedirs(root / f"id{i:02d}")
        for j in range(8):
            Image.fromarray(noisy(100 * i + j)).save(root / f"id{i:02d}" / f"{j}.jpg", quality=90)
    with local_s3("bucket") as endpoint:
        build_identity_tree(str(root), "s3://bucket/ids",
                            BuildOptions(image_size=SIZE, max_samples=12, progress=False))
        seqs = [(q % 10, noisy(10_000 + q)) for q in range(60)]
        write_shard_set(seqs, "s3://bucket/seqs", "sequence", max_samples=10)
        yield endpoint


def collect(spec: str, rank: int, world: int, workers: int, endpoint: str = "") -> list[dict]:
    stream = SampleStream([resolve_shard_set(spec, endpoint)], rank=rank, world_size=world,
                          seed=7, shuffle_buffer=16, endpoint_url=endpoint)
    loader = DataLoader(stream, batch_size=None, num_workers=workers)
    return [{k: s[k] for k in ("center", "key", "url", "rank", "worker")} for s in loader]


def test_each_sample_exactly_once_over_2_ranks_x_2_workers(s3_sets):
    ss = resolve_shard_set("s3://bucket/ids")
    assert len(ss.shards) == 8 and ss.num_samples == 96
    got = collect("s3://bucket/ids", 0, 2, 2) + collect("s3://bucket/ids", 1, 2, 2)
    keys = Counter((s["url"], s["key"]) for s in got)
    assert len(keys) == 96 and set(keys.values()) == {1}
    # Disjoint: every shard is read by exactly one (rank, worker), and all four took part.
    owners: dict[str, set] = {}
    for s in got:
        owners.setdefault(s["url"], set()).add((s["rank"], s["worker"]))
    assert all(len(o) == 1 for o in owners.values())
    assert set().union(*owners.values()) == {(0, 0), (0, 1), (1, 0), (1, 1)}
    # Centers are the identity indices of the label map: 8 images per identity.
    assert Counter(s["center"] for s in got) == {i: 8 for i in range(12)}


def test_connections_cut_mid_object_lose_and_repeat_nothing(s3_sets):
    with CuttingProxy(s3_sets, cut_after=20_000) as proxy:
        got = collect("s3://bucket/ids", 0, 1, 2, endpoint=proxy.url)
        assert proxy.cuts >= 8  # every shard (~40 kB) was cut at least once
    keys = Counter((s["url"], s["key"]) for s in got)
    assert len(keys) == 96 and set(keys.values()) == {1}


@pytest.mark.slow  # waits out botocore's and the reader's backoff
def test_throttling_503s_and_cuts_lose_and_repeat_nothing(s3_sets):
    with CuttingProxy(s3_sets, cut_after=20_000, throttle_every=4) as proxy:
        got = collect("s3://bucket/ids", 0, 1, 2, endpoint=proxy.url)
        assert proxy.throttled >= 4 and proxy.cuts >= 8
    keys = Counter((s["url"], s["key"]) for s in got)
    assert len(keys) == 96 and set(keys.values()) == {1}


@pytest.mark.slow  # waits out botocore's and the reader's backoff
def test_throttling_beyond_botocore_retries_is_retried_by_the_reader(s3_sets):
    # The first read (the manifest) meets 6 throttled connections in a row: botocore gives
    # up after 5 attempts and the reader's own backoff must carry it through.
    with CuttingProxy(s3_sets, None, throttle_every=10**6, throttle_run=6) as proxy:
        got = collect("s3://bucket/ids", 0, 1, 2, endpoint=proxy.url)
        assert proxy.throttled == 6
    assert len({(s["url"], s["key"]) for s in got}) == len(got) == 96


def test_range_reader_resumes_and_counts_reopens(s3_sets):
    data = os.urandom(300_000)
    store.write_bytes("s3://bucket/blob", data)
    with CuttingProxy(s3_sets, cut_after=50_000) as proxy:
        with s3.open_s3("s3://bucket/blob", proxy.url) as f:
            assert f.read() == data
            assert f.raw.reopens >= 5
    # Plain webdataset code reads s3:// through the same reader once it is registered.
    import importlib

    with CuttingProxy(s3_sets, cut_after=50_000) as proxy:
        s3.configure(proxy.url)
        with importlib.import_module("webdataset.gopen").gopen("s3://bucket/blob") as f:
            assert f.read() == data
    s3.configure("")
    # Without resumption the same cut is an error the caller sees.
    with CuttingProxy(s3_sets, cut_after=50_000) as proxy:
        reader = s3.S3RangeReader("s3://bucket/blob", proxy.url, s3.RetryPolicy(max_attempts=1))
        with pytest.raises(Exception):  # noqa: B017 - botocore/urllib3 error types vary
            while reader.read(65536):
                pass


def test_multipart_upload_round_trips(s3_sets, tmp_path):
    src = tmp_path / "big.bin"
    data = os.urandom(11 << 20)
    src.write_bytes(data)
    s3.put_file(str(src), "s3://bucket/big.bin", part_size=5 << 20)
    head = s3.client().head_object(Bucket="bucket", Key="big.bin")
    assert head["ETag"].strip('"').endswith("-3")  # three parts: a multipart upload
    assert store.read_bytes("s3://bucket/big.bin") == data


def test_mixed_batches_from_s3_and_endpoint_from_config(s3_sets, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # the config field alone must be enough
    cfg = DataConfig(identity_shards=["s3://bucket/ids"],
                     sequence_shards=["s3://bucket/seqs/seqs-{000000..000005}.tar"],
                     identities_per_batch=4, sequences_per_batch=3, num_workers=2,
                     resampled=False, shuffle_buffer=8, s3_endpoint_url=s3_sets, random_crop=2)
    loader = make_train_loader(cfg, rank=0, world_size=1, image_size=SIZE, channels=3, seed=1)
    assert loader.layout.num_identities == 12 and loader.layout.num_sequences == 10
    batches = list(loader)
    # 96 identity samples / 4 per batch = 24; 60 sequence samples / 3 = 20: the lesser.
    assert len(batches) == len(loader) == 20
    for images, centers in batches:
        assert images.shape == (7, *SIZE, 3) and images.dtype == torch.uint8
        assert centers.dtype == torch.int64
        assert (centers[:4] < 12).all() and (centers[4:] >= 12).all() and (centers < 22).all()
    c = loader.counters()
    assert c["samples"] >= 20 * 7 and c["shards"] >= 8 and c["bytes"] > 0 and c["bad"] == {}


def test_verify_catches_a_tampered_shard_in_s3(s3_sets):
    assert verify_shard_set("s3://bucket/ids").ok
    data = bytearray(store.read_bytes("s3://bucket/ids/ids-000003.tar"))
    data[2000] ^= 0xFF
    store.write_bytes("s3://bucket/ids/ids-000003.tar", bytes(data))
    res = verify_shard_set("s3://bucket/ids")
    assert not res.ok and any("ids-000003.tar" in e and "sha256" in e for e in res.errors)
