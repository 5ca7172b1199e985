# Issue 26 (started session 12, 2026-12-07): does token efficiency pay at equal training time?
# New arms against the committed compare (../compare, ../compare-seed1): T-SPMO and S-GRPO with
# 4 updates per rollout batch, top-entropy (quantile 0.2) with 1 and with 4.
#
# Everything but the arms is the committed compare's (../command.sh): SVAMP train -> test,
# Qwen2.5-Coder-0.5B-Instruct fp32, LoRA r8 scale 20, B=4 x G=8, 300 new tokens, temperature
# 0.6, warmup 5 then cosine to lr/10, test[:100] every 5 steps and all 300 at the end (greedy),
# microbatch 2 rows, a checkpoint every step, two arms at a time, each its own process with
# one BLAS thread. The base evaluation is the committed one (copied, not re-scored).
# Equal training time: every arm has --time-budget 8056 (seconds: the committed seed-0 GRPO
# arm's sum of step_s), so it stops after the first step that reaches it; its schedule is
# planned at the end of warmup for the steps the budget buys at its median step time so far
# (docs/usage.md). --steps 60 only caps it. Seed 1: --time-budget 6875 (seed-1 GRPO's).
# Learning rates: calibration/ (train[600:700], never test).
# GRPO reference: the committed arm. The new code with 1 update reproduces its first two
# steps (repro/).
set -e
SELF=$(realpath "$0")
cd /work/main
# Every arm runs the package as of commit 9981d50 (the first with --time-budget), so later
# changes cannot favour the arms that start later.
CODE=/work/runs/eqtime-code
[ -d "$CODE" ] || git worktree add --detach "$CODE" 9981d50
# The package installs cli/ as tokenrl_cli: without this link the CLI layer would come from
# the editable install in /work/main.
[ -e "$CODE/tokenrl_cli" ] || ln -s cli "$CODE/tokenrl_cli"
export SEED=${SEED:-0}
OUT=/work/runs/svamp-qwen-eqtime
BUDGET=8056
[ "$SEED" = 0 ] || { OUT=$OUT-seed$SEED; BUDGET=6875; }
PINNED=$CODE
arm() {
  PYTHONPATH="$PINNED" OPENBLAS_NUM_THREADS=1 .venv/bin/tokenrl-mlx compare svamp --data ../shared/data/svamp \
    --model /work/models/qwen2.5-coder-0.5b --steps 60 --time-budget "$BUDGET" --prompts-per-step 4 \
    --group-size 8 --max-new-tokens 300 --temperature 0.6 --lr 5e-6 --eval-every 5 --eval-limit 100 \
    --final-eval-limit 300 --microbatch-rows 2 --save-every 1 --seed "$SEED" \
    --out "$OUT" "$@"
}
base_copied() {  # the committed base evaluation (the test split and greedy decoding do not
  if [ ! -d "$OUT/base" ]; then  # depend on the seed)
    mkdir -p "$OUT" && cp -r /work/main/results/svamp-qwen2.5-0.5b/compare/base "$OUT/base.copy.$BASHPID" \
      && { mv -T "$OUT/base.copy.$BASHPID" "$OUT/base" 2>/dev/null || rm -rf "$OUT/base.copy.$BASHPID"; }
  fi
}
case "${1:-}" in
  # One arm (--resume: starts it, or continues it from its last checkpoint), logged to
  # $OUT.<arm>.log: bash command.sh one t-spmo:updates-per-rollout=4:lr=2e-6
  one)   shift; name="$1"; shift; base_copied
         arm --algos "$name" --resume "$@" >> "$OUT.${name//[:=]/_}.log" 2>&1 ;;
  *) echo "usage: [SEED=N] bash command.sh one ARM"; exit 2 ;;
esac
