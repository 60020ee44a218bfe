"""CLI smoke tests: the commands run end to end on a tiny configuration and write their files."""

import json

import pytest

from moba_attn import bench
from moba_attn.cli import main


def test_bench_writes_table_files_and_plot(tmp_path, capsys):
    out = tmp_path / "b"
    rc = main(["bench", "--seqlens", "256,600", "--heads", "2", "--kv-heads", "1", "--head-dim", "16",
               "--block-size", "64", "--topk", "2", "--repeats", "1", "--out", str(out),
               "--routing", "local"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "PASS" in text and "moba-torch" in text and "x sdpa" in text
    result = json.loads((out / "results.json").read_text())
    rows = result["rows"]
    assert {r["provider"] for r in rows} == {"moba-torch", "sdpa"}
    assert {r["mode"] for r in rows} == {"fwd", "fwd+bwd"}
    assert all(r["ms"] > 0 and r["tflops"] > 0 for r in rows)
    assert (out / "results.csv").read_text().startswith("T,")
    assert (out / "plot.png").stat().st_size > 10_000


def test_useful_flops_count_only_attended_keys():
    cfg = bench.BenchConfig(seqlens=[512], heads=1, head_dim=16, block_size=64, topk=2,
                            modes=["fwd"], repeats=1, check=False, device="cpu")
    rows = bench.run_benchmark(cfg, progress=False)["rows"]
    by = {r["provider"]: r for r in rows}
    moba_flops = by["moba-torch"]["tflops"] * by["moba-torch"]["ms"]
    dense_flops = by["sdpa"]["tflops"] * by["sdpa"]["ms"]
    # keys: dense 512*513/2; MoBA: own-block part + min(k-1, earlier) * 64 per query
    moba_keys = sum(t % 64 + 1 + min(1, t // 64) * 64 for t in range(512))
    assert moba_flops / dense_flops == pytest.approx(moba_keys / (512 * 513 / 2), rel=1e-6)


def test_local_routing_is_smooth_and_unit_scale():
    import torch

    x = bench.local_walk(4000, 8, torch.Generator().manual_seed(0), "cpu")
    assert 0.6 < x.std().item() < 1.5
    lag1 = torch.nn.functional.cosine_similarity(x[1:], x[:-1]).mean().item()
    assert lag1 > 0.9  # neighbours point the same way: they route alike


def test_check_and_env(capsys):
    assert main(["check"]) == 0
    assert "all checks passed" in capsys.readouterr().out
    assert main(["env"]) == 0
    assert "torch" in capsys.readouterr().out


def test_bad_provider_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown providers"):
        bench.run_benchmark(bench.BenchConfig(seqlens=[64], providers=["nope"], check=False),
                            progress=False)
