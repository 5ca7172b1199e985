# Follow-up to issue 26: top-entropy for exactly GRPO's 20 steps (seed 0, the same cosine over 20
# steps as the committed GRPO arm), to separate the extra steps from the selection. Everything
# else as equal-time/command.sh (pinned code 9981d50) but no in-training evaluations (time);
# two BLAS threads (step times not compared).
set -e
cd /work/main
OUT=/work/runs/svamp-qwen-eqsteps
if [ ! -d "$OUT/base" ]; then mkdir -p "$OUT" && cp -r results/svamp-qwen2.5-0.5b/compare/base "$OUT/base"; fi
PYTHONPATH=/work/runs/eqtime-code OPENBLAS_NUM_THREADS=2 .venv/bin/tokenrl-mlx compare svamp --data ../shared/data/svamp \
  --model /work/models/qwen2.5-coder-0.5b --steps 20 --prompts-per-step 4 \
  --group-size 8 --max-new-tokens 300 --temperature 0.6 --lr 5e-6 --eval-every 0 \
  --final-eval-limit 300 --microbatch-rows 2 --save-every 1 --seed 0 \
  --out "$OUT" --algos top-entropy --resume >> "$OUT.log" 2>&1
