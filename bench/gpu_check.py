"""GPU checks with torch alone (the device machine has no Ray/DeepSpeed/WebDataset).

    python -m bench.gpu_check                 # on a CUDA machine
    python -m bench.gpu_check --device cpu    # dry run here (tiny sizes)

1. Contract on the device: one step of the head (R = 1, fp32 on the GPU, the default
   sequence mode) against the dense oracle (`chief_loss` + `dsa_loss`) in float64 on the
   CPU, same inputs and negatives: loss, feature gradient and W's gradient; again with
   the sampled softmax (rate 0.1, the oracle restricted to the same rows), and both with
   the bf16 head (looser, stated tolerance). An oracle check, not a training run (those
   go through `seqface_dist.train.step`).
2. Head step time at N_id = N_seq = 100k and 1M (batch 256, D 512) with the full softmax
   and the sampled one (rate 0.1), and the fraction of the matmul floor (3 GEMMs at the
   measured sgemm rate of the rows the softmax runs over); at 1M and 10M + 10M with the
   bf16 head (the whole 10M + 10M head of the paper's lsr fits one H200 in bf16), with
   the peak device memory.
3. Backbone forward+backward images/s (sphere20 112x96, iresnet50 112x112), fp32 and bf16
   autocast: a throughput probe on a stand-in loss, no head and no optimizer.
Prints figures only; copy them into bench/RESULTS.md with the device name.
"""

from __future__ import annotations

import argparse
import time

import torch

from seqface_dist.config import LossConfig, ModelConfig
from seqface_dist.losses import chief_loss, dsa_loss
from seqface_dist.models import build_backbone
from seqface_dist.parallel import Comm, HeadSpec, PartitionedHead


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def contract(device: torch.device, *, sample_rate: float = 1.0,
             dtype: torch.dtype = torch.float32) -> None:
    """One step of the head on ``device`` against the float64 oracle on the CPU. With
    ``sample_rate`` < 1 the head's sampled softmax over given rows (positives added) is
    held to the oracle restricted to those rows."""
    n_id, n_seq, d, b = 1000, 700, 64, 48
    cfg = LossConfig(scale=16.0, dsa_p=0.05, sampled_softmax_fraction=sample_rate)
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(b, d, generator=g, dtype=torch.float64) * 3
    t = torch.randint(0, n_id + n_seq, (b,), generator=g)
    neg = torch.randperm(n_id + n_seq, generator=g)[:80].sort().values
    given = None
    rows = torch.arange(n_id + n_seq)  # W rows the softmax sees (the default mode has all)
    if sample_rate < 1.0:
        k = int(sample_rate * (n_id + n_seq))
        given = torch.randperm(n_id + n_seq, generator=g)[:k]
        rows = torch.unique(torch.cat([given, t]))
    head = PartitionedHead(HeadSpec(n_id, n_seq, d), cfg, Comm(), device=device, dtype=dtype)
    w0 = head.weight.detach().double().cpu().clone()
    with torch.no_grad():
        head.centers.normal_(0, 1)
    c0 = head.centers.detach().double().cpu().clone()
    f = feats.to(device, dtype).requires_grad_(True)
    out = head(f, t.to(device), negatives=neg.to(device),
               classifier_rows=None if given is None else given.to(device))
    out.loss.backward()
    ref_f = feats.clone().requires_grad_(True)
    w, c = w0[rows].clone().requires_grad_(True), c0.clone().requires_grad_(True)
    n_id_rows = int((rows < n_id).sum())
    chief = chief_loss(ref_f, w, torch.searchsorted(rows, t), n_id_rows,
                       rows.numel() - n_id_rows, mode=cfg.sequence_mode, kind=cfg.margin,
                       scale=cfg.scale, m=cfg.m, lam=cfg.lambda_min).loss  # the default mode
    ref = cfg.chief_weight * chief + cfg.dsa_weight * dsa_loss(ref_f, t, c, n_id, neg)
    ref.backward()
    got_w = head.weight.grad
    got_w = (got_w.coalesce().to_dense() if got_w.is_sparse else got_w).double().cpu()[rows]
    dl = abs(float(out.loss.detach()) - float(ref.detach()))
    dg = float((f.grad.double().cpu() - ref_f.grad).abs().max() / ref_f.grad.abs().max())
    dw = float((got_w - w.grad).abs().max() / w.grad.abs().max())
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    what = f"rate {sample_rate:g}, {str(dtype).removeprefix('torch.')}"
    print(f"contract on {device} ({what}): |loss - ref| {dl:.2e}, rel feature grad err "
          f"{dg:.2e}, rel W grad err {dw:.2e}  ({'OK' if max(dl, dg, dw) < tol else 'MISMATCH'}"
          f" at {tol:g})")


