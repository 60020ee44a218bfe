"""The benchmark scripts run end to end on the CPU (``--smoke``; ``cp.py --dry-run`` with two
gloo processes) and write their JSON, CSV and PNG; the shared helpers are right."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _load_common():
    """``benchmarks/common.py`` (benchmarks/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("benchmarks_common",
                                                  ROOT / "benchmarks" / "common.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


common = _load_common()


def run_script(script: str, out: Path, *args: str, timeout: int = 300, **env) -> str:
    """``python benchmarks/<script> --out OUT args``; returns stdout (fails with the tail)."""
    full = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [
        str(ROOT / "src"), os.environ.get("PYTHONPATH")])), **env)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--out", str(out),
                           *args], cwd=ROOT, env=full, capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def load(out: Path, name: str) -> dict:
    """The script's JSON; its CSV and (with matplotlib) PNG exist next to it."""
    assert (out / f"{name}.csv").read_text().strip()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pass
    else:
        assert (out / f"{name}.png").stat().st_size > 5_000
    data = json.loads((out / f"{name}.json").read_text())
    assert data["checks"] and all(c["ok"] for c in data["checks"])
    assert data["rows"] and data["machine_line"] and data["command"].startswith("python")
    return data


@pytest.fixture(scope="module")
def forward_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("forward")
    text = run_script("forward.py", out, "--smoke", "--gate")
    assert "check PASS" in text and text.rstrip().splitlines()[-1].startswith("| gqa")
    return out


def test_forward_smoke(forward_out):
    data = load(forward_out, "forward")
    assert [r["setting"] for r in data["rows"]] == ["paper", "flashmoba", "gqa"]
    for r in data["rows"]:
        assert r["backend"] == "torch" and r["moba_ms"] > 0 and r["varlen_ms"] > 0
        assert r["sdpa_ms"] > 0 and r["x_sdpa"] > 0 and r["gate_ms"] > 0
        assert 0 < r["keys_share"] < 1  # the smoke lengths are sparse


def test_plot_only_redraws_the_png(forward_out):
    pytest.importorskip("matplotlib")
    png = forward_out / "forward.png"
    png.unlink()
    run_script("forward.py", forward_out, "--plot-only", str(forward_out / "forward.json"))
    assert png.stat().st_size > 5_000


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or torch.cuda.is_available(),
                    reason="the Triton CPU interpreter (TRITON_INTERPRET=1, no GPU)")
@pytest.mark.slow
def test_forward_smoke_triton_interpreter(tmp_path):
    pytest.importorskip("triton")
    run_script("forward.py", tmp_path, "--smoke", "--backend", "triton", "--jobs", "gqa:300",
               "--no-varlen", "--repeats", "1")
    (row,) = load(tmp_path, "forward")["rows"]
    assert row["backend"] == "triton" and row["schedule"] in ("masked", "in-place", "partials")


@pytest.mark.slow
def test_backward_smoke(tmp_path):
    run_script("backward.py", tmp_path, "--smoke")
    data = load(tmp_path, "backward")
    assert {c["setting"] for c in data["checks"]} == {"paper", "flashmoba", "gqa"}
    assert all("rel_err_dk" in c for c in data["checks"])
    assert all(r["moba_ms"] > 0 and r["x_sdpa"] > 0 for r in data["rows"])


def test_decode_smoke(tmp_path):
    run_script("decode.py", tmp_path, "--smoke")
    data = load(tmp_path, "decode")
    assert len(data["rows"]) == 8  # 2 caches x 2 batches x 2 settings
    for r in data["rows"]:
        assert r["moba_ms"] > 0 and r["moba_host_ms"] > 0 and r["update_ms"] > 0
        assert r["sdpa_ms"] > 0 and r["x_sdpa"] > 0


@pytest.mark.slow
def test_generation_smoke(tmp_path):
    run_script("generation.py", tmp_path, "--smoke")
    data = load(tmp_path, "generation")
    impls = {(r["part"], r["impl"]) for r in data["rows"]}
    assert impls == {("eager", "sdpa"), ("eager", "moba"), ("eager", "moba-decode-full"),
                     ("compiled", "sdpa"), ("compiled", "moba")}
    for r in data["rows"]:
        assert r["decode_ms"] > 0 and r["tokens_s"] > 0 and r["x_sdpa"] > 0


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or torch.cuda.is_available(),
                    reason="the Triton gate under the CPU interpreter")
