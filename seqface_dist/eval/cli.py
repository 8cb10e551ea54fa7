"""``seqface eval ...``: verification protocols on exported models and checkpoints."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="verification on pairs and videos (evaluation issue)")
    p.set_defaults(handler=_not_yet)


def _not_yet(args: argparse.Namespace) -> int:
    raise SystemExit("seqface eval: not implemented yet (see the evaluation issue)")
