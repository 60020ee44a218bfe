"""One MoBA decode step through ``moba_attn_with_kvcache`` against dense SDPA decode.

Setting: one new token per sequence, 32 q / 8 kv heads, D=128, bf16, a full
KV cache of random keys and values (random routing); MoBA block 512 / top-8 and block 4096 /
top-12; caches of 128K and 1M tokens; batch 1 and 16. The step is called as a decode loop
calls it: ``validate=False`` and the block centroids passed in (computed once here, as
``moba_attn.update_centroids`` keeps them during generation), so it never syncs with the
host. The dense baselines are SDPA with ``enable_gqa=True`` under the CUDNN_ATTENTION and
FLASH_ATTENTION backends, on the same cache (stored ``[B, Hkv, T, D]``, what SDPA and
transformers use; MoBA reads it through a transposed view).

Per call, each in the same run: eager device time (``do_bench`` median), eager host time
(median of ``perf_counter`` around each of ``--host-calls`` calls issued without a sync; when
the device is the slower side this shows its pace instead), and the time of the same call
replayed from a CUDA graph. ``update ms`` is ``moba_attn.update_centroids`` for one decode
step (a loop calls it every step). Before any timing the step is checked against the fp64
reference on small caches of the same kind (two rows of different lengths).

    python benchmarks/decode.py --out bench_out                  # 8 rows, ~3 min
    python benchmarks/decode.py --caches 1M --batches 1 --out bench_out
    python benchmarks/decode.py --smoke --out /tmp/decode        # CPU, seconds
"""

from __future__ import annotations

import common
import torch
import torch.nn.functional as F
from forward import dense_backends

from moba_attn import moba_attn_with_kvcache, update_centroids
from moba_attn.ops.naive import moba_attn_with_kvcache_naive

NAME = "decode"
HQ, HKV, D = 32, 8, 128
SMOKE_HEADS = (4, 2, 32)
COLUMNS = [("block/topk", "moba", "s"), ("batch", "batch", "d"), ("cache", "T", "tokens"),
           ("MoBA eager ms", "moba_ms", ".3f"), ("MoBA host ms", "moba_host_ms", ".3f"),
           ("MoBA graph ms", "moba_graph_ms", ".3f"), ("update ms", "update_ms", ".3f"),
           ("cuDNN eager / graph ms", "cudnn_cells", "s"),
           ("FLASH eager / graph ms", "flash_cells", "s"), ("SDPA ms", "sdpa_ms", ".3f"),
           ("x cuDNN", "x_cudnn", "x"), ("x cuDNN graph", "x_cudnn_graph", "x"),
           ("x FLASH", "x_flash", "x"), ("x FLASH graph", "x_flash_graph", "x"),
           ("x SDPA", "x_sdpa", "x")]
PLOT = {"x": "T", "xlabel": "cached tokens", "by": "case", "panels": [
    {"title": "device ms per step", "ys": ["moba_ms", "moba_graph_ms", "cudnn_ms",
                                           "cudnn_graph_ms", "flash_ms", "flash_graph_ms",
                                           "sdpa_ms"], "logy": True, "ylabel": "ms"},
    {"title": "host ms per call (no sync)", "ys": ["moba_host_ms", "cudnn_host_ms",
                                                   "flash_host_ms", "sdpa_host_ms"],
     "logy": True, "ylabel": "ms"},
]}


