"""``seqface train``, ``seqface demo`` and ``seqface smoke``.

    seqface smoke [--config F] [--steps N] [section.key=value ...]
    seqface demo          # for now: the smoke training with a progress bar and a report
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="distributed training with Ray Train (training issue)")
    p.set_defaults(handler=_not_yet)

    p = sub.add_parser("smoke", help="single-process smoke training on synthetic data")
    p.add_argument("--config", default=None,
                   help="YAML config (default: the built-in smoke config, configs/smoke.yaml)")
    p.add_argument("--steps", type=int, default=None, help="training steps (optim.max_steps)")
    p.add_argument("--quiet", action="store_true", help="no periodic loss lines")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    p.set_defaults(handler=_smoke)

    p = sub.add_parser("demo", help="the one-command local demo (for now: the smoke training)")
    p.set_defaults(handler=_demo)


def _not_yet(args: argparse.Namespace) -> int:
    raise SystemExit(f"seqface {args.command}: not implemented yet (see the training issue)")


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
    from tqdm import tqdm

    from seqface_dist.train.smoke import format_report, run_smoke, smoke_config

    cfg = smoke_config()
    print("seqface demo: single-process smoke training (tiny backbone, synthetic faces, "
          "LSR chief loss + DSA); the distributed demo comes with the training issue.")
    with tqdm(total=cfg.optim.max_steps, desc="smoke", unit="step") as bar:
        result = run_smoke(cfg, log=bar.write, progress=bar.update)
    print(format_report(result))
    return 0
