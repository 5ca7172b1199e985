"""`compare`: base vs GRPO vs S-GRPO vs T-SPMO on one task, one table."""

import inspect
from typing import Annotated

import typer
from rich.table import Table

from mlx_tokenrl.compare import run_compare
from mlx_tokenrl.config import ALGOS

from .common import (config_parameters, console, new_config, option_parameter, report_step,
                     reported_errors, step_progress)


def print_table(rows):
    table = Table(title="held-out accuracy (greedy)")
    table.add_column("arm", overflow="fold")  # sweep arms carry their settings in the name
    for col in ("accuracy (95% CI)", "vs base", "format", "steps", "loss tokens/step",
                "median step s", "peak GB"):
        table.add_column(col, justify="right")
    for r in rows:
        low, high = r["ci95"]
        delta = "" if r["delta_vs_base"] is None else f"{r['delta_vs_base'] * 100:+.1f} pts"
        trained = "step_seconds" in r
        table.add_row(r["arm"], f"{r['accuracy']:.1%} ({low:.1%}-{high:.1%})", delta,
                      f"{r['format_rate']:.0%}", str(r["steps"]),
                      f"{r['selected_tokens_per_step']:.0f}" if trained else "",
                      f"{r['step_seconds']:.1f}" if trained else "",
                      f"{r['peak_memory_gb']:.2f}" if trained else "")
    console.print(table)


def compare(**kwargs):
    """Train each arm (an algorithm, optionally with its own settings) from the same start and
    compare held-out accuracy with the base model."""
    arms = [a.strip() for a in kwargs.pop("algos").split(",") if a.strip()]
    resume = kwargs.pop("resume")
    with reported_errors():
        kwargs["out"] = kwargs.get("out") or "runs/compare"
        cfg = new_config(kwargs)
        progress = step_progress()
        bars = {}

        def on_arm(name, arm_cfg, finished):
            if finished:
                console.print(f"[bold]arm {name}[/]: finished earlier, skipped")
                return
            if arm_cfg is not None:
                console.print(f"[bold]arm {name}[/]: training {arm_cfg.steps} steps into {arm_cfg.out}")
                bars["train"] = progress.add_task(name, total=arm_cfg.steps, info="starting")
            bars["eval"] = progress.add_task(f"{name} eval", total=cfg.eval_limit, info="",
                                             start=False)

        def on_step(m):
            report_step(progress, bars["train"], m)

        def on_eval(done, total):
            progress.start_task(bars["eval"])
            progress.update(bars["eval"], completed=done, total=total)

        with progress:
            try:
                rows = run_compare(cfg, arms, resume=resume, on_arm=on_arm, on_step=on_step,
                                   on_eval=on_eval)
            except KeyboardInterrupt:
                console.print("interrupted: continue with the same command plus --resume")
                raise typer.Exit(130)
        print_table(rows)
        console.print(f"wrote {cfg.out}/compare.json, compare.md and compare.png")


compare.__signature__ = inspect.Signature(config_parameters([
    option_parameter("algos", Annotated[str, typer.Option(
        help="Comma-separated arms: an algorithm, optionally with settings of its own after "
             "colons, e.g. grpo,s-grpo,s-grpo:lr=4e-5:sgrpo-k=48 (a small sweep).",
        rich_help_panel="Compare")],
        ",".join(ALGOS)),
    option_parameter("resume", Annotated[bool, typer.Option(
        help="Skip finished arms and continue an unfinished one from its checkpoint.",
        rich_help_panel="Compare")], False),
]))
