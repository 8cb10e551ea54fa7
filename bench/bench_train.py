"""Training throughput: the whole stack against a bare PyTorch loop, and 2 workers vs 2 threads.

    .venv/bin/python -m bench.bench_train            # the figures in bench/RESULTS.md
    .venv/bin/python -m bench.bench_train --quick    # every path at toy sizes (~1 min)

(a) images/s of the whole stack (``seqface_dist.train.driver.run``: Ray Train, one worker,
    DeepSpeed-wrapped backbone, ``PartitionedHead``, ``make_train_loader`` over local
    shards, Prometheus metrics on) against a bare loop in a fresh process: the same step
    function (``seqface_dist.train.step.Trainer``, as the worker runs it) over a plain
    module (``LocalEngine``: torch SGD, no DeepSpeed), the same seed and thread count,
    fed by the *same* ``make_train_loader`` over the same shards (the fair comparison);
    a second bare run cycles pre-decoded batches held in memory (no data path at all) to
    show what the loader costs. Target: stack >= 0.9x bare.
    Same init, data and optimizer, so the two runs' losses at the first logged steps must
    agree to float noise: printed, as evidence that both do the same work.
(b) 2 workers x 1 torch thread against 1 worker x 2 threads, the same global batch
    (2 x (B/2) vs 1 x B), each worker with its own shard loader.

Default size: ``tiny`` at 112x96 RGB (SphereFace's crop, so the JPEG decode and batch
assembly are those of real training), 32 identity + 32 sequence samples a step, 512-d
features. On this CPU a step is ~0.3 s of backbone compute per thread, far above the
stack's per-step bookkeeping, so the ratio measures overhead, not noise; sphere20 at
112x96 runs ~2 images/s per core here (a 64-sample step takes ~30 s), too slow to time.

Rates exclude warm-up: Ray start, worker start, DeepSpeed init and the first ``--warmup``
steps. The stack's rate comes from rank 0's ``history.jsonl`` (``samples_per_second`` of
each log window after the warm-up, combined as total samples / total time); the bare
loop's from its own clock over the same steps. Figures, not asserts. The load average
(/proc/loadavg) is printed around every run: on a shared machine compare only ratios
measured in the same invocation. The last line of stdout is one JSON object holding the
figures printed above it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from bench.bench_data import face_like
from seqface_dist.config import config_from_dict

# log_every 10 is the config default: a ray.train.report every 10 steps (see RESULTS.md on
# what shorter intervals cost).
FULL = {"backbone": "tiny", "size": [112, 96], "batch": 32, "samples": 1024, "steps": 60,
        "warmup": 10, "log_every": 10, "repeats": 2, "a_threads": 1}
QUICK = {"backbone": "tiny", "size": [32, 32], "batch": 8, "samples": 128, "steps": 6,
         "warmup": 2, "log_every": 2, "repeats": 1, "a_threads": 2}


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def load_figures(text: str) -> list[float]:
    """A :func:`load` reading as numbers: the 1, 5 and 15 minute load averages."""
    return [float(x) for x in text.split()]


# --------------------------------------------------------------------------- shards


def build_shards(root: Path, n: int, size: tuple[int, int]) -> tuple[str, str]:
    """``n`` identity samples over n/4 identities and ``n`` sequence samples over n/8
    sequences (labels only size the head; nothing here is meant to be learned)."""
    from seqface_dist.data.build import write_shard_set

    ids = ((i % max(n // 4, 1), face_like(i, size)) for i in range(n))
    seqs = ((i // 8, face_like(10**6 + i, size)) for i in range(n))
    per_shard = max(n // 4, 1)
    write_shard_set(ids, str(root / "ids"), "identity", max_samples=per_shard)
    write_shard_set(seqs, str(root / "seqs"), "sequence", max_samples=per_shard)
    return str(root / "ids"), str(root / "seqs")


def make_cfg(sz: dict, shards: tuple[str, str], storage: Path, name: str, *, workers: int,
             threads: int) -> dict:
    """One run's config. ``sz['batch']`` is the *global* batch per kind, split over workers."""
    per = sz["batch"] // workers
    return {
        "model": {"backbone": sz["backbone"], "embedding_dim": 512, "input_size": sz["size"],
                  "in_channels": 3},
        "loss": {"dsa_p": 0.05},
        "data": {"identity_shards": [shards[0]], "sequence_shards": [shards[1]],
                 "identities_per_batch": per, "sequences_per_batch": per, "num_workers": 1,
                 "shuffle_buffer": 100,
                 # One epoch covers the run: no DataLoader restart inside the timed steps.
                 "samples_per_epoch": (sz["steps"] + 2) * 2 * per},
        "optim": {"lr": 0.01, "max_steps": sz["steps"], "milestones": [10**6]},
        "train": {"run_name": name, "storage_path": str(storage), "num_workers": workers,
                  "cpus_per_worker": threads, "log_every": sz["log_every"],
                  "checkpoint_every": sz["steps"], "max_failures": 0},
    }


# --------------------------------------------------------------------------- the bare loop


