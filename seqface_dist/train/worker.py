"""What runs on each Ray Train worker: DeepSpeed backbone + partitioned head + shards.

``train_func(config)`` is handed to ``TorchTrainer``; Ray has already created the
process group (gloo on CPU, NCCL on GPU) and set RANK/WORLD_SIZE. Per step:

    images, centers = next(batches)                 # identities + sequences, this rank
    feats = engine(images)                          # data-parallel backbone (DeepSpeed)
    out = head(feats, centers, step=step)           # global-batch loss, row-parallel head
    engine.backward(out.loss)                       # also fills the head's row gradients
    clip; engine.step(); head_opt.step()

The head is never given to DeepSpeed (it would broadcast and average the row blocks); the
features' all-gather hands each rank the gradient of the *global* loss, and DeepSpeed
averages the backbone gradients over R ranks, so the gather scales that gradient by R.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from seqface_dist.config import Config, config_from_dict


def _deepspeed(cfg: Config):
    if not cfg.train.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from deepspeed import ops

    # The shared-memory comm op needs a ~30 s JIT build and only helps intra-node CPU runs.
    ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def ds_config(cfg: Config, micro_batch: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": cfg.train.zero_stage},
        "bf16": {"enabled": cfg.train.precision == "bf16"},
        "gradient_clipping": 0.0,  # clipping covers backbone *and* head: done here
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def clip_gradients(engine, head, max_norm: float, comm) -> float:
    """Clip the global gradient norm over backbone and head rows together; return it.

    Backbone gradients are identical on every rank after DeepSpeed's all-reduce (ZeRO 0);
    the head's row gradients are disjoint blocks, so their squares are summed over ranks.
    The center update is not a gradient and is not clipped.
    """
    bb = [p.grad for p in engine.module.parameters() if p.grad is not None]
    sq_bb = sum(g.float().square().sum() for g in bb) if bb else torch.zeros(())
    hw = head.weight.grad
    sq_head = hw.float().square().sum() if hw is not None else torch.zeros(())
    sq_head = comm.all_reduce_(sq_head.reshape(1).to(head.weight.device)).squeeze(0)
    norm = float(torch.sqrt(sq_bb.to(sq_head.device) + sq_head))
    if max_norm > 0 and norm > max_norm:
        coef = max_norm / (norm + 1e-6)
        for g in bb + ([hw] if hw is not None else []):
            g.mul_(coef)
    return norm


class _Batches:
    """Endless (images, centers) from the loader, counting epochs as they roll over."""

    def __init__(self, loader, epoch: int):
        self.loader, self.epoch = loader, epoch
        self._it = None

    def next(self):
        while True:
            if self._it is None:
                self.loader.set_epoch(self.epoch)
                self._it = iter(self.loader)
            try:
                return next(self._it)
            except StopIteration:
                self._it, self.epoch = None, self.epoch + 1


@dataclass
class _Worker:
    """Everything one worker trains with, built once by :func:`_build`."""

    cfg: Config
    rank: int
    world: int
    device: torch.device
    loader: object
    engine: object
    head: object
    head_opt: torch.optim.Optimizer
    comm: object
    state: object  # RunState
    optimizers: list = field(default_factory=list)
    base_lrs: list = field(default_factory=list)


def _build(cfg: Config) -> _Worker:
    """Process group, shard loader, DeepSpeed backbone and the head beside it."""
    import ray.train

    from seqface_dist.data.loader import make_train_loader
    from seqface_dist.models import build_backbone
    from seqface_dist.parallel import Comm, HeadSpec, PartitionedHead
    from seqface_dist.train.checkpoint import RunState

    deepspeed = _deepspeed(cfg)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, cfg.train.cpus_per_worker))
    deepspeed.init_distributed(dist_backend="nccl" if cfg.train.use_gpu else "gloo")
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if cfg.train.use_gpu else "cpu")
    torch.manual_seed(cfg.train.seed)  # same backbone init everywhere (DeepSpeed broadcasts)

    loader = make_train_loader(cfg.data, rank=rank, world_size=world,
                               image_size=tuple(cfg.model.input_size),
                               channels=cfg.model.in_channels, seed=cfg.train.seed)
    o = cfg.optim
    backbone = build_backbone(cfg.model)
    bb_opt = torch.optim.SGD(backbone.parameters(), lr=o.lr, momentum=o.momentum,
                             weight_decay=o.weight_decay)
    engine, bb_opt, _, _ = deepspeed.initialize(
        model=backbone, optimizer=bb_opt, config=ds_config(cfg, loader.batch_size))
    comm = Comm()
    layout = loader.layout
    spec = HeadSpec(layout.num_identities, layout.num_sequences, cfg.model.embedding_dim,
                    seed=cfg.train.seed)
    head = PartitionedHead(spec, cfg.loss, comm, device=device, feature_grad_scale=world)
    head_opt = head.make_optimizer(lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    state = RunState(world_size=world, zero_stage=cfg.train.zero_stage, seed=cfg.train.seed,
                     head={"spec": asdict(spec), "layout": layout.to_dict()},
                     config=cfg.to_dict())
    optimizers = [bb_opt, head_opt]
    return _Worker(cfg, rank, world, device, loader, engine, head, head_opt, comm, state,
                   optimizers, [[g["lr"] for g in opt.param_groups] for opt in optimizers])


def _resume(w: _Worker) -> None:
    """Continue from Ray's latest checkpoint (after a failure) or train.resume_from."""
    import ray.train

    from seqface_dist.train.checkpoint import load_checkpoint

    resume = ray.train.get_checkpoint()
    if resume is None and w.cfg.train.resume_from:
        resume = ray.train.Checkpoint(w.cfg.train.resume_from)
    if resume is None:
        return
    with resume.as_directory() as d:
        old = load_checkpoint(d, engine=w.engine, head=w.head, head_optimizer=w.head_opt,
                              rank=w.rank, world_size=w.world)
    # A partly read epoch is not replayed: its batches are drawn afresh.
    w.state.step, w.state.epoch, w.state.samples_seen = old.step, old.epoch + 1, \
        old.samples_seen
    if w.rank == 0:
        _append_history(w.cfg, {"event": "resumed", "step": w.state.step,
                                "checkpoint": str(resume.path)})
        print(f"[seqface] resumed at step {w.state.step} from {resume.path}", flush=True)


