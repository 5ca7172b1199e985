# Seed check (session 3, 2026-11-25): is the 2-point gap between full-token GRPO and the best
# selective setting (T-SPMO with replay 6) on multiply 2x1 more than seed noise? The default
# s-grpo and t-spmo arms were added after, for the full table on this seed. Same settings
# as results/multiply-2x1/command.sh and results/sweep-multiply-2x1 except --seed 1, which
# changes the held-out problems, the training data order and the sampling.
# Ran as one-thread processes (OPENBLAS_NUM_THREADS=1), two at a time, into the same --out:
# `--algos grpo` (which evaluated base) and `--algos t-spmo:tspmo-replay=6 --resume`, then
# `--algos s-grpo --resume` and `--algos t-spmo --resume`; this full command with --resume then
# skipped every arm and wrote the table.
cd /work/main && /work/venv/bin/tokenrl-mlx compare multiply --digits 2x1 \
  --model /work/models/smollm2-135m-instruct \
  --algos grpo,s-grpo,t-spmo,t-spmo:tspmo-replay=6 \
  --steps 50 --prompts-per-step 8 --group-size 8 --max-new-tokens 128 --temperature 0.6 \
  --lr 2e-5 --warmup-steps 5 --lora-rank 8 --lora-scale 20 \
  --eval-every 25 --eval-limit 202 --save-every 5 --seed 1 \
  --out /work/runs/seed1-multiply-2x1 "$@"
