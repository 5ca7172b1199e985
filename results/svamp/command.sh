# SVAMP compare with SmolLM2-135M-Instruct (started in session 1; continue with: bash results/svamp/command.sh --resume)
# Data: ../shared/data/svamp (ChilleD split: train 700 / test 300). Model: see results/multiply-2x1/command.sh.
cd /work/main && /work/venv/bin/tokenrl-mlx compare svamp --data ../shared/data/svamp \
  --model /work/models/smollm2-135m-instruct \
  --steps 50 --prompts-per-step 8 --group-size 8 --max-new-tokens 192 --temperature 0.6 \
  --lr 2e-5 --warmup-steps 5 --lora-rank 8 --lora-scale 20 \
  --eval-every 25 --eval-limit 300 --save-every 5 --seed 0 \
  --out /work/runs/compare-svamp "$@"
