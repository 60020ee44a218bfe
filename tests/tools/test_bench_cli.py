"""``moba bench`` / ``moba check`` / ``moba env``: the commands run end to end on a tiny
configuration, time the public functions under truthful labels, and need neither tqdm nor
matplotlib."""

import json
import sys

import pytest

from moba_attn import bench
from moba_attn.cli import main

TINY = ["--seqlens", "256,600", "--heads", "2", "--kv-heads", "1", "--head-dim", "16",
        "--block-size", "64", "--topk", "2", "--repeats", "1"]


def test_bench_writes_table_files_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "b"
    rc = main(["bench", *TINY, "--out", str(out), "--routing", "local"])
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


def test_bench_without_tqdm_and_matplotlib(tmp_path, capsys, monkeypatch):
    for name in ("tqdm", "tqdm.auto", "matplotlib", "matplotlib.pyplot"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    out = tmp_path / "b"
    assert main(["bench", "--seqlens", "256", *TINY[2:], "--modes", "fwd", "--no-check",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.count("install moba-attn[plot] for plot.png") == 1
    assert (out / "results.json").exists() and (out / "results.csv").exists()
    assert not (out / "plot.png").exists()


def test_moba_providers_call_the_batch_function(monkeypatch):
    """moba-torch times ``moba_attn_func`` on [batch, T, H, D] with backend="torch" (no
    varlen call, so no per-call host sync)."""
    calls = []
    real = bench.moba_attn_func

    def spy(q, k, v, **kw):
        calls.append((q.dim(), kw["backend"]))
        return real(q, k, v, **kw)

    def no_varlen(*a, **kw):
        raise AssertionError("the benchmark must not time moba_attn_varlen_func")

    monkeypatch.setattr(bench, "moba_attn_func", spy)
    monkeypatch.setattr(bench, "moba_attn_varlen_func", no_varlen)
    cfg = bench.BenchConfig(seqlens=[128], batch=2, heads=2, head_dim=16, block_size=32, topk=2,
                            modes=["fwd", "fwd+bwd"], repeats=1, check=False, device="cpu",
                            providers=["moba-torch"])
    rows = bench.run_benchmark(cfg, progress=False)["rows"]
    assert all(r["error"] is None for r in rows)
    assert calls and set(calls) == {(4, "torch")}


def test_triton_label_means_the_triton_kernels(monkeypatch):
    """moba-triton passes backend="triton", which raises where the kernels cannot run
    (here: the CPU without the interpreter) instead of running the torch path."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cfg = bench.BenchConfig(seqlens=[64], heads=1, head_dim=16, block_size=16, topk=2,
                            modes=["fwd"], repeats=1, check=False, device="cpu",
                            providers=["moba-triton"])
    with pytest.raises(ValueError, match="moba-triton cannot run here"):
        bench.run_benchmark(cfg, progress=False)
    assert "moba-triton" not in bench.default_providers(bench.torch.device("cpu"))


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
