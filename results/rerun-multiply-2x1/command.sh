# Issue 13 re-run (session 4, 2026-11-26): the T-SPMO arms of results/multiply-2x1 after the
# fixes to T-SPMO's normalisation (a mean over each group's unique pairs, then over groups,
# instead of per-completion weights that depended on the order of completions), replay (solved
# completions only, each continuation within its own budget) and the learning-rate schedule
# (warmup no longer starts at 0). Same command as results/multiply-2x1/command.sh otherwise.
# The schedule fix changes every arm; GRPO/S-GRPO were not re-run here (see the README).
# Ran as one process with one BLAS thread, beside other work on the 2 cores.
cd /work/main && OPENBLAS_NUM_THREADS=1 .venv/bin/tokenrl-mlx compare multiply --digits 2x1 \
  --model /work/models/smollm2-135m-instruct \
  --algos t-spmo,t-spmo:tspmo-replay=6 \
  --steps 50 --prompts-per-step 8 --group-size 8 --max-new-tokens 128 --temperature 0.6 \
  --lr 2e-5 --warmup-steps 5 --lora-rank 8 --lora-scale 20 \
  --eval-every 25 --eval-limit 202 --save-every 5 --seed 0 \
  --out /work/runs/rerun-multiply-2x1 "$@"
