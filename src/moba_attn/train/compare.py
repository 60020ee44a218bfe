"""``moba compare``: several attention variants trained side by side on one device with the
same model, data, token budget and seed, then evaluated and summarised together.

Variants (``--variants``, comma separated; ``NAME@SEED`` overrides the seed):
  full          dense (SDPA) attention throughout
  moba          MoBA in every layer throughout
  hybrid        stage hybrid: MoBA for ``switch_at`` of the steps, then full attention
  layer-hybrid  MoBA, except the layers in ``--full-attn-layers`` (preset default: last 2)
Training is round-robin, one step of each variant in turn, so an interrupted comparison (time
limit) leaves every variant at the same step; rerunning the same command resumes all of them.

Several devices: every variant lives in its own ``out/<variant>/``, so processes with disjoint
``--variants`` can train into the same ``--out`` at once with ``--train-only`` (no joint report)
and the same ``--steps``; a last run with all the variants then finds each one finished, trains
nothing, and evaluates and reports them together. :func:`probe_variants` times each variant's
step on a device and :func:`plan_parallel` picks the split and the step count.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from .config import PRESETS, TrainConfig, UsageError
from .data import load_corpus
from .evaluate import DEFAULT_DEPTHS, check_eval_settings
from .modeling import moba_sparsity
from .trainer import FLAT_TAIL, Run, _bar, describe, resolve_device

VARIANTS = ("full", "moba", "hybrid", "layer-hybrid")
DEFAULT_VARIANTS = "full,full@1,moba,hybrid,layer-hybrid"
SPLIT_EXACT_MAX = 100_000  # split_variants tries every assignment up to this many


def parse_variants(spec: str, base_seed: int) -> list[tuple[str, str, int]]:
    """``"full,full@1,moba"`` -> ``[(label, variant, seed), ...]``."""
    out = []
    for item in [s.strip() for s in spec.split(",") if s.strip()]:
        name, at, seed = item.partition("@")
        if name not in VARIANTS:
            raise UsageError(
                f"unknown variant {name!r}: choose from {VARIANTS} (optionally NAME@SEED)"
            )
        if at and not seed.isdigit():
            raise UsageError(f"variant {item!r}: the seed after @ must be an integer >= 0")
        s = int(seed) if at else base_seed
        out.append((name if s == base_seed else f"{name}@{s}", name, s))
    if not out:
        raise UsageError(f"no variants in {spec!r}: choose from {VARIANTS}")
    labels = [o[0] for o in out]
    if len(set(labels)) != len(labels):
        raise UsageError(f"duplicate variants in {spec!r}")
    return out


def variant_config(base: TrainConfig, variant: str, seed: int) -> TrainConfig:
    base = base.resolved()
    if variant == "full":
        return replace(base, attn="full", full_attn_layers=(), seed=seed)
    if variant == "moba":
        return replace(base, attn="moba", full_attn_layers=(), seed=seed)
    if variant == "hybrid":
        return replace(base, attn="hybrid", full_attn_layers=(), seed=seed)
    layers = base.full_attn_layers or PRESETS[base.preset].layer_hybrid_full
    return replace(base, attn="moba", full_attn_layers=tuple(layers), seed=seed)


def run_compare(
    base: TrainConfig,
    out: str | Path,
    *,
    variants: str = DEFAULT_VARIANTS,
    fresh: bool = False,
    time_limit_s: float | None = None,
    train_minutes: float | None = None,
    progress: bool = True,
    eval_seqs: int = 32,
    eval_samples: int = 16,
    train_only: bool = False,
    log=print,
) -> dict:
    """Train the variants round-robin, then evaluate them and write the combined report.

    ``train_minutes``: instead of ``base.steps``, time a few steps of every variant on this
    device first and take the number of steps that fits that much training time (all variants
    together; evaluation comes on top). A resumed comparison keeps the steps it started with.

    ``train_only``: train (or resume) and stop there: no ``compare.png``, evaluation or summary,
    so that processes training disjoint variants into the same ``out`` write only their own
    ``out/<variant>/``. A variant already at its last step is not stepped again, and its files
    are left as the process that trained it wrote them.

    Writes ``out/<variant>/`` (each a normal ``moba train`` run directory), ``out/compare.png``
    (loss curves), ``out/eval/`` (``moba eval`` of all variants) and ``out/summary.{csv,md,json}``.
    Settings that cannot work raise :class:`UsageError` before ``out`` is created.
    """
    out = Path(out)
    given = base
    base = base.resolved()
    specs = parse_variants(variants, base.seed)
    resolve_device(base.device)
    check_eval_settings(n_seqs=eval_seqs, lengths=None, depths=DEFAULT_DEPTHS,
                        samples=eval_samples, seq_len=None)
    if train_minutes is not None and not (math.isfinite(train_minutes) and train_minutes > 0):
        raise UsageError(f"train_minutes must be a positive number, got {train_minutes}")
    if time_limit_s is not None and not time_limit_s >= 0:
        raise UsageError(f"time_limit_s must be >= 0 seconds, got {time_limit_s}")
    corpus = load_corpus(base.data, base.tokenizer, base.corpus)
    out.mkdir(parents=True, exist_ok=True)
    if fresh:
        for label, _, _ in specs:
            ck = out / label / "checkpoint.pt"
            if ck.exists():
                ck.unlink()
            mc = out / label / "metrics.csv"
            if mc.exists():
                mc.unlink()
    if train_minutes is not None:
        saved = [out / label / "config.json" for label, _, _ in specs]
        saved = [p for p in saved if (p.parent / "checkpoint.pt").exists()]
        if saved:
            steps = TrainConfig.load(saved[0]).steps
            log(f"[moba compare] resuming: keeping {steps} steps from {saved[0]}")
        else:
            round_s = probe_round_time(base, specs, corpus, out)
            steps = steps_for_budget(round_s, 60 * train_minutes, min_steps=1)
            log(
                f"[moba compare] one round (a step of each of {len(specs)} variants) takes "
                f"{round_s:.2f} s here: {steps} steps fit {train_minutes:g} minutes"
            )
        base = replace(given, steps=steps).resolved()  # warm-up: as given, or 5% of these steps
    runs = [
        Run(variant_config(base, v, s), out / label, resume=True, label=label, corpus=corpus)
        for label, v, s in specs
    ]
    log(
        f"[moba compare] {len(runs)} variants, {_describe_base(base)}; {runs[0].n_params / 1e6:.1f}M params each, "
        f"{base.steps} steps x {base.batch_size} x {base.seq_len} = {base.steps * base.batch_size * base.seq_len:,} "
        f"tokens each, on {runs[0].device}; {corpus.describe()}"
    )
    warn = corpus.repeat_warning(base.steps * base.batch_size * base.seq_len)
    if warn:
        log(f"[moba compare] {warn}")
    for r in runs:
        log(
            f"  {r.label:>14}: {describe(r.cfg)}"
            + (f" (resuming at step {r.step_no})" if r.step_no else "")
        )
    start = time.perf_counter()
    done_steps = min(r.step_no for r in runs)
    start_steps = {r.label: r.step_no for r in runs}
    if all(r.done for r in runs):
        log(f"[moba compare] every variant is at step {base.steps} already: nothing to train")
    bar = _bar(total=base.steps, initial=done_steps, desc="compare", enabled=progress)
    stopped = False
    try:
        while not all(r.done for r in runs):
            target = min(r.step_no for r in runs) + 1
            for r in runs:
                if r.step_no < target and not r.done:
                    r.step()
            bar.update(1)
            bar.set_postfix({r.label: r.rows[-1]["loss"] for r in runs if r.rows})
            if (
                time_limit_s is not None
                and time.perf_counter() - start > time_limit_s
                and not all(r.done for r in runs)
            ):
                stopped = True
                break
    finally:
        bar.close()
    summaries = {
        r.label: (
            r.finish()
            if r.step_no > start_steps[r.label] or not (r.out / "summary.json").exists()
            else r.summary()
        )
        for r in runs
    }
    for run in runs:
        run.close()
    step = min(r.step_no for r in runs)
    if stopped:
        log(
            f"[moba compare] time limit reached at step {step}/{base.steps}; rerun the same "
            "command to continue (checkpoints saved)"
            + ("" if train_only else "; evaluation runs when all variants finish")
        )
    if train_only:
        log(
            f"[moba compare] {', '.join(summaries)}: step {step}/{base.steps} in {out} "
            "(--train-only: no evaluation or joint report)"
        )
        return {"complete": not stopped, "step": step, "summaries": summaries}
    from .plots import plot_loss_curves

    plot_loss_curves(
        {r.label: r.rows for r in runs},
        out / "compare.png",
        switch_tokens={r.label: r.switch_tokens() for r in runs if r.switch_tokens()},
        title=_describe_base(base),
        reference=next((r.label for r in runs if r.cfg.attn == "full"), None),
    )
    if stopped:
        _write_summary(out, runs, summaries, None, base)
        return {"complete": False, "step": step, "summaries": summaries}
    r = runs = None  # free the models (the loop variable holds one too) before evaluating
    _free_device_memory()
    from .evaluate import print_tables, run_eval

    results, _ = run_eval(
        [out / label for label, _, _ in specs],
        out=out / "eval",
        device=base.device,
        n_seqs=eval_seqs,
        samples=eval_samples,
        show=False,
    )
    results = dict(zip([label for label, _, _ in specs], results.values()))
    print_tables(results)
    table = _write_summary(out, None, summaries, results, base)
    log(
        f"[moba compare] wrote {out / 'summary.md'}, {out / 'summary.csv'}, {out / 'compare.png'}, {out / 'eval'}"
    )
    return {"complete": True, "table": table, "summaries": summaries}


def probe_round_time(
    base: TrainConfig, specs, corpus, out: Path, warmup: int = 2, timed: int = 3
) -> float:
    """Seconds per round (one step of every variant), timed on throwaway copies of the runs."""
    return sum(probe_step_times(base, specs, corpus, out, warmup, timed).values())


def probe_step_times(
    base: TrainConfig, specs, corpus, out: Path, warmup: int = 2, timed: int = 3
) -> dict[str, float]:
    """Wall seconds per training step of each variant (``{label: s}``, mean of ``timed`` steps
    after ``warmup``), stepped round-robin as in training on throwaway copies of the runs under
    ``out/.probe-<pid>`` (removed afterwards). With the default ``switch_at`` every timed step
    of a hybrid is a MoBA step, its slower stage."""
    import shutil

    probe = out / f".probe-{os.getpid()}"
    shutil.rmtree(probe, ignore_errors=True)
    cfg = replace(base, steps=warmup + timed + 1, eval_every=10**9, ckpt_every=10**9)
    runs = [
        Run(variant_config(cfg, v, s), probe / label, label=label, corpus=corpus)
        for label, v, s in specs
    ]
    spent = dict.fromkeys((r.label for r in runs), 0.0)
    try:
        for i in range(warmup + timed):
            for r in runs:
                t0 = time.perf_counter()
                r.step()
                if i >= warmup:
                    spent[r.label] += time.perf_counter() - t0
        return {label: s / timed for label, s in spent.items()}
    finally:
        for r in runs:
            r.close()
        del runs
        _free_device_memory()
        shutil.rmtree(probe, ignore_errors=True)


def probe_variants(
    base: TrainConfig, out: str | Path, *, variants: str = DEFAULT_VARIANTS, log=print
) -> dict[str, float]:
    """:func:`probe_step_times` of ``variants`` on ``base.device``; trains nothing that stays."""
    out = Path(out)
    base = base.resolved()
    specs = parse_variants(variants, base.seed)
    resolve_device(base.device)
    corpus = load_corpus(base.data, base.tokenizer, base.corpus)
    out.mkdir(parents=True, exist_ok=True)
    times = probe_step_times(base, specs, corpus, out)
    log(
        f"[moba compare] seconds per step, {_describe_base(base)}, batch {base.batch_size}, "
        f"on {resolve_device(base.device)}: " + ", ".join(f"{k} {v:.3f}" for k, v in times.items())
    )
    return times


def steps_for_budget(
    round_s: float, seconds: float, *, margin: float = 0.9, min_steps: int = 1
) -> int:
    """Steps whose rounds of ``round_s`` seconds fill ``margin`` of ``seconds`` (held-out
    evaluations, checkpoints and timing noise take the rest); at least ``min_steps``."""
    if not (math.isfinite(round_s) and round_s > 0):
        raise ValueError(f"round time must be a positive number of seconds, got {round_s}")
    if min_steps < 1:
        raise ValueError(f"min_steps must be >= 1, got {min_steps}")
    return max(min_steps, int(margin * max(seconds, 0.0) / round_s))


def split_variants(step_s: dict[str, float], n_groups: int) -> list[list[str]]:
    """Share the variants ``{label: seconds per step}`` among ``n_groups`` processes so that the
    slowest group's round (the sum of its step times) is as short as possible, each group
    holding at most ``ceil(n / n_groups)`` variants (5 variants on 3 groups: 2/2/1). Slowest
    variant first, each to the least loaded group; where the assignments are few enough
    (``n_groups ** n <= SPLIT_EXACT_MAX``) every one is tried and a shorter slowest round
    replaces that (5 variants on 2 GPUs: greedy puts both full seeds with MoBA). Groups keep
    the order of ``step_s``; with fewer variants than groups the extra groups are empty."""
    if n_groups < 1:
        raise ValueError(f"n_groups must be >= 1, got {n_groups}")
    order = list(step_s)
    cap = max(1, math.ceil(len(order) / n_groups))
    groups: list[list[str]] = [[] for _ in range(n_groups)]
    load = [0.0] * n_groups
    for label in sorted(order, key=lambda k: -step_s[k]):  # stable: ties keep the given order
        g = min((i for i in range(n_groups) if len(groups[i]) < cap), key=lambda i: load[i])
        groups[g].append(label)
        load[g] += step_s[label]
    best = max(load)
    if n_groups > 1 and n_groups ** len(order) <= SPLIT_EXACT_MAX:
        for assign in itertools.product(range(n_groups), repeat=len(order)):
            counts = [0] * n_groups
            sums = [0.0] * n_groups
            for label, g in zip(order, assign):
                counts[g] += 1
                sums[g] += step_s[label]
            if max(counts) <= cap and max(sums) < best - 1e-12:
                best = max(sums)
                groups = [[lb for lb, g in zip(order, assign) if g == i] for i in range(n_groups)]
    return [sorted(g, key=order.index) for g in groups]


def plan_parallel(
    step_s: dict[str, float],
    n_groups: int,
    seconds: float,
    *,
    overhead_s: float = 0.0,
    margin: float = 0.9,
    min_steps: int = 5,
) -> dict:
    """Split the variants over ``n_groups`` devices and pick the one step count that lets the
    slowest group finish within ``seconds`` of wall time, ``overhead_s`` of it going to process
    start-up (imports, data, models, first-step compilation)::

        steps = max(min_steps, floor(margin * (seconds - overhead_s) / max(group round time)))

    Returns ``groups`` (labels per device, possibly empty), ``round_s`` (seconds per round of
    each group), ``steps``, ``expected_s`` (each group's estimated wall time) and
    ``loop_budget_s`` (``seconds - overhead_s``, a time limit for the training loops).
    """
    bad = {k: v for k, v in step_s.items() if not (math.isfinite(v) and v > 0)}
    if not step_s or bad:
        raise ValueError(f"need a positive step time for every variant, got {step_s}")
    groups = split_variants(step_s, n_groups)
    round_s = [sum(step_s[k] for k in g) for g in groups]
    loop_s = max(seconds - overhead_s, 0.0)
    steps = steps_for_budget(max(round_s), loop_s, margin=margin, min_steps=min_steps)
    return {
        "step_s": dict(step_s),
        "groups": groups,
        "round_s": round_s,
        "steps": steps,
        "expected_s": [overhead_s + steps * r for r in round_s],
        "seconds": seconds,
        "overhead_s": overhead_s,
        "loop_budget_s": loop_s,
        "margin": margin,
    }


def _describe_base(base: TrainConfig) -> str:
    p = PRESETS[base.preset]
    return (
        f"preset {base.preset} ({p.num_layers} layers), T={base.seq_len}, MoBA B={base.block_size} "
        f"k={base.topk}"
    )


def _free_device_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _write_summary(
    out: Path, runs, summaries: dict, results: dict | None, base: TrainConfig
) -> list[dict]:
    full_vals = (
        [results[k]["loss"] for k in results if summaries[k]["attn"] == "full"] if results else []
    )
    ref = float(np.mean(full_vals)) if full_vals else None
    full_trail = (
        [results[k]["trailing_loss"] for k in results if summaries[k]["attn"] == "full"]
        if results
        else []
    )
    ref_t = float(np.mean(full_trail)) if full_trail else None
    table = []
    for label, s in summaries.items():
        r = (results or {}).get(label, {})
        row = {
            "variant": label,
            "attn": s["attn"],
            "full_attn_layers": " ".join(map(str, s["full_attn_layers"])),
            "seed": s["seed"],
            "steps": s["step"],
            "tokens_seen": s["tokens_seen"],
            "final_train_loss": s["final_train_loss"],
            "heldout_loss": r.get("loss", s["final_val_loss"]),
            "final_periodic_heldout": s["final_val_loss"],
            "best_periodic_heldout": s.get("best_val_loss"),
            "best_periodic_step": s.get("best_val_step"),
            "heldout_change_tail_pct": s.get("val_change_tail_pct"),
            "trailing_loss": r.get("trailing_loss"),
            "retrieval_acc": (r.get("retrieval") or {}).get("mean"),
            "eval_attn": r.get("attn_used"),
            "sparsity": s["sparsity"],
            "tokens_per_s": s["tokens_per_s"],
            "tokens_per_s_moba": s["tokens_per_s_moba"],
            "train_time_s": s["train_time_s"],
        }
        row["heldout_vs_full_pct"] = (
            (100 * (row["heldout_loss"] / ref - 1)) if ref and row["heldout_loss"] else None
        )
        row["trailing_vs_full_pct"] = (
            (100 * (row["trailing_loss"] / ref_t - 1)) if ref_t and row["trailing_loss"] else None
        )
        table.append(row)
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(table[0]))
        w.writeheader()
        w.writerows(table)
    (out / "summary.json").write_text(
        json.dumps(
            {
                "config": base.to_json(),
                "rows": table,
                "moba_layer_sparsity": moba_sparsity(base.seq_len, base.block_size, base.topk),
            },
            indent=2,
        )
        + "\n"
    )
    (out / "summary.md").write_text(summary_markdown(table, base, results is not None))
    return table


OVERFIT_RISE_PCT = 2.0  # a final periodic held-out loss this far above its minimum is flagged
FLAT_PCT = 1.0  # a larger held-out fall over the last FLAT_TAIL of the steps: still falling


def _overfit_pct(row: dict) -> float | None:
    """How far (%) the last periodic held-out loss is above the lowest, when over the limit."""
    best, last = row.get("best_periodic_heldout"), row.get("final_periodic_heldout")
    if best is None or last is None or best <= 0:
        return None
    pct = 100 * (last / best - 1)
    return pct if pct > OVERFIT_RISE_PCT else None


def _f(v, fmt):
    return "-" if v is None or v == "" else format(v, fmt)


def _pct(v):
    return "-" if v is None else f"{v:+.2f}%"


def summary_markdown(table: list[dict], base: TrainConfig, evaluated: bool) -> str:
    sp = moba_sparsity(base.seq_len, base.block_size, base.topk)
    lines = [
        f"# moba compare: {_describe_base(base)}",
        "",
        (
            f"Same data stream and token budget for every variant ({base.steps} steps x {base.batch_size} x "
            f"{base.seq_len} tokens); MoBA block {base.block_size}, topk {base.topk}: per-layer sparsity "
            f"{sp['nominal']:.1%} nominal (1 - k/#blocks), {sp['causal']:.1%} of the causal attention work."
        ),
        (
            "Held-out and trailing-token losses (last 1/8 of the context) from `moba eval` in each variant's "
            "final attention mode; retrieval = exact-match needle accuracy averaged over lengths and depths; "
            "sparsity = share of causal attention work skipped, averaged over layers and steps."
            if evaluated
            else "Training incomplete: held-out loss is the last periodic evaluation; rerun to finish and evaluate."
        ),
        "",
        "| variant | seed | tokens | held-out loss | vs full | trailing loss | vs full | retrieval | sparsity | tokens/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        lines.append(
            f"| {r['variant']} | {r['seed']} | {r['tokens_seen']:,} | {_f(r['heldout_loss'], '.4f')} | "
            f"{_pct(r['heldout_vs_full_pct'])} | {_f(r['trailing_loss'], '.4f')} | "
            f"{_pct(r['trailing_vs_full_pct'])} | {_f(r['retrieval_acc'], '.2f')} | "
            f"{_f(r['sparsity'], '.1%')} | {_f(r['tokens_per_s'], ',.0f')} |"
        )
    rising = [(r, pct) for r in table if (pct := _overfit_pct(r)) is not None]
    if rising:
        lines += [
            "",
            (
                "**Held-out loss rose before the end** (periodic evaluations; more than "
                f"{OVERFIT_RISE_PCT:g}% above its lowest): "
                + "; ".join(
                    f"{r['variant']} {pct:+.1f}% from {r['best_periodic_heldout']:.4f} "
                    f"at step {r['best_periodic_step']}"
                    for r, pct in rising
                )
                + ". Those variants were memorising their training data, and the final losses "
                "compare how much each one overfits. Train on more data (`--corpus python`, "
                "`--data DIR`) or for fewer steps."
            ),
        ]
    tails = [(r["variant"], r.get("heldout_change_tail_pct")) for r in table]
    tails = [(v, p) for v, p in tails if p is not None]
    if tails:
        falling = [v for v, p in tails if p < -FLAT_PCT]
        lines += [
            "",
            (
                f"Periodic held-out loss over the last {FLAT_TAIL:.0%} of the steps: "
                + ", ".join(f"{v} {p:+.2f}%" for v, p in tails)
                + (
                    f". **Still falling** (more than {FLAT_PCT:g}%): {', '.join(falling)}; the "
                    "curves have not flattened at this token budget, so train longer (`--steps`) "
                    "before reading the final losses as converged."
                    if falling
                    else f". Every curve has flattened (within {FLAT_PCT:g}%)."
                )
            ),
        ]
    fulls = [r for r in table if r["attn"] == "full" and r["heldout_loss"] is not None]
    if len(fulls) > 1:
        v = [r["heldout_loss"] for r in fulls]
        spread = max(v) - min(v)
        lines += [
            "",
            (
                f"Seed spread of full attention (held-out): {spread:.4f} "
                f"({100 * spread / np.mean(v):.2f}% of the mean)."
            ),
        ]
    return "\n".join(lines) + "\n"
