# Issue 26: does the new code (several updates per rollout, clipping, algorithm modules;
# main at 3311b9b) with 1 update per rollout reproduce the committed seed-0 GRPO arm
# (../../compare/grpo, code 6120d50)? Its settings, as `train`; stopped after step 2.
cd /work/main
OPENBLAS_NUM_THREADS=1 .venv/bin/tokenrl-mlx train svamp --data ../shared/data/svamp \
  --model /work/models/qwen2.5-coder-0.5b --algo grpo --steps 20 --prompts-per-step 4 --group-size 8 \
  --max-new-tokens 300 --temperature 0.6 --lr 5e-6 --eval-every 5 --eval-limit 100 \
  --microbatch-rows 2 --save-every 1 --seed 0 --out /work/runs/eqtime/repro-grpo
