# Issue 14, deliverable 1 (session 4, 2026-11-26): base greedy accuracy of Qwen2.5-Coder-0.5B-Instruct
# on all 300 SVAMP test problems, with a generous budget (400 new tokens) so the truncation rate
# at any smaller budget can be read off the completions' lengths (greedy: a shorter budget gives
# a prefix of the same text). One BLAS thread, beside other work on the 2-core CPU.
# Model: ../shared/models/fetch-qwen2.5-coder.sh 0.5b /work/models/qwen2.5-coder-0.5b.gguf
#        tokenrl-mlx convert-gguf /work/models/qwen2.5-coder-0.5b.gguf --out /work/models/qwen2.5-coder-0.5b
cd /work/main && OPENBLAS_NUM_THREADS=1 .venv/bin/tokenrl-mlx eval svamp --data ../shared/data/svamp \
  --model /work/models/qwen2.5-coder-0.5b --max-new-tokens 400 --batch-size 32 \
  --out /work/runs/svamp-qwen-base-400 "$@"
# The truncation a smaller budget would have had (truncation.json):
.venv/bin/python scripts/truncation_curve.py results/svamp-qwen2.5-0.5b/base/examples.jsonl \
  --out results/svamp-qwen2.5-0.5b/base/truncation.json
