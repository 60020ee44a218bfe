"""CPU tests of ``moba eval`` and ``moba viz`` on a tiny trained run, and of the routing
telemetry's oracles."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from moba_attn.train.routing import layer_routing

from .helpers import is_png, moba


def test_eval_writes_tables_and_pngs(trained, tmp_path, capsys):
    out = tmp_path / "eval"
    moba(
        "eval",
        str(trained),
        str(trained / "checkpoint.pt"),
        "--out",
        str(out),
        "--n-seqs",
        "4",
        "--samples",
        "2",
        "--depths",
        "0,1",
    )
    res = json.loads((out / "eval.json").read_text())
    assert len(res) == 2
    r = next(iter(res.values()))
    assert len(r["buckets"]) == 8 and r["trailing_from"] == 112
    assert r["loss"] < np.log(256) and abs(r["trailing_loss"] - r["buckets"][-1]["loss"]) < 1e-6
    acc = np.asarray(r["retrieval"]["accuracy"])
    assert acc.shape == (1, 2) and ((0 <= acc) & (acc <= 1)).all()
    with open(out / "retrieval.csv") as f:
        assert len(f.read().strip().splitlines()) == 1 + 2 * 2
    assert is_png(out / "position_loss.png") and is_png(out / "retrieval_heatmap.png")
    text = capsys.readouterr().out
    assert "held-out loss" in text and "trailing" in text and "retrieval" in text


def test_viz_writes_pictures_and_telemetry(trained, tmp_path):
    out = tmp_path / "viz"
    moba(
        "viz",
        str(trained),
        "--out",
        str(out),
        "--block-size",
        "16",
        "--topk",
        "3",
        "--heads",
        "0,1",
    )
    assert is_png(out / "selection.png") and is_png(out / "routing_mass.png")
    tele = json.loads((out / "telemetry.json").read_text())
    assert len(tele["layers"]) == 4 and tele["block_size"] == 16
    for layer in tele["layers"]:
        m, o = np.array(layer["mass"]), np.array(layer["oracle"])
        assert m.shape == (4,) and (m > 0).all() and (m <= o + 1e-5).all() and (o <= 1 + 1e-5).all()
        assert layer["routed_queries"] == 128 - 3 * 16
        assert len(layer["needle_selected"]) == 4


def test_layer_routing_oracles():
    torch.manual_seed(0)
    q, k = torch.randn(100, 4, 16), torch.randn(100, 2, 16)
    dense = layer_routing(q, k, 0.25, block_size=10, topk=10)  # topk >= #blocks: dense attention
    assert dense.routed == 0 and np.allclose(dense.mass, 1.0)
    r = layer_routing(q, k, 0.25, block_size=10, topk=3)
    assert r.routed == 70 and r.sel.shape == (100, 4, 2)
    assert (r.mass <= r.oracle + 1e-6).all() and (r.mass < 1).all()
    # the row of query 95 (block 9): 2 distinct earlier blocks per head
    assert all(len(set(r.sel[95, h])) == 2 and (r.sel[95, h] < 9).all() for h in range(4))
