#!/usr/bin/env bash
# GPU tests and benchmarks in one call on a CUDA machine. PARTS picks the steps (run in this
# order); each step has its own time limit. Logs and results go to $OUT/suite-$TAG.tgz (packed
# after every step, so a killed call still returns what finished).
#   COMMIT=<sha> bash benchmarks/gpu_suite.sh                       # every part, one GPU
#   CUDA_VISIBLE_DEVICES=1 PARTS="decode train32" TAG=b DEADLINE=560 bash benchmarks/gpu_suite.sh
# Parts: tests (pytest -m gpu), memcheck, fwd-sweep (forward variants + kernel breakdown;
# SWEEP_VARIANTS picks them, SWEEP_JOBS the settings), fwd-tiles (tile variants at the paper
# setting, 256K and 1M; TILE_VARIANTS), fwd (the issue's forward settings), decode (sparse decode vs dense decode), train32 and
# train128 (training-step tokens/s at 32K / 128K), bwd (fwd+bwd, FlashMoBA setting, 128K and 256K),
# bwd512 (FlashMoBA setting at 512K, dense baselines in the same run), bwd-paper (paper setting at
# 128K and 1M, each dense baseline timed once after a warm-up), bench (`moba bench` with every
# provider, setting 3).
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
PARTS=${PARTS:-tests memcheck fwd-sweep fwd decode train32 train128 bwd bench}
TAG=${TAG:-a}
FINAL=${OUT:-gpu_out}
OUT=$(mktemp -d)/suite-$TAG  # written here, packed into $FINAL/suite-$TAG.tgz after each step
mkdir -p "$OUT" "$FINAL"
step() { tar czf "$FINAL/suite-$TAG.tgz" -C "$(dirname "$OUT")" "suite-$TAG"; echo "=== [$TAG] $(date -u +%H:%M:%S) $*"; }
{
  echo "commit ${COMMIT:-unknown}, $(date -u +%Y-%m-%d), parts: $PARTS"
  nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader
  python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} | tee "$OUT/machine.txt"

MEMCHECK_TESTS="(gpu_varlen_gqa and bf16 and 64) or (gpu_bf16_grads and H8-Hkv4-D64-B64) or gpu_split_paths or (gpu_masked_schedule and B128-D128)"
START=$(date +%s)
# limit SECONDS: the part's own limit, cut to what is left before DEADLINE (seconds after start)
limit() { local left=$(( ${DEADLINE:-100000} - ($(date +%s) - START) )); echo $(( left < $1 ? left : $1 )); }
for part in $PARTS; do
  step "$part"
  if [ "$(limit 100000)" -lt 40 ]; then echo "skipped $part: deadline"; continue; fi
  case $part in
  tests)
    timeout $(limit 240) python -m pytest -m gpu -q -p no:cacheprovider tests/ 2>&1 | tee "$OUT/pytest_gpu.log" | tail -4
    timeout $(limit 100) python -m pytest -q -p no:cacheprovider tests/test_transformers.py 2>&1 | tail -2 ;;
  memcheck)  # one small GPU test per kernel family: forward (gate + attention), backward, decode
    timeout $(limit 150) compute-sanitizer --tool memcheck --print-limit 20 python -m pytest -q -p no:cacheprovider \
      tests/test_triton_forward.py tests/test_triton_backward.py tests/test_triton_decode.py \
      -k "$MEMCHECK_TESTS" 2>&1 | tee "$OUT/memcheck.log" | tail -4 ;;
  fwd-sweep)
    timeout $(limit 240) python benchmarks/gpu_forward.py --fwd-sweep --settings none \
      --sweep-variants "${SWEEP_VARIANTS:-(default$|partials)}" \
      ${SWEEP_JOBS:+--sweep-jobs "$SWEEP_JOBS"} --out "$OUT/fwd_sweep" 2>&1 | tail -70 ;;
  fwd-tiles)  # the sweep's variants at the paper setting's large blocks (the 1M stretch target)
    timeout $(limit 240) python benchmarks/gpu_forward.py --fwd-sweep --settings none \
      --sweep-variants "${TILE_VARIANTS:-(default$|default, mul|sel)}" \
      --sweep-jobs paper:262144,paper:1048576 --out "$OUT/fwd_tiles" 2>&1 | grep -E "^sweep|Error" ;;
  fwd)
    timeout $(limit 260) python benchmarks/gpu_forward.py --out "$OUT/fwd" \
      --jobs "${FWD_JOBS:-paper:1048576,flashmoba:524288,flashmoba:8192,gqa:8192,gqa:32768,flashmoba:131072,paper:131072,paper:32768,paper32h:1048576,paper:524288}" 2>&1 | tail -16 ;;
  decode)
    timeout $(limit 170) python benchmarks/gpu_decode.py --out "$OUT/decode" 2>&1 | tail -20 ;;
  train32|train128)
    T=$(( ${part#train} * 1024 ))
    OUT="$OUT/$part" SEQLENS="$T" STEPS=5 STEP_TIMEOUT=110 timeout $(limit 400) bash benchmarks/train_step.sh 2>&1 | tail -6 ;;
  bwd)
    timeout $(limit 150) python benchmarks/gpu_backward.py --out "$OUT/bwd" --sweep none --flashmoba-t 128,256 --paper-t "" --dense-max 256 2>&1 | tail -12 ;;
  bwd512)
    timeout $(limit 300) python benchmarks/gpu_backward.py --out "$OUT/bwd512" --sweep none --flashmoba-t 512 --paper-t "" \
      --dense-max 512 --long-reps 1 --budget-s 1000 2>&1 | tail -8 ;;
  bwd-paper)
    timeout $(limit 420) python benchmarks/gpu_backward.py --out "$OUT/bwd_paper" --sweep none --flashmoba-t "" \
      --paper-t 128,1024 --dense-max 1024 --long-reps 1 --budget-s 1000 2>&1 | tail -8 ;;
  bench)
    timeout $(limit 110) python -m moba_attn.cli bench --no-check --seqlens 8k,32k,128k --heads 32 --kv-heads 8 \
      --head-dim 128 --block-size 512 --topk 3 --providers moba-triton,sdpa-flash,sdpa-cudnn,orig-moba \
      --out "$OUT/gqa_random" 2>&1 | tail -15 ;;
  *) echo "unknown part $part" ;;
  esac
done
step done
