"""What runs on each Ray Train worker: DeepSpeed backbone + partitioned head + shards.

``train_func(config)`` is handed to ``TorchTrainer``; Ray has already created the
process group (gloo on CPU, NCCL on GPU) and set RANK/WORLD_SIZE. Per step:

    images, center_index = next(batches)            # identities + sequences, this rank
    res = trainer.step(images, center_index, step)  # seqface_dist.train.step: the one step
    # inside: engine(images) -> head(feats, ...) -> engine.backward -> clip -> both steps

The head is never given to DeepSpeed (it would broadcast and average the row blocks); the
features' all-gather hands each rank the gradient of the *global* loss, and DeepSpeed
averages the backbone gradients over R ranks, so the gather scales that gradient by R.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, replace

import torch

from seqface_dist.config import Config, config_from_dict
from seqface_dist.data.loader import TrainLoader, make_train_loader
from seqface_dist.train.checkpoint import RunState
from seqface_dist.train.history import History
from seqface_dist.train.step import (
    Trainer,
    backbone_optimizer,
    build_head,
    init_backbone,
    resolve_sequence_weight,
)

log = logging.getLogger("seqface")

# Seconds every rank waits between its upload and the commit; only for fault injection.
FAULT_PAUSE_BEFORE_COMMIT = "SEQFACE_FAULT_PAUSE_BEFORE_COMMIT_S"


def _deepspeed(cfg: Config):
    if not cfg.train.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from deepspeed import ops

    # The shared-memory comm op needs a ~30 s JIT build and only helps intra-node CPU runs.
    ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def ds_config(cfg: Config, micro_batch: int, world: int | None = None
              ) -> tuple[dict, list[str]]:
    """(the engine's config: ``train.deepspeed_config`` (if any) under seqface's keys, the
    user's keys seqface overrode, as 'key (user a -> b)').

    ``micro_batch``: one micro-batch per rank (the step's batch / accumulation steps);
    ``world``: ranks (None: DeepSpeed derives train_batch_size itself). The user's JSON
    was checked by the config's validation (refused keys); what seqface owns and what it
    refuses: seqface_dist/deepspeed_json.py.
    """
    from seqface_dist import deepspeed_json as dsc

    t = cfg.train
    user = dsc.read_json(t.deepspeed_config) if t.deepspeed_config else None
    ours = dsc.owned(micro_batch=micro_batch, accumulation=t.gradient_accumulation_steps,
                     world=world or 1, zero_stage=t.zero_stage, precision=t.precision)
    if world is None:
        del ours["train_batch_size"]
    merged, overridden = dsc.merge(user, ours)
    if world is None and user and "train_batch_size" in user:
        merged.pop("train_batch_size")  # derived by DeepSpeed from the three above
        overridden.append(f"train_batch_size (user {user['train_batch_size']!r} -> derived)")
    return merged, overridden


class _Batches:
    """Endless (images, center_index) from the loader, counting epochs as they roll over."""

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
    loader: TrainLoader
    trainer: Trainer
    state: RunState
    attempt: str  # this worker group's token in its checkpoints' folder names
    history: History | None = None  # rank 0's


def deepspeed_trainer(cfg: Config, micro_batch: int, num_identities: int,
                      num_sequences: int, *, world: int, device: torch.device,
                      sequence_weight: float) -> tuple[Trainer, dict]:
    """The backbone under DeepSpeed (checkpoints read weights-only) and the head beside it,
    on the process group that exists; returns the Trainer and the head's spec.

    ``micro_batch``: this rank's batch of one step; with train.gradient_accumulation_steps
    k it is split into k micro-batches of micro_batch / k (the engine's micro-batch).
    ``train.init_from``: the backbone starts from those weights (before DeepSpeed wraps
    it; step 0, fresh optimizers and head)."""
    import torch.distributed as dist

    from seqface_dist.models import build_backbone
    from seqface_dist.parallel import Comm
    from seqface_dist.train import safe_load

    deepspeed = _deepspeed(cfg)
    k = cfg.train.gradient_accumulation_steps
    if micro_batch % k:
        raise ValueError(f"a batch of {micro_batch} per rank does not split into "
                         f"train.gradient_accumulation_steps={k} equal micro-batches")
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    torch.manual_seed(cfg.train.seed)  # same backbone init everywhere (DeepSpeed broadcasts)
    backbone = build_backbone(cfg.model)
    said = init_backbone(cfg, backbone)
    if said and rank0:
        _say(said)
    bb_opt = backbone_optimizer(backbone, cfg.optim)
    config, overridden = ds_config(cfg, micro_batch // k, world)
    if overridden and rank0:
        _say("deepspeed_config: overridden by seqface: " + ", ".join(overridden))
    engine, bb_opt, _, _ = deepspeed.initialize(
        model=backbone, optimizer=bb_opt, config=config)
    if cfg.train.precision != "fp32":
        # DeepSpeed casts the parameters only; BatchNorm's running statistics stay fp32,
        # which batch_norm refuses beside bf16/fp16 weights: they follow the weights.
        low = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float16
        for b in engine.module.buffers():
            if b.is_floating_point():
                b.data = b.data.to(low)
    safe_load.install(engine)  # its checkpoint files are read without unpickling code
    comm = Comm()
    # DeepSpeed averages backbone gradients over R ranks; the head's loss is already the
    # global batch's, so the features' gather scales their gradient by R.
    head, head_opt, spec = build_head(cfg, num_identities, num_sequences, comm, device,
                                      feature_grad_scale=world,
                                      sequence_weight=sequence_weight)
    return Trainer(cfg, engine, head, head_opt, bb_opt, comm, device), asdict(spec)


def _build(cfg: Config) -> _Worker:
    """Process group, shard loader, DeepSpeed backbone and the head beside it."""
    import ray.train
    import torch.distributed as dist

    deepspeed = _deepspeed(cfg)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, cfg.train.cpus_per_worker))
    deepspeed.init_distributed(dist_backend="nccl" if cfg.train.use_gpu else "gloo")
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if cfg.train.use_gpu else "cpu")

    loader = make_train_loader(cfg.data, rank=rank, world_size=world,
                               image_size=tuple(cfg.model.input_size),
                               channels=cfg.model.in_channels, seed=cfg.train.seed)
    layout = loader.layout
    images = {kind: sum(s["num_samples"] for s in sets) for kind, sets in
              (("id", layout.identity_sets), ("seq", layout.sequence_sets))}
    seq_weight = resolve_sequence_weight(cfg, images["id"], images["seq"])
    trainer, spec = deepspeed_trainer(cfg, loader.batch_size, layout.num_identities,
                                      layout.num_sequences, world=world, device=device,
                                      sequence_weight=seq_weight)
    if rank == 0 and cfg.data.sequences_per_batch:
        _say(f"sequences: loss.sequence_mode {cfg.loss.sequence_mode}, "
             f"sequence weight {seq_weight:.3g} ({images['seq']:,} sequence and "
             f"{images['id']:,} identity images)")
    state = RunState(world_size=world, zero_stage=cfg.train.zero_stage, seed=cfg.train.seed,
                     head={"spec": spec, "layout": layout.to_dict()}, config=cfg.to_dict())
    attempt = [uuid.uuid4().hex[:8]]
    dist.broadcast_object_list(attempt, src=0)
    history = None
    if rank == 0:
        storage = ctx.get_storage()
        history = History(storage.storage_filesystem, storage.experiment_fs_path, attempt[0])
    return _Worker(cfg, rank, world, loader, trainer, state, attempt[0], history)


def _resume(w: _Worker) -> None:
    """Continue from this run's newest committed checkpoint (after a failure, or a rerun
    under the same name), else from train.resume_from; rank 0 chooses for everyone."""
    import ray.train
    import torch.distributed as dist

    from seqface_dist.train import commit
    from seqface_dist.train.checkpoint import load_checkpoint

    storage = ray.train.get_context().get_storage()
    choice: list = [None]
    if w.rank == 0:
        found, skipped = commit.find_resumable(storage.storage_filesystem,
                                               storage.experiment_fs_path)
        for why in skipped:
            _say(f"skipping an incomplete checkpoint: {why}")
        if found is not None:
            choice[0] = ("run", found.path)
        elif w.cfg.train.resume_from:
            choice[0] = ("resume_from", w.cfg.train.resume_from)
    dist.broadcast_object_list(choice, src=0)
    if choice[0] is None:
        return
    origin, where = choice[0]
    ckpt = (ray.train.Checkpoint(where, filesystem=storage.storage_filesystem)
            if origin == "run" else ray.train.Checkpoint(where))
    # Weights only: asked for, and only for the other run's checkpoint (this run's own
    # checkpoints continue it whole).
    weights_only = origin == "resume_from" and w.cfg.train.resume_weights_only
    t = w.trainer
    with ckpt.as_directory() as d:
        old = load_checkpoint(d, engine=t.engine, head=t.head, head_optimizer=t.head_opt,
                              rank=w.rank, world_size=w.world, weights_only=weights_only,
                              data_layout=w.state.head["layout"])
    if weights_only:
        if w.rank == 0:
            _say(f"backbone weights from {where} (step {old.step}); a new head and "
                 "schedule start at step 0")
        return
    # A partly read epoch is not replayed: its batches are drawn afresh.
    w.state.step, w.state.epoch, w.state.samples_seen = old.step, old.epoch + 1, \
        old.samples_seen
    t.skipped_steps = old.skipped_steps
    if w.rank == 0:
        w.history.append({"event": "resumed", "step": w.state.step, "checkpoint": where})
        _say(f"resumed at step {w.state.step} from {where}")


def _start_metrics(w: _Worker):
    """This worker's Prometheus endpoint, registered for discovery when configured.

    metrics.port 0: any free port; P > 0: P + this worker's local rank (fixed per node,
    so a PodMonitor can scrape it; the discovery file lists it all the same)."""
    import ray
    import ray.train

    from seqface_dist.metrics import register_endpoint, start_worker_metrics

    node_ip = ray.util.get_node_ip_address()
    metrics, target = start_worker_metrics(
        w.cfg.metrics, w.cfg.train.run_name, w.rank, w.world, node_ip,
        local_rank=ray.train.get_context().get_local_rank())
    if target and w.cfg.metrics.service_discovery_dir:
        register_endpoint(w.cfg.train.run_name, w.rank, node_ip, target)
    h = w.trainer.head
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

    cfg = config_from_dict(config["cfg"])
    _quiet_report_lines()
    w = _build(cfg)
    _resume(w)
    where = _where(w)
    metrics = _start_metrics(w)
    vsets = []  # rank 0's evaluation sets (eval.sets, or the eval.pairs shorthand)
    if w.rank == 0 and cfg.eval.resolved_sets():
        from seqface_dist.eval.sets import load_eval_set

        vsets = [load_eval_set(s, cfg.data.s3_endpoint_url) for s in cfg.eval.resolved_sets()]
    tracker = _start_tracking(w) if w.rank == 0 else None

    o, state, trainer = cfg.optim, w.state, w.trainer
    batches = _Batches(w.loader, state.epoch)
    global_batch = w.loader.batch_size * w.world
    window = {"t0": time.perf_counter(), "samples": 0}
    try:
        while state.step < o.max_steps:
            t0 = time.perf_counter()
            images, center_index = batches.next()
            data_wait = time.perf_counter() - t0
            step = state.step
            last = step + 1 >= o.max_steps
            log_now = (step + 1) % cfg.train.log_every == 0 or last
            res = trainer.step(images, center_index, step)
            out = res.out
            state.step += 1
            state.samples_seen += global_batch
            state.epoch = batches.epoch
            window["samples"] += global_batch

            losses = res.losses()
            # A skipped step (non-finite loss or gradient) used up its number and batch but
            # changed nothing; it is counted, and its loss gauges keep the last finite value.
            metrics.observe_step({"data_wait": data_wait, **res.seconds},
                                 {k: v for k, v in losses.items() if math.isfinite(v)},
                                 w.loader.batch_size, lr=res.lr, lam=out.lam,
                                 active_hinge_fraction=float(out.active_fraction),
                                 step=state.step, skipped=res.skipped)
            if res.skipped and w.rank == 0:
                _say(f"step {step}: skipped, not finite: {', '.join(res.nonfinite)} "
                     f"({trainer.consecutive_skipped} in a row, {res.skipped_steps} in all; "
                     f"the run stops after {trainer.max_nonfinite_steps} in a row)")
            report = None
            if log_now:
                metrics.update_data_counters(_data_counters(w.loader.counters()))
                now = time.perf_counter()
                rate = window["samples"] / max(now - window["t0"], 1e-9)
                window.update(t0=now, samples=0)
                report = {"step": state.step, "epoch": state.epoch, **losses,
                          "chief_identity": float(out.chief_identity),
                          "dsa": float(out.dsa), "active_fraction": float(out.active_fraction),
                          "lr": res.lr, "lambda": out.lam, "grad_norm": res.grad_norm,
                          "skipped_steps": res.skipped_steps,
                          "samples_per_second": rate, "samples_seen": state.samples_seen,
                          **where}
                if vsets and (last or (cfg.eval.every_steps and
                                       state.step % cfg.eval.every_steps == 0)):
                    for vset in vsets:
                        report.update(_evaluate(trainer.module, vset, cfg, state.step,
                                                metrics))
                if w.rank == 0:
                    _log(w.history, report, tracker)
            # Ray hears of the run only at checkpoints: each ray.train.report waits for the
            # controller's next poll (~2 s), too slow for every logged step.
            if state.step % cfg.train.checkpoint_every == 0 or last:
                _checkpoint(report or {"step": state.step, **losses,
                                       "skipped_steps": res.skipped_steps}, trainer, state,
                            w.rank, dist, w.attempt, cfg if last else None)
                if w.history is not None:
                    w.history.sync()
                if tracker is not None:
                    tracker.flush()
    finally:
        metrics.stop()
        if w.history is not None:
            w.history.sync()
        if tracker is not None:
            tracker.close()


def _log(history: History, report: dict, tracker=None) -> None:
    """Rank 0: one history line, the same scalars to the trackers (queued, written off
    the step's path) and one progress line per logged step."""
    history.append(report)
    if tracker is not None:
        tracker.log(report)
    _say(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                  for k, v in report.items() if k not in ("node_ids", "pids")))


def _quiet_report_lines() -> None:
    """Ray Train 2.60 logs every report's whole metrics dict, per rank, through a logger
    named by its file's path (outside ``ray.train``, so its log level does not reach it);
    our progress line already says each step once."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray version: nothing to quiet
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def _say(message: str) -> None:
    """One progress line. Through logging, not print: Ray Train's workers tee print() to
    stdout and to the root logger, and the driver showed every line twice."""
    log.info("[seqface] %s", message)


def _evaluate(model, vset, cfg: Config, step: int, metrics) -> dict:
    """Rank 0's verification on one evaluation set (named by its ``eval.sets`` entry);
    returns its report entries ``eval/<name>/accuracy``, ``eval/<name>/tar@far=...``, ...
    The Prometheus eval metrics carry the set's name as their ``dataset`` label."""
    from seqface_dist.eval.evaluate import evaluate_model

    res = evaluate_model(model, vset, flip=cfg.eval.flip_test, progress=False)
    metrics.set_eval(vset.name, step, accuracy=res.accuracy,
                     tar_at_far={t.far_target: t.tar for t in res.tar_at_far})
    _say(f"eval {vset.name} at step {step}: " + res.summary().replace("\n", "; "))
    return {f"eval/{vset.name}/{k}": float(v) for k, v in res.metrics().items()}


def _start_tracking(w: _Worker):
    """Rank 0's TensorBoard / MLflow writer in the run's storage (``tracking``), or None."""
    t = w.cfg.tracking
    if not (t.tensorboard or t.mlflow_uri):
        return None
    import ray.train

    from seqface_dist.train.tracking import Tracker

    storage = ray.train.get_context().get_storage()
    return Tracker(w.cfg, storage.storage_filesystem, storage.experiment_fs_path, w.attempt,
                   resumed_step=w.state.step)


def _checkpoint(report: dict, trainer: Trainer, state: RunState, rank: int, dist,
                attempt: str, export_cfg: Config | None = None) -> None:
    """Collective: every rank writes and uploads its files; then rank 0 commits.

    ``export_cfg`` (the last step): rank 0 also writes the standalone export into it.
    The commit (``state.json`` listing every rank's files) is written only after every
    rank's ``ray.train.report`` (its upload) returned, so a folder that looks complete is.
    """
    import ray.train

    from seqface_dist.train import commit
    from seqface_dist.train.checkpoint import write_rank_files

    name = commit.checkpoint_dir_name(state.step, attempt)
    listings: list = [None] * dist.get_world_size()
    with tempfile.TemporaryDirectory(prefix="seqface-ckpt-") as d:
        if export_cfg is not None and rank == 0:
            from seqface_dist.train.export import export_embedding

            export_embedding(trainer.module, export_cfg.model, os.path.join(d, "export"))
        files = write_rank_files(d, engine=trainer.engine, head=trainer.head,
                                 head_optimizer=trainer.head_opt, rank=rank)
        dist.all_gather_object(listings, files)
        ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(d),
                         checkpoint_dir_name=name)
    pause = float(os.environ.get(FAULT_PAUSE_BEFORE_COMMIT, "0") or 0)
    if pause > 0:  # fault injection (tests/docs): a window to kill a rank mid-checkpoint
        time.sleep(pause)
    dist.barrier()  # every rank's upload returned
    if rank == 0:
        storage = ray.train.get_context().get_storage()
        fs, run_path = storage.storage_filesystem, storage.experiment_fs_path
        commit.commit(fs, f"{run_path}/{name}",
                      replace(state, files=_merge_listings(listings),
                              skipped_steps=trainer.skipped_steps))
        commit.prune(fs, run_path, state.step, trainer.cfg.train.keep_checkpoints)


def _merge_listings(listings: list[dict]) -> dict:
    """Every rank's files in one listing; two ranks may never write one path."""
    merged: dict = {}
    for rank, files in enumerate(listings):
        for rel, info in files.items():
            if rel in merged and merged[rel] != info:
                raise RuntimeError(f"checkpoint file {rel} written differently by two ranks "
                                   f"(rank {rank} and an earlier one)")
            merged[rel] = info
    return merged


def _data_counters(c: dict) -> dict:
    return {"shard_bytes": c.get("bytes", 0), "shard_samples": c.get("samples", 0),
            "shards_opened": c.get("shards", 0), "s3_retries": c.get("s3_reopens", 0),
            "shards_failed": c.get("failed_shards", 0), "bad_samples": dict(c.get("bad", {}))}
