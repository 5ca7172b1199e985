# Issue 16: does --max-memory hold its budget on SmolLM2-135M-Instruct (a third model after the
# tiny test model and the 0.5B)? Full-token GRPO (the largest loss), SVAMP prompts with a
# pseudo-random reward (coin.py: every group has signal, so all 32 completions are in the
# loss), B=4 x G=8, 128 new tokens, 3 steps per budget, no evaluation; the loss+grad peak
# (weights included) of every step against the budget. One BLAS thread: run beside the SVAMP
# compare (session 8), which does not change memory.
set -e
cd "$(dirname "$0")/../.."
for budget in 1.5 2.5; do
  OPENBLAS_NUM_THREADS=1 .venv/bin/tokenrl-mlx train svamp --data ../shared/data/svamp \
    --model /work/models/smollm2-135m-instruct --algo grpo --steps 3 --prompts-per-step 4 \
    --group-size 8 --max-new-tokens 128 --max-memory "$budget" --eval-every 0 --seed 0 \
    --reward-fn results/max-memory-smollm2/coin.py:coin --out "/work/runs/max-memory-smollm2/budget-$budget"
done