def _start_metrics(w: _Worker):
    """This worker's Prometheus endpoint, registered for discovery when configured."""
    import ray

    from seqface_dist.metrics import register_endpoint, start_worker_metrics

    node_ip = ray.util.get_node_ip_address()
    metrics, target = start_worker_metrics(w.cfg.metrics, w.cfg.train.run_name, w.rank,
                                           w.world, node_ip)
    if target and w.cfg.metrics.service_discovery_dir:
        register_endpoint(w.cfg.train.run_name, w.rank, node_ip, target)
    h = w.head
    metrics.set_head_rows(classifier=h.weight.shape[0],
                          identity_centers=h.id_rows[1] - h.id_rows[0],
                          sequence_centers=h.seq_rows[1] - h.seq_rows[0])
    return metrics


def _where(w: _Worker) -> dict:
    """(node id, pid) of every rank, for the log and for operators."""
    import ray
    import torch.distributed as dist

    where: list = [None] * w.world
    dist.all_gather_object(where, (ray.get_runtime_context().get_node_id(), os.getpid()))
    return {"node_ids": [x[0] for x in where], "pids": [x[1] for x in where]}


def train_func(config: dict) -> None:
    """The per-worker loop (``TorchTrainer(train_loop_per_worker=train_func)``)."""
    import torch.distributed as dist

    from seqface_dist.data.loader import normalize
    from seqface_dist.losses import lambda_schedule
    from seqface_dist.train.schedule import lr_multiplier, set_lr

    cfg = config_from_dict(config["cfg"])
    # Ray Train logs every report at INFO; our own progress line says it once.
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    w = _build(cfg)
    _resume(w)
    where = _where(w)
    metrics = _start_metrics(w)
    vset = None
    if w.rank == 0 and cfg.eval.pairs:
        from seqface_dist.eval.evaluate import load_verification_set

        vset = load_verification_set(cfg.eval.pairs, root=cfg.eval.root or None)

    o, state, engine, head, comm = cfg.optim, w.state, w.engine, w.head, w.comm
    batches = _Batches(w.loader, state.epoch)
    global_batch = w.loader.batch_size * w.world
    window = {"t0": time.perf_counter(), "samples": 0}
    try:
        while state.step < o.max_steps:
            t0 = time.perf_counter()
            images, centers = batches.next()
            t1 = time.perf_counter()
            step = state.step
            factor = lr_multiplier(step, o)
            set_lr(w.optimizers, w.base_lrs, factor)
            lam = lambda_schedule(step, base=cfg.loss.lambda_base, gamma=cfg.loss.lambda_gamma,
                                  power=cfg.loss.lambda_power, lambda_min=cfg.loss.lambda_min)
            comm_before = comm.seconds
            feats = engine(normalize(images.to(w.device, non_blocking=True)))
            out = head(feats, centers.to(w.device), step=step)
            t2 = time.perf_counter()
            engine.backward(out.loss)
            t3 = time.perf_counter()
            last = step + 1 >= o.max_steps
            log_now = (step + 1) % cfg.train.log_every == 0 or last
            # The norm costs a pass over every gradient: only when clipping or logging it.
            grad_norm = (clip_gradients(engine, head, o.grad_clip, comm)
                         if o.grad_clip > 0 or log_now else float("nan"))
            engine.step()
            w.head_opt.step()
            w.head_opt.zero_grad(set_to_none=True)
            t4 = time.perf_counter()
            state.step += 1
            state.samples_seen += global_batch
            state.epoch = batches.epoch
            window["samples"] += global_batch

            losses = {"chief": float(out.chief), "lsr": float(out.chief_lsr),
                      "dsa_pull": float(out.dsa_pull), "dsa_push": float(out.dsa_push),
                      "total": float(out.loss.detach())}
            metrics.observe_step({"data_wait": t1 - t0, "forward": t2 - t1,
                                  "backward": t3 - t2, "optimizer": t4 - t3,
                                  "communication": comm.seconds - comm_before},
                                 {k: v for k, v in losses.items() if v == v},
                                 w.loader.batch_size, lr=o.lr * factor, lam=lam,
                                 active_hinge_fraction=float(out.active_fraction),
                                 step=state.step)
            report = None
            if log_now:
                metrics.update_data_counters(_data_counters(w.loader.counters()))
                now = time.perf_counter()
                rate = window["samples"] / max(now - window["t0"], 1e-9)
                window.update(t0=now, samples=0)
                report = {"step": state.step, "epoch": state.epoch, **losses,
                          "chief_identity": float(out.chief_identity),
                          "dsa": float(out.dsa), "active_fraction": float(out.active_fraction),
                          "lr": o.lr * factor, "lambda": lam, "grad_norm": grad_norm,
                          "samples_per_second": rate, "samples_seen": state.samples_seen,
                          **where}
                if vset is not None and (last or (cfg.eval.every_steps and
                                             state.step % cfg.eval.every_steps == 0)):
                    report.update(_evaluate(engine.module, vset, cfg, state.step, metrics))
                if w.rank == 0:
                    _log(cfg, report)
            # Ray hears of the run only at checkpoints: each ray.train.report waits for the
            # controller's next poll (~2 s), too slow for every logged step.
            if state.step % cfg.train.checkpoint_every == 0 or last:
                _checkpoint(report or {"step": state.step, **losses}, engine, head,
                            w.head_opt, state, w.rank, dist, cfg if last else None)
    finally:
        metrics.stop()


