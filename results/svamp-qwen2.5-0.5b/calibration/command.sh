# Issue 14 calibration (started session 4, 2026-11-26): the learning rate for the SVAMP compare,
# chosen on a held-out slice of SVAMP *train* (nothing tuned on the test split).
# Data: train.json[:600] trains, train.json[600:700] is the held-out "test" split here.
# Settings fixed from the base evaluation (results/svamp-qwen2.5-0.5b/base): max 300 new tokens
# (5.3% of greedy answers truncated, accuracy >= 39.3% of 40.0%); B=4 x G=8 (a 4x8 T-SPMO step
# took ~3 min on this CPU); temperature 0.6 (default). Arms: T-SPMO (the paper's method).
# First lr 1e-5 and 2e-5 (2e-5 was best on SmolLM2); 1e-5 lost 17 points of held-out accuracy
# by step 5 (t-spmo_lr=1e-5/STATUS), so both stopped and the arms are now lr 5e-6 and 2e-6.
# The two arms train at once as two processes on the same --out, each with one BLAS thread
# and --max-memory 5 (GB: the default budget, 75% of RAM, is for one process; two such arms
# were OOM-killed on this 23 GB machine); session 4 ran lr 1e-5 alone, at one thread and the
# default budget, to step 4. --max-memory changes how the loss is chunked, not what it
# computes. The last command scores nothing new: it writes the table and plot over both.
# Checkpoints every step: a step costs minutes. Continue with: bash command.sh --resume
set -e
mkdir -p /work/runs/svamp-calib-data
python3 -c "
import json
train = json.load(open('/work/shared/data/svamp/train.json'))
json.dump(train[:600], open('/work/runs/svamp-calib-data/train.json', 'w'))
json.dump(train[600:], open('/work/runs/svamp-calib-data/test.json', 'w'))"
cd /work/main
calibrate() {
  OPENBLAS_NUM_THREADS=1 .venv/bin/tokenrl-mlx compare svamp --data /work/runs/svamp-calib-data \
    --model /work/models/qwen2.5-coder-0.5b --steps 15 --prompts-per-step 4 --group-size 8 \
    --max-new-tokens 300 --temperature 0.6 --eval-every 5 --eval-limit 100 --save-every 1 \
    --max-memory 5 --seed 0 --out /work/runs/calib-svamp-qwen "$@"
}
calibrate --algos t-spmo:lr=5e-6 "$@" >> /work/runs/calib-svamp-qwen.lr5e-6.log 2>&1 &
calibrate --algos t-spmo:lr=2e-6 "$@" >> /work/runs/calib-svamp-qwen.lr2e-6.log 2>&1 &
wait
calibrate --algos t-spmo:lr=5e-6,t-spmo:lr=2e-6 --resume
