"""The ``moba`` command line: a thin layer that parses arguments and calls library functions.

Subcommands register themselves through ``add_parsers(subparsers)`` functions so each feature
keeps its flags next to its code: bench/check/env (:mod:`moba_attn.bench`), and
train/compare/eval/viz (:mod:`moba_attn.train.cli`, which needs the ``train`` extra to run and
says so in one line without it).
"""

from __future__ import annotations

import argparse
import sys


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, ``moba train: error: ...``, exit status 2; ``--help`` has the
    full usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="moba", description="MoBA attention: benchmarks, checks, training tools")
    sub = parser.add_subparsers(dest="command", required=True)
    from . import bench
    from .train import cli as train_cli

    bench.add_parsers(sub)
    train_cli.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
