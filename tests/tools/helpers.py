"""Shared helpers of the training-tool tests: the ``moba`` entry point, run files, PNG checks."""

from __future__ import annotations

import contextlib
import csv
from pathlib import Path

import torch

from moba_attn.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SMALL = ["--seq-len", "128", "--batch-size", "4", "--no-progress"]


def moba(*argv: str) -> int:
    """``moba <argv>`` in this process, through the real command line."""
    return main(list(argv))


def rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def is_png(path: Path) -> bool:
    return path.exists() and path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 2000


@contextlib.contextmanager
def one_thread():
    """These models are tiny: one thread is faster than two fighting over a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
