#!/bin/bash
# Copy the finished seed-1 arms' files and the table into the repository (issue 14).
set -e
SRC=/work/runs/svamp-qwen-compare-seed1
DST=/work/main/results/svamp-qwen2.5-0.5b/compare-seed1
mkdir -p "$DST"
for arm in "$@"; do
  [ -f "$SRC/$arm/final_eval.json" ] || { echo "$arm unfinished" >&2; exit 2; }
  mkdir -p "$DST/$arm/eval"
  cp "$SRC/$arm/config.json" "$SRC/$arm/metrics.jsonl" "$SRC/$arm/final_eval.json" "$DST/$arm/"
  cp "$SRC/$arm/eval/examples.jsonl" "$SRC/$arm/eval/summary.json" "$DST/$arm/eval/"
done
mkdir -p "$DST/base"
cp "$SRC/base/final_eval.json" "$DST/base/"
cp "$SRC/compare_config.json" "$DST/"
for f in compare.md compare.json compare.png; do [ -f "$SRC/$f" ] && cp "$SRC/$f" "$DST/"; done
ls -R "$DST" | head -30
