# Sweep around the multiply 2x1 compare (session 2, 2026-11-25), on a 2-core Linux CPU, one
# thread (OPENBLAS_NUM_THREADS=1) beside the SVAMP compare. Same shared settings as
# results/multiply-2x1/command.sh; each extra arm changes only what its name says.
# The grpo, s-grpo and t-spmo arms (lr 2e-5, S-GRPO alpha 4 / k 24 / P 0.75, T-SPMO replay 2,
# max pairs 256) are the runs of results/multiply-2x1, copied into --out with their base eval
# before starting, so --resume skipped them.
# Session 2 ran the arms up to grpo:lr=4e-5 at nice 19 beside the SVAMP compare. Session 3 ran
# t-spmo:tspmo-replay=6 (resumed from its step-15 checkpoint) and s-grpo:sgrpo-k=48, then
# t-spmo:tspmo-replay=12 and s-grpo:sgrpo-k=12 (chosen from those two results), each pair as two
# one-thread processes with --algos naming one arm into the same --out; this full command with
# --resume then skipped every arm and wrote the table.
# To rerun on a new machine, refill --out first: base/final_eval.json from
# results/multiply-2x1/base_final_eval.json, the grpo, s-grpo, t-spmo folders from results/multiply-2x1
# (or let it retrain them).
cd /work/main && /work/venv/bin/tokenrl-mlx compare multiply --digits 2x1 \
  --model /work/models/smollm2-135m-instruct \
  --algos grpo,s-grpo,t-spmo,s-grpo:lr=4e-5,t-spmo:lr=4e-5,grpo:lr=4e-5,t-spmo:tspmo-replay=6,s-grpo:sgrpo-k=48,t-spmo:tspmo-replay=12,s-grpo:sgrpo-k=12 \
  --steps 50 --prompts-per-step 8 --group-size 8 --max-new-tokens 128 --temperature 0.6 \
  --lr 2e-5 --warmup-steps 5 --lora-rank 8 --lora-scale 20 \
  --eval-every 25 --eval-limit 202 --save-every 5 --seed 0 \
  --out /work/runs/sweep-multiply-2x1 "$@"
