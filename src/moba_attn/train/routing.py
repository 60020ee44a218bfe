"""``moba viz``: which key blocks each query selects, per layer and head, and how much of the
dense attention mass those blocks hold (routing telemetry).

Queries and keys are captured with forward pre-hooks on every attention module and recomputed
from the module's own projections and rotary embedding (the inputs the attention function
sees); the selection comes from :func:`moba_attn.moba_select`, the same gate the kernels use.
"""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..interface import moba_select
from .config import UsageError
from .plots import annotate_cells
from .trainer import LoadedRun, checkpoint_path, load_run, resolve_device


@dataclass
class LayerRouting:
    layer: int
    mode: str  # "moba" or "full": how this layer attends in the forward pass that was captured
    sel: np.ndarray  # [T, Hq, k-1] selected block per query (-1 = none), within the sequence
    mass: np.ndarray  # [Hq] mean dense mass in own + selected blocks, over routed queries
    oracle: np.ndarray  # [Hq] the same for the best possible k-1 blocks (by dense mass)
    routed: int  # queries with more earlier blocks than k-1 (where the gate drops something)
    block_mass: list  # per head [T, n_blocks] dense mass per key block (for pictures)


def _attention_layers(model) -> list[torch.nn.Module]:
    layers = model.model.layers
    return [layer.self_attn for layer in layers]


