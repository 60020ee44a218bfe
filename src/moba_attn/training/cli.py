"""``moba train``, ``moba eval``, ``moba viz`` and ``moba compare``: argument parsing only;
the work is done by :mod:`.trainer`, :mod:`.evaluate`, :mod:`.routing` and :mod:`.compare`."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from .config import ATTN_MODES, PRESETS, TrainConfig


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in s.replace(" ", "").split(",") if x != "")


def _floats(s: str) -> tuple[float, ...]:
    return tuple(float(x) for x in s.replace(" ", "").split(",") if x != "")


def _add_model_args(p: argparse.ArgumentParser, *, single: bool) -> None:
    presets = ", ".join(f"{k} ({v.note})" for k, v in PRESETS.items())
    g = p.add_argument_group("model and attention")
    g.add_argument(
        "--preset", default="tiny", choices=sorted(PRESETS), help=f"model size: {presets}"
    )
    if single:
        g.add_argument(
            "--attn",
            default="full",
            choices=ATTN_MODES,
            help="full | moba | hybrid (MoBA for --switch-at of the steps, then full)",
        )
    g.add_argument(
        "--switch-at",
        type=float,
        default=0.9,
        help="hybrid: fraction of the steps trained with MoBA (default 0.9)",
    )
    g.add_argument(
        "--full-attn-layers",
        type=_ints,
        nargs="+",
        default=None,
        metavar="I",
        help="layers kept on full attention while MoBA is on; negative = from the end: "
        "--full-attn-layers -2 -1 (or --full-attn-layers=-2,-1)"
        + ("" if single else "; used by layer-hybrid (preset default otherwise)"),
    )
    g.add_argument("--block-size", type=int, default=None, help="MoBA block size (preset default)")
    g.add_argument(
        "--topk", type=int, default=None, help="MoBA blocks per query, own block included"
    )
    g.add_argument(
        "--decode",
        default="moba",
        choices=("moba", "full"),
        help="how generation decodes once MoBA is enabled (passed to enable_moba)",
    )
    g = p.add_argument_group("training")
    g.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (preset default)")
    g.add_argument("--steps", type=int, default=None, help="optimizer steps (preset default)")
    g.add_argument(
        "--batch-size", type=int, default=None, help="sequences per step (preset default)"
    )
    g.add_argument(
        "--lr", type=float, default=None, help="peak learning rate (warm-up, cosine to 10%%)"
    )
    g.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 5%% of steps)")
    g.add_argument("--seed", type=int, default=0, help="model init and data order")
    g.add_argument("--eval-every", type=int, default=None, help="held-out loss every N steps")
    g.add_argument("--eval-batches", type=int, default=4, help="held-out batches per evaluation")
    g.add_argument(
        "--ckpt-every", type=int, default=200, help="checkpoint every N steps (and at the end)"
    )
    g.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "bf16", "fp32"),
        help="auto = bf16 autocast on CUDA, fp32 on CPU",
    )
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1 ...")
    g.add_argument(
        "--time-limit",
        type=float,
        default=None,
        metavar="MIN",
        help="stop (checkpointed) after MIN minutes; rerun to continue",
    )
    g.add_argument(
        "--deterministic",
        action="store_true",
        help="bit-identical reruns on CUDA: MoBA's backward and PyTorch's kernels reduce in a "
        "fixed order",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        nargs="+",
        default=None,
        metavar="PATH",
        help="text files or directories (default: the Python standard library sources)",
    )
    g.add_argument(
        "--corpus",
        default="stdlib",
        choices=("stdlib", "python"),
        help="embedded corpus when --data is not given: the standard library's .py "
        "sources, or those plus site-packages' .py sources (larger)",
    )
    g.add_argument(
        "--tokenizer",
        default=None,
        metavar="DIR",
        help="local tokenizer directory (default: raw UTF-8 bytes, vocabulary 256)",
    )
    g.add_argument(
        "--retrieval-frac",
        type=float,
        default=0.25,
        help="share of training sequences carrying the key-value retrieval task (default 0.25)",
    )


def _config(args, attn: str) -> TrainConfig:
    return TrainConfig(
        preset=args.preset,
        attn=attn,
        switch_at=args.switch_at,
        full_attn_layers=tuple(i for part in (args.full_attn_layers or ()) for i in part),
        block_size=args.block_size,
        topk=args.topk,
        decode=args.decode,
        seq_len=args.seq_len,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup=args.warmup,
        seed=args.seed,
        data=tuple(args.data or ()),
        corpus=args.corpus,
        tokenizer=args.tokenizer,
        retrieval_frac=args.retrieval_frac,
        deterministic=args.deterministic,
        eval_every=args.eval_every,
        eval_batches=args.eval_batches,
        ckpt_every=args.ckpt_every,
        dtype=args.dtype,
        device=args.device,
    )


def _minutes(v):
    return None if v is None else 60.0 * v


def cmd_train(args) -> int:
    from .trainer import CHECKPOINT, train

    out = Path(args.out)
    cfg = _config(args, args.attn)
    if args.resume and (out / CHECKPOINT).exists():
        # The saved run defines everything; only the step budget and the machine may change.
        saved = TrainConfig.load(out / "config.json")
        cfg = replace(
            saved,
            steps=args.steps or saved.steps,
            device=args.device,
            dtype=args.dtype,
            eval_every=args.eval_every or saved.eval_every,
            ckpt_every=args.ckpt_every,
        )
    train(
        cfg,
        out,
        resume=args.resume,
        progress=not args.no_progress,
        time_limit_s=_minutes(args.time_limit),
    )
    return 0


def cmd_compare(args) -> int:
    from .compare import probe_variants, run_compare

    if args.probe:
        import json

        times = probe_variants(_config(args, "full"), args.out, variants=args.variants)
        Path(args.probe).write_text(json.dumps(times, indent=2) + "\n")
        return 0
    res = run_compare(
        _config(args, "full"),
        args.out,
        variants=args.variants,
        fresh=args.fresh,
        time_limit_s=_minutes(args.time_limit),
        train_minutes=args.train_minutes,
        progress=not args.no_progress,
        eval_seqs=args.eval_seqs,
        eval_samples=args.eval_samples,
        train_only=args.train_only,
    )
    return 0 if res["complete"] else 3


def cmd_eval(args) -> int:
    from .evaluate import DEFAULT_DEPTHS, run_eval

    run_eval(
        args.runs,
        out=args.out,
        attn=args.attn,
        device=args.device,
        n_seqs=args.n_seqs,
        lengths=list(args.lengths) if args.lengths else None,
        depths=args.depths or DEFAULT_DEPTHS,
        samples=args.samples,
        seq_len=args.seq_len,
    )
    return 0


def cmd_viz(args) -> int:
    from .routing import run_viz

    run_viz(
        args.run,
        out=args.out,
        text_file=args.input,
        seq_len=args.seq_len,
        depth=args.depth,
        layers=args.layers,
        heads=args.heads,
        block_size=args.block_size,
        topk=args.topk,
        attn=args.attn,
        device=args.device,
    )
    return 0


def add_parsers(subparsers) -> None:
    """Register ``train``, ``compare``, ``eval`` and ``viz`` on the ``moba`` command."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = subparsers.add_parser(
        "train",
        help="train a small Llama-style model with full, MoBA or hybrid attention",
        description="Train a Llama-style model (transformers) from a preset with full "
        "attention, MoBA, or a stage/layer hybrid. Writes OUT/metrics.csv, "
        "OUT/checkpoint.pt, OUT/loss.png, OUT/summary.json.",
    )
    _add_model_args(p, single=True)
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its checkpoint"
    )
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser(
        "compare",
        help="train attention variants side by side and compare them",
        description="Train full / MoBA / stage-hybrid / layer-hybrid variants round-robin "
        "on one device with the same data, token budget and seed, evaluate "
        "them, and write OUT/summary.md, OUT/summary.csv, OUT/compare.png. "
        "Rerunning the same command resumes unfinished variants.",
    )
    _add_model_args(p, single=False)
    p.add_argument(
        "--variants",
        default="full,full@1,moba,hybrid,layer-hybrid",
        help="comma-separated from full, moba, hybrid, layer-hybrid; NAME@SEED sets a seed",
    )
    p.add_argument(
        "--out", required=True, help="comparison directory (one sub-directory per variant)"
    )
    p.add_argument("--fresh", action="store_true", help="discard existing checkpoints in --out")
    p.add_argument(
        "--train-minutes",
        type=float,
        default=None,
        metavar="MIN",
        help="instead of --steps: time a few steps of each variant here and train as many steps as "
        "fit MIN minutes for all variants together (evaluation comes on top)",
    )
    p.add_argument(
        "--eval-seqs", type=int, default=32, help="held-out sequences for the final evaluation"
    )
    p.add_argument(
        "--eval-samples", type=int, default=16, help="retrieval samples per (length, depth) cell"
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--train-only",
        action="store_true",
        help="train (or resume) the variants and stop: no evaluation, compare.png or summary. "
        "Processes with disjoint --variants and the same --steps may share --out this way; a "
        "last run with all the variants and no --train-only evaluates and reports them",
    )
    g.add_argument(
        "--probe",
        default=None,
        metavar="FILE",
        help="only time a few steps of each variant on this device (throwaway runs under "
        "OUT/.probe-PID) and write {variant: seconds per step} to FILE as JSON; trains nothing",
    )
    p.set_defaults(func=cmd_compare)

    p = subparsers.add_parser(
        "eval",
        help="held-out loss by position and needle retrieval, checkpoints side by side",
        formatter_class=fmt,
    )
    p.add_argument("runs", nargs="+", help="run directories (or checkpoint.pt files)")
    p.add_argument("--out", default=None, help="output directory (default: FIRST_RUN/eval)")
    p.add_argument(
        "--attn",
        default="as-trained",
        choices=("as-trained", "full", "moba"),
        help="attention used for evaluation; as-trained = the mode of the last training step",
    )
    p.add_argument(
        "--n-seqs", type=int, default=32, help="held-out sequences for the position analysis"
    )
    p.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="context length of the position analysis (default: the training length)",
    )
    p.add_argument(
        "--lengths", type=_ints, default=None, help="retrieval context lengths (default T/4,T/2,T)"
    )
    p.add_argument(
        "--depths", type=_floats, default=None, help="needle depths (default 0,0.25,0.5,0.75,1)"
    )
    p.add_argument(
        "--samples", type=int, default=16, help="retrieval samples per (length, depth) cell"
    )
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_eval)

    p = subparsers.add_parser(
        "viz",
        help="picture of MoBA block selection per layer/head and routing telemetry",
        formatter_class=fmt,
    )
    p.add_argument("run", help="run directory (or checkpoint.pt)")
    p.add_argument(
        "--input",
        default=None,
        metavar="FILE",
        help="text file to route (default: a held-out retrieval sample with a needle)",
    )
    p.add_argument("--depth", type=float, default=0.25, help="needle depth of the default input")
    p.add_argument(
        "--seq-len", type=int, default=None, help="tokens of input (default: the training length)"
    )
    p.add_argument(
        "--layers", default="all", help="layers to draw, e.g. 0,-1 (telemetry covers all)"
    )
    p.add_argument("--heads", default="0,1,2,3", help="heads to draw, or 'all'")
    p.add_argument(
        "--block-size", type=int, default=None, help="gate block size (default: the run's)"
    )
    p.add_argument("--topk", type=int, default=None, help="gate topk (default: the run's)")
    p.add_argument(
        "--attn",
        default="as-trained",
        choices=("as-trained", "full", "moba"),
        help="attention of the forward pass whose queries/keys are captured",
    )
    p.add_argument("--out", default=None, help="output directory (default: RUN/viz)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_viz)
