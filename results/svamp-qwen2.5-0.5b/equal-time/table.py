"""The equal-time table and plot (issue 26): the finished new arms of one seed beside the
committed GRPO arm of that seed and the base model, from the files committed here.

    python results/svamp-qwen2.5-0.5b/equal-time/table.py [--seed 1]

Reads seed<N>/<arm>/ (collect.sh copies them from the runs), ../compare/grpo (seed 0) or
../compare-seed1/grpo (seed 1) and ../compare/base; writes seed<N>/table.md, table.json and
equal-time.png. Every arm is paired with the base and with GRPO on the same 300 questions.
Once both seeds have a table.json, it also writes two-seeds.md: the arms that ran both seeds,
their mean against GRPO's mean and the base (the issue's target).
"""

import argparse
import json
import statistics
from pathlib import Path

from mlx_tokenrl.compare import (arm_row, base_reference, head_to_head_table, markdown_table,
                                 paired, read_metrics, read_records)
from mlx_tokenrl.compare_plot import ArmCurves, save_figure
from mlx_tokenrl.evaluate import sign_test_p

HERE = Path(__file__).resolve().parent
GRPO = "grpo (committed)"
COMMITTED_GRPO = {0: HERE.parent / "compare" / "grpo", 1: HERE.parent / "compare-seed1" / "grpo"}
BASE = HERE.parent / "compare" / "base"


def machine_speed(arms: list) -> str:
    """The rollout's milliseconds per generated token (median over steps) of each of `arms`,
    (name, metrics) pairs: the same decoding code in every arm, so it tells the machine of
    the day (and what else ran beside it) from what an arm costs. Longer completions cost a
    little more per token (a longer attention), so it is a rough check, not a correction."""
    lines = ["", "Machine speed (the same decoding code in every arm; longer completions cost "
             "a little more per token):", "",
             "| arm | rollout ms per generated token (median over steps) |", "|---|---|"]
    for name, metrics in arms:
        per_token = [1000 * m["rollout_s"] / m["generated_tokens"] for m in metrics]
        lines.append(f"| {name} | {statistics.median(per_token):.1f} |")
    return "\n".join(lines) + "\n"


def step_costs(arms: list) -> str:
    """Where a step's time went in each of `arms`, (name, metrics) pairs (medians over steps,
    seconds), and the steps the --time-budget plan expected against the ones the budget
    bought: the schedule's cosine ends at the planned step, and steps after it run at its
    floor (lr/10)."""
    lines = ["", "Where a step's time went (medians over steps, s) and the budget's plan:", "",
             "| arm | rollout | loss+grad | updates 2-N | step | steps planned | steps taken |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, metrics in arms:
        def median(key):
            return statistics.median(m.get(key, 0.0) for m in metrics)
        planned = metrics[-1].get("planned_steps", "(--steps)")
        lines.append(f"| {name} | {median('rollout_s'):.0f} | {median('loss_s'):.0f} | "
                     f"{median('more_updates_s'):.0f} | {median('step_s'):.0f} | {planned} | "
                     f"{len(metrics)} |")
    return "\n".join(lines) + "\n"


def two_seeds(tables: dict) -> str:
    """GRPO and the arms of both seeds' `tables` (seed -> table.json): each seed's accuracy,
    their mean against GRPO's mean and the base's, and the answers fixed and broken against
    that seed's GRPO with each seed's paired p. The summed counts' p is approximate: the 600
    pairs are the same 300 questions twice, so they are not independent."""
    rows = [{r["arm"]: r for r in tables[seed]["rows"]} for seed in (0, 1)]
    against = [{p["arm"]: p for p in tables[seed]["vs_grpo"]} for seed in (0, 1)]
    grpo_mean = (rows[0][GRPO]["accuracy"] + rows[1][GRPO]["accuracy"]) / 2
    base = rows[0]["base"]["accuracy"]
    lines = ["| arm | seed 0 | seed 1 | mean | vs GRPO's mean | vs base | fixed / broke vs GRPO, "
             "seed 0 (p); seed 1 (p); summed (approximate p) | training s, seed 0 / seed 1 |",
             "|---|---:|---:|---:|---:|---:|---|---|"]
    for arm in [a for a in rows[0] if a in rows[1] and a != "base"]:
        first, second = rows[0][arm], rows[1][arm]
        mean = (first["accuracy"] + second["accuracy"]) / 2
        vs_grpo = ""
        if arm in against[0] and arm in against[1]:
            seeds = (against[0][arm], against[1][arm])
            fixed, broke = sum(p["fixed"] for p in seeds), sum(p["broke"] for p in seeds)
            vs_grpo = "; ".join([f"{p['fixed']} / {p['broke']} ({p['p']:.2g})" for p in seeds]
                                + [f"{fixed} / {broke} ({sign_test_p(fixed, broke):.2g})"])
        lines.append(f"| {arm} | {first['accuracy']:.1%} | {second['accuracy']:.1%} | "
                     f"{mean:.1%} | {100 * (mean - grpo_mean):+.1f} pts | "
                     f"{100 * (mean - base):+.1f} pts | {vs_grpo} | "
                     f"{first['train_seconds']:,.0f} / {second['train_seconds']:,.0f} |")
    return (f"Two seeds (base {base:.1%}; each seed's arms against that seed's GRPO):\n\n"
            + "\n".join(lines) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, choices=sorted(COMMITTED_GRPO))
    seed = parser.parse_args().seed
    out = HERE / f"seed{seed}"
    arms = [(GRPO, COMMITTED_GRPO[seed])]
    arms += sorted((d.name, d) for d in out.iterdir() if (d / "final_eval.json").is_file())
    base = json.loads((BASE / "final_eval.json").read_text())
    base_records = read_records(BASE)
    grpo_records = read_records(COMMITTED_GRPO[seed])
    rows, pairs, curves, measured = [arm_row("base", base, [], None)], [], [], []
    for name, arm_dir in arms:
        final = json.loads((arm_dir / "final_eval.json").read_text())
        metrics, records = read_metrics(arm_dir), read_records(arm_dir)
        rows.append(arm_row(name, final, metrics, base["accuracy"], paired(base_records, records)))
        if name != arms[0][0]:
            pairs.append({"arm": name, "against": arms[0][0], **paired(grpo_records, records)})
        curves.append(ArmCurves(name, metrics, final["accuracy"], final["n"]))
        measured.append((name, metrics))
    (out / "table.md").write_text(markdown_table(rows) + head_to_head_table(pairs)
                                  + step_costs(measured) + machine_speed(measured))
    (out / "table.json").write_text(json.dumps({"rows": rows, "vs_grpo": pairs}, indent=2))
    save_figure(out / "equal-time.png", base_reference(BASE, 100), curves)
    print((out / "table.md").read_text())
    tables = {n: json.loads(t.read_text()) for n in (0, 1)
              if (t := HERE / f"seed{n}" / "table.json").is_file()}
    if len(tables) == 2:
        (HERE / "two-seeds.md").write_text(two_seeds(tables))
        print((HERE / "two-seeds.md").read_text())


if __name__ == "__main__":
    main()
