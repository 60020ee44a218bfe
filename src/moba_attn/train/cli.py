"""``moba train``, ``moba compare``, ``moba eval`` and ``moba viz``: argument parsing only;
the work is done by :mod:`.trainer`, :mod:`.compare`, :mod:`.evaluate` and :mod:`.routing`.

Importing this module needs neither transformers nor matplotlib, so the ``moba`` command keeps
these subcommands without the ``train`` extra: they then print how to install it.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import math
import sys
from dataclasses import fields, replace
from pathlib import Path

from .config import ATTN_MODES, CORPORA, DECODE_MODES, DTYPES, PRESETS, TrainConfig, UsageError

EXTRA_MODULES = ("transformers", "matplotlib", "tqdm")  # what the train extra installs
INSTALL_HINT = "pip install 'moba-attn[train]'"
COMMANDS = {
    "train": "train a small Llama-style model with full, MoBA or hybrid attention",
    "compare": "train attention variants side by side and compare them",
    "eval": "held-out loss by position and needle retrieval, checkpoints side by side",
    "viz": "picture of MoBA block selection per layer/head and routing telemetry",
}
# What ``moba train --resume`` may change; every other setting is the saved run's.
RESUMABLE = ("steps", "device", "dtype", "eval_every", "ckpt_every")


def missing_modules() -> list[str]:
    """The train extra's packages that are not installed."""
    return [m for m in EXTRA_MODULES if importlib.util.find_spec(m) is None]


# ----------------------------------------------------------------------------- argument types
# argparse reports an ArgumentTypeError as "argument --FLAG: MESSAGE" (exit status 2).
def _int_at_least(low: int):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {v}")
        return v

    return parse


def _number(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if math.isnan(v):
        raise argparse.ArgumentTypeError("expected a number, got nan")
    return v


def _positive_float(s: str) -> float:
    v = _number(s)
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {s}")
    return v


def _nonneg_float(s: str) -> float:
    v = _number(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {s}")
    return v


def _fraction(s: str) -> float:
    v = _number(s)
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {s}")
    return v


def _list(item):
    """Comma-separated values, each parsed by ``item``; at least one."""

    def parse(s: str) -> tuple:
        parts = [x for x in s.replace(" ", "").split(",") if x != ""]
        if not parts:
            raise argparse.ArgumentTypeError(f"expected comma-separated values, got {s!r}")
        return tuple(item(x) for x in parts)

    return parse


def _int(s: str) -> int:
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None


_positive_int = _int_at_least(1)
_nonneg_int = _int_at_least(0)
_seq_len = _int_at_least(2)


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
        type=_fraction,
        default=0.9,
        help="hybrid: fraction of the steps trained with MoBA (default 0.9)",
    )
    g.add_argument(
        "--full-attn-layers",
        type=_list(_int),
        nargs="+",
        default=None,
        metavar="I",
        help="layers kept on full attention while MoBA is on; negative = from the end: "
        "--full-attn-layers -2 -1 (or --full-attn-layers=-2,-1)"
        + ("" if single else "; used by layer-hybrid (preset default otherwise)"),
    )
    g.add_argument(
        "--block-size", type=_positive_int, default=None, help="MoBA block size (preset default)"
    )
    g.add_argument(
        "--topk",
        type=_positive_int,
        default=None,
        help="MoBA blocks per query, own block included (preset default)",
    )
    g.add_argument(
        "--decode",
        default="moba",
        choices=DECODE_MODES,
        help="how generation decodes once MoBA is enabled (passed to enable_moba)",
    )
    g = p.add_argument_group("training")
    g.add_argument(
        "--seq-len", type=_seq_len, default=None, help="tokens per sequence (preset default)"
    )
    g.add_argument(
        "--steps", type=_positive_int, default=None, help="optimizer steps (preset default)"
    )
    g.add_argument(
        "--batch-size", type=_positive_int, default=None, help="sequences per step (preset default)"
    )
    g.add_argument(
        "--lr",
        type=_positive_float,
        default=None,
        help="peak learning rate (warm-up, cosine to 10%%; preset default)",
    )
    g.add_argument(
        "--warmup", type=_nonneg_int, default=None, help="warm-up steps (default 5%% of steps)"
    )
    g.add_argument("--seed", type=_nonneg_int, default=0, help="model init and data order")
    g.add_argument(
        "--eval-every",
        type=_positive_int,
        default=None,
        help="held-out loss every N steps (preset default)",
    )
    g.add_argument(
        "--eval-batches", type=_positive_int, default=4, help="held-out batches per evaluation"
    )
    g.add_argument(
        "--ckpt-every",
        type=_positive_int,
        default=200,
        help="checkpoint every N steps (and at the end)",
    )
    g.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPES,
        help="auto = bf16 autocast on CUDA, fp32 on CPU",
    )
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1 ...")
    g.add_argument(
        "--time-limit",
        type=_nonneg_float,
        default=None,
        metavar="MIN",
        help="stop (checkpointed) after MIN minutes (0: after one step); rerun to continue",
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
        choices=CORPORA,
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
        type=_fraction,
        default=0.25,
        help="share of training sequences carrying the key-value retrieval task (default 0.25)",
    )


