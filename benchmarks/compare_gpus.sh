#!/usr/bin/env bash
# `moba compare` spread over several GPUs: the variants (same model, data, token budget and seed)
# are shared among the GPUs, one training process per GPU, and every variant trains the same
# number of steps N; one last `moba compare` with all the variants then finds each at step N,
# trains nothing, and evaluates and reports them together.
#
# On a CUDA machine, from the repository root (the package needs no install: PYTHONPATH=src),
# with GPUs 1, 2 and 3 free (GPU 0 busy with other work) and ~7 minutes for training:
#   GPUS="1 2 3" TRAIN_MINUTES=7 OUT=$OUT bash benchmarks/compare_gpus.sh
# CPU dry run (tiny preset, two CPU processes, about 2 minutes on 2 cores):
#   DRY=1 OUT=/tmp/cmp_dry bash benchmarks/compare_gpus.sh
#
# Stages; the probe and the report come on top of TRAIN_MINUTES, every stage is timed in the log:
#   probe   each GPU times a few steps of a share of the variants (`moba compare --probe`);
#           the slowest probe process's wall time stands for a training process's start-up
#           (imports, data, models, first-step compilation)
#   plan    `compare.plan_parallel`: the split of the variants whose slowest GPU round is
#           shortest (at most ceil(#variants / #GPUs) per GPU: 5 on 3 GPUs is 2/2/1), and
#           N = floor(MARGIN * (60 * TRAIN_MINUTES - start-up) / slowest GPU's round time),
#           a round being one step of each of its variants; N >= MIN_STEPS. MARGIN (0.9) leaves
#           room for the periodic held-out evaluations, checkpoints and timing noise
#   train   one `moba compare --train-only --steps N` per GPU, in parallel, all into RUNS/cmp
#           (each variant has its own sub-directory; --train-only writes nothing shared); a
#           process still running at TRAIN_MINUTES stops there, checkpointed
#   report  `moba compare --steps N` of all the variants on the first GPU: it resumes each at
#           step N, so it trains nothing (a variant that stopped short is finished here, for
#           at most CATCHUP_MINUTES), evaluates all of them and writes the summary and plots
# A plan that spans calls (e.g. one machine lent for 10-minute commands): every call is the
# same but the last, and they share RUNS. The first probes and plans N for the whole
# TRAIN_MINUTES and trains LOOP_MINUTES; a later call finds RUNS/plan.sh and checkpoints,
# keeps N and the groups (no probe) and trains on:
#   export GPUS="0 1" PRESET=mini TRAIN_MINUTES=14 RUNS=$PWD/runs/cmp OUT=$OUT
#   LOOP_MINUTES=7 NO_REPORT=1 bash benchmarks/compare_gpus.sh   # first call(s)
#   LOOP_MINUTES=6 bash benchmarks/compare_gpus.sh               # last call: reports
# Results: OUT/compare.tgz (summary.{md,csv,json}, compare.png, eval/, each variant's
# metrics.csv, loss.png, config.json and summary.json, the plan and every process's log; no
# checkpoints; rewritten after each stage) and OUT/summary.md. A device named more than once
# (GPUS="0 0" on one GPU) runs several training processes on it at once: they time-slice it,
# and summary.md ends with a note that its tokens/s are contended figures.
#
# Settings (environment):
#   GPUS             CUDA device ids, one training process each, e.g. "1 2 3"; "cpu" = the CPU
#   PRESET           model preset (small)
#   CORPUS           training data, `moba compare --corpus` (python: the standard library plus
#                    site-packages; a distribution's standard library alone can be ~10 MB, which
#                    the small preset's 2000 steps pass over 12 times; DRY: stdlib)
#   VARIANTS         comma-separated, as for `moba compare` (full,full@1,moba,hybrid,layer-hybrid)
#   TRAIN_MINUTES    wall minutes of the parallel training stage (7)
#   OUT              results folder (compare_out)
#   RUNS             working folder: run directories, checkpoints, logs (a new temporary folder)
#   EXTRA            more `moba compare` arguments for every stage, e.g. "--seq-len 4096"
#   STEPS            skip the probe: train this many steps, variants split by count, or by
#                    STEP_S when given
#   STEP_S           with STEPS: seconds per step of each variant for the split, e.g.
#                    "full=0.2,full@1=0.2,moba=0.39,hybrid=0.37,layer-hybrid=0.36"
#   NO_REPORT=1      stop after the training stage (checkpoints in RUNS; a later run with the
#                    same RUNS and STEPS resumes and reports)
#   MIN_STEPS        fewest steps the plan may choose (5)
#   MARGIN           share of the training time the planned steps should fill (0.9)
#   CATCHUP_MINUTES  report stage: most training for variants that stopped short (1)
#   LOOP_MINUTES     this call's training loops stop after this many minutes (checkpointed),
#                    whatever the plan's budget: with TRAIN_MINUTES the total over several
#                    calls and NO_REPORT=1, one plan spans calls (see below)
#   FRESH=1          discard checkpoints (and the plan) already in RUNS
#   DRY=1            CPU dry run: GPUS="cpu cpu", PRESET=tiny, TRAIN_MINUTES=1, small evaluation
#   PYTHON           interpreter (python)
set -uo pipefail
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if [ "${DRY:-0}" = 1 ]; then
  : "${GPUS:=cpu cpu}" "${PRESET:=tiny}" "${TRAIN_MINUTES:=1}" "${EXTRA:=--eval-seqs 8 --eval-samples 2}"
  : "${CORPUS:=stdlib}"
