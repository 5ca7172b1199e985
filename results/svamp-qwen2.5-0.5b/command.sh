# Issue 14, deliverable 3 (started session 6, 2026-11-26): GRPO vs S-GRPO vs T-SPMO (and T-SPMO
# with more replay) on SVAMP train -> test, Qwen2.5-Coder-0.5B-Instruct (fp32, LoRA r8 scale 20).
#
# Every arm: seed 0, the same data order, B=4 prompts x G=8 completions a step, 300 new tokens,
# temperature 0.6, lr 5e-6 (warmup 5 steps, cosine to lr/10), 20 steps; held-out
# accuracy every 5 steps on the first 100 test problems, and on all 300 at the end (greedy).
# Why these (calibration/, on a held-out slice of *train*, nothing tuned on test):
#   300 tokens: 5.3% of the base's greedy answers longer (base/truncation.json).
#   B=4 x G=8: a step is 5-9 min here; 75% of groups carried signal at the base.
#   lr: 1e-5 and 2e-5 broke the answer format within 5-7 steps (calibration/t-spmo_lr=1e-5);
#       5e-6 and 2e-6 kept it (95-97%) and were even at step 10 (51% vs the base 49%, n=100);
#       5e-6 led at step 5 (53% vs 46%): the larger of the two safe ones (calibration/STATUS).
#   20 steps: what ~2.5 h of training per arm buys on this CPU; 80 of the 700 train problems.
# Conditions: two arms at a time, each its own process with one BLAS thread (2-core CPU), and a
# fixed loss microbatch of 2 rows for every arm, so step times compare (the --max-memory
# planner would probe new shapes inside some steps and add minutes to them).
# The first arm to start scores the base model (all 300) before it trains; the other waits for
# that and comes in with --resume, which starts an arm without a checkpoint from step 0.
# Each arm checkpoints every step. Sessions 6-7 ran `pair1`; from session 8 on,
# `bash command.sh rest` continues whatever is unfinished, two arms at a time (after any stop);
# `bash command.sh table [ARMS]` writes the table and plot over ARMS (default: all four); it
# refuses to run while one of ARMS is unfinished (`compare --resume` would train it).
# A second seed (issue 14, deliverable 4): SEED=1 before any mode runs it into
# /work/runs/svamp-qwen-compare-seed1 (logs svamp-qwen-compare-seed1.<arm>.log), e.g.
#   SEED=1 bash command.sh pair grpo t-spmo      (two arms side by side, as pair1)
#   SEED=1 bash command.sh table grpo,t-spmo
# SVAMP's test split does not depend on the seed and the base is scored greedily, so a
# seed-1 compare starts from a copy of seed 0's base evaluation instead of repeating it.
set -e
SELF=$(realpath "$0")
cd /work/main
# Every arm runs the package as of commit 6120d50 (session 7 on: a worktree of it first on the
# import path), so later changes to the code (e.g. faster rollouts) cannot favour the arms
# that start later; pair 1 ran 7efaea5's loss up to its session-6 steps (same values, see
# compare/STATUS).
CODE=/work/runs/compare-code
[ -d "$CODE" ] || git worktree add --detach "$CODE" 6120d50
# The package installs cli/ as tokenrl_cli: without this link the CLI layer would come from the
# editable install in /work/main (unchanged since 6120d50 up to session 8, pinned from then on).
[ -e "$CODE/tokenrl_cli" ] || ln -s cli "$CODE/tokenrl_cli"
export SEED=${SEED:-0}  # the slots' own `bash command.sh one ...` read it too
OUT=/work/runs/svamp-qwen-compare
[ "$SEED" = 0 ] || OUT=$OUT-seed$SEED
PINNED=$CODE
arm() {
  PYTHONPATH="$PINNED" OPENBLAS_NUM_THREADS=1 .venv/bin/tokenrl-mlx compare svamp --data ../shared/data/svamp \
    --model /work/models/qwen2.5-coder-0.5b --steps 20 --prompts-per-step 4 --group-size 8 \
    --max-new-tokens 300 --temperature 0.6 --lr 5e-6 --eval-every 5 --eval-limit 100 \
    --final-eval-limit 300 --microbatch-rows 2 --save-every 1 --seed "$SEED" \
    --out "$OUT" "$@"
}
base_scored() {
  if [ "$SEED" != 0 ] && [ ! -d "$OUT/base" ]; then  # the table and plot read base/eval too
    mkdir -p "$OUT" && cp -r /work/runs/svamp-qwen-compare/base "$OUT/base.copy.$BASHPID" \
      && { mv -T "$OUT/base.copy.$BASHPID" "$OUT/base" 2>/dev/null || rm -rf "$OUT/base.copy.$BASHPID"; }
  fi
  until [ -f "$OUT/base/final_eval.json" ]; do sleep 60; done
}
case "${1:-}" in
  pair1) shift; arm --algos t-spmo "$@" >> /work/runs/svamp-qwen-compare.t-spmo.log 2>&1 &
         base_scored; arm --algos grpo --resume >> /work/runs/svamp-qwen-compare.grpo.log 2>&1 &
         wait ;;
  pair2) shift; base_scored
         arm --algos s-grpo --resume >> /work/runs/svamp-qwen-compare.s-grpo.log 2>&1 &
         arm --algos t-spmo:tspmo-replay=6 --resume >> /work/runs/svamp-qwen-compare.replay6.log 2>&1 &
         wait ;;
  # One arm by itself (--resume), to start the next arm as soon as one of a pair finishes:
  # bash command.sh one s-grpo
  one)   shift; name="$1"; shift; base_scored
         arm --algos "$name" --resume "$@" >> "$OUT.${name//[:=]/_}.log" 2>&1 ;;
  # Two arms side by side, each in its own slot: bash command.sh pair grpo t-spmo
  # The second slot starts 2 minutes after the first, here and in `rest`: the pinned code
  # writes compare_config.json in place, and two arms starting together garbled it once
  # (session 8; the package writes it in one step since 00d48e6).
  pair)  shift; a="$1"; b="$2"; shift 2
         bash "$SELF" one "$a" "$@" &
         sleep 120; bash "$SELF" one "$b" "$@" &
         wait ;;
  # What is left of the four arms, two slots at a time (finished arms are skipped at once):
  # each slot moves on to its next arm as soon as its current one finishes.
  rest)  shift
         { bash "$SELF" one t-spmo "$@"; bash "$SELF" one s-grpo "$@"; } &
         { sleep 120; bash "$SELF" one grpo "$@"; bash "$SELF" one t-spmo:tspmo-replay=6 "$@"; } &
         wait ;;
  # The table reads finished arms only (so it trains nothing), with the current code: its
  # columns may be newer than the pinned code's (session 9: the paired comparison).
  table) shift; arms="${1:-grpo,s-grpo,t-spmo,t-spmo:tspmo-replay=6}"; shift || true
         for a in ${arms//,/ }; do
           [ -f "$OUT/${a//:/_}/final_eval.json" ] || { echo "arm $a has not finished" >&2; exit 2; }
         done
         PINNED= arm --algos "$arms" --resume "$@" ;;
  *) echo "usage: [SEED=N] bash command.sh pair1|pair2|one ARM|pair ARM ARM|rest|table [ARMS]"; exit 2 ;;
esac
