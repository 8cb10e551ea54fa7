"""The driver: preflight checks, then a Ray Train ``TorchTrainer`` running ``train_func``.

Laptop (local Ray on this machine's CPUs):

    seqface train --config configs/local-cpu.yaml

GPU cluster (the same code; see launch/submit.sh and the README):

    ray job submit --address http://HEAD:8265 --runtime-env launch/runtime_env.yaml \\
        -- seqface train --config configs/cluster-8gpu.yaml

The preflight runs before any worker starts and refuses, with a message naming what to
fix: an invalid config, shard manifests that cannot be read or disagree with the model,
an evaluation set (``eval.sets``) that cannot be read or parsed,
a checkpoint to resume that does not fit, a storage path that cannot be written, and
(once connected to Ray) more workers than the cluster has CPUs or GPUs for.
"""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path

from seqface_dist.config import CLASS_ROW_MODES, Config, ConfigError


class PreflightError(RuntimeError):
    """The run cannot start; the message says what to fix."""


@dataclass
class Preflight:
    num_identities: int
    num_sequences: int
    storage_path: str  # absolute local path or s3:// URL


def _check_storage(path: str, endpoint_url: str) -> str:
    if path.startswith("s3://"):
        from seqface_dist.data import store

        probe = store.join(path, f".seqface-write-probe-{uuid.uuid4().hex}")
        try:
            store.write_bytes(probe, b"ok", endpoint_url)
            store.delete(probe, endpoint_url)
        except Exception as e:
            raise PreflightError(f"train.storage_path {path}: cannot write there ({e}); check "
                                 "the bucket name, credentials and AWS_ENDPOINT_URL") from None
        return path
    p = Path(path).expanduser().resolve()
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".seqface-write-probe-{uuid.uuid4().hex}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise PreflightError(f"train.storage_path {p}: not writable ({e.strerror}); choose a "
                             "folder you can write to") from None
    return str(p)


def _absolute(path: str) -> str:
    """A relative local path made absolute; URLs (s3://, file://) and "" unchanged."""
    if not path or "://" in path:
        return path
    return str(Path(path).expanduser().resolve())


def resolve_paths(cfg: Config) -> Config:
    """Make local paths absolute: Ray workers run in another working directory."""
    d, e, t = cfg.data, cfg.eval, cfg.train
    d.identity_shards = [_absolute(p) for p in d.identity_shards]
    d.sequence_shards = [_absolute(p) for p in d.sequence_shards]
    e.pairs, e.root = _absolute(e.pairs), _absolute(e.root)
    for s in e.sets:
        s.path, s.root = _absolute(s.path), _absolute(s.root)
    t.resume_from, t.storage_path = _absolute(t.resume_from), _absolute(t.storage_path)
    return cfg


def preflight(cfg: Config) -> Preflight:
    """Check everything a run needs before any worker starts."""
    cfg.validate()
    resolve_paths(cfg)
    from seqface_dist.data.layout import make_layout, resolve_sets

    d = cfg.data
    if d.identities_per_batch and not d.identity_shards:
        raise PreflightError("data.identity_shards: empty; give a shard set's manifest URL "
                             "(build one with `seqface shards build`)")
    if d.sequences_per_batch and not d.sequence_shards:
        raise PreflightError("data.sequence_shards: empty, but data.sequences_per_batch > 0")
    try:
        id_sets = resolve_sets(list(d.identity_shards), "identity", d.s3_endpoint_url)
        seq_sets = resolve_sets(list(d.sequence_shards), "sequence", d.s3_endpoint_url)
    except Exception as e:
        raise PreflightError(f"data: cannot read the shard manifests: {e}") from None
    for s in id_sets + seq_sets:
        size = list(s.manifest.image_size)
        if size != list(cfg.model.input_size):
            raise PreflightError(f"{s.url}: images are {size}, model.input_size is "
                                 f"{list(cfg.model.input_size)}; rebuild the shards or change "
                                 "model.input_size")
        if s.manifest.channels != cfg.model.in_channels:
            raise PreflightError(f"{s.url}: images have {s.manifest.channels} channels, "
                                 f"model.in_channels is {cfg.model.in_channels}")
    layout = make_layout(id_sets, seq_sets)
    if layout.num_identities < 1:
        raise PreflightError("data.identity_shards: no identities; the chief loss needs some")
    _check_eval_sets(cfg)
    if cfg.train.resume_from:
        _check_resume(cfg, layout.to_dict())
    storage = _check_storage(cfg.train.storage_path, d.s3_endpoint_url)
    return Preflight(layout.num_identities, layout.num_sequences, storage)


