#!/usr/bin/env bash
# Issue #7's context-parallel benchmark in one call on one host with 4 GPUs (NVLink), in at
# most ~8 minutes (time limits 190 s + 250 s): MoBA "allgather" and "selective" and dense CP (all-gather K/V + SDPA) at
# 1M-4M tokens, block_size 4096 / topk 12, 8/8 and 32/8 query/KV heads, D=128, bf16, forward
# and forward+backward, on 1, 2 and 4 GPUs.
#   phase A, three runs at once: the 1-GPU references (MoBA on one device, dense SDPA FLASH and
#            cuDNN) for 8 heads on GPU 0 and for 32 heads on GPU 1; the 2-GPU run on GPUs 2,3
#   phase B: the 4-GPU run on GPUs 0-3
# Each run has a time limit (timeout) and, inside the benchmark, a time budget that skips what
# would not fit; the JSON is rewritten after every measurement, so a run stopped early keeps
# what it measured. Logs and JSON are packed into $OUT/cp.tgz after each phase; the merged
# table (efficiency against the 1-GPU runs, ratios against dense CP) is $OUT/cp_summary.md.
# SUITE=4m: the targets' length only, with dense CP timed at 4M instead of extrapolated (~7 min):
#   phase A: the 1-GPU references at 4M (8 heads on GPU 0, 32/8 heads forward on GPU 1)
#   phase B: on 4 GPUs, 8 heads: dense CP, allgather and selective at 4M (forward and
#            forward+backward); then 32/8 heads, allgather, forward and forward+backward
#   OUT=/path bash benchmarks/cp_suite.sh
#   PLAN=1 bash benchmarks/cp_suite.sh   # print every run's time plan (H200 figures), run nothing
#   DRY=1 bash benchmarks/cp_suite.sh    # the same runs on CPU (gloo), tiny shapes
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=src PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True  # less fragmentation near full memory
PY=${PYTHON:-python}

if [ "${DRY:-0}" = 1 ]; then
  COMMON=(--kv-heads 2 --head-dim 16 --block-size 64 --topk 3 --dtype fp32 --backend torch
          --dense-tokens 512 --iters 2 --meas-s 0.2)
  HS=2 HB=4 T1=1K T2=2K T4=4K MEAS1=0.4
else
  COMMON=(--kv-heads 8 --head-dim 128 --block-size 4096 --topk 12 --dtype bf16
          --dense-tokens 256K --iters 3 --meas-s 6)
  HS=8 HB=32 T1=1M T2=2M T4=4M MEAS1=8  # 1-GPU runs: calls up to 4 s get a warm-up
fi
LIMIT_A=${LIMIT_A:-190}  # seconds: phase A (its runs in parallel)
LIMIT_B=${LIMIT_B:-250}  # seconds: phase B
SLACK=${SLACK:-30}  # of a run's limit, kept for start-up (imports, NCCL) and shutdown
ONE=(--modes single dense dense-cudnn --meas-s "$MEAS1")
# name | GPUs | processes | limit | arguments
RUNS=(
  "w1-h$HS|0|1|$LIMIT_A|${ONE[*]} --heads $HS --tokens $T1 $T4 $T2"
  "w1-h$HB|1|1|$LIMIT_A|${ONE[*]} --heads $HB --tokens $T1 $T4 $T2 --fwd-only-at $T2:$HB $T4:$HB"
  "w2|2,3|2|$LIMIT_A|--heads $HS $HB --tokens $T1 $T4 $T2 --fwd-only-at $T1:$HB $T2:$HB $T4:$HB"
  "w4|0,1,2,3|4|$LIMIT_B|--heads $HS $HB --tokens $T1 $T2 $T4 --fwd-only-at $T2:$HB"
)
PHASE_A=(0 1 2)  # indexes into RUNS
PHASE_B=(3)
if [ "${SUITE:-full}" = 4m ]; then
  LIMIT_A=${LIMIT_A4:-150} LIMIT_B=${LIMIT_B4:-270} LIMIT_C=${LIMIT_C4:-140}
  RUNS=(
    "w1-h$HS|0|1|$LIMIT_A|${ONE[*]} --heads $HS --tokens $T4"
    "w1-h$HB|1|1|$LIMIT_A|${ONE[*]} --heads $HB --tokens $T4 --fwd-only-at $T4:$HB"
    "w4-h$HS|0,1,2,3|4|$LIMIT_B|--modes allgather selective dense --heads $HS --tokens $T4 --dense-tokens $T4"
    "w4-h$HB|0,1,2,3|4|$LIMIT_C|--modes allgather --heads $HB --tokens $T4"
  )
  PHASE_A=(0 1)
  PHASE_B=(2 3)
elif [ "${SUITE:-full}" != full ]; then
  echo "SUITE must be full or 4m, got ${SUITE}" >&2
  exit 2