fi
read -r -a DEVS <<<"${GPUS//,/ }"
[ "${#DEVS[@]}" -gt 0 ] || { echo "set GPUS, e.g. GPUS=\"1 2 3\" (CUDA ids) or DRY=1" >&2; exit 2; }
PRESET=${PRESET:-small}
CORPUS=${CORPUS:-python}
VARIANTS=${VARIANTS:-full,full@1,moba,hybrid,layer-hybrid}
TRAIN_MINUTES=${TRAIN_MINUTES:-7}
OUT=${OUT:-compare_out}
RUNS=${RUNS:-$(mktemp -d)}
EXTRA=${EXTRA:-}
MIN_STEPS=${MIN_STEPS:-5}
MARGIN=${MARGIN:-0.9}
CATCHUP_MINUTES=${CATCHUP_MINUTES:-1}
PY=${PYTHON:-python}
CMP=$RUNS/cmp
LOGS=$RUNS/logs
mkdir -p "$OUT" "$CMP" "$LOGS" "$RUNS/probe"
# shellcheck disable=SC2206  # EXTRA is split into arguments on purpose
MOBA=("$PY" -m moba_attn.cli compare --preset "$PRESET" --corpus "$CORPUS" --no-progress $EXTRA)

say() { echo "=== $(date -u +%H:%M:%S) $*"; }
on() {  # on DEVICE CMD...: CMD with only that GPU visible, or on the CPU
  local dev=$1
  shift
  if [ "$dev" = cpu ]; then CUDA_VISIBLE_DEVICES="" "$@" --device cpu; else CUDA_VISIBLE_DEVICES=$dev "$@"; fi
}
pack() {  # everything in RUNS but checkpoints -> OUT/compare.tgz (replaced whole, never torn)
  local m=() f
  for f in machine.txt plan.json probe logs cmp; do [ -e "$RUNS/$f" ] && m+=("$f"); done
  tar czf "$OUT/compare.tgz.part" -C "$RUNS" --exclude='*.pt' --exclude='*.tmp' --exclude='.probe-*' "${m[@]}" &&
    mv -f "$OUT/compare.tgz.part" "$OUT/compare.tgz"
}
last_step() {  # last_step LABEL: the step of the variant's last metrics row (0 if none)
  local s
  s=$(tail -n 1 "$CMP/$1/metrics.csv" 2>/dev/null | cut -d, -f1)
  [[ $s =~ ^[0-9]+$ ]] && echo "$s" || echo 0
}
wait_all() {  # wait_all NAME PID...: wait, printing every variant's step each PROGRESS_S seconds
  local name=$1 p t=$SECONDS alive
  shift
  while :; do
    alive=0
    for p in "$@"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ $alive = 1 ] || break
    if [ $((SECONDS - t)) -ge "${PROGRESS_S:-60}" ] && [ "${#LABELS[@]}" -gt 0 ]; then
      t=$SECONDS
      echo "    $(date -u +%H:%M:%S) $name: $(for l in "${LABELS[@]}"; do printf '%s %s/%s  ' "$l" "$(last_step "$l")" "$N"; done)"
    fi
    sleep 2
  done
  RCS=()
  for p in "$@"; do wait "$p"; RCS+=($?); done
}

