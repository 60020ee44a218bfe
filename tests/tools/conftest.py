"""Fixtures of the training-tool tests: one thread per test module, one trained run for all."""

from __future__ import annotations

from pathlib import Path

import pytest

from .helpers import SMALL, moba, one_thread


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Path:
    """A full-attention tiny run: 40 steps of 4 x 128 bytes (read-only for the tests)."""
    pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("runs") / "full"
    argv = ["--steps", "40", "--lr", "3e-3", "--eval-every", "20", "--ckpt-every", "20"]
    with one_thread():
        assert moba("train", "--out", str(out), *argv, *SMALL) == 0
    return out