def test_gate_smoke(tmp_path):
    run_script("gate.py", tmp_path, "--smoke", "--backend", "triton")
    data = json.loads((tmp_path / "gate.json").read_text())
    assert data["rows"] and all(r["tf32_ms"] > 0 and r["ieee_ms"] > 0 and 0 <= r["agree"] <= 1
                                for r in data["rows"])


def test_train_step_smoke(tmp_path):
    pytest.importorskip("transformers")
    run_script("train_step.py", tmp_path, "--smoke")
    data = load(tmp_path, "train_step")
    assert [(r["T"], r["variant"]) for r in data["rows"]] == [
        (256, "SDPA"), (256, "MoBA 64/2"), (384, "SDPA"), (384, "MoBA 64/2")]
    assert all(r["tokens_per_s"] > 0 for r in data["rows"])
    assert data["rows"][0]["x_sdpa"] == 1.0


@pytest.mark.slow
def test_cp_dry_run(tmp_path):
    text = run_script("cp.py", tmp_path, "--dry-run", timeout=300)
    assert "selective" in text and "allgather" in text
    data = load(tmp_path, "cp")
    assert data["complete"]
    assert {(c["world"], c["heads"]) for c in data["checks"]} == {
        (1, "H2"), (1, "H4"), (2, "H2"), (2, "H4")}
    cp = [r for r in data["rows"] if r["mode"] in ("allgather", "selective")]
    assert {r["world"] for r in cp} == {2}
    assert all(r["eff_fwd"] and r["x_dense_fwd"] for r in cp)


# ----------------------------------------------------------------------------- helpers
def test_reference_matches_naive():
    from moba_attn import moba_select
    from moba_attn.ops.naive import moba_attn_naive

    b, t, hq, hkv, d, bs, topk = 2, 300, 4, 2, 16, 64, 3
    q, k, v, do = (torch.randn(b, t, h, d, dtype=torch.float64) for h in (hq, hkv, hkv, hq))
    cu = common.seq_offsets(b, t, "cpu")
    sel = moba_select(q.flatten(0, 1).float(), k.flatten(0, 1).float(), cu, cu, block_size=bs,
                      topk=topk, backend="torch")
    out, grads = common.moba_reference(q, k, v, sel, block_size=bs, dout=do, chunk=64)
    leaves = [x.flatten(0, 1).requires_grad_() for x in (q, k, v)]
    ref, _ = moba_attn_naive(*leaves, cu, cu, block_size=bs, topk=topk,
                             compute_dtype=torch.float64, selection=sel)
    ref_grads = torch.autograd.grad(ref, leaves, do.flatten(0, 1))
    torch.testing.assert_close(out.flatten(0, 1), ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.flatten(0, 1), want, rtol=1e-11, atol=1e-11)


def test_failed_check_aborts_and_keeps_the_json(tmp_path):
    result = {"checks": [{"setting": "paper", "T": 64, "rel_err_out": 0.5, "tol": 0.02,
                          "ok": False}], "rows": []}
    with pytest.raises(SystemExit, match="correctness check failed"):
        common.report_checks(result, tmp_path, "forward")
    assert json.loads((tmp_path / "forward.json").read_text())["checks"][0]["ok"] is False


def test_tokens_and_jobs():
    assert [common.parse_tokens(x) for x in ("300", "8K", "1M", "1.5k")] == [300, 8192, 2**20, 1536]
    assert [common.fmt_tokens(x) for x in (300, 8192, 2**20, 1536)] == ["300", "8K", "1M", "1.5K"]
    jobs = common.parse_jobs("paper:128K,gqa:8192", common.SETTINGS)
    assert [(s.name, t) for s, t in jobs] == [("paper", 131072), ("gqa", 8192)]
    with pytest.raises(SystemExit, match="SETTING:TOKENS"):
        common.parse_jobs("nope:1K", common.SETTINGS)


def test_cpu_timing_and_flops():
    cpu = torch.device("cpu")
    calls = []
    assert common.time_ms(lambda: calls.append(1), cpu, repeats=3) >= 0
    assert len(calls) == 4  # one warm-up, three timed
    m = common.measure(lambda: None, cpu)
    assert m["peak_mib"] is None and m["ms"] >= 0
    assert common.tflops(10**6, 2, 64, 1.0) == pytest.approx(4 * 64 * 10**6 * 2 / 1e-3 / 1e12)
    assert common.tflops(1, 1, 1, None) is None and common.ratio(None, 1.0) is None
