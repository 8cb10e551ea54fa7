"""The ``seqface`` console entry point.

Each area registers its own subcommands (``register(subparsers)`` in its ``cli`` module),
so this file only lists them; heavy imports happen inside the handlers.

    seqface demo                                   # the one-command local demo
    seqface smoke                                  # single-process smoke training
    seqface train --config configs/local-cpu.yaml [section.key=value ...]
    seqface shards build|verify|info ...
    seqface eval ...
    seqface config [--show] [--config F] [section.key=value ...] | --reference
"""

from __future__ import annotations

import argparse
import sys

from seqface_dist import __version__
from seqface_dist.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    from seqface_dist import config_doc
    from seqface_dist.data import cli as data_cli
    from seqface_dist.eval import cli as eval_cli
    from seqface_dist.train import cli as train_cli

    parser = argparse.ArgumentParser(
        prog="seqface", description="Distributed SeqFace training (LSR + DSA)."
    )
    parser.add_argument("--version", action="version", version=f"seqface-dist {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    train_cli.register(sub)
    data_cli.register(sub)
    eval_cli.register(sub)
    config_doc.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except ConfigError as e:
        print(f"seqface: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
