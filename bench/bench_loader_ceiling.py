"""The loader against the decode bound: as shipped, and without some of its work.

    .venv/bin/python -m bench.bench_loader_ceiling [--samples 4096] [--rounds 5]

The local loader of ``bench_data.py`` (2 batch worker processes) against the 2-process decode
bound, in rounds measured back to back, in three variants:
- ``real``: as shipped;
- ``pre-parsed``: every shard's samples (tar members, JSON and label checks) parsed into
  memory before the workers start, so tar and JSON cost nothing: the ceiling of any
  faster tar/JSON code;
- ``pre-parsed, no flip``: the same without the random flip: what is left is the shuffle
  buffer, decoding into the batch and the handoff to the main process.
Prints each round and the medians of the per-round ratios. Figures, not asserts; the last
line of stdout is one JSON object holding them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile

from bench.bench_data import SIZE, build_sets, decode_bound, loader_rate
from seqface_dist.data import images, stream
from seqface_dist.data.manifest import resolve_shard_set


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=4096, help="per kind")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ids, seqs, blobs = build_sets(tmp, args.samples)
        real = stream.ShardReader.raw_samples
        parsed = {}  # url -> checked samples, made before any worker forks
        for spec in (ids, seqs):
            for ref in stream.shard_refs([resolve_shard_set(spec)], 0):
                parsed[ref.url] = list(real(stream.ShardReader(SIZE, 3), ref))

        def pre_parsed(self, ref):
            self.counters.shards += 1
            yield from parsed[ref.url]

        ratios: dict[str, list[float]] = {"real": [], "pre-parsed": [],
                                          "pre-parsed, no flip": []}
        rounds: list[dict] = []
        for r in range(args.rounds):
            bound = decode_bound(blobs, 2, images.decoder_name(), 2)
            for name in ratios:
                stream.ShardReader.raw_samples = pre_parsed if "pre" in name else real
                # The workers fork after this: they run the function set here.
                ratios[name].append(loader_rate(ids, seqs, 2, 2, flip="flip" not in name)[0]
                                    / bound)
            stream.ShardReader.raw_samples = real
            print(f"round {r + 1}: decode bound {bound:6.0f} images/s; loader / bound: "
                  + ", ".join(f"{k} {v[-1]:.2f}" for k, v in ratios.items()), flush=True)
            rounds.append({"round": r + 1, "decode_bound_images_per_s": bound,
                           "loader_over_bound": {k: v[-1] for k, v in ratios.items()}})
        print(f"median over {args.rounds} rounds: "
              + ", ".join(f"{k} {statistics.median(v):.2f}" for k, v in ratios.items()))
    print(json.dumps({"bench": "loader_ceiling", "args": vars(args), "rounds": rounds,
                      "median_loader_over_bound": {k: statistics.median(v)
                                                   for k, v in ratios.items()}}))  # last line


if __name__ == "__main__":
    main()
