#!/usr/bin/env bash
# One call on a CUDA machine: GPU tests, a memcheck pass, then the benchmark settings.
# Each step has its own time limit; logs and results are packed into $OUT/suite.tgz (default ./gpu_out).
#   COMMIT=<sha> bash benchmarks/gpu_suite.sh
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
FINAL=${OUT:-gpu_out}
OUT=$(mktemp -d)/suite  # everything is written here and packed into $FINAL/suite.tgz after each step
mkdir -p "$OUT" "$FINAL"
step() { tar czf "$FINAL/suite.tgz" -C "$(dirname "$OUT")" suite; echo "=== $(date -u +%H:%M:%S) $*"; }
{
  echo "commit ${COMMIT:-unknown}, $(date -u +%Y-%m-%d)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} | tee "$OUT/machine.txt"

step "pytest -m gpu"
timeout 200 python -m pytest -m gpu -q -p no:cacheprovider tests/ 2>&1 | tee "$OUT/pytest_gpu.log" | tail -4

step "compute-sanitizer memcheck (small kernel tests)"
timeout 70 compute-sanitizer --tool memcheck --print-limit 20 python -m pytest -q -p no:cacheprovider \
  tests/test_triton_forward.py -k "gpu_varlen_gqa and bf16 and 64" 2>&1 | tee "$OUT/memcheck.log" | tail -4

B="python -m moba_attn.cli bench --no-check"
step "setting 3 (GQA 32/8, B=512, k=3), random routing, fwd + fwd+bwd"
timeout 110 $B --seqlens 8k,32k,128k --heads 32 --kv-heads 8 --head-dim 128 --block-size 512 --topk 3 \
  --providers moba-triton,sdpa-flash,sdpa-cudnn,orig-moba --out "$OUT/gqa_random" 2>&1 | tail -15

step "setting 1 (paper, B=4096, k=12, 8 heads), local routing, fwd"
timeout 90 $B --seqlens 128k,1m --heads 8 --head-dim 128 --block-size 4096 --topk 12 --routing local \
  --modes fwd --providers moba-triton,sdpa-cudnn,sdpa-flash --out "$OUT/paper_local" 2>&1 | tail -8

step "setting 2 (FlashMoBA, batch 2, 16 heads, B=128, k=8), local routing, fwd"
timeout 80 $B --seqlens 128k,512k --batch 2 --heads 16 --head-dim 128 --block-size 128 --topk 8 \
  --routing local --modes fwd --providers moba-triton,sdpa-cudnn,sdpa-flash --out "$OUT/flashmoba_local" 2>&1 | tail -8

step "setting 3, FlexAttention MoBA (exact per-token routing), fwd"
timeout 70 $B --seqlens 8k,32k --heads 32 --kv-heads 8 --head-dim 128 --block-size 512 --topk 3 \
  --modes fwd --providers flex-moba,moba-triton,sdpa-flash --out "$OUT/gqa_flex" 2>&1 | tail -6

step "transformers integration tests on this machine's versions"
timeout 50 python -m pytest -q -p no:cacheprovider tests/test_transformers.py 2>&1 | tail -2
step done
