"""``seqface train``, ``seqface demo`` and ``seqface smoke``."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="distributed training with Ray Train (training issue)")
    p.set_defaults(handler=_not_yet)
    p = sub.add_parser("demo", help="the one-command local demo (training issue)")
    p.set_defaults(handler=_not_yet)


def _not_yet(args: argparse.Namespace) -> int:
    raise SystemExit(f"seqface {args.command}: not implemented yet (see the training issue)")
