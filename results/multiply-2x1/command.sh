cd /work/main && /work/venv/bin/tokenrl-mlx compare multiply --digits 2x1 \
  --model /work/models/smollm2-135m-instruct \
  --steps 50 --prompts-per-step 8 --group-size 8 --max-new-tokens 128 --temperature 0.6 \
  --lr 2e-5 --warmup-steps 5 --lora-rank 8 --lora-scale 20 \
  --eval-every 25 --eval-limit 202 --save-every 5 --seed 0 \
  --out /work/runs/compare-multiply-2x1 "$@"
