"""``seqface shards ...``: build, verify and describe WebDataset shard sets."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("shards", help="build, verify and describe shard sets (data-plane issue)")
    p.set_defaults(handler=_not_yet)


def _not_yet(args: argparse.Namespace) -> int:
    raise SystemExit("seqface shards: not implemented yet (see the data-plane issue)")
