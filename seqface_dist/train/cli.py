"""``seqface train``, ``seqface demo`` and ``seqface smoke``.

    seqface smoke [--config F] [--steps N] [section.key=value ...]
    seqface train --config F [--resume-from URI [--resume-weights-only]] [--address ADDR]
                  [section.key=value ...]
    seqface demo [--out demo-out] [--steps 1200] [--workers 2] [--compare]
    seqface plot RUN [--out curves.png]
    seqface export SRC --out DIR [--onnx]
"""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="distributed training with Ray Train + DeepSpeed",
                       description="Train on Ray Train workers (local Ray, or the cluster at "
                       "--address / RAY_ADDRESS; inside `ray job submit` the job's cluster).")
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.add_argument("--resume-from", default=None, metavar="URI",
                   help="a checkpoint folder (local or s3://) of another run to continue; "
                   "may have been written by a different number of workers")
    p.add_argument("--resume-weights-only", action="store_true",
                   help="take only the backbone's weights from --resume-from: a new head "
                   "and schedule, e.g. to train on other identities")
    p.add_argument("--address", default=None,
                   help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    p.set_defaults(handler=_train)

    p = sub.add_parser("plot", help="a run's loss, lr, accuracy and throughput curves (PNG)")
    p.add_argument("run", help="a run folder or its history.jsonl (local or s3://)")
    p.add_argument("--out", default=None,
                   help="PNG to write (default: curves.png in the run folder)")
    p.set_defaults(handler=_plot)

    p = sub.add_parser("export", help="the standalone embedding network of a checkpoint or "
                       "export (safetensors + model.json + .pt2, and ONNX with --onnx)")
    p.add_argument("source", help="a run folder (its newest committed checkpoint), a run "
                   "checkpoint folder (with state.json), or an export folder / its "
                   "backbone.safetensors")
    p.add_argument("--out", required=True, help="folder to write the export into")
    p.add_argument("--onnx", action="store_true",
                   help="also embedding.onnx, checked against onnxruntime when installed "
                   "(pip install 'seqface-dist[onnx]')")
    p.set_defaults(handler=_export)

    p = sub.add_parser("smoke", help="single-process smoke training on synthetic data")
    p.add_argument("--config", default=None,
                   help="YAML config (default: the built-in smoke config, configs/smoke.yaml)")
    p.add_argument("--steps", type=int, default=None, help="training steps (optim.max_steps)")
    p.add_argument("--quiet", action="store_true", help="no periodic loss lines")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    p.set_defaults(handler=_smoke)

    p = sub.add_parser("demo", help="the one-command local demo: MNIST shards, 2 Ray "
                       "workers, DeepSpeed, partitioned head, evaluation, export")
    p.add_argument("--out", default="demo-out", help="folder for shards, runs and the export")
    p.add_argument("--steps", type=int, default=1200, help="training steps")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers")
    p.add_argument("--compare", action="store_true",
                   help="also train the identities-only baseline on the same budget and "
                        "print both accuracies side by side")
    p.set_defaults(handler=_demo)


def _train(args: argparse.Namespace) -> int:
    from seqface_dist.config import load_config
    from seqface_dist.train.driver import PreflightError, run

    overrides = list(args.overrides)
    if args.resume_from:
        overrides.append(f"train.resume_from={args.resume_from}")
    if args.resume_weights_only:
        overrides.append("train.resume_weights_only=true")
    cfg = load_config(args.config, overrides)
    try:
        result = run(cfg, ray_address=args.address)
    except PreflightError as e:
        print(f"seqface train: preflight failed: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # Ray raises when the run fails past its max_failures
        print(f"seqface train: the run failed: {e}", file=sys.stderr)
        return 1
    if result.error is not None:
        print(f"seqface train: the run failed: {result.error}", file=sys.stderr)
        return 1
    print(f"seqface train: done at step {result.metrics.get('step')}; "
          f"latest checkpoint {result.checkpoint.path if result.checkpoint else None}")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from seqface_dist.train.plot import plot_run

    try:
        print(f"seqface plot: wrote {plot_run(args.run, args.out)}")
    except (FileNotFoundError, ValueError) as e:
        print(f"seqface plot: {e}", file=sys.stderr)
        return 2
    return 0


def _export(args: argparse.Namespace) -> int:
    from seqface_dist.train.export import (
        backbone_from,
        export_embedding,
        export_onnx,
        onnx_max_abs_diff,
    )

    try:
        net, model_cfg = backbone_from(args.source)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"seqface export: {e}", file=sys.stderr)
        return 2
    program = export_embedding(net, model_cfg, args.out)
    print(f"seqface export: wrote {program.parent} ({model_cfg.backbone}, "
          f"{model_cfg.in_channels} x {model_cfg.input_size[0]} x {model_cfg.input_size[1]})")
    if args.onnx:
        try:
            path = export_onnx(net, model_cfg, args.out)
        except ImportError as e:
            print(f"seqface export: --onnx needs onnx and onnxscript "
                  f"(pip install 'seqface-dist[onnx]'): {e}", file=sys.stderr)
            return 2
        diff = onnx_max_abs_diff(net, path, model_cfg)
        check = ("onnxruntime not installed, not checked" if diff is None else
                 f"onnxruntime matches the module to {diff:.1e}")
        print(f"seqface export: wrote {path} ({check})")
        if diff is not None and diff > 1e-3:
            print(f"seqface export: the ONNX graph differs from the module by {diff:.2e}",
                  file=sys.stderr)
            return 1
    return 0


def _smoke(args: argparse.Namespace) -> int:
    from seqface_dist.config import ConfigError
    from seqface_dist.train.smoke import format_report, run_smoke, smoke_config

    overrides = list(args.overrides)
    if args.steps is not None:
        if args.steps < 1:
            raise ConfigError(f"--steps: must be >= 1 (got {args.steps})")
        overrides.append(f"optim.max_steps={args.steps}")
    cfg = smoke_config(args.config, overrides)
    result = run_smoke(cfg, log=None if args.quiet else print)
    print(format_report(result))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from seqface_dist.train.demo import run_demo

    if args.steps < 1 or args.workers < 1:
        raise SystemExit("seqface demo: --steps and --workers must be >= 1")
    run_demo(args.out, steps=args.steps, workers=args.workers, compare=args.compare)
    return 0