def bare_loop(cfg_dict: dict, warmup: int, predecoded: bool) -> dict:
    """The same training step without Ray or DeepSpeed, in this (fresh) process."""
    import torch

    from seqface_dist.data.loader import make_train_loader
    from seqface_dist.train.step import local_trainer

    cfg = config_from_dict(cfg_dict)
    torch.set_num_threads(cfg.train.cpus_per_worker)
    o = cfg.optim
    loader = make_train_loader(cfg.data, rank=0, world_size=1,
                               image_size=tuple(cfg.model.input_size),
                               channels=cfg.model.in_channels, seed=cfg.train.seed)
    lay = loader.layout
    # The one training step, as the worker runs it, without Ray or DeepSpeed.
    trainer = local_trainer(cfg, lay.num_identities, lay.num_sequences)
    trainer.module.train()

    loader.set_epoch(0)
    batches = iter(loader)
    if predecoded:  # decode a few batches up front, then cycle them: no data path timed
        held = [next(batches) for _ in range(min(8, o.max_steps))]
        batches = (held[i % len(held)] for i in range(o.max_steps))
    stamps, losses = [], {}
    for step in range(o.max_steps):
        images, center_index = next(batches)
        out = trainer.step(images, center_index, step).out
        if (step + 1) % cfg.train.log_every == 0:
            losses[step + 1] = float(out.loss.detach())
        stamps.append(time.perf_counter())
    n = (len(stamps) - warmup) * loader.batch_size
    return {"rate": n / (stamps[-1] - stamps[warmup - 1]), "losses": losses}


def run_bare(cfg_dict: dict, warmup: int, predecoded: bool) -> dict:
    # A fresh spawned process: no Ray threads forked into the DataLoader workers, and a
    # clean allocator, like the stack's worker.
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(bare_loop, cfg_dict, warmup, predecoded).result()


# --------------------------------------------------------------------------- the stack


def run_stack(cfg_dict: dict, warmup: int) -> dict:
    from seqface_dist.train.driver import run
    from seqface_dist.train.history import history_path

    cfg = config_from_dict(cfg_dict)
    run(cfg)
    rows = [json.loads(line) for line in history_path(cfg).read_text().splitlines()]
    global_batch = cfg.train.num_workers * (cfg.data.identities_per_batch +
                                            cfg.data.sequences_per_batch)
    samples = seconds = 0.0
    prev = 0
    for r in rows:
        window = (r["step"] - prev) * global_batch
        if prev >= warmup:
            samples += window
            seconds += window / r["samples_per_second"]
        prev = r["step"]
    if not samples:
        raise RuntimeError(f"no log window after step {warmup}: raise --steps")
    return {"rate": samples / seconds, "losses": {r["step"]: r["total"] for r in rows}}


# --------------------------------------------------------------------------- main


def timed(label: str, fn, *args) -> dict:
    before, t = load(), time.perf_counter()
    res = fn(*args)
    res.update(load_before=before, load_after=load(), wall=time.perf_counter() - t)
    print(f"  {label:44s} {res['rate']:8.1f} images/s   (load {before} -> "
          f"{res['load_after']}; run {res['wall']:.0f} s)", flush=True)
    return res


def ratio_line(label: str, num: list[dict], den: list[dict], note: str = "") -> dict:
    """Prints one ratio per round (and their median if more than one); returns them."""
    r = [a["rate"] / b["rate"] for a, b in zip(num, den, strict=True)]
    print(f"  {label:46s} = {' '.join(f'{x:.3f}' for x in r)}"
          + (f"  (median {float(np.median(r)):.3f})" if len(r) > 1 else "") + note)
    return {"per_round": r, "median": float(np.median(r))}


