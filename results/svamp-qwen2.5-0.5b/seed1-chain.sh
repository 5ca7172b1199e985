#!/bin/bash
# Session 9: start the second seed as the seed-0 slots free up (issue 14, deliverable 4).
# Slot 1: seed-1 GRPO once seed-0 S-GRPO has finished. Slot 2: seed-1 of the best selective
# seed-0 arm (final accuracy on all 300) once replay 6 has finished.
cd /work/main
R=/work/runs/svamp-qwen-compare
until [ -f $R/s-grpo/final_eval.json ]; do sleep 60; done
sleep 30  # its compare writes its table after final_eval.json
echo "$(date +%T) seed-1 grpo starts"
SEED=1 bash results/svamp-qwen2.5-0.5b/command.sh one grpo &
until [ -f "$R/t-spmo_tspmo-replay=6/final_eval.json" ]; do sleep 60; done
sleep 30
best=$(python3 -c "
import json
arms = {'s-grpo': 's-grpo', 't-spmo': 't-spmo', 't-spmo:tspmo-replay=6': 't-spmo_tspmo-replay=6'}
acc = {a: json.load(open('$R/' + d + '/final_eval.json'))['accuracy'] for a, d in arms.items()}
print(max(acc, key=acc.get))")
echo "$(date +%T) seed-1 $best starts (best selective arm of seed 0)"
SEED=1 bash results/svamp-qwen2.5-0.5b/command.sh one "$best" &
wait
