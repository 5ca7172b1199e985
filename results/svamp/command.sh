# SVAMP compare with SmolLM2-135M-Instruct (session 2, 2026-11-25), on a 2-core Linux CPU.
# Data: ../shared/data/svamp (ChilleD split: train 700 / test 300). Model: see results/multiply-2x1/command.sh.
# --format-reward 0.1: a training-only bonus for '#### N' answers; without it 3 groups in 4 carried
# no signal in the first steps (session 1's run without it). Held-out accuracy is scored on
# correctness alone. The base arm's eval (results/svamp/base_final_eval.json) was made in
# session 1 with the same model, prompts and 192-token budget, and copied to base/final_eval.json.
# The arms ran as two processes, one thread each (OPENBLAS_NUM_THREADS=1): this command with
# --algos grpo and with --algos s-grpo,t-spmo, both into the same --out; this command with
# --resume then skipped the finished arms and wrote the table.
cd /work/main && /work/venv/bin/tokenrl-mlx compare svamp --data ../shared/data/svamp \
  --model /work/models/smollm2-135m-instruct \
  --steps 20 --prompts-per-step 8 --group-size 8 --max-new-tokens 192 --temperature 0.6 \
  --lr 2e-5 --warmup-steps 5 --lora-rank 8 --lora-scale 20 --format-reward 0.1 \
  --eval-limit 300 --save-every 5 --seed 0 \
  --out /work/runs/compare-svamp "$@"