def run_figures(res: dict) -> dict:
    """One timed run's printed figures, for the JSON line."""
    return {"images_per_s": res["rate"], "load_before": load_figures(res["load_before"]),
            "load_after": load_figures(res["load_after"]), "wall_s": res["wall"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="toy sizes: every path in ~1 min")
    ap.add_argument("--backbone", help="default tiny (see the module doc)")
    ap.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="default 112 96")
    ap.add_argument("--batch", type=int, help="global identities (= sequences) per step")
    ap.add_argument("--steps", type=int, help="steps per run, warm-up included")
    ap.add_argument("--warmup", type=int, help="steps left out of every rate")
    ap.add_argument("--log-every", type=int, help="train.log_every (a ray.train.report each)")
    ap.add_argument("--repeats", type=int, help="interleaved rounds of every run (default 2, "
                    "quick 1): on a shared machine the load drifts between runs")
    ap.add_argument("--a-threads", type=int, choices=(1, 2), help="torch threads of (a)'s "
                    "bare loop and stack run (default 1; quick 2, where (a)'s stack run is "
                    "also (b)'s 1 worker x 2 threads run: one Ray Train start fewer)")
    ap.add_argument("--keep", help="write shards and runs here (default: a temp folder)")
    args = ap.parse_args()
    sz = dict(QUICK if args.quick else FULL)
    for key in ("backbone", "size", "batch", "steps", "warmup", "log_every", "repeats",
                "a_threads"):
        if getattr(args, key) is not None:
            sz[key] = list(getattr(args, key)) if key == "size" else getattr(args, key)
    if sz["warmup"] % sz["log_every"] or sz["steps"] <= sz["warmup"] or sz["batch"] % 2:
        ap.error("need --steps > --warmup, --warmup a multiple of the log interval "
                 f"({sz['log_every']}) and an even --batch")

    import ray

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        root = Path(args.keep or tmp).resolve()
        root.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        shards = build_shards(root / "shards", sz["samples"], tuple(sz["size"]))
        build_s, load_start = time.perf_counter() - t, load()
        b = sz["batch"]
        print(f"== setup\n  {sz['backbone']} at {sz['size'][0]}x{sz['size'][1]} RGB, 512-d, "
              f"global batch {b} identities + {b} sequences, {sz['steps']} steps a run, "
              f"first {sz['warmup']} left out, log every {sz['log_every']}, "
              f"{sz['repeats']} round(s); shards ({2 * sz['samples']} JPEGs) built in "
              f"{build_s:.1f} s; {os.cpu_count()} CPUs, load {load_start}",
              flush=True)
        summary: dict = {"bench": "train", "args": vars(args),
                         "setup": {**sz, "jpegs": 2 * sz["samples"], "shards_build_s": build_s,
                                   "cpus": os.cpu_count(), "load": load_figures(load_start)}}

        def cfg(name: str, workers: int, threads: int, k: int) -> dict:
            return make_cfg(sz, shards, root / "runs", f"{name}-{os.getpid()}-{k}",
                            workers=workers, threads=threads)

        w = sz["warmup"]
        res: dict[str, list[dict]] = {k: [] for k in ("bare", "stack", "pre", "w1t2", "w2t1")}
        try:
            for k in range(sz["repeats"]):
                at = sz["a_threads"]
                one = cfg(f"stack-1w{at}t", 1, at, k)
                print(f"== round {k + 1}: (a) whole stack vs bare loop (1 worker, {at} "
                      "thread(s), 1 DataLoader worker)", flush=True)
                res["bare"].append(timed("bare loop, same shard loader", run_bare, one, w,
                                         False))
                if not ray.is_initialized():
                    # One local Ray for every stack run (dashboard off), never timed. Round
                    # 1's first bare run precedes it; later bare runs share the machine
                    # with an idle Ray.
                    ray.init(num_cpus=os.cpu_count(), include_dashboard=False,
                             object_store_memory=256 << 20, log_to_driver=False)
                res["stack"].append(timed("stack: Ray + DeepSpeed + head + loader", run_stack,
                                          one, w))
                res["pre"].append(timed("bare loop, pre-decoded batches", run_bare, one, w,
                                        True))
                print(f"== round {k + 1}: (b) 2 workers x 1 thread vs 1 worker x 2 threads "
                      "(same global batch)", flush=True)
                if at == 2:
                    res["w1t2"].append(res["stack"][-1])
                    print("  stack, 1 worker x 2 threads: the (a) run above")
                else:
                    res["w1t2"].append(timed("stack, 1 worker x 2 threads", run_stack,
                                             cfg("stack-1w2t", 1, 2, k), w))
                res["w2t1"].append(timed("stack, 2 workers x 1 thread", run_stack,
                                         cfg("stack-2w1t", 2, 1, k), w))
        finally:
            ray.shutdown()
        # Each run under its printed label, one entry per round. With --a-threads 2 the
        # 1 worker x 2 threads entry is (a)'s stack run itself (printed as "the (a) run").
        summary["runs"] = {label: [run_figures(x) for x in res[key]] for key, label in (
            ("bare", "bare loop, same shard loader"),
            ("stack", "stack: Ray + DeepSpeed + head + loader"),
            ("pre", "bare loop, pre-decoded batches"),
            ("w1t2", "stack, 1 worker x 2 threads"),
            ("w2t1", "stack, 2 workers x 1 thread"))}
        print("== ratios (one figure per round)")
        summary["ratios"] = {}
        for label, num, den, note in (
                ("stack / bare, same loader", "stack", "bare", "  (target >= 0.9)"),
                ("stack / bare, pre-decoded", "stack", "pre", ""),
                ("bare same loader / bare pre-decoded", "bare", "pre", ""),
                ("2 workers x 1 thread / 1 worker x 2 threads", "w2t1", "w1t2", "")):
            summary["ratios"][label] = ratio_line(label, res[num], res[den], note)
        bare, stack = res["bare"][0], res["stack"][0]
        common = sorted(set(bare["losses"]) & set(stack["losses"]))[:2]
        gap = max(abs(bare["losses"][s] - stack["losses"][s]) for s in common)
        print(f"  same work: |loss stack - bare| at steps {common} = {gap:.2e}")
        summary["same_work"] = {"steps": common, "loss_gap_stack_vs_bare": gap}
        load_end = load()
        print(f"== load average at the end: {load_end}")
        summary["load_end"] = load_figures(load_end)
    print(json.dumps(summary))  # the last line: the figures above, for tests and tools


if __name__ == "__main__":
    main()
