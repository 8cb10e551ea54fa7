"""Benchmarks of the partitioned head (issue 3): memory, communication, speed, scale plan.

    .venv/bin/python -m bench.bench_head memory   # N_id = N_seq = 1M, D 512, R = 2 gloo ranks
    .venv/bin/python -m bench.bench_head comm     # bytes/rank/step at N_id = 10k and 1M, R = 2
    .venv/bin/python -m bench.bench_head speed    # head R = 1, 2 vs dense, 100k and 1M; floor
    .venv/bin/python -m bench.bench_head speed --speed-n 1000000 --steps 1 --head-only
    .venv/bin/python -m bench.bench_head speed --speed-n 100000 --worlds 2 --head-only \
        --sample-rate 1.0 0.1 --partial-fc /path/to/insightface  # sampled softmax vs Partial FC
    .venv/bin/python -m bench.bench_head passes   # ops streaming the B x n / n x D buffers
    .venv/bin/python -m bench.bench_head scale    # one rank of 10M + 10M over R = 8, alone
    .venv/bin/python -m bench.bench_head --quick  # all of the above at tiny sizes (seconds)
    .venv/bin/python -m bench.bench_head memory comm --mode sequence_classes  # per mode
    .venv/bin/python -m bench.bench_head scale --mode lsr none sequence_classes \
        separate_heads masked_softmax --sample-rate 1.0 0.1 --head-dtype fp32 bf16

Each configuration runs in its own forked process(es), one thread each, fp32, global batch
256 (half identity, half sequence samples), SGD momentum 0.9 (W weight decay 5e-4).
Speed is compared on main-thread CPU time per step (time.thread_time), wall time beside
it: the machine's two cores are shared, so wall time includes waiting for a core.
Peak memory is VmHWM after the steps minus the RSS just before the head is built (torch
imported, gloo group up): the head's own footprint. A configuration whose estimated
footprint exceeds MemAvailable is skipped with a message (the machine is shared), unless
--force. Figures are printed, never asserted; results are recorded in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from bench.head_common import (
    GB,
    Setup,
    count_passes,
    dense_worker,
    head_worker,
    ideal_parts,
    local_rows,
    mem_available_bytes,
    run_processes,
    setup_dict,
)
from seqface_dist.config import SEQUENCE_MODES

FULL = {"memory_n": 1_000_000, "comm_n": (10_000, 1_000_000), "speed_n": (100_000, 1_000_000),
        "scale_n": 10_000_000, "dim": 512, "batch": 256, "steps": 2}
QUICK = {"memory_n": 3_000, "comm_n": (500, 5_000), "speed_n": (2_000, 4_000),
         "scale_n": 40_000, "dim": 32, "batch": 16, "steps": 2}


RESULT: dict[str, list[dict]] = {}  # every figure printed, by section: the final JSON line


def _record(section: str, **figures) -> None:
    RESULT.setdefault(section, []).append(figures)


def _gb(x: float) -> str:
    return f"{x / GB:.3f} GB"


def _fits(what: str, need: float, force: bool) -> bool:
    avail = mem_available_bytes()
    if need <= avail or force:
        return True
    print(f"  SKIPPED {what}: needs ~{_gb(need)}, MemAvailable is {_gb(avail)} "
          f"(shared machine; --force to run anyway)")
    return False


def _head_need(s: Setup) -> float:
    ranks = [s.solo_rank] if s.solo_rank >= 0 else range(s.world)
    need = sum(sum(ideal_parts(s, r).values()) for r in ranks) * 1.1 + 0.3 * GB * len(ranks)
    if s.gemm_reps:  # the GEMM timing's operands are freed before the head is built
        need = max(need, len(ranks) * (3 * s.batch + 2 * s.dim) * local_rows(s, 0)[0] * 4)
    return need


def _run_head(s: Setup) -> list[dict]:
    if s.solo_rank >= 0:
        return run_processes(head_worker, 1, setup_dict(s), gloo=False)
    return run_processes(head_worker, s.world, setup_dict(s), gloo=s.world > 1)


def _ms(xs: list[float]) -> str:
    return f"{statistics.median(xs) * 1e3:9.1f} ms (min {min(xs) * 1e3:.1f})"


def _wall_cpu(res: dict) -> str:
    """Median wall and main-thread CPU ms per step: on a shared machine the CPU figure is
    the one to compare (wall time includes waiting for a core)."""
    return (f"wall {statistics.median(res['step_s']) * 1e3:9.1f} ms, CPU "
            f"{statistics.median(res['cpu_s']) * 1e3:9.1f} ms")


# -- 1. memory ------------------------------------------------------------------------------

def _print_memory(res: dict, s: Setup) -> float:
    ideal = sum(res["ideal"].values())
    used = res["peak_rss"] - res["baseline_rss"]
    print(f"  rank {res['rank']}: {res['n_id_local']:,} W rows, {res['n_centers_local']:,} "
          f"center rows; baseline RSS {_gb(res['baseline_rss'])} (torch + gloo, subtracted)")
    for k, v in res["ideal"].items():
        print(f"      ideal  {k:34s} {_gb(v)}")
    print(f"      ideal  {'total':34s} {_gb(ideal)}")
    print(f"      peak RSS - baseline = {_gb(used)}  ->  {used / ideal:.3f} x ideal "
          f"(target <= 1.15); build {res['build_s']:.1f} s, step {_wall_cpu(res)}")
    return used / ideal


def bench_memory(sz: dict, force: bool) -> None:
    n = sz["memory_n"]
    s = Setup(n, n, sz["dim"], sz["batch"], world=2, steps=sz["steps"], mode=sz["mode"])
    print(f"\n== memory: N_id = N_seq = {n:,}, D = {s.dim}, global batch {s.batch}, R = 2 "
          f"gloo ranks, fp32, {s.warmup} + {s.steps} steps, sequence_mode {s.mode}")
    if not _fits("memory", _head_need(s), force):
        return
    for res in _run_head(s):
        x_ideal = _print_memory(res, s)
        print(f"      bytes sent per step: {res['bytes_per_step']}")
        _record("memory", mode=s.mode, n=n, rank=res["rank"], x_ideal=x_ideal,
                peak_gb=(res["peak_rss"] - res["baseline_rss"]) / GB,
                bytes_per_step=res["bytes_per_step"])


# -- 2. communication -----------------------------------------------------------------------

def bench_comm(sz: dict, force: bool) -> None:
    print(f"\n== communication: payload bytes handed to collectives per rank per step, R = 2, "
          f"global batch {sz['batch']}, D = {sz['dim']}, sequence_mode {sz['mode']}")
    seen = {}
    for n in sz["comm_n"]:
        s = Setup(n, n, sz["dim"], sz["batch"], world=2, steps=sz["steps"], mode=sz["mode"])
        if not _fits(f"comm N = {n:,}", _head_need(s), force):
            continue
        res = _run_head(s)
        per_rank = [sorted(set(r["bytes_per_step"])) for r in res]
        seen[n] = per_rank
        feat = s.local_batch * s.dim * 4
        _record("comm", mode=s.mode, n=n, bytes_per_step=per_rank)
        print(f"  N_id = N_seq = {n:>10,}: bytes/step per rank {per_rank} "
              f"(features gathered {feat:,} B/rank; their gradient all-reduced "
              f"{s.batch * s.dim * 4:,} B)")
    if len(seen) == len(sz["comm_n"]) > 1:
        values = {str(v) for v in seen.values()}
        print(f"  bytes/step equal across N_id: {len(values) == 1}")
        _record("comm_equal_across_n", mode=sz["mode"], equal=len(values) == 1)


# -- 3. speed ---------------------------------------------------------------------------------

def _dense_need(s: Setup, sparse: bool) -> float:
    n_id, n_c = s.num_identities, s.num_identities + s.num_sequences
    return (3 * n_id + (1 if sparse else 3) * n_c) * s.dim * 4 + 7 * s.batch * n_id * 4 + 0.3 * GB


def _print_partial_fc(s: Setup, rate: float, snapshot: str, ours_ms: float | None) -> None:
    """insightface's PartialFC_V2 on the same sizes and batches (read from ``snapshot``)."""
    from bench.partial_fc import partial_fc_worker, snapshot_commit

    res = run_processes(partial_fc_worker, s.world, setup_dict(s), rate, snapshot)
    slow = max(res, key=lambda r: statistics.median(r["cpu_s"]))
    ms = statistics.median(slow["cpu_s"]) * 1e3
    ratio = f"; ours / Partial FC (CPU) {ours_ms / ms:.3f}" if ours_ms else ""
    commit = snapshot_commit(snapshot) or "?"
    print(f"    Partial FC R = {s.world} sample rate {rate:g} (slowest rank {slow['rank']}, "
          f"insightface {commit[:12]})  {_wall_cpu(slow)}{ratio}")
    _record("partial_fc", n=s.num_identities, world=s.world, rate=rate, cpu_ms=ms,
            wall_ms=statistics.median(slow["step_s"]) * 1e3, commit=commit,
            ours_over_partial_fc=ours_ms / ms if ours_ms else None)