def _config(args, attn: str) -> TrainConfig:
    return TrainConfig(
        preset=args.preset,
        attn=attn,
        switch_at=args.switch_at,
        full_attn_layers=tuple(i for part in args.full_attn_layers or () for i in part),
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


def _resume_config(args, parser: argparse.ArgumentParser, saved: TrainConfig) -> TrainConfig:
    """The saved run's settings with the few that may change; a flag given with another value
    than the saved one (``--block-size 32`` on a block-64 run) is an error, not ignored."""
    given = _config(args, args.attn)
    changed = [
        f"--{f.name.replace('_', '-')} {getattr(saved, f.name)!r} -> {getattr(given, f.name)!r}"
        for f in fields(TrainConfig)
        if f.name not in RESUMABLE
        and hasattr(args, f.name)
        and getattr(args, f.name) != parser.get_default(f.name)
        and getattr(given, f.name) != getattr(saved, f.name)
    ]
    if changed:
        raise UsageError(
            f"--resume continues {args.out} with its saved settings; these flags differ: "
            f"{'; '.join(changed)} (only --steps, --device, --dtype, --eval-every and "
            "--ckpt-every may change)"
        )
    return replace(
        saved,
        steps=saved.steps if args.steps is None else args.steps,
        device=args.device,
        dtype=args.dtype,
        eval_every=saved.eval_every if args.eval_every is None else args.eval_every,
        ckpt_every=args.ckpt_every,
    )


def cmd_train(args, parser: argparse.ArgumentParser) -> int:
    from .trainer import CHECKPOINT, train

    out = Path(args.out)
    cfg = _config(args, args.attn)
    if args.resume and (out / CHECKPOINT).exists():
        cfg = _resume_config(args, parser, TrainConfig.load(out / "config.json"))
    train(
        cfg,
        out,
        resume=args.resume,
        progress=not args.no_progress,
        time_limit_s=_minutes(args.time_limit),
    )
    return 0


def cmd_compare(args, parser: argparse.ArgumentParser) -> int:
    from .compare import probe_variants, run_compare

    if args.train_minutes is not None and args.steps is not None:
        parser.error("--train-minutes sets the number of steps: give it or --steps, not both")
    if args.probe is not None:
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


def cmd_eval(args, parser: argparse.ArgumentParser) -> int:
    from .evaluate import DEFAULT_DEPTHS, run_eval

    run_eval(
        args.runs,
        out=args.out,
        attn=args.attn,
        device=args.device,
        n_seqs=args.n_seqs,
        lengths=None if args.lengths is None else list(args.lengths),
        depths=DEFAULT_DEPTHS if args.depths is None else args.depths,
        samples=args.samples,
        seq_len=args.seq_len,
    )
    return 0


def cmd_viz(args, parser: argparse.ArgumentParser) -> int:
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


def _one_line_errors(cmd, parser: argparse.ArgumentParser):
    """Run ``cmd``; a setting, path or device that cannot work becomes one line,
    ``moba CMD: error: ...`` (exit status 2), instead of a traceback. They are raised before
    anything is written, and their messages name the fix."""

    @functools.wraps(cmd)
    def run(args) -> int:
        try:
            return cmd(args, parser)
        except (UsageError, FileNotFoundError, FileExistsError) as e:
            parser.exit(2, f"{parser.prog}: error: {e}\n")

    return run


def _needs_extra(name: str, missing: list[str], args) -> int:
    print(
        f"moba {name} needs the train extra ({', '.join(missing)} missing): {INSTALL_HINT}",
        file=sys.stderr,
    )
    return 2


def _add_stubs(subparsers, missing: list[str]) -> None:
    """Without the train extra: the subcommands exist, take any arguments (``--help`` too) and
    say in one line how to install what they need."""
    for name, text in COMMANDS.items():
        p = subparsers.add_parser(
            name,
            help=f"{text} (needs {INSTALL_HINT})",
            add_help=False,
            prefix_chars="\0",  # no options: every argument lands in `ignored`
        )
        p.add_argument("ignored", nargs="*", help=argparse.SUPPRESS)
        p.set_defaults(func=functools.partial(_needs_extra, name, missing))


def add_parsers(subparsers) -> None:
    """Register ``train``, ``compare``, ``eval`` and ``viz`` on the ``moba`` command (as
    one-line install hints when the train extra is missing)."""
    missing = missing_modules()
    if missing:
        _add_stubs(subparsers, missing)
        return
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = subparsers.add_parser(
        "train",
        help=COMMANDS["train"],
        description="Train a Llama-style model (transformers) from a preset with full "
        "attention, MoBA, or a stage/layer hybrid. Writes OUT/metrics.csv, "
        "OUT/checkpoint.pt, OUT/loss.png, OUT/summary.json.",
    )
    _add_model_args(p, single=True)
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its checkpoint (a new run when it has none)",
    )
    p.set_defaults(func=_one_line_errors(cmd_train, p))

    p = subparsers.add_parser(
        "compare",
        help=COMMANDS["compare"],
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
        type=_positive_float,
        default=None,
        metavar="MIN",
        help="instead of --steps: time a few steps of each variant here and train as many steps as "
        "fit MIN minutes for all variants together (evaluation comes on top)",
    )
    p.add_argument(
        "--eval-seqs",
        type=_positive_int,
        default=32,
        help="held-out sequences for the final evaluation",
    )
    p.add_argument(
        "--eval-samples",
        type=_positive_int,
        default=16,
        help="retrieval samples per (length, depth) cell",
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
    p.set_defaults(func=_one_line_errors(cmd_compare, p))

    p = subparsers.add_parser("eval", help=COMMANDS["eval"], formatter_class=fmt)
    p.add_argument("runs", nargs="+", help="run directories (or checkpoint.pt files)")
    p.add_argument("--out", default=None, help="output directory (default: FIRST_RUN/eval)")
    p.add_argument(
        "--attn",
        default="as-trained",
        choices=("as-trained", "full", "moba"),
        help="attention used for evaluation; as-trained = the mode of the last training step",
    )
    p.add_argument(
        "--n-seqs",
        type=_positive_int,
        default=32,
        help="held-out sequences for the position analysis",
    )
    p.add_argument(
        "--seq-len",
        type=_seq_len,
        default=None,
        help="context length of the position analysis (default: the training length)",
    )
    p.add_argument(
        "--lengths",
        type=_list(_seq_len),
        default=None,
        help="retrieval context lengths (default T/4,T/2,T)",
    )
    p.add_argument(
        "--depths",
        type=_list(_fraction),
        default=None,
        help="needle depths (default 0,0.25,0.5,0.75,1)",
    )
    p.add_argument(
        "--samples",
        type=_positive_int,
        default=16,
        help="retrieval samples per (length, depth) cell",
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1 ...")
    p.set_defaults(func=_one_line_errors(cmd_eval, p))

    p = subparsers.add_parser("viz", help=COMMANDS["viz"], formatter_class=fmt)
    p.add_argument("run", help="run directory (or checkpoint.pt)")
    p.add_argument(
        "--input",
        default=None,
        metavar="FILE",
        help="text file to route (default: a held-out retrieval sample with a needle)",
    )
    p.add_argument(
        "--depth", type=_fraction, default=0.25, help="needle depth of the default input"
    )
    p.add_argument(
        "--seq-len",
        type=_seq_len,
        default=None,
        help="tokens of input (default: the training length)",
    )
    p.add_argument(
        "--layers", default="all", help="layers to draw, e.g. 0,-1 (telemetry covers all)"
    )
    p.add_argument(
        "--heads", default=None, help="heads to draw, e.g. 0,1, or 'all' (default: the first 4)"
    )
    p.add_argument(
        "--block-size",
        type=_positive_int,
        default=None,
        help="gate block size (default: the run's)",
    )
    p.add_argument(
        "--topk", type=_positive_int, default=None, help="gate topk (default: the run's)"
    )
    p.add_argument(
        "--attn",
        default="as-trained",
        choices=("as-trained", "full", "moba"),
        help="attention of the forward pass whose queries/keys are captured",
    )
    p.add_argument("--out", default=None, help="output directory (default: RUN/viz)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1 ...")
    p.set_defaults(func=_one_line_errors(cmd_viz, p))