def _check_eval_sets(cfg: Config) -> None:
    """Every evaluation set exists, is readable and parses, with genuine and impostor
    pairs (rank 0 evaluates them during training and at the end)."""
    sets = cfg.eval.resolved_sets()
    if not sets:
        return
    from seqface_dist.eval.sets import check_eval_set

    for i, spec in enumerate(sets):
        key = "eval.pairs" if cfg.eval.pairs else f"eval.sets[{i}] ({spec.name})"
        try:
            check_eval_set(spec, cfg.data.s3_endpoint_url)
        except Exception as e:
            raise PreflightError(f"{key}: {spec.path}: cannot evaluate it: {e} (rank 0 "
                                 "evaluates it during training; '' = no evaluation)") from None


def _check_resume(cfg: Config, layout: dict) -> None:
    """train.resume_from is a committed checkpoint (every listed file there at its size;
    local or s3://) of the same data and classifier layout, unless only weights are taken."""
    from seqface_dist.train import commit
    from seqface_dist.train.checkpoint import CheckpointError, describe_data_change

    uri = cfg.train.resume_from
    try:
        fs, path = commit.filesystem(uri)
        state = commit.read_committed(fs, path)
    except (CheckpointError, OSError, ValueError) as e:
        raise PreflightError(f"train.resume_from: {e}") from None
    if cfg.train.resume_weights_only:
        return  # a new head: only the backbone must fit (checked when it loads)
    change = describe_data_change(state.head.get("layout", {}), layout)
    if change:
        raise PreflightError(f"train.resume_from {uri}: trained on other data: {change}; "
                             "pass --resume-weights-only (train.resume_weights_only) to take "
                             "its backbone with a new head")
    spec = state.head.get("spec", {})
    for key, have in (("num_identities", layout["num_identities"]),
                      ("num_sequences", layout["num_sequences"]),
                      ("dim", cfg.model.embedding_dim)):
        if spec.get(key) != have:
            raise PreflightError(f"train.resume_from {uri}: the checkpoint's head has "
                                 f"{key}={spec.get(key)}, this run has {key}={have}")
    saved = (state.config or {}).get("loss", {}).get("sequence_mode")
    mode = cfg.loss.sequence_mode
    if (saved in CLASS_ROW_MODES) != (mode in CLASS_ROW_MODES):
        rows = "has" if saved in CLASS_ROW_MODES else "has no"
        raise PreflightError(f"train.resume_from {uri}: the checkpoint's classifier {rows} "
                             f"a row per sequence (loss.sequence_mode {saved}); this run's "
                             f"{mode} needs the other; set loss.sequence_mode={saved}")


def check_cluster_resources(cfg: Config) -> None:
    """Refuse a run the connected Ray cluster cannot place (call after ``ray.init``).

    Ray Train would otherwise wait for the missing CPUs or GPUs forever, retrying every
    minute. A cluster with an autoscaler grows on demand: there ``train.wait_for_resources:
    true`` skips this check (Ray cannot tell from here whether nodes will be added).
    """
    import ray

    t = cfg.train
    if t.wait_for_resources:
        return
    per_worker = {"CPU": float(t.cpus_per_worker)}
    if t.use_gpu:
        per_worker["GPU"] = 1.0  # ScalingConfig(use_gpu=True): one GPU per worker
    have = ray.cluster_resources()
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    for res, each in per_worker.items():
        need, total = each * t.num_workers, float(have.get(res, 0.0))
        largest = max((float(n.get(res, 0.0)) for n in nodes), default=0.0)
        what = (f"train.num_workers={t.num_workers} x "
                + (f"train.cpus_per_worker={t.cpus_per_worker}" if res == "CPU" else
                   "1 GPU (train.use_gpu)"))
        if total < need:
            problem = f"needs {need:g} {res}s, the Ray cluster has {total:g}"
        elif largest < each:
            problem = (f"needs {each:g} {res}s on one node, the largest node has "
                       f"{largest:g}")
        else:
            continue
        raise PreflightError(
            f"{what} {problem} (ray.cluster_resources(): {_fmt_resources(have)}); Ray Train "
            f"would wait for them forever. Lower train.num_workers or "
            f"train.cpus_per_worker, add nodes, or, on a cluster with an autoscaler, set "
            f"train.wait_for_resources=true")