def bench_speed(sz: dict, force: bool, dense_center_grad_max: int, head_only: bool = False,
                worlds: tuple[int, ...] = (1, 2), sample_rates: tuple[float, ...] = (1.0,),
                partial_fc: str | None = None, lazy_centers: bool = False) -> None:
    print(f"\n== speed: fwd + bwd + optimizer step, global batch {sz['batch']}, D = {sz['dim']},"
          f" fp32, one thread per rank; median over {sz['steps']} steps after 1 warm-up")
    for n in sz["speed_n"]:
        print(f"  -- N_id = N_seq = {n:,}")
        base = Setup(n, n, sz["dim"], sz["batch"], world=1, steps=sz["steps"])
        dense_ms = None
        variants = [] if head_only else [True] + ([False] if n <= dense_center_grad_max else [])
        dense_loss0 = None
        for sparse in variants:
            name = "dense, sparse center grad" if sparse else "dense, dense center grad"
            if not _fits(name, _dense_need(base, sparse), force):
                continue
            (res,) = run_processes(dense_worker, 1, setup_dict(base), sparse, gloo=False)
            ms = statistics.median(res["cpu_s"]) * 1e3
            if sparse:
                dense_ms, dense_loss0 = ms, res["losses"][0]
            print(f"    {name:28s} {_wall_cpu(res)}   peak RSS - baseline "
                  f"{_gb(res['peak_rss'] - res['baseline_rss'])}   loss[0] {res['losses'][0]:.6f}")
            _record("dense", n=n, sparse_center_grad=sparse, cpu_ms=ms,
                    wall_ms=statistics.median(res["step_s"]) * 1e3, loss0=res["losses"][0])
        for world, rate in [(w, r) for w in worlds for r in sample_rates]:
            s = Setup(n, n, sz["dim"], sz["batch"], world=world, steps=sz["steps"],
                      gemm_reps=2 if n >= 1_000_000 else 3, sample_rate=rate,
                      lazy_centers=lazy_centers)
            if not _fits(f"head R = {world}", _head_need(s), force):
                continue
            res = _run_head(s)
            slow = max(res, key=lambda r: statistics.median(r["cpu_s"]))
            ms = statistics.median(slow["cpu_s"]) * 1e3
            ratio = (f"CPU {ms / dense_ms:.3f} x dense" if dense_ms and rate >= 1.0 else
                     "no dense figure")
            sampled = f"   sample rate {rate:g}" if rate < 1.0 else ""
            sampled += "   lazy center momentum" if lazy_centers else ""
            print(f"    head R = {world} (slowest rank {slow['rank']})  {_wall_cpu(slow)} "
                  f"= {ratio}   loss[0] {slow['losses'][0]:.6f}{sampled}")
            gap = None
            if world == 1 and rate >= 1.0 and dense_loss0 is not None:
                gap = abs(slow["losses"][0] - dense_loss0)
                print(f"      same data as dense: |loss[0] head - dense| = {gap:.2e}")
            floors = [sum(r["gemm_s"].values()) / statistics.median(r["cpu_s"]) for r in res]
            _record("head", n=n, world=world, rate=rate, lazy_centers=lazy_centers, cpu_ms=ms,
                    wall_ms=statistics.median(slow["step_s"]) * 1e3, loss0=slow["losses"][0],
                    vs_dense=ms / dense_ms if dense_ms and rate >= 1.0 else None,
                    loss0_gap_vs_dense=gap, floor_fraction=min(floors))
            if partial_fc:
                _print_partial_fc(s, rate, partial_fc, ms)
            for r in res:
                floor_s = sum(r["gemm_s"].values())
                flops = 3 * 2 * s.batch * s.dim * r["n_gemm_rows"]
                med = statistics.median(r["cpu_s"])
                print(f"      rank {r['rank']}: 3 GEMMs {flops / 1e9:.1f} GFLOP, sgemm "
                      f"{flops / floor_s / 1e9:.1f} GFLOP/s on these shapes -> floor "
                      f"{floor_s * 1e3:.1f} ms CPU; step {med * 1e3:.1f} ms CPU: at "
                      f"{floor_s / med:.1%} of floor (target >= 65%); in collectives (wall) "
                      f"{statistics.median(r['comm_s']) * 1e3:.1f} ms; peak RSS - baseline "
                      f"{_gb(r['peak_rss'] - r['baseline_rss'])}")
                for k, v in r["gemm_s"].items():
                    print(f"        {k}: {v * 1e3:8.1f} ms")