def parse_settings(text: str) -> list[tuple[int, int]]:
    """``"512:8,4096:12"`` -> ``[(512, 8), (4096, 12)]`` (block size, topk)."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        block, _, topk = part.partition(":")
        out.append((common.parse_tokens(block), int(topk)))
    return out


def block_centroids(k_cache: torch.Tensor, block: int, rows: int = 1 << 16) -> torch.Tensor:
    """fp32 mean key of every full block, ``[B, T // block, Hkv, D]``, from ``k_cache
    [B, T, Hkv, D]`` (any strides), a few blocks at a time (no fp32 copy of the cache)."""
    bsz, t, hkv, d = k_cache.shape
    nb = t // block
    cent = torch.empty(bsz, nb, hkv, d, dtype=torch.float32, device=k_cache.device)
    step = max(1, rows // block)
    for b in range(bsz):
        for j0 in range(0, nb, step):
            j1 = min(nb, j0 + step)
            part = k_cache[b, j0 * block : j1 * block].float()
            cent[b, j0:j1] = part.reshape(j1 - j0, block, hkv, d).mean(1)
    return cent


def sdpa_decode(q, key, value, sdpa_backend):
    """Dense decode: q ``[B, 1, Hq, D]`` over the whole cache ``[B, Hkv, T, D]``."""
    from contextlib import nullcontext

    from torch.nn.attention import sdpa_kernel

    ctx = nullcontext() if sdpa_backend is None else sdpa_kernel([sdpa_backend])
    with ctx:
        return F.scaled_dot_product_attention(q.transpose(1, 2), key, value, enable_gqa=True)


# ----------------------------------------------------------------------------- check
def check(block: int, topk: int, heads, device, dtype, backend: str, seed: int) -> dict:
    """The step (``validate=False``, centroids passed) against the fp64 reference on two
    rows of ``topk + 3`` blocks and ``topk + 3`` blocks minus 37 tokens. Heads where the
    reference's gate is a near-tie at the top-k boundary (TF32 gate scores may order those
    differently) are excused, at most a quarter of them."""
    hq, hkv, d = heads
    t = (topk + 3) * block
    lens = torch.tensor([t, t - 37], device=device, dtype=torch.int32)
    gen = torch.Generator(device=device).manual_seed(seed + 7)
    kc, vc = (torch.randn(2, t, hkv, d, generator=gen, device=device, dtype=dtype) for _ in "kv")
    q = torch.randn(2, 1, hq, d, generator=gen, device=device, dtype=dtype)
    cent = block_centroids(kc, block)
    with torch.no_grad():
        got = moba_attn_with_kvcache(q, kc, vc, lens, block_size=block, topk=topk,
                                     centroids=cent, validate=False, backend=backend)
    ref, _ = moba_attn_with_kvcache_naive(q.double(), kc.double(), vc.double(), lens,
                                          block_size=block, topk=topk,
                                          compute_dtype=torch.float64)
    errs = ((got.double() - ref).norm(dim=-1) / ref.norm(dim=-1))[:, 0]  # [B, Hq]
    # gate scores as the reference ranks them: <q, centroid> over the blocks before the own
    tie = torch.zeros_like(errs, dtype=torch.bool)
    for b, n in enumerate(lens.tolist()):
        own = (n - 1) // block
        if own <= topk - 1:
            continue  # every earlier block is picked: no boundary
        c = cent[b, :own].double().repeat_interleave(hq // hkv, dim=1)  # [own, Hq, D]
        s = torch.einsum("hd,nhd->hn", q[b, 0].double(), c)
        top = s.sort(-1, descending=True).values
        gap = top[:, topk - 2] - top[:, topk - 1]
        scale = q[b, 0].double().norm(dim=-1) * c.norm(dim=-1).amax(0)
        tie[b] = gap <= 1e-3 * scale  # 2x the TF32 rounding bound of a score
    tol = common.tolerance(dtype)
    bad = errs > tol
    ok = bool((~bad | tie).all()) and tie.float().mean().item() <= 0.25
    return {"case": f"{block}/{topk}", "T": t, "block": block, "topk": topk, "backend": backend,
            "dtype": str(dtype).removeprefix("torch."), "tol": tol,
            "rel_err_out": float(errs[~tie].max()) if (~tie).any() else 0.0,
            "near_tie_heads": int(tie.sum()), "ok": ok}


# ----------------------------------------------------------------------------- timing
def time_step(fn, device, args, row: dict, label: str) -> None:
    """``{label}_ms`` (eager), ``{label}_host_ms`` and ``{label}_graph_ms`` into ``row``."""
    row[f"{label}_ms"] = common.time_ms(fn, device, args.repeats)
    row[f"{label}_host_ms"] = common.host_ms(fn, device, args.host_calls)
    if device.type == "cuda":
        row[f"{label}_graph_ms"], err = common.graph_ms(fn, device)
        if err:
            row[f"{label}_graph_error"] = err


def run_cache(t: int, bsz: int, settings, heads, args, device, dtype, backend) -> list[dict]:
    """Every MoBA setting and the dense baselines over one cache of ``t`` tokens per row."""
    hq, hkv, d = heads
    gen = torch.Generator(device=device).manual_seed(args.seed + t + bsz)
    # drawn in the cache dtype: no fp32 copy of a 68.7 GB cache on the way
    key, value = (torch.randn(bsz, hkv, t, d, generator=gen, device=device, dtype=dtype)
                  for _ in "kv")
    q = torch.randn(bsz, 1, hq, d, generator=gen, device=device, dtype=dtype)
    k_cache, v_cache = key.transpose(1, 2), value.transpose(1, 2)  # [B, T, Hkv, D] views
    lens = torch.full((bsz,), t, dtype=torch.int32, device=device)
    before = lens - 1  # the update of a step that wrote token t - 1
    base = {"batch": bsz, "T": t, "hq": hq, "hkv": hkv, "d": d, "backend": backend,
            "cache_gb": 2 * key.numel() * key.element_size() / 1e9}
    dense = {}
    for label, sdpa_backend in dense_backends(device):
        def step(sdpa_backend=sdpa_backend):
            return sdpa_decode(q, key, value, sdpa_backend)
        try:
            time_step(step, device, args, dense, label)
        except RuntimeError as err:  # a backend refusing the shape
            dense[f"{label}_error"] = common.short_error(err)
        common.free_memory(device)
    rows = []
    for block, topk in settings:
        row = {"case": f"{block}/{topk} batch {bsz}", "moba": f"{block}/{topk}",
               "block": block, "topk": topk, **base}
        cent = block_centroids(k_cache, block)

        def step(block=block, topk=topk, cent=cent):
            return moba_attn_with_kvcache(q, k_cache, v_cache, lens, block_size=block,
                                          topk=topk, centroids=cent, validate=False,
                                          backend=backend)

        def update(block=block, cent=cent):
            return update_centroids(cent, k_cache, before, lens, block_size=block,
                                    max_new_blocks=1, backend=backend)

        with torch.no_grad():
            time_step(step, device, args, row, "moba")
            row["update_ms"] = common.time_ms(update, device, args.repeats)
        row.update(dense)
        for label, _ in dense_backends(device):
            row[f"x_{label}"] = common.ratio(row.get(f"{label}_ms"), row["moba_ms"])
            row[f"x_{label}_graph"] = common.ratio(row.get(f"{label}_graph_ms"),
                                                   row.get("moba_graph_ms"))
            if f"{label}_ms" in row:
                g = row.get(f"{label}_graph_ms")
                row[f"{label}_cells"] = (f"{row[f'{label}_ms']:.3f} / "
                                         + ("-" if g is None else f"{g:.3f}"))
        rows.append(row)
        print(" ".join(f"{k_}={v_:.4g}" if isinstance(v_, float) else f"{k_}={v_}"
                       for k_, v_ in row.items()), flush=True)
        del cent
        common.free_memory(device)
    return rows


def main(argv=None):
    p = common.base_parser(__doc__)
    p.add_argument("--caches", default=None, help="cache lengths (default 128K,1M)")
    p.add_argument("--batches", default=None, help="batch sizes (default 1,16)")
    p.add_argument("--settings", default=None, help="BLOCK:TOPK list (default 512:8,4096:12)")
    p.add_argument("--host-calls", type=int, default=1000, help="calls of the host timing")
    p.add_argument("--repeats", type=int, default=3, help="timed calls on the CPU")
    args = p.parse_args(argv)
    if common.handle_plot_only(args):
        return
    device = common.pick_device(args, "decode.py")
    backend = common.pick_backend(args, device)
    dtype = common.work_dtype(device)
    heads = SMOKE_HEADS if args.smoke else (HQ, HKV, D)
    caches = [common.parse_tokens(x) for x in
              (args.caches or ("512,700" if args.smoke else "128K,1M")).split(",")]
    batches = [int(x) for x in (args.batches or ("1,2" if args.smoke else "1,16")).split(",")]
    settings = parse_settings(args.settings or ("64:3,128:2" if args.smoke else "512:8,4096:12"))
    if args.smoke:
        args.host_calls = min(args.host_calls, 20)
    result = common.new_result(NAME, "MoBA decode step vs dense SDPA decode", device,
                               {"backend": backend, "dtype": str(dtype), "smoke": args.smoke,
                                "heads": heads, "caches": caches, "batches": batches,
                                "settings": settings, "host_calls": args.host_calls})
    print(result["machine_line"], flush=True)
    result["plot"] = PLOT
    for block, topk in settings:
        result["checks"].append(check(block, topk, heads, device, dtype, backend, args.seed))
    common.report_checks(result, args.out, NAME)
    for t in sorted(caches):
        for bsz in batches:
            result["rows"] += run_cache(t, bsz, settings, heads, args, device, dtype, backend)
            common.free_memory(device)
    common.finish(result, args.out, NAME, COLUMNS)


if __name__ == "__main__":
    main()