def _fmt_resources(have: dict) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in sorted(have.items()) if k in ("CPU", "GPU"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_ray(num_cpus: int | None = None, env_vars: dict[str, str] | None = None, **init_kw):
    """A new Ray cluster on this machine that all of its processes know as *the* cluster.

    Other Ray clusters may run on the same machine. Ray Train's placement-group cleaner
    asks the state API whether the run's controller is alive, and without RAY_ADDRESS that
    API picks the machine's *latest* cluster: another one answers "no such actor" and the
    cleaner removes this run's placement group mid-run. So the GCS gets a known port and
    RAY_ADDRESS names it before start (every Ray process inherits both); the dashboard
    stays on, since the state API goes through it. The environment is restored after.
    """
    import ray

    keys = ("RAY_GCS_SERVER_PORT", "RAY_ADDRESS")
    saved = {k: os.environ.get(k) for k in keys}
    port = _free_port()
    os.environ.update(RAY_GCS_SERVER_PORT=str(port), RAY_ADDRESS=f"127.0.0.1:{port}")
    try:
        # "local": start a new cluster; RAY_ADDRESS is for its own processes.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=True,
                 dashboard_host="127.0.0.1", dashboard_port=_free_port(),
                 runtime_env={"env_vars": env_vars or {}}, **init_kw)
        yield
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run(cfg: Config, *, ray_address: str | None = None, num_cpus: int | None = None):
    """Preflight, then train with Ray Train; returns Ray's ``Result``.

    Uses the Ray cluster this process is connected to, else the one at ``ray_address`` /
    RAY_ADDRESS (inside ``ray job submit``: the job's cluster), else a new local one.
    """
    import ray

    pre = preflight(cfg)
    if ray.is_initialized():
        return _fit(cfg, pre)
    address = ray_address or os.environ.get("RAY_ADDRESS")
    env = {"DS_ACCELERATOR": "cpu"} if not cfg.train.use_gpu else {}
    if address:
        ray.init(address=address, runtime_env={"env_vars": env})
        try:
            return _fit(cfg, pre)
        finally:
            ray.shutdown()
    with local_ray(num_cpus, env):
        return _fit(cfg, pre)


def _fit(cfg: Config, pre: Preflight):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from seqface_dist.train.worker import train_func

    check_cluster_resources(cfg)
    registrar = None
    try:
        if cfg.metrics.enabled and cfg.metrics.service_discovery_dir:
            from seqface_dist.metrics import start_registrar

            registrar = start_registrar(cfg.metrics.service_discovery_dir, cfg.train.run_name)
        t = cfg.train
        trainer = TorchTrainer(
            train_loop_per_worker=train_func,
            train_loop_config={"cfg": cfg.to_dict()},
            scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                         resources_per_worker={"CPU": t.cpus_per_worker}),
            torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
            run_config=RunConfig(
                name=t.run_name, storage_path=pre.storage_path,
                # Ray keeps every checkpoint it registers: ours commit after the upload,
                # and the worker prunes only once a newer one is committed.
                checkpoint_config=CheckpointConfig(num_to_keep=None),
                failure_config=FailureConfig(max_failures=t.max_failures)),
        )
        return trainer.fit()
    finally:
        if registrar is not None:
            from seqface_dist.metrics import stop_registrar

            stop_registrar(registrar)


__all__ = ["ConfigError", "Preflight", "PreflightError", "check_cluster_resources",
           "local_ray", "preflight", "run"]
