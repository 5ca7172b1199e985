# GSM8K transfer check (issue 26, optional): the seed-0 top-entropy adapter (trained on SVAMP)
# and the base model, greedy on GSM8K test[:100], one BLAS thread (beside the seed-1 arm).
cd /work/main
for arm in top-entropy base; do
  [ -f /work/runs/eqtime/gsm8k/$arm/summary.json ] && continue
  adapter=(); [ $arm = base ] || adapter=(--adapter-path /work/runs/svamp-qwen-eqtime/$arm)
  OPENBLAS_NUM_THREADS=1 .venv/bin/tokenrl-mlx eval gsm8k --model /work/models/qwen2.5-coder-0.5b \
    "${adapter[@]}" --data ../shared/data/gsm8k --limit 100 --max-new-tokens 400 \
    --out /work/runs/eqtime/gsm8k/$arm > /work/runs/eqtime/gsm8k/$arm.log 2>&1
done
