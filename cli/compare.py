"""`compare`: base vs GRPO vs S-GRPO vs T-SPMO on one task, one table."""

import inspect
from typing import Annotated, Optional

import typer
from rich.table import Table

from mlx_tokenrl.config import ALGOS

from .common import (config_parameters, console, new_config, option_parameter, report_step,
                     reported_errors, step_progress)

# compare's own defaults where they differ from train's (TrainConfig's).
DEFAULTS = {"out": "runs/compare"}


def print_tables(rows, pairs):
    """Accuracy, arm against arm and cost apart, so that each stays readable at 80 columns."""
    from mlx_tokenrl.compare import cell, paired_cell

    accuracy = Table(title=f"held-out accuracy (greedy, n={rows[0]['n']})")
    cost = Table(title="training cost")
    for table in (accuracy, cost):
        table.add_column("arm", overflow="fold")  # sweep arms carry their settings in the name
    for col in ("accuracy (95% CI)", "vs base", "fixed/broke\n(paired p)", "format",
                "truncated"):
        accuracy.add_column(col, justify="right")
    for col in ("steps", "loss tokens\nper step", "median\nstep s", "train s\n(total)",
                "loss+grad\nGB", "peak\nGB"):
        cost.add_column(col, justify="right")
    for r in rows:
        low, high = r["ci95"]
        delta = "" if r["delta_vs_base"] is None else f"{r['delta_vs_base'] * 100:+.1f} pts"
        accuracy.add_row(r["arm"], f"{r['accuracy']:.1%} ({low * 100:.1f}-{high * 100:.1f})",
                         delta, paired_cell(r), f"{r['format_rate']:.0%}",
                         cell(r, "truncation_rate", ".0%"))
        if "step_seconds" in r:
            cost.add_row(r["arm"], str(r["steps"]), f"{r['selected_tokens_per_step']:.0f}",
                         f"{r['step_seconds']:.1f}", f"{r['train_seconds']:.1f}",
                         cell(r, "loss_peak_memory_gb", ".2f"), f"{r['peak_memory_gb']:.2f}")
    console.print(accuracy)
    if pairs:
        against = Table(title="arm against arm (same examples)")
        for col in ("arm", "against"):
            against.add_column(col, overflow="fold")
        for col in ("fixed", "broke", "paired p"):
            against.add_column(col, justify="right")
        for p in pairs:
            against.add_row(p["arm"], p["against"], str(p["fixed"]), str(p["broke"]),
                            f"{p['p']:.2g}")
        console.print(against)
    console.print(cost)


def compare(**kwargs):
    """Train arms (algorithms, optionally with their own settings) from one start and compare
    their held-out accuracy with the base model's.

    Every arm uses the same model, seed, data order and steps (or, with --time-budget, the
    same training time); the base model and every arm are scored on the same held-out
    examples."""
    specs = [a.strip() for a in kwargs.pop("algos").split(",") if a.strip()]
    resume = kwargs.pop("resume")
    final_eval_limit = kwargs.pop("final_eval_limit")
    with reported_errors():
        cfg = new_config(kwargs, DEFAULTS)
        from mlx_tokenrl.compare import run_compare  # (seconds: not for a bad option)

        progress = step_progress(max(map(len, ["base", *specs])),
                                 max(cfg.steps, final_eval_limit or cfg.eval_limit))
        arm = {}  # the arm being trained or evaluated: its name, bar, whether it trains

        def finish_arm():  # its bar stays, without its numbers
            if arm:
                progress.update(arm["bar"], phase="done", numbers=None)
            arm.clear()

        def on_arm(name, arm_cfg, finished):
            finish_arm()
            if finished:
                console.print(f"[bold]arm {name}[/]: finished earlier, skipped", soft_wrap=True)
                return
            if arm_cfg is not None:
                length = (f"{arm_cfg.steps} steps" if arm_cfg.time_budget is None else
                          f"for {arm_cfg.time_budget:g} s of steps (at most {arm_cfg.steps})")
                console.print(f"[bold]arm {name}[/]: training {length} into {arm_cfg.out}",
                              soft_wrap=True)
            # The base model's bar counts its evaluation; an arm's counts its steps.
            arm.update(name=name, trains=arm_cfg is not None, bar=progress.add_task(
                name, total=arm_cfg.steps if arm_cfg else None, phase="starting", numbers=None))

        def on_eval(done, total):
            if arm["trains"]:
                progress.update(arm["bar"], phase=f"final eval {done}/{total}")
            else:
                progress.update(arm["bar"], completed=done, total=total, phase="eval")

        with progress:
            try:
                result = run_compare(
                    cfg, specs, resume=resume, final_eval_limit=final_eval_limit, on_arm=on_arm,
                    on_step=lambda m: report_step(progress, arm["bar"], m, label=arm["name"]),
                    on_phase=lambda phase: progress.update(arm["bar"], phase=phase),
                    on_eval=on_eval)
            except KeyboardInterrupt:
                console.print("interrupted: continue with the same command plus --resume")
                raise typer.Exit(130)
            finish_arm()
        print_tables(result.rows, result.pairs)
        console.print(f"wrote {cfg.out}/compare.json, compare.md" + (
            " and compare.png" if result.plot else "; no plot without matplotlib "
            "(pip install 'mlx-tokenrl[plot]')"), soft_wrap=True)


compare.__signature__ = inspect.Signature(config_parameters([
    option_parameter("algos", Annotated[str, typer.Option(
        help=f"Comma-separated arms: an algorithm, optionally with settings of its own after "
             f"colons (a small sweep), e.g. grpo,s-grpo:lr=4e-5. (default: {','.join(ALGOS)})",
        rich_help_panel="Compare", show_default=False)],
        ",".join(ALGOS)),
    option_parameter("final_eval_limit", Annotated[Optional[int], typer.Option(
        help="Held-out examples of the final evaluations (base model and every arm), e.g. "
             "all 300 while --eval-limit 100 keeps the in-training ones quick. (default: "
             "--eval-limit)", rich_help_panel="Compare", show_default=False)]),
    option_parameter("resume", Annotated[bool, typer.Option(
        "--resume", help="Continue the compare in --out: the command that started it plus "
        "--resume skips finished arms and continues an unfinished one from its checkpoint. "
        "Settings must keep their values, but how steps run may change, e.g. --max-memory.",
        rich_help_panel="Compare", show_default=False)], False),
], skip={"algo"}, defaults=DEFAULTS))
