"""Pieces shared by bench/bench_head.py: memory readings, batches, one step, GEMM rates,
the pass count, and a runner that starts R real gloo ranks (or one bare process).

Every measured configuration runs in its own forked process, so its peak RSS is its own
and its memory is returned to the machine before the next one starts.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from seqface_dist.config import CLASS_ROW_MODES, LossConfig
from seqface_dist.losses import chief_loss, dsa_loss, lambda_schedule
from seqface_dist.parallel import Comm, HeadLayout, HeadSpec, PartitionedHead, SoloComm

GB = 1e9
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 5e-4

# Building a torch optimizer imports torch._dynamo lazily (~3 s, ~100 MB): do it once here,
# before any fork, so it is part of every rank's baseline rather than of the head.
torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=LR)


# -- memory -----------------------------------------------------------------------------

def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def rss_bytes() -> int:
    return _status_kb("VmRSS") * 1024


def peak_rss_bytes() -> int:
    return _status_kb("VmHWM") * 1024


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux clear_refs 5), so a later peak is this phase's."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def mem_available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable")


# -- sizes, data, the ideal --------------------------------------------------------------

@dataclass(frozen=True)
class Setup:
    num_identities: int
    num_sequences: int
    dim: int
    batch: int  # global batch, split evenly over the ranks
    world: int  # R of the layout
    steps: int  # timed steps (after `warmup`)
    warmup: int = 1
    gemm_reps: int = 0  # > 0: measure the three GEMMs' sgemm rate first, best of this many
    solo_rank: int = -1  # >= 0: SoloComm(solo_rank, world) in one process, no peers
    mode: str = "lsr"  # loss.sequence_mode; the figures in RESULTS.md are the paper's lsr
    sample_rate: float = 1.0  # loss.sampled_softmax_fraction (1.0: the full softmax)
    head_dtype: str = "fp32"  # train.head_precision: fp32 | bf16 (W, centers, momentum)
    lazy_centers: bool = False  # loss.lazy_center_momentum

    @property
    def local_batch(self) -> int:
        return self.batch // self.world

    def spec(self) -> HeadSpec:
        return HeadSpec(self.num_identities, self.num_sequences, self.dim)

    def loss_cfg(self) -> LossConfig:
        return LossConfig(sequence_mode=self.mode, sampled_softmax_fraction=self.sample_rate,
                          lazy_center_momentum=self.lazy_centers)

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.head_dtype == "bf16" else torch.float32

    @property
    def elem(self) -> int:
        """Bytes per element of the head's blocks, their momentum and its logits."""
        return 2 if self.head_dtype == "bf16" else 4

    def softmax_rows(self, n_w: int) -> int:
        """Rows of a rank's W block the softmax runs over per step (the sampled ones)."""
        return n_w if self.sample_rate >= 1.0 else math.ceil(self.sample_rate * n_w)