def _time(fn, device, steps: int) -> float:
    fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / steps


def head_speed(device: torch.device, sizes: list[int], steps: int,
               rates: tuple[float, ...] = (1.0, 0.1), dtype: torch.dtype = torch.float32,
               mode: str = "lsr") -> None:
    """Step time of one head per size (N_id = N_seq = n) at each sample rate, against the
    matmul floor of the rows its softmax runs over; peak device memory beside it."""
    b, d = 256, 512
    name = str(dtype).removeprefix("torch.")
    for n in sizes:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        head = PartitionedHead(HeadSpec(n, n, d), LossConfig(sequence_mode=mode), Comm(),
                               device=device, dtype=dtype)
        build_s = time.perf_counter() - t0
        opt = head.make_optimizer(lr=0.1)
        feats = torch.randn(b, d, device=device)
        t = torch.randint(0, 2 * n, (b,), device=device)
        full_ms, k = None, [0]
        for rate in rates:
            # A bench only: the same head, its softmax sampled at another rate from now on.
            head.cfg.sampled_softmax_fraction = rate

            def step(head=head, opt=opt, feats=feats, t=t, k=k):
                f = feats.clone().requires_grad_(True)
                head(f, t, step=k[0]).loss.backward()  # a new draw of rows each step
                opt.step()
                opt.zero_grad(set_to_none=True)
                k[0] += 1

            ms = _time(step, device, steps) * 1e3
            a = torch.randn(b, d, device=device, dtype=dtype)
            wt = torch.randn(head.softmax_rows_per_step(), d, device=device, dtype=dtype)
            gemm = _time(lambda a=a, wt=wt: a @ wt.t(), device, steps) * 1e3
            floor = 3 * gemm  # the three GEMMs have the same FLOPs
            full_ms = ms if rate >= 1.0 else full_ms
            vs = f", {ms / full_ms:.3f} x the full softmax" if full_ms and rate < 1.0 else ""
            peak = (f", peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
                    if device.type == "cuda" else "")
            print(f"head {mode} {name} N_id=N_seq={n:>10,} rate {rate:g}: {ms:8.2f} ms/step, "
                  f"matmul floor {floor:7.2f} ms ({floor / ms:5.1%} of floor){vs}{peak}; "
                  f"built in {build_s:.0f} s")
            del a, wt
        del head, opt
        if device.type == "cuda":
            torch.cuda.empty_cache()


def backbones(device: torch.device, steps: int, batch: int) -> None:
    for name, size in (("sphere20", [112, 96]), ("iresnet50", [112, 112])):
        net = build_backbone(ModelConfig(backbone=name, input_size=size)).to(device)
        x = torch.randn(batch, 3, *size, device=device)
        for dtype in (None, torch.bfloat16):
            def step(net=net, x=x, dtype=dtype):
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    net(x).float().square().mean().backward()

            s = _time(step, device, steps)
            print(f"{name} {size} {'bf16' if dtype else 'fp32'}: {batch / s:8.1f} images/s")


# --- fp16 with DeepSpeed's dynamic loss scale (issue 16; self-contained) -----------------