fi
field() { echo "$1" | cut -d'|' -f"$2"; }

if [ "${PLAN:-0}" = 1 ]; then
  for r in "${RUNS[@]}"; do
    echo "=== run $(field "$r" 1): GPUs $(field "$r" 2), limit $(field "$r" 4) s"
    # shellcheck disable=SC2046
    $PY benchmarks/cp_bench.py --plan-world "$(field "$r" 3)" "${COMMON[@]}" $(field "$r" 5) \
      --budget-s $(($(field "$r" 4) - SLACK))
  done
  echo "phase A = the longest of its runs (limit $LIMIT_A s), then phase B's runs in turn"
  exit 0
fi

FINAL=${OUT:-cp_out}
ROOT=$(mktemp -d)
W=$ROOT/cp  # everything is written here and packed into $FINAL/cp.tgz
mkdir -p "$W" "$FINAL"

pack() { tar czf "$FINAL/cp.tgz.part" -C "$ROOT" cp && mv "$FINAL/cp.tgz.part" "$FINAL/cp.tgz"; }

reap() {  # processes of a run that outlived its limit would keep their GPU memory
  local f pid
  for f in $(grep -l -a -z '^CP_SUITE_RUN=' /proc/[0-9]*/environ 2>/dev/null); do
    pid=${f#/proc/}
    pid=${pid%/environ}
    kill -9 "$pid" 2>/dev/null && echo "killed leftover benchmark process $pid"
  done
}

run() {  # one torchrun launch; its log and JSON go to $W/<name>/
  local r=$1 name gpus n limit t0 rc
  name=$(field "$r" 1) gpus=$(field "$r" 2) n=$(field "$r" 3) limit=$(field "$r" 4)
  mkdir -p "$W/$name"
  t0=$SECONDS
  # shellcheck disable=SC2046
  CUDA_VISIBLE_DEVICES=$gpus CP_SUITE_RUN=$name timeout -k 10 "$limit" \
    $PY -m torch.distributed.run --standalone --nproc-per-node "$n" benchmarks/cp_bench.py \
    "${COMMON[@]}" $(field "$r" 5) --budget-s $((limit - SLACK)) --out "$W/$name" \
    > "$W/$name/log.txt" 2>&1
  rc=$?
  echo "=== $(date -u +%H:%M:%S) run $name (GPUs $gpus): exit $rc after $((SECONDS - t0)) s" \
       "(limit $limit s)$([ $rc = 124 ] && echo ': TIMED OUT, kept what it wrote')"
  grep -m1 "measurements ~" "$W/$name/log.txt" | sed 's/^ */  plan: /'
  grep -E "skipped|out of memory|failed|CHECK FAILED|Error|error:" "$W/$name/log.txt" | head -n 12
}

{
  echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo "${COMMIT:-unknown}")," \
       "$(date -u +%Y-%m-%dT%H:%M:%SZ), DRY=${DRY:-0}"
  git status --short -- src benchmarks 2>/dev/null | sed 's/^/  changed: /'
  nvidia-smi --query-gpu=index,name,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null
  nvidia-smi topo -m 2>/dev/null
} | tee "$W/machine.txt"
echo "plan (SUITE=${SUITE:-full}): phase A, at once:" \
     "$(for i in "${PHASE_A[@]}"; do printf '%s ' "$(field "${RUNS[i]}" 1)"; done)(<= $LIMIT_A s)," \
     "then phase B, in turn: $(for i in "${PHASE_B[@]}"; do
       printf '%s (<= %s s) ' "$(field "${RUNS[i]}" 1)" "$(field "${RUNS[i]}" 4)"; done);" \
     "every run prints its own time plan in its log"

echo "=== $(date -u +%H:%M:%S) phase A"
for i in "${PHASE_A[@]}"; do
  run "${RUNS[i]}" &
done
wait
reap
pack
echo "=== $(date -u +%H:%M:%S) phase B"
for i in "${PHASE_B[@]}"; do
  run "${RUNS[i]}"
  reap
  pack
done

$PY benchmarks/cp_bench.py --merge "$W"/*/cp_bench_world*.json --out "$W" > "$W/merge.log" 2>&1 \
  || tail -n 20 "$W/merge.log"
cp "$W/cp_summary.md" "$FINAL/cp_summary.md" 2>/dev/null
pack
echo "=== $(date -u +%H:%M:%S) done after $SECONDS s: $FINAL/cp.tgz, $FINAL/cp_summary.md"
cat "$FINAL/cp_summary.md" 2>/dev/null
echo "=== targets and modes (from cp_summary.md)"
grep -E "^- .* heads, |^On [0-9]+ GPUs" "$FINAL/cp_summary.md" 2>/dev/null
