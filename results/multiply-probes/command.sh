# Which multiply setting puts SmolLM2-135M-Instruct's base accuracy in the 10-40% band:
# greedy, 100 held-out problems per setting, 128 new tokens (the compare's budget). Session 2 re-ran
# the probes of session 1 so the numbers are on disk (summary.json per setting).
for digits in 2x1 3x1 2x2; do
  /work/venv/bin/tokenrl-mlx eval multiply --digits $digits --model /work/models/smollm2-135m-instruct \
    --limit 100 --max-new-tokens 128 --out results/multiply-probes/$digits
done