def fp16_loss_scale_check(device: torch.device, steps: int = 12) -> None:
    """``train.precision: fp16`` through the real training step on one GPU rank: DeepSpeed's
    fp16 block with a dynamic loss scale started far too high (2^40) so that the first
    steps overflow. Checks: every overflowed step is reported skipped
    (``loss_scale_overflow``), the head's W and centers do not move on it, the engine's
    scale falls; once the scale fits, steps apply, the loss is finite, and the head's
    gradient norm is the unscaled one (well below the scale). Needs CUDA and DeepSpeed
    (DeepSpeed refuses fp16 on CPUs); prints what it skips otherwise."""
    if device.type != "cuda":
        print("fp16 loss scale: skipped (DeepSpeed's fp16 needs a CUDA device)")
        return
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        print("fp16 loss scale: skipped (DeepSpeed is not installed here)")
        return
    import json
    import math
    import os
    import tempfile

    import torch.distributed as dist

    from seqface_dist.train.smoke import smoke_config
    from seqface_dist.train.worker import deepspeed_trainer

    with tempfile.TemporaryDirectory() as tmp:
        ds = os.path.join(tmp, "ds.json")
        with open(ds, "w") as f:
            json.dump({"fp16": {"initial_scale_power": 40, "loss_scale_window": 1000,
                                "hysteresis": 1, "min_loss_scale": 1}}, f)
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        if not dist.is_initialized():
            dist.init_process_group("nccl", init_method=f"file://{tmp}/store", rank=0,
                                    world_size=1)
        cfg = smoke_config(None, ["train.precision=fp16", "train.use_gpu=true",
                                  "train.zero_stage=1", f"train.deepspeed_config={ds}",
                                  "data.identities_per_batch=16",
                                  "data.sequences_per_batch=16"])
        trainer, _ = deepspeed_trainer(cfg, 32, 64, 64, world=1, device=device,
                                       sequence_weight=1.0)
        scale0 = trainer.engine._get_optimizer_loss_scale()
        g = torch.Generator().manual_seed(0)
        skipped = applied = 0
        ok = True
        for step in range(steps):
            images = torch.randint(0, 256, (32, 32, 32, 1), generator=g, dtype=torch.uint8)
            t = torch.cat([torch.randint(0, 64, (16,), generator=g),
                           64 + torch.randint(0, 64, (16,), generator=g)])
            w0 = trainer.head.weight.detach().clone()
            c0 = trainer.head.centers.detach().clone()
            res = trainer.step(images, t, step)
            moved = not (torch.equal(w0, trainer.head.weight) and
                         torch.equal(c0, trainer.head.centers))
            if res.skipped:
                skipped += 1
                ok &= res.nonfinite == ("loss_scale_overflow",) and not moved
            else:
                applied += 1
                ok &= moved and math.isfinite(res.grad_norm) and res.grad_norm < 1e6
        scale1 = trainer.engine._get_optimizer_loss_scale()
        ok &= skipped > 0 and applied > 0 and scale1 < scale0
        print(f"fp16 loss scale: {skipped} overflowed steps skipped (head unmoved), "
              f"{applied} applied, scale {scale0:g} -> {scale1:g}: "
              f"{'OK' if ok else 'FAILED'}")
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    device = torch.device(args.device)
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}")
    contract(device)
    contract(device, sample_rate=0.1)
    contract(device, dtype=torch.bfloat16)  # train.head_precision: bf16
    contract(device, dtype=torch.bfloat16, sample_rate=0.1)
    small = device.type == "cpu"
    steps = 2 if small else args.steps
    head_speed(device, [20_000] if small else [100_000, 1_000_000], steps)
    head_speed(device, [20_000] if small else [1_000_000], steps, dtype=torch.bfloat16)
    # The whole 10M + 10M head on one device, bf16 (~75 GiB at rate 1 in lsr).
    head_speed(device, [30_000] if small else [10_000_000], steps, dtype=torch.bfloat16)
    backbones(device, 1 if small else args.steps, 4 if small else 128)
    fp16_loss_scale_check(device)


if __name__ == "__main__":
    main()
