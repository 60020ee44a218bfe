"""Smoke tests: every example's main() runs with small arguments."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("decode", ["moba", "full"])
def test_hf_generate(decode, capsys):
    pytest.importorskip("transformers")
    mod = load("hf_generate")
    out = mod.main(["--layers", "2", "--prompt-len", "40", "--new-tokens", "12",
                    "--block-size", "8", "--topk", "2", "--decode", decode])
    assert out.shape == (2, 52)
    assert ((out[:, 40:] >= 0) & (out[:, 40:] < 256)).all()
    text = capsys.readouterr().out
    assert "'full_attn_layers': [1]" in text and f"'decode': '{decode}'" in text
    assert "back to 'sdpa' attention" in text


def test_attention_basics(capsys):
    res = load("attention_basics").main(["--seqlen", "300", "--heads", "4", "--kv-heads", "2",
                                          "--head-dim", "16", "--block-size", "32", "--topk", "2",
                                          "--device", "cpu"])
    assert res["dense_err"] < 1e-5 and res["packed_err"] < 1e-5
    assert res["sparse_gap"] > 1e-3
    assert "picked blocks" in capsys.readouterr().out