{
  rev=$(git rev-parse --short HEAD 2>/dev/null) || rev=unknown
  [ "$rev" = unknown ] || git diff --quiet HEAD 2>/dev/null || rev+=" + uncommitted changes"
  echo "commit $rev, $(date -u '+%Y-%m-%d %H:%M') UTC"
  echo "GPUS=${DEVS[*]} PRESET=$PRESET CORPUS=$CORPUS VARIANTS=$VARIANTS TRAIN_MINUTES=$TRAIN_MINUTES STEPS=${STEPS:-probe or the plan in RUNS} LOOP_MINUTES=${LOOP_MINUTES:-plan} EXTRA=$EXTRA"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=index,name,memory.used,memory.total,utilization.gpu --format=csv,noheader
  "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'python', __import__('platform').python_version())"
} | tee "$RUNS/machine.txt"
RESUME_PLAN=0
if compgen -G "$CMP/*/checkpoint.pt" >/dev/null; then
  if [ "${FRESH:-0}" = 1 ]; then
    rm -rf "$CMP" "$RUNS/plan.json" "$RUNS/plan.sh" && mkdir -p "$CMP"
  elif [ -z "${STEPS:-}" ] && [ -e "$RUNS/plan.sh" ]; then
    RESUME_PLAN=1  # an earlier call's plan: same N and groups, no new probe
  elif [ -z "${STEPS:-}" ]; then
    echo "$CMP already holds checkpoints but no plan.sh: a new probe could change N; set FRESH=1, STEPS=<their N>, or another RUNS" >&2
    exit 2
  fi
fi