def global_batch(setup: Setup, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's global batch: features and center indices, half identities, half sequences
    (the reference mixes 32 + 32 per GPU). Identical on every rank (seeded by step)."""
    g = torch.Generator().manual_seed(1_000 + step)
    b = setup.batch
    feats = torch.randn(b, setup.dim, generator=g)
    n_id_samples = b // 2 if setup.num_sequences else b
    ids = torch.randint(0, setup.num_identities, (n_id_samples,), generator=g)
    seqs = setup.num_identities + torch.randint(0, max(setup.num_sequences, 1),
                                                (b - n_id_samples,), generator=g)
    t = torch.cat([ids, seqs])[torch.randperm(b, generator=g)]
    return feats, t


def local_rows(setup: Setup, rank: int) -> tuple[int, int]:
    """(classifier rows, center rows) of ``rank``'s block: the classifier has its identity
    rows, plus its sequence rows in the modes with one row per sequence."""
    id0, id1, sq0, sq1 = HeadLayout(setup.num_identities, setup.num_sequences,
                                    setup.world).local_rows(rank)
    n_w = (id1 - id0) + ((sq1 - sq0) if setup.mode in CLASS_ROW_MODES else 0)
    return n_w, (id1 - id0) + (sq1 - sq0)


def ideal_parts(setup: Setup, rank: int) -> dict[str, int]:
    """The bytes a rank cannot do without in its head dtype (the brief's ideal)."""
    elem = setup.elem
    n_id, n_c = local_rows(setup, rank)
    k = setup.softmax_rows(n_id)
    d = setup.dim
    sampled_copy = k if k < n_id else 0  # the sampled rows gathered for the GEMMs
    return {
        # Sampled: W's gradient lives on the k sampled rows only.
        "W block + grad + momentum": (2 * n_id + k + sampled_copy) * d * elem,
        # The center update is a sparse gradient over the batch's rows (<= B of them, values
        # plus int64 row indices) added into the momentum: no dense n_c x D update buffer.
        "center block + momentum": 2 * n_c * d * elem,
        "sparse center update (B x D)": setup.batch * (d * elem + 8),
        "B x n_local logits buffer": setup.batch * k * elem,
        "features (global batch)": setup.batch * d * 4,  # fp32 in every head dtype
    }


# -- one step of the head / of the dense reference ----------------------------------------

def head_step(head: PartitionedHead, opt, setup: Setup, rank: int, step: int) -> float:
    feats, t = global_batch(setup, step)
    sl = slice(rank * setup.local_batch, (rank + 1) * setup.local_batch)
    local = feats[sl].clone().requires_grad_(True)
    out = head(local, t[sl], step=step)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return out.loss.item()


class DenseReference:
    """The speed and memory *baseline* of `bench_head.py speed`: the same math on one
    process, written plainly with the dense oracle (`chief_loss` in the setup's mode +
    `dsa_loss`, autograd, torch.optim.SGD) on random features, no backbone. It trains
    nothing: training runs go through `seqface_dist.train.step` and the partitioned head.
    W and C are the R = 1 head's initial rows (shared storage, no copy) and the negatives
    are its draws, so the losses match the head's."""

    def __init__(self, setup: Setup, cfg: LossConfig, sparse_centers: bool) -> None:
        self.setup, self.cfg, self.sparse = setup, cfg, sparse_centers
        self.draws = PartitionedHead(setup.spec(), cfg, SoloComm(0, 1))
        self.weight = torch.nn.Parameter(self.draws.weight.detach())
        self.centers = torch.nn.Parameter(self.draws.centers.detach())
        self.opt = torch.optim.SGD([
            {"params": [self.weight], "weight_decay": WEIGHT_DECAY},
            {"params": [self.centers], "weight_decay": 0.0}], lr=LR, momentum=MOMENTUM)

    def step(self, step: int) -> float:
        cfg, n_id = self.cfg, self.setup.num_identities
        feats, t = global_batch(self.setup, step)
        feats.requires_grad_(True)
        lam = lambda_schedule(step, base=cfg.lambda_base, gamma=cfg.lambda_gamma,
                              power=cfg.lambda_power, lambda_min=cfg.lambda_min)
        chief = chief_loss(feats, self.weight, t, n_id, self.setup.num_sequences,
                           mode=cfg.sequence_mode, kind=cfg.margin, scale=cfg.scale, m=cfg.m,
                           lam=lam).loss
        neg = self.draws.global_index_of_rows(self.draws.draw_negatives(step))
        dsa = dsa_loss(feats, t, self.centers, n_id, neg, lam=cfg.dsa_lambda,
                       alpha=cfg.dsa_alpha, beta=cfg.dsa_beta, sparse_center_grad=self.sparse)
        loss = cfg.chief_weight * chief + cfg.dsa_weight * dsa
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()


# -- the matmul floor ----------------------------------------------------------------------

def gemm_seconds(b: int, d: int, n: int, reps: int) -> dict[str, float]:
    """Best-of-``reps`` single-call time of the step's three GEMMs on their shapes (fp32)."""
    g = torch.Generator().manual_seed(7)
    fn = torch.randn(b, d, generator=g)
    w = torch.randn(n, d, generator=g)
    z = torch.randn(b, n, generator=g)
    shapes = {"logits  (B x D) @ (D x n)": lambda: fn @ w.t(),
              "grad f  (B x n) @ (n x D)": lambda: z @ w,
              "grad W  (n x B) @ (B x D)": lambda: z.t() @ fn}
    out = {}
    for name, f in shapes.items():
        best = float("inf")
        for _ in range(reps):
            t0 = time.thread_time()  # CPU time: robust to other jobs sharing the cores
            r = f()
            best = min(best, time.thread_time() - t0)
            del r
        out[name] = best
    return out


# -- counting passes over the big buffers ------------------------------------------------

_NO_PASS = {  # views, allocations without a fill, and gathers/scatters of a few entries
    "aten::t", "aten::select", "aten::slice", "aten::view", "aten::view_as", "aten::unsqueeze",
    "aten::squeeze", "aten::expand", "aten::detach", "aten::detach_", "aten::as_strided",
    "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::index",
    "aten::index_put_", "aten::alias", "aten::narrow", "aten::lift_fresh", "aten::reshape",
    "aten::transpose", "aten::resolve_conj", "aten::resolve_neg", "aten::index_add_",
}
# Ops on the sparse center update: the profiler records its n_c x D logical shape, but
# they touch only its <= B stored rows (indices and values), never the block.
_SPARSE_META = {
    "aten::_indices", "aten::_values", "aten::indices", "aten::values", "aten::coalesce",
    "aten::_coalesce", "aten::_coalesced_", "aten::is_coalesced", "aten::sparse_coo_tensor",
    "aten::_sparse_coo_tensor_unsafe", "aten::_sparse_coo_tensor_with_dims_and_tensors",
    "aten::_validate_sparse_coo_tensor_args",
}
_GEMMS = {"aten::matmul", "aten::mm", "aten::addmm"}


def _operand_kinds(event, sizes: dict[int, str]) -> set[str]:
    """Which big buffers an op reads (its recorded input shapes, else its children's)."""
    kinds = set()
    for shape in event.input_shapes:
        numel = 1
        for x in shape:
            numel *= x
        if shape and numel in sizes:
            kinds.add(sizes[numel])
    if not any(event.input_shapes):
        for child in event.cpu_children:
            kinds |= _operand_kinds(child, sizes)
    return kinds


def count_passes(steps_before: int = 1) -> dict:
    """Profile one R = 1 step (after the first, which allocates the momenta) at sizes whose
    shapes are unique, and list every top-level op that streams a B x n logits-sized or an
    n x D matrix-sized operand. Views and few-entry gathers/scatters are not passes."""
    from torch.profiler import ProfilerActivity, profile

    s = Setup(num_identities=1000, num_sequences=700, dim=40, batch=24, world=1, steps=1)
    head = PartitionedHead(s.spec(), s.loss_cfg(), Comm())
    opt = head.make_optimizer(lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    for k in range(steps_before):
        head_step(head, opt, s, 0, k)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        head_step(head, opt, s, 0, steps_before)
    # Classify operands by element count: unique at these sizes, and robust to views
    # (bmm's n x 1 x D) and to ops whose TensorList inputs the profiler does not record.
    sizes = {s.batch * s.num_identities: "logits", s.num_identities * s.dim: "W",
             (s.num_identities + s.num_sequences) * s.dim: "C"}
    result = {"logits": [], "W": [], "C": [], "gemms": [], "sparse": []}
    for e in prof.events():
        if not e.name.startswith("aten::") or e.name in _NO_PASS:
            continue
        if e.name in _SPARSE_META:
            result["sparse"].append(e.name)
            continue
        parent = e.cpu_parent
        nested = False
        while parent is not None:
            nested |= parent.name.startswith("aten::")
            parent = parent.cpu_parent
        if nested:
            continue  # counted with its parent op
        kinds = _operand_kinds(e, sizes)
        if e.name in _GEMMS:
            if kinds & {"logits", "W"}:
                result["gemms"].append(e.name)
            continue
        for k in sorted(kinds):
            result[k].append(e.name)
    return result


# -- running ranks -----------------------------------------------------------------------

def _child(rank: int, world: int, store: str | None, out: str, fn, args) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    try:
        if store is not None:
            dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                                    world_size=world)
        result = fn(rank, *args)
        Path(out, f"{rank}.json").write_text(json.dumps({"ok": result}))
    except BaseException as e:  # the parent prints it: never a silent hang
        Path(out, f"{rank}.json").write_text(json.dumps(
            {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}))
    finally:
        if store is not None and dist.is_initialized():
            dist.destroy_process_group()


def run_processes(fn, world: int, *args, gloo: bool = True, timeout: float = 900.0) -> list:
    """fn(rank, *args) in ``world`` forked processes (a gloo group when ``gloo``), one
    thread each; returns their results, raising the first rank's error."""
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store") if gloo else None
        ctx = mp.get_context("fork")
        procs = [ctx.Process(target=_child, args=(r, world, store, tmp, fn, args))
                 for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(1.0, deadline - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        results = []
        for r, p in enumerate(procs):
            f = Path(tmp, f"{r}.json")
            if not f.exists():
                raise RuntimeError(f"rank {r} gave no result (exit code {p.exitcode}; "
                                   f"killed by the {timeout:.0f} s timeout or out of memory?)")
            res = json.loads(f.read_text())
            if "error" in res:
                raise RuntimeError(f"rank {r}: {res['error']}\n{res['trace']}")
            results.append(res["ok"])
        return results


# -- the per-rank workers ------------------------------------------------------------------

def head_worker(rank: int, setup_d: dict) -> dict:
    """Build this rank's head, step it, and report its memory, bytes and times."""
    setup = Setup(**setup_d)
    my_rank = setup.solo_rank if setup.solo_rank >= 0 else rank
    n_id, n_c = local_rows(setup, my_rank)
    n_gemm = setup.softmax_rows(n_id)
    gemm = (gemm_seconds(setup.batch, setup.dim, n_gemm, setup.gemm_reps) if setup.gemm_reps
            else {})
    reset_peak_rss()
    base = rss_bytes()
    comm = SoloComm(setup.solo_rank, setup.world) if setup.solo_rank >= 0 else Comm()
    t0 = time.perf_counter()
    head = PartitionedHead(setup.spec(), setup.loss_cfg(), comm, dtype=setup.torch_dtype)
    opt = head.make_optimizer(lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    build_s = time.perf_counter() - t0
    times, cpu, sent, comm_s, losses = [], [], [], [], []
    for step in range(setup.warmup + setup.steps):
        b0, c0 = comm.bytes_sent, getattr(comm, "seconds", 0.0)
        t0, u0 = time.perf_counter(), time.thread_time()
        losses.append(head_step(head, opt, setup, my_rank, step))
        times.append(time.perf_counter() - t0)
        cpu.append(time.thread_time() - u0)
        sent.append(comm.bytes_sent - b0)
        comm_s.append(getattr(comm, "seconds", 0.0) - c0)
    return {"rank": my_rank, "n_id_local": n_id, "n_gemm_rows": n_gemm, "n_centers_local": n_c,
            "baseline_rss": base, "peak_rss": peak_rss_bytes(), "build_s": build_s,
            "step_s": times[setup.warmup:], "cpu_s": cpu[setup.warmup:],
            "comm_s": comm_s[setup.warmup:],
            "bytes_per_step": sent[setup.warmup:], "losses": losses, "gemm_s": gemm,
            "ideal": ideal_parts(setup, my_rank)}


def dense_worker(rank: int, setup_d: dict, sparse_centers: bool) -> dict:
    setup = Setup(**setup_d)
    reset_peak_rss()
    base = rss_bytes()
    ref = DenseReference(setup, setup.loss_cfg(), sparse_centers)
    times, cpu, losses = [], [], []
    for step in range(setup.warmup + setup.steps):
        t0, u0 = time.perf_counter(), time.thread_time()
        losses.append(ref.step(step))
        times.append(time.perf_counter() - t0)
        cpu.append(time.thread_time() - u0)
    return {"baseline_rss": base, "peak_rss": peak_rss_bytes(), "step_s": times[setup.warmup:],
            "cpu_s": cpu[setup.warmup:], "losses": losses}


def setup_dict(setup: Setup) -> dict:
    return asdict(setup)