@torch.no_grad()
def capture_qk(run: LoadedRun, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """``(q [T, Hq, D], k [T, Hkv, D], scaling)`` of every layer for one sequence ``x [1, T]``,
    after the rotary embedding, as the attention function receives them."""
    captured: dict[int, tuple] = {}

    def hook(module, args, kwargs):
        h = kwargs.get("hidden_states", args[0] if args else None)
        cos, sin = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
        shape = (*h.shape[:-1], -1, module.head_dim)
        q = module.q_proj(h).view(shape).transpose(1, 2)
        k = module.k_proj(h).view(shape).transpose(1, 2)
        if getattr(module, "q_norm", None) is not None:  # models with q/k norms (e.g. Qwen3)
            q, k = module.q_norm(q), module.k_norm(k)
        rope = sys.modules[type(module).__module__].apply_rotary_pos_emb
        q, k = rope(q, k, cos, sin)
        captured[module.layer_idx] = (
            q[0].transpose(0, 1).float(),
            k[0].transpose(0, 1).float(),
            float(module.scaling),
        )

    handles = [
        m.register_forward_pre_hook(hook, with_kwargs=True) for m in _attention_layers(run.model)
    ]
    try:
        run.model(input_ids=x.to(run.device))
    finally:
        for hd in handles:
            hd.remove()
    return [captured[i] for i in sorted(captured)]


def layer_routing(
    q: torch.Tensor,
    k: torch.Tensor,
    scaling: float,
    block_size: int,
    topk: int,
    layer: int = 0,
    mode: str = "moba",
) -> LayerRouting:
    """Selection and dense-mass telemetry of one layer (fp32, one sequence)."""
    T, hq, _ = q.shape
    g = hq // k.shape[1]
    dev = q.device
    cu = torch.tensor([0, T], dtype=torch.int64, device=dev)
    sel = moba_select(q, k, cu, cu, block_size=block_size, topk=topk)  # [T, Hq, k-1]
    nb = -(-T // block_size)
    own = torch.arange(T, device=dev) // block_size
    routed = own > topk - 1  # more earlier blocks than the gate may keep
    causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
    mass, oracle, maps = [], [], []
    for h in range(hq):
        logits = (q[:, h] @ k[:, h // g].T) * scaling
        p = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)  # [T, T]
        bm = torch.zeros(T, nb * block_size, device=dev)
        bm[:, :T] = p
        bm = bm.view(T, nb, block_size).sum(-1)  # [T, nb] dense mass per key block
        own_m = bm.gather(1, own[:, None])[:, 0]
        s = sel[:, h]
        got = torch.where(s >= 0, bm.gather(1, s.clamp(min=0)), torch.zeros((), device=dev))
        attended = own_m + got.sum(-1)
        earlier = bm.masked_fill(torch.arange(nb, device=dev)[None, :] >= own[:, None], 0.0)
        best = earlier.topk(min(max(topk - 1, 0), nb), dim=-1).values.sum(-1) if topk > 1 else 0.0
        best = own_m + best
        mass.append(float(attended[routed].mean()) if routed.any() else 1.0)
        oracle.append(float(best[routed].mean()) if routed.any() else 1.0)
        maps.append(bm.cpu().numpy())
    return LayerRouting(
        layer,
        mode,
        sel.cpu().numpy(),
        np.asarray(mass),
        np.asarray(oracle),
        int(routed.sum()),
        maps,
    )


def viz_input(run: LoadedRun, *, text_file: str | None, seq_len: int, depth: float, seed: int = 0):
    """``(tokens [1, T], info)``: a user file, or a held-out retrieval sample (needle at ``depth``)."""
    if text_file is not None:
        ids = run.corpus.encode(Path(text_file).read_text(errors="replace"))[:seq_len]
        if len(ids) < 2:
            raise UsageError(f"{text_file} gives fewer than 2 tokens")
        return torch.from_numpy(ids)[None], {"source": str(text_file)}
    rng = np.random.default_rng(seed)
    held = run.corpus.heldout
    filler = run.corpus._window(held, int(rng.integers(0, max(len(held) - seq_len, 1))), seq_len)
    from .data import TASK

    depths = [depth] + list(rng.uniform(0, 1, TASK.n_pairs - 1))
    x, answers, starts = run.corpus.insert_retrieval(filler, rng, depths=depths, needle=0)
    return torch.from_numpy(x)[None], {
        "source": "held-out retrieval sample",
        "needle_start": starts[0],
        "answer": answers[0],
        "depth": depth,
    }


def routing(run: LoadedRun, x: torch.Tensor, *, block_size: int, topk: int) -> list[LayerRouting]:
    full_layers = set(run.cfg.full_layer_ids()) if run.switch.mode == "moba" else None
    out = []
    for i, (q, k, scale) in enumerate(capture_qk(run, x)):
        mode = "full" if full_layers is None or i in full_layers else "moba"
        out.append(layer_routing(q, k, scale, block_size, topk, layer=i, mode=mode))
    return out


def _parse_sel(spec: str, n: int, what: str) -> list[int]:
    """``"all"`` or comma-separated indices (negative: from the end) of ``n`` layers/heads."""
    if spec == "all":
        return list(range(n))
    try:
        ids = [int(s) for s in str(spec).split(",")]
    except ValueError:
        raise UsageError(f"{what} must be 'all' or comma-separated integers, got {spec!r}") from None
    bad = [i for i in ids if not -n <= i < n]
    if bad:
        raise UsageError(f"{what} {bad} out of range: the model has {n} (valid: {-n} .. {n - 1})")
    return sorted({i % n for i in ids})


def plot_selection(
    layers: list[LayerRouting],
    path: Path,
    *,
    block_size: int,
    heads: list[int],
    info: dict,
    max_rows: int = 1024,
) -> Path:
    """Grid of (query x key block) maps: own block, selected blocks, skipped blocks, future."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    from .plots import _plt

    plt = _plt()
    T = layers[0].sel.shape[0]
    stride = max(1, -(-T // max_rows))
    rows = np.arange(0, T, stride)
    nb = -(-T // block_size)
    own = rows // block_size
    fig, axes = plt.subplots(
        len(layers),
        len(heads),
        figsize=(2.6 * len(heads) + 1, 2.3 * len(layers) + 0.8),
        squeeze=False,
    )
    cmap = ListedColormap(["#e6e6e6", "#1f77b4", "#222222"])
    for r, lr in enumerate(layers):
        for c, h in enumerate(heads):
            img = np.zeros((len(rows), nb))
            s = lr.sel[rows, h]  # [rows, k-1]
            for j in range(s.shape[1]):
                ok = s[:, j] >= 0
                img[np.nonzero(ok)[0], s[ok, j]] = 1
            img[np.arange(len(rows)), own] = 2
            img[np.arange(nb)[None, :] > own[:, None]] = np.nan
            ax = axes[r, c]
            ax.imshow(
                img,
                cmap=cmap,
                vmin=0,
                vmax=2,
                aspect="auto",
                interpolation="nearest",
                extent=(0, nb, rows[-1] + stride, 0),
            )
            if "needle_start" in info:
                nbk = info["needle_start"] // block_size
                ax.axvspan(nbk, nbk + 1, color="tab:red", alpha=0.18, lw=0)
                ax.axhline(info["answer"][0] - 1, color="tab:red", lw=0.6, ls=":")
            ax.set_title(
                f"layer {lr.layer}{' (full)' if lr.mode == 'full' else ''} head {h}: "
                f"mass {lr.mass[h]:.2f}",
                fontsize=8,
            )
            ax.tick_params(labelsize=6)
            if c == 0:
                ax.set_ylabel("query position", fontsize=7)
            if r == len(layers) - 1:
                ax.set_xlabel("key block", fontsize=7)
    handles = [
        Patch(color="#222222", label="own block"),
        Patch(color="#1f77b4", label="selected"),
        Patch(color="#e6e6e6", label="skipped"),
    ]
    if "needle_start" in info:
        handles.append(Patch(color="tab:red", label="needle block / query row"))
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_mass(layers: list[LayerRouting], path: Path) -> Path:
    """Heatmaps (layer x head) of the dense mass kept by the gate and by the best possible pick."""
    from .plots import _plt

    plt = _plt()
    m = np.stack([lr.mass for lr in layers])
    o = np.stack([lr.oracle for lr in layers])
    fig, axes = plt.subplots(
        1, 2, figsize=(2 * (0.5 * m.shape[1] + 2.5), 0.45 * m.shape[0] + 2), squeeze=False
    )
    for ax, data, title in (
        (axes[0, 0], m, "gate: dense mass in own + selected blocks"),
        (axes[0, 1], o, "oracle: best k-1 blocks by dense mass"),
    ):
        im = ax.imshow(data, vmin=0, vmax=1, cmap="magma", aspect="auto")
        annotate_cells(ax, data, fontsize=6)
        ax.set_yticks(
            range(len(layers)),
            [f"{lr.layer}{' (full)' if lr.mode == 'full' else ''}" for lr in layers],
            fontsize=7,
        )
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def run_viz(
    path,
    *,
    out: str | Path | None = None,
    text_file: str | None = None,
    seq_len: int | None = None,
    depth: float = 0.25,
    layers: str = "all",
    heads: str | None = None,
    block_size: int | None = None,
    topk: int | None = None,
    attn: str = "as-trained",
    device: str = "auto",
    show: bool = True,
) -> tuple[list[LayerRouting], dict]:
    """Routing pictures and telemetry for one checkpoint; returns ``(layers, files)``.

    ``None`` means the run's own value (``block_size``, ``topk``, ``seq_len``), ``RUN/viz``
    (``out``) or the first four heads (``heads``); ``layers`` and ``heads`` take ``"all"`` or
    indices such as ``"0,-1"``. Raises :class:`UsageError` for settings that cannot work.
    """
    checkpoint_path(path)
    resolve_device(device)
    for name, v, low in (("block_size", block_size, 1), ("topk", topk, 1), ("seq_len", seq_len, 2)):
        if v is not None and not (isinstance(v, int) and v >= low):
            raise UsageError(f"{name} must be an integer >= {low}, got {v!r}")
    if not 0.0 <= depth <= 1.0:
        raise UsageError(f"depth must be in [0, 1], got {depth}")
    if text_file is not None and not Path(text_file).is_file():
        raise FileNotFoundError(f"--input {text_file}: no such file")
    run = load_run(path, device=device)
    mode = run.set_attn(attn)
    B = run.cfg.block_size if block_size is None else block_size
    k = run.cfg.topk if topk is None else topk
    T = run.cfg.seq_len if seq_len is None else seq_len
    n_layers, n_heads = run.model.config.num_hidden_layers, run.model.config.num_attention_heads
    keep_layers = _parse_sel(layers, n_layers, "layers")
    head_ids = list(range(min(4, n_heads))) if heads is None else _parse_sel(heads, n_heads, "heads")
    out = run.path / "viz" if out is None else Path(out)
    x, info = viz_input(run, text_file=text_file, seq_len=T, depth=depth)
    routed = routing(run, x, block_size=B, topk=k)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "selection_png": out / "selection.png",
        "mass_png": out / "routing_mass.png",
        "telemetry_csv": out / "telemetry.csv",
        "telemetry_json": out / "telemetry.json",
    }
    plot_selection(
        [routed[i] for i in keep_layers],
        files["selection_png"],
        block_size=B,
        heads=head_ids,
        info=info,
    )
    plot_mass(routed, files["mass_png"])
    needle_hit = None
    if "needle_start" in info:
        nblk = info["needle_start"] // B
        row = info["answer"][0] - 1  # the position that predicts the first value token
        needle_hit = [
            [bool((lr.sel[row, h] == nblk).any() or row // B == nblk) for h in range(n_heads)]
            for lr in routed
        ]
    with open(files["telemetry_csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "layer",
                "mode",
                "head",
                "mass_selected",
                "mass_oracle",
                "routed_queries",
                "needle_selected",
            ]
        )
        for i, lr in enumerate(routed):
            for h in range(n_heads):
                w.writerow(
                    [
                        lr.layer,
                        lr.mode,
                        h,
                        f"{lr.mass[h]:.4f}",
                        f"{lr.oracle[h]:.4f}",
                        lr.routed,
                        "" if needle_hit is None else int(needle_hit[i][h]),
                    ]
                )
    tele = {
        "checkpoint": str(run.path),
        "step": run.step,
        "attn_used": mode,
        "block_size": B,
        "topk": k,
        "seq_len": int(x.shape[1]),
        "input": {kk: (list(v) if isinstance(v, tuple) else v) for kk, v in info.items()},
        "layers": [
            {
                "layer": lr.layer,
                "mode": lr.mode,
                "mass": lr.mass.tolist(),
                "oracle": lr.oracle.tolist(),
                "routed_queries": lr.routed,
                **({"needle_selected": needle_hit[i]} if needle_hit else {}),
            }
            for i, lr in enumerate(routed)
        ],
    }
    files["telemetry_json"].write_text(json.dumps(tele, indent=2) + "\n")
    if show:
        _print(routed, needle_hit, tele)
        print(f"[moba viz] wrote {', '.join(str(f) for f in files.values())}")
    return routed, files


def _print(routed, needle_hit, tele) -> None:
    from .tables import print_table

    cols = ["layer", "mode", "mass (mean)", "mass (min head)", "oracle (mean)", "routed queries"]
    rows = []
    for i, lr in enumerate(routed):
        row = [
            str(lr.layer),
            lr.mode,
            f"{lr.mass.mean():.3f}",
            f"{lr.mass.min():.3f}",
            f"{lr.oracle.mean():.3f}",
            str(lr.routed),
        ]
        if needle_hit:
            row.append(f"{sum(needle_hit[i])}/{len(needle_hit[i])}")
        rows.append(row)
    print_table(
        f"routing telemetry: B={tele['block_size']}, topk={tele['topk']}, T={tele['seq_len']}, "
        f"forward in {tele['attn_used']} mode",
        cols + (["heads on needle"] if needle_hit else []),
        rows,
        left=2,
    )
