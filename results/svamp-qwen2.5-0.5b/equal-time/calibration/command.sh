# Issue 26 calibration (session 12, 2026-12-07): the learning rate of the arms that take
# several updates per rollout batch, chosen on a held-out slice of SVAMP *train*
# (train[:600] trains, train[600:700] is the held-out split; nothing tuned on test), as the
# compare's own lr was (../../calibration/STATUS: T-SPMO x1 at 5e-6 kept the format, 1e-5
# broke it by step 5).
# Every run: Qwen2.5-Coder-0.5B-Instruct fp32, LoRA r8 scale 20, seed 0, B=4 x G=8, 300 new
# tokens, temperature 0.6, warmup 5 then cosine (20 steps), one BLAS thread, microbatch 2 rows
# (the arms' settings); held-out accuracy and format rate at step 5 (greedy, train[600:700]:
# the base scores 49%, format 95%, ../../calibration/base_final_eval.json). A run is stopped
# after its step-5 evaluation. Two runs at a time, each its own process.
# Code: the editable install in /work/main: 3311b9b for t-spmo 5e-6, 9981d50 for the later
# runs (it adds --time-budget, unused here; the training step is the same).
# Usage: bash command.sh ARM LR, e.g. bash command.sh t-spmo 5e-6 (add --resume RUN_DIR to continue)
set -e
mkdir -p /work/runs/svamp-calib-data
python3 -c "
import json
train = json.load(open('/work/shared/data/svamp/train.json'))
json.dump(train[:600], open('/work/runs/svamp-calib-data/train.json', 'w'))
json.dump(train[600:], open('/work/runs/svamp-calib-data/test.json', 'w'))"
cd /work/main
algo="$1"; lr="$2"; shift 2
OPENBLAS_NUM_THREADS=1 .venv/bin/tokenrl-mlx train svamp --data /work/runs/svamp-calib-data \
  --model /work/models/qwen2.5-coder-0.5b --algo "$algo" --updates-per-rollout 4 --steps 20 \
  --prompts-per-step 4 --group-size 8 --max-new-tokens 300 --temperature 0.6 --lr "$lr" \
  --eval-every 5 --eval-limit 100 --microbatch-rows 2 --save-every 1 --seed 0 \
  --out "/work/runs/eqtime/calib/$algo-x4_lr=$lr" "$@" >> "/work/runs/eqtime/calib-$algo-x4-lr$lr.log" 2>&1