# ---------------------------------------------------------------- probe
if [ "$RESUME_PLAN" = 0 ] && [ -z "${STEPS:-}" ]; then
  IFS=, read -r -a ALL <<<"$VARIANTS"
  SHARE=()
  for j in "${!ALL[@]}"; do
    g=$((j % ${#DEVS[@]}))
    SHARE[g]="${SHARE[g]:-}${SHARE[g]:+,}${ALL[j]}"
  done
  say "probe: seconds per step, ${#SHARE[@]} processes"
  PIDS=()
  for g in "${!SHARE[@]}"; do
    (
      t0=$SECONDS
      on "${DEVS[g]}" "${MOBA[@]}" --variants "${SHARE[g]}" --probe "$RUNS/probe/g$g.json" \
        --out "$RUNS/probe/g$g" >"$LOGS/probe_g$g.log" 2>&1
      rc=$?
      echo $((SECONDS - t0 + 1)) >"$RUNS/probe/g$g.wall"  # whole seconds, rounded up
      exit $rc
    ) &
    PIDS+=($!)
  done
  LABELS=()
  wait_all probe "${PIDS[@]}"
  for g in "${!SHARE[@]}"; do
    tail -n 1 "$LOGS/probe_g$g.log"
    if [ "${RCS[g]}" != 0 ]; then
      say "probe on device ${DEVS[g]} failed (exit ${RCS[g]}):"; tail -n 20 "$LOGS/probe_g$g.log"; pack; exit 1
    fi
  done
fi

# ---------------------------------------------------------------- plan
[ "$RESUME_PLAN" = 1 ] || "$PY" - "$RUNS" "$VARIANTS" "${DEVS[*]}" "$TRAIN_MINUTES" "$MIN_STEPS" "$MARGIN" "${STEPS:-}" "${STEP_S:-}" $EXTRA <<'PY' || { pack; exit 1; }
import json
import shlex
import sys
from pathlib import Path

from moba_attn.cli import build_parser
from moba_attn.training.compare import parse_variants, plan_parallel, split_variants

runs, variants, devs, minutes, min_steps, margin, steps, given_s, *extra = sys.argv[1:]
runs, devs, seconds = Path(runs), devs.split(), 60 * float(minutes)
n_dev = len(devs)
seed = build_parser().parse_args(["compare", "--out", "-", *extra]).seed
labels = [label for label, _, _ in parse_variants(variants, seed)]
if steps:
    weights = dict.fromkeys(labels, 1.0)
    for item in filter(None, given_s.split(",")):
        label, _, sec = item.partition("=")
        if label.strip() not in weights:
            sys.exit(f"STEP_S names {label.strip()!r}, not one of the variants {labels}")
        weights[label.strip()] = float(sec)
    groups = split_variants(weights, n_dev)
    plan = {"groups": groups, "steps": int(steps), "loop_budget_s": seconds, "seconds": seconds}
    print(f"  STEPS={steps} given: no probe; variants split by "
          + (f"STEP_S ({given_s})" if given_s else "count"))
else:
    step_s = {}
    for f in sorted((runs / "probe").glob("g*.json")):
        step_s.update(json.loads(f.read_text()))
    wall = max(float(f.read_text()) for f in (runs / "probe").glob("g*.wall"))
    plan = plan_parallel(
        {k: step_s[k] for k in labels},
        n_dev,
        seconds,
        overhead_s=wall,
        margin=float(margin),
        min_steps=int(min_steps),
    )
    print(
        "  seconds per step: " + ", ".join(f"{k} {v:.3f}" for k, v in plan["step_s"].items())
        + f"; start-up of a process ~{wall:.0f} s (slowest probe)"
    )
    if max(plan["expected_s"]) > seconds:
        print(f"  NOTE: {plan['steps']} steps (MIN_STEPS) take longer than TRAIN_MINUTES={minutes}")
for i, g in enumerate(plan["groups"]):
    est = f", ~{plan['expected_s'][i]:.0f} s" if "expected_s" in plan else ""
    print(f"  device {devs[i]}: {','.join(g) or '(idle)'}"
          + (f" (round {plan['round_s'][i]:.3f} s{est})" if "round_s" in plan else ""))
print(f"  N = {plan['steps']} steps for every variant")
plan["devices"] = devs
(runs / "plan.json").write_text(json.dumps(plan, indent=2) + "\n")
# The training loops stop at the budget, or later when MIN_STEPS asks for more than it holds.
need_s = plan["steps"] * max(plan.get("round_s", [0]))
limit_s = plan["loop_budget_s"] if need_s <= plan["loop_budget_s"] else 1.5 * need_s
limit_min = max(limit_s, 1.0) / 60
(runs / "plan.sh").write_text(
    f"N={plan['steps']}\nLIMIT={limit_min:.3f}\nLABELS=({shlex.join(labels)})\n"
    + "".join(f"SHARE[{i}]={shlex.quote(','.join(g))}\n" for i, g in enumerate(plan["groups"]))
)
PY
unset SHARE
# shellcheck disable=SC1091
source "$RUNS/plan.sh"
if [ "$RESUME_PLAN" = 1 ]; then
  if [ "${#SHARE[@]}" != "${#DEVS[@]}" ]; then
    echo "$RUNS/plan.sh splits the variants over ${#SHARE[@]} devices, GPUS names ${#DEVS[@]}" >&2
    exit 2
  fi
  say "resuming the plan in $RUNS/plan.json: $N steps per variant"
  for g in "${!SHARE[@]}"; do echo "  device ${DEVS[g]}: ${SHARE[g]}"; done
fi
[ -z "${LOOP_MINUTES:-}" ] || LIMIT=$LOOP_MINUTES
pack

# ---------------------------------------------------------------- train
say "train: $N steps per variant, ${#DEVS[@]} devices in parallel, loops stop at $LIMIT min"
PIDS=()
USED=()
for g in "${!SHARE[@]}"; do
  [ -n "${SHARE[g]}" ] || continue
  on "${DEVS[g]}" "${MOBA[@]}" --variants "${SHARE[g]}" --steps "$N" --train-only --time-limit "$LIMIT" \
    --out "$CMP" >"$LOGS/train_g$g.log" 2>&1 &
  PIDS+=($!)
  USED+=("$g")
done
wait_all train "${PIDS[@]}"
for i in "${!USED[@]}"; do
  g=${USED[i]}
  echo "  device ${DEVS[g]} (${SHARE[g]}): exit ${RCS[i]}$([ "${RCS[i]}" = 3 ] && echo ' (time limit)'); $(tail -n 1 "$LOGS/train_g$g.log")"
  [ "${RCS[i]}" = 0 ] || [ "${RCS[i]}" = 3 ] || tail -n 20 "$LOGS/train_g$g.log"
done
pack
if [ "${NO_REPORT:-0}" = 1 ]; then
  say "NO_REPORT=1: stopping after training; the same command with RUNS=$RUNS resumes this plan"
  for l in "${LABELS[@]}"; do echo "  $l: step $(last_step "$l")/$N"; done
  exit 0
fi

# ---------------------------------------------------------------- report
HAVE=()
for l in "${LABELS[@]}"; do
  s=$(last_step "$l")
  if [ -e "$CMP/$l/checkpoint.pt" ]; then HAVE+=("$l"); else echo "  $l: no checkpoint, left out of the report"; fi
  [ "$s" = "$N" ] || echo "  $l: at step $s of $N; the report stage trains the rest (at most $CATCHUP_MINUTES min)"
done
[ "${#HAVE[@]}" -gt 0 ] || { say "no variant trained"; exit 1; }
say "report: ${HAVE[*]} on device ${DEVS[0]}"
on "${DEVS[0]}" "${MOBA[@]}" --variants "$(IFS=,; echo "${HAVE[*]}")" --steps "$N" \
  --time-limit "$CATCHUP_MINUTES" --out "$CMP" >"$LOGS/report.log" 2>&1
RC=$?
grep -E "resuming at step|nothing to train|time limit|Error" "$LOGS/report.log"
pack
if [ "$RC" != 0 ] || [ ! -e "$CMP/summary.md" ]; then
  say "report stage exit $RC:"; tail -n 30 "$LOGS/report.log"
  [ -e "$CMP/summary.md" ] && cp "$CMP/summary.md" "$OUT/summary.md"
  exit 1
fi
SHARED=$(printf '%s\n' "${DEVS[@]}" | sort | uniq -d | paste -sd, -)
if [ -n "$SHARED" ]; then  # e.g. GPUS="0 0" on a one-GPU machine
  printf '\n%s\n' "Devices shared: GPUS=\"${DEVS[*]}\" ran several training processes on device(s) $SHARED at once, so the tokens/s above are contended figures, not a speed comparison (the probe's seconds per step, timed the same way, are in plan.json)." >>"$CMP/summary.md"
  pack
fi
cp "$CMP/summary.md" "$OUT/summary.md"
say "done: $OUT/compare.tgz, $OUT/summary.md"
cat "$OUT/summary.md"
