# Issue 14, item 5: one training step of each algorithm on Qwen2.5-Coder-1.5B-Instruct (the
# paper's size), fp32 on this 2-core CPU, with the SVAMP compare's settings: 4 prompts x 8
# completions, 300 new tokens, temperature 0.6, LoRA rank 8 / scale 20 on every layer. The loss
# runs a fixed number of rows per microbatch (not --max-memory, whose probes would count in the
# loss time): 4 for S-GRPO and T-SPMO; GRPO at 4 rows was OOM-killed in its loss at 15.9 GB
# resident (session 5, with 8 GB held by two paused 0.5B runs), so GRPO runs 1 row. Model: ../shared/models/fetch-qwen2.5-coder.sh 1.5b
# /work/models/qwen2.5-coder-1.5b.gguf, then tokenrl-mlx convert-gguf ... --out
# /work/models/qwen2.5-coder-1.5b (7.1 GB of fp32 weights).
set -e
cd /work/main
for algo in t-spmo s-grpo grpo; do
  rows=4; [ $algo = grpo ] && rows=1
  rm -rf /work/runs/step-1.5b/$algo
  .venv/bin/tokenrl-mlx train svamp --data /work/shared/data/svamp \
    --model /work/models/qwen2.5-coder-1.5b --algo $algo --steps 1 --warmup-steps 0 \
    --prompts-per-step 4 --group-size 8 --max-new-tokens 300 --microbatch-rows $rows \
    --seed 0 --out /work/runs/step-1.5b/$algo
  cp /work/runs/step-1.5b/$algo/metrics.jsonl results/svamp-qwen2.5-1.5b-step/$algo.metrics.jsonl
done