def _log(cfg: Config, report: dict) -> None:
    """Rank 0: one history line and one progress line per logged step."""
    _append_history(cfg, report)
    print("[seqface] " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                  for k, v in report.items() if k not in ("node_ids", "pids")),
          flush=True)


def _evaluate(model, vset, cfg: Config, step: int, metrics) -> dict:
    """Rank 0's verification on the configured pairs set; returns report entries."""
    from seqface_dist.eval.evaluate import evaluate_model

    res = evaluate_model(model, vset, flip=cfg.eval.flip_test, progress=False)
    metrics.set_eval(vset.name, step, accuracy=res.accuracy,
                     tar_at_far={t.far_target: t.tar for t in res.tar_at_far})
    print(f"[seqface] eval {vset.name} at step {step}: " + res.summary().replace("\n", "; "),
          flush=True)
    return {f"eval_{k}": float(v) for k, v in res.metrics().items()}


def _checkpoint(metrics: dict, engine, head, head_opt, state, rank, dist,
                export_cfg: Config | None = None) -> None:
    """Collective: every rank writes its files and calls ray.train.report with them.

    ``export_cfg`` (the last step): rank 0 also writes the standalone export into it.
    """
    import ray.train

    from seqface_dist.train.checkpoint import save_checkpoint

    with tempfile.TemporaryDirectory(prefix="seqface-ckpt-") as d:
        if export_cfg is not None and rank == 0:
            from seqface_dist.train.export import export_embedding

            export_embedding(engine.module, export_cfg.model, os.path.join(d, "export"))
        save_checkpoint(d, engine=engine, head=head, head_optimizer=head_opt, state=state,
                        rank=rank, barrier=dist.barrier)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def history_path(cfg: Config) -> Path | None:
    """Rank 0's log of every reported step, one JSON object a line (local storage only)."""
    if cfg.train.storage_path.startswith("s3://"):
        return None
    return Path(cfg.train.storage_path).expanduser().resolve() / cfg.train.run_name / \
        "history.jsonl"


def _append_history(cfg: Config, report: dict) -> None:
    path = history_path(cfg)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(report) + "\n")


def _data_counters(c: dict) -> dict:
    return {"shard_bytes": c.get("bytes", 0), "shard_samples": c.get("samples", 0),
            "shards_opened": c.get("shards", 0), "s3_retries": c.get("s3_reopens", 0),
            "bad_samples": dict(c.get("bad", {}))}
