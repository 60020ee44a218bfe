#!/usr/bin/env bash
# Training-step throughput of a ~158M-param GQA Llama (the `medium` preset: 14 layers,
# hidden 1024, 16 q / 4 kv heads) with SDPA vs MoBA attention, batch 1, bf16 autocast,
# at 32K and 128K context. Each variant trains a few steps; tokens/s is the median over the
# steps after the first two. Writes $OUT/train_step.json.
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-train_out}
RUNS=$(mktemp -d)
mkdir -p "$OUT"
summarise() {  # tokens/s per run so far -> $OUT/train_step.json (after every run)
python - "$RUNS" "$OUT/train_step.json" <<'PY'
import csv, json, statistics, sys
from pathlib import Path
rows = []
for run in sorted(Path(sys.argv[1]).iterdir()):
    f = run / "metrics.csv"
    if not f.exists():
        rows.append({"run": run.name, "tokens_per_s": None, "note": "no metrics (OOM or time limit)"})
        continue
    tps = [float(r["tokens_per_s"]) for r in csv.DictReader(f.open()) if r.get("tokens_per_s")]
    rows.append({"run": run.name, "steps": len(tps),
                 "tokens_per_s": statistics.median(tps[2:]) if len(tps) > 2 else None})
Path(sys.argv[2]).write_text(json.dumps(rows, indent=2))
for r in rows:
    print(f"{r['run']:>26}  tokens/s {r['tokens_per_s']}  {r.get('note', '')}")
PY
}
for T in ${SEQLENS:-32768 131072}; do
  for v in ${VARIANTS:-full:0:0 moba:512:3 moba:4096:12}; do
    IFS=: read -r attn bs k <<<"$v"
    name="T${T}-${attn}${bs/#0/}-k${k}"
    extra=""; [ "$attn" = moba ] && extra="--block-size $bs --topk $k"
    echo "=== $(date -u +%H:%M:%S) $name"
    timeout "${STEP_TIMEOUT:-100}" python -m moba_attn.cli train --preset medium --attn "$attn" $extra \
      --seq-len "$T" --batch-size 1 --steps "${STEPS:-6}" --warmup 1 --eval-every 100000 \
      --eval-batches 1 --ckpt-every 100000 --no-progress --out "$RUNS/$name" 2>&1 | tail -3
    summarise >/dev/null
  done
done
summarise
