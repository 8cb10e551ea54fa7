"""Where a loader worker's CPU goes, per sample: the parts of the pipeline one by one.

    .venv/bin/python -m bench.bench_loader_parts [--samples 4096] [--repeats 3]

One process, the shard sets of ``bench_data.py`` (112x112 JPEGs, 32 identities + 32
sequences per batch), CPU time per sample (best of ``--repeats``) of each stage alone and of
the whole worker loop (the train loader run in-process, ``num_workers=0``). Whatever the whole
loop costs beyond the JPEG decode is what keeps the loader below the decode bound.
Figures, not asserts; the last line of stdout is one JSON object holding them.
"""

from __future__ import annotations

import argparse
import glob
import json
import random
import tempfile
import time

import numpy as np
import torch

from bench.bench_data import SIZE, build_sets
from seqface_dist.config import DataConfig
from seqface_dist.data import images, tario
from seqface_dist.data.augment import augment_batch
from seqface_dist.data.loader import make_train_loader
from seqface_dist.data.manifest import resolve_shard_set
from seqface_dist.data.stream import ShardReader, kind_stream, shard_refs


def cpu_per_item(fn, repeats: int) -> float:
    """Best CPU microseconds per item of ``fn()``, which returns its item count."""
    best = float("inf")
    for _ in range(repeats):
        t = time.process_time()
        n = fn()
        best = min(best, (time.process_time() - t) / n * 1e6)
    return best


def json_name(printed: str) -> str:
    """A stage's key in the JSON line: its printed name, the indented sub-line named whole."""
    return "flip, numpy pixel axis" if "numpy pixel axis" in printed else printed.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=4096, help="per kind")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)  # as in a batch worker

    with tempfile.TemporaryDirectory() as tmp:
        ids, seqs, blobs = build_sets(tmp, args.samples)
        files = sorted(glob.glob(f"{tmp}/*/*.tar"))
        refs = shard_refs([resolve_shard_set(ids)], 0)

        def tar() -> int:
            n = 0
            for f in files:
                with open(f, "rb") as fh:
                    n += sum(1 for _ in tario.iter_samples(fh, print))
            return n

        def checked() -> int:
            reader = ShardReader(SIZE, 3)
            return sum(1 for r in refs for _ in reader.raw_samples(r))

        def stream() -> int:
            reader = ShardReader(SIZE, 3)
            return sum(1 for _ in kind_stream(refs, refs, reader.raw_samples, resampled=False,
                                              endless=False, shuffle_buffer=1000,
                                              rng=random.Random(0)))

        out = np.empty((*SIZE, 3), np.uint8)

        def decode() -> int:
            for b in blobs:
                images.decode_jpeg(b, 3, None, out)
            return len(blobs)

        batch = np.zeros((64, *SIZE, 3), np.uint8)

        def flip() -> int:
            for _ in range(50):
                augment_batch(batch, [True] * 64, random.Random(0), 0)
            return 50 * 64

        def flip_pixels_numpy() -> int:  # what augment_batch's torch flip is measured against
            for _ in range(5):
                for i in range(64):
                    batch[i] = batch[i, :, ::-1]
            return 5 * 64

        cfg = DataConfig(identity_shards=[ids], sequence_shards=[seqs],
                         identities_per_batch=32, sequences_per_batch=32, num_workers=0,
                         resampled=False, shuffle_buffer=1000, flip=True)
        loader = make_train_loader(cfg, rank=0, world_size=1, image_size=SIZE, channels=3,
                                   seed=0)  # num_workers=0: the worker loop runs in-process

        def whole() -> int:
            return sum(len(images) for images, _ in loader)

        r = args.repeats
        parts = {"tar parsing (2 members)": cpu_per_item(tar, r),
                 "+ json and label checks": cpu_per_item(checked, r),
                 "+ shuffle buffer, stream": cpu_per_item(stream, r),
                 "JPEG decode, tight loop": cpu_per_item(decode, r),
                 "flip, per mirrored image": cpu_per_item(flip, r),
                 "  (numpy pixel axis)": cpu_per_item(flip_pixels_numpy, r)}
        full = cpu_per_item(whole, r)
        for name, us in parts.items():
            print(f"{name:28s} {us:7.1f} us")
        dec = parts["JPEG decode, tight loop"]
        print(f"{'whole worker loop':28s} {full:7.1f} us per sample: decode share "
              f"{dec / full:.2f}, {full - dec:.1f} us beyond the decode")
    print(json.dumps({"bench": "loader_parts", "args": vars(args),
                      "us_per_sample": {**{json_name(k): v for k, v in parts.items()},
                                        "whole worker loop": full},
                      "decode_share": dec / full, "us_beyond_decode": full - dec}))  # last line


if __name__ == "__main__":
    main()