# -- passes --------------------------------------------------------------------------------------

def _passes_worker(rank: int) -> dict:
    return count_passes()


def bench_passes() -> None:
    (res,) = run_processes(_passes_worker, 1, gloo=False)
    print("\n== passes per step (R = 1, second step, profiled at B 24, n_id 1000, n_c 1700, "
          "D 40; top-level aten ops with such an operand; views and few-entry "
          "gathers/scatters excluded)")
    print(f"  GEMMs on the big operands ({len(res['gemms'])}): {', '.join(res['gemms'])}")
    for key, what in (("logits", "B x n_local logits buffer"), ("W", "n x D W block"),
                      ("C", "n_c x D center block")):
        names = [x.removeprefix("aten::") for x in res[key]]
        print(f"  other ops on the {what} ({len(names)}): {' '.join(names)}")
    names = sorted({x.removeprefix("aten::") for x in res["sparse"]})
    print(f"  not passes: {len(res['sparse'])} ops on the sparse center update's <= B rows "
          f"({' '.join(names)})")
    _record("passes", gemms=len(res["gemms"]),
            **{f"{key}_ops": [x.removeprefix("aten::") for x in res[key]]
               for key in ("logits", "W", "C")}, sparse_ops=len(res["sparse"]))


# -- 4. scale plan ----------------------------------------------------------------------------

