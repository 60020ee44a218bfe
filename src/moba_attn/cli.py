"""The ``moba`` command line: a thin layer that parses arguments and calls library functions.

Subcommands register themselves through ``add_parser(subparsers)`` functions so each feature
keeps its flags next to its code: bench/check/env (moba_attn.bench), train/eval/viz
(moba_attn.training).
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moba", description="MoBA attention: benchmarks, checks, training tools")
    sub = parser.add_subparsers(dest="command", required=True)
    from . import bench

    bench.add_parsers(sub)
    try:
        from .training import cli as training_cli
    except ImportError:  # training tools need the 'hf' extra
        training_cli = None
    if training_cli is not None:
        training_cli.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
