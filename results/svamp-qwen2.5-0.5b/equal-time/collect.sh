#!/bin/bash
# Copy finished arms' files from the runs into the repository, then write the table and plot:
#   bash collect.sh [SEED]     (seed 0 reads /work/runs/svamp-qwen-eqtime, seed N its -seedN)
set -e
SEED=${1:-0}
SRC=/work/runs/svamp-qwen-eqtime
[ "$SEED" = 0 ] || SRC=$SRC-seed$SEED
HERE=$(dirname "$(realpath "$0")")
DST=$HERE/seed$SEED
for dir in "$SRC"/*/; do
  arm=$(basename "$dir")
  [ "$arm" != base ] && [ -f "$dir/final_eval.json" ] || continue
  mkdir -p "$DST/$arm/eval"
  cp "$dir/config.json" "$dir/metrics.jsonl" "$dir/final_eval.json" "$DST/$arm/"
  cp "$dir/eval/examples.jsonl" "$dir/eval/summary.json" "$DST/$arm/eval/"
done
[ -f "$SRC/compare_config.json" ] && cp "$SRC/compare_config.json" "$DST/"
cd /work/main && .venv/bin/python "$HERE/table.py" --seed "$SEED"