def bench_scale(sz: dict, force: bool, extrapolate: bool = False, sample_rate: float = 1.0,
                head_dtype: str = "fp32") -> None:
    n = sz["scale_n"]
    s = Setup(n, n, sz["dim"], sz["batch"], world=8, steps=1, solo_rank=0, mode=sz["mode"],
              sample_rate=sample_rate, head_dtype=head_dtype)
    ideal = ideal_parts(s, 0)
    print(f"\n== scale plan: rank 0 of R = 8 for N_id = N_seq = {n:,}, D = {s.dim}, global "
          f"batch {s.batch} (SoloComm, one process), 1 + 1 steps, sequence_mode {s.mode}, "
          f"sample rate {sample_rate:g}, head {head_dtype}")
    for k, v in ideal.items():
        print(f"      ideal  {k:34s} {_gb(v)}")
    total = sum(ideal.values())
    print(f"      ideal  {'total':34s} {_gb(total)} (goal <= 20 GB)")
    plan = dict(mode=s.mode, rate=sample_rate, dtype=head_dtype, ideal_gb=total / GB)
    if _fits("the R = 8 block", _head_need(s), force):
        (res,) = _run_head(s)
        x_ideal = _print_memory(res, s)
        _record("scale", **plan, peak_gb=(res["peak_rss"] - res["baseline_rss"]) / GB,
                x_ideal=x_ideal, step_cpu_s=statistics.median(res["cpu_s"]))
        if not extrapolate:
            return
    # Measure smaller shares of the same matrices and extrapolate (memory is linear in rows).
    points = []
    for world in (64, 32):
        part = Setup(n, n, sz["dim"], sz["batch"], world=world, steps=1, solo_rank=0,
                     mode=sz["mode"], sample_rate=sample_rate, head_dtype=head_dtype)
        if not _fits(f"the R = {world} block", _head_need(part), force):
            _record("scale", **plan, peak_gb=None, projected_gb=None)
            return
        (res,) = _run_head(part)
        used = res["peak_rss"] - res["baseline_rss"]
        rows = res["n_id_local"] + res["n_centers_local"]
        points.append((rows, used))
        print(f"    instead, R = {world}: {res['n_id_local']:,} W + {res['n_centers_local']:,} "
              f"center rows: peak RSS - baseline {_gb(used)} = "
              f"{used / sum(res['ideal'].values()):.3f} x its ideal; step {_ms(res['step_s'])}")
    (r1, u1), (r2, u2) = points
    slope = (u2 - u1) / (r2 - r1)
    n_id8, n_c8 = local_rows(s, 0)
    projected = u2 + slope * (n_id8 + n_c8 - r2)
    _record("scale", **plan, projected_gb=projected / GB, x_ideal=projected / total)
    print(f"    projected R = 8 peak (linear in rows): {_gb(projected)} "
          f"= {projected / total:.3f} x ideal (goal <= 20 GB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", nargs="*", default=[],
                    choices=["memory", "comm", "speed", "passes", "scale", []],
                    help="benchmarks to run (default with --quick: all)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes; runs in seconds")
    ap.add_argument("--force", action="store_true", help="run even if MemAvailable looks short")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per configuration")
    ap.add_argument("--memory-n", type=int, default=None,
                    help="N_id = N_seq for memory (default 1000000)")
    ap.add_argument("--comm-n", type=int, nargs="+", default=None,
                    help="N_id = N_seq values for comm (default 10000 1000000)")
    ap.add_argument("--speed-n", type=int, nargs="+", default=None,
                    help="N_id = N_seq values for speed (default 100000 1000000)")
    ap.add_argument("--head-only", action="store_true",
                    help="speed: skip the dense reference (it needs ~17 GB at 1M)")
    ap.add_argument("--worlds", type=int, nargs="*", default=[1, 2],
                    help="speed: the R values of the head to time (default 1 2; none: dense only)")
    ap.add_argument("--dense-center-grad-max", type=int, default=100_000,
                    help="also time the dense reference with a dense center grad up to this N")
    ap.add_argument("--mode", nargs="+", default=["lsr"], choices=SEQUENCE_MODES,
                    help="loss.sequence_mode(s) of memory, comm and scale, each in turn "
                         "(default: the paper's lsr, the mode of the recorded figures; speed "
                         "always runs lsr, the mode of its dense reference)")
    ap.add_argument("--head-dtype", nargs="+", default=["fp32"], choices=["fp32", "bf16"],
                    help="scale: train.head_precision value(s), each in turn (default fp32)")
    ap.add_argument("--sample-rate", type=float, nargs="+", default=[1.0],
                    help="speed: loss.sampled_softmax_fraction values of the head (default 1.0, "
                         "the full softmax)")
    ap.add_argument("--partial-fc", metavar="SNAPSHOT", default=None,
                    help="speed: also time insightface's PartialFC_V2 at each sample rate, read "
                         "from this snapshot of deepinsight/insightface (a git dir or checkout; "
                         "never vendored); without it that column is skipped")
    ap.add_argument("--lazy-center-momentum", action="store_true",
                    help="speed: loss.lazy_center_momentum (only the batch's centers move)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    sz = dict(QUICK if args.quick else FULL, mode=args.mode[0])
    if args.steps:
        sz["steps"] = args.steps
    if args.comm_n:
        sz["comm_n"] = tuple(args.comm_n)
    if args.memory_n:
        sz["memory_n"] = args.memory_n
    if args.speed_n:
        sz["speed_n"] = tuple(args.speed_n)
    what = args.what or (["memory", "comm", "speed", "passes", "scale"] if args.quick else [])
    if not what:
        ap.error("name a benchmark (memory, comm, speed, passes, scale) or pass --quick")
    print(f"torch {torch.__version__}, MemAvailable {_gb(mem_available_bytes())}")
    modes = [dict(sz, mode=m) for m in args.mode]
    for w in what:
        if w == "memory":
            for szm in modes:
                bench_memory(szm, args.force)
        elif w == "comm":
            for szm in modes:
                bench_comm(szm, args.force)
        elif w == "speed":
            bench_speed(sz, args.force, args.dense_center_grad_max if not args.quick else 10**9,
                        args.head_only, tuple(args.worlds), tuple(args.sample_rate),
                        args.partial_fc, args.lazy_center_momentum)
        elif w == "passes":
            bench_passes()
        elif w == "scale":
            for szm, rate, dtype in [(m, r, d) for m in modes for r in args.sample_rate
                                     for d in args.head_dtype]:
                bench_scale(szm, args.force, extrapolate=args.quick,  # quick: both paths
                            sample_rate=rate, head_dtype=dtype)
    print(json.dumps({"bench": "head", "args": vars(args), **RESULT}))  # the last line


if __name__ == "__main__":
    main()
