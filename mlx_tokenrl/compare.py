"""`compare`: base model vs each algorithm, same model, seed, data order and step count.

Every arm trains into `<out>/<arm>/` with the trainer (so an unfinished arm resumes from
its checkpoint), then all arms are scored greedily on the same held-out examples.
A finished arm leaves `<out>/<arm>/final_eval.json` and is skipped on `--resume`.

An arm is an algorithm, optionally with settings of its own (`s-grpo:lr=4e-5:sgrpo-k=48`),
so the same command, table and plot serve a small hyperparameter sweep.
"""

import json
import typing
from dataclasses import replace
from pathlib import Path

import numpy as np

from .evaluate import evaluate, write_eval
from .models import check_lora_fits, load_model
from .tasks import load_task
from .checkpoint import latest_checkpoint
from .config import ALGOS, ConfigError, TrainConfig, coerce
from .trainer import train

# What makes arms comparable: the same task, model, data order and rollout budget.
SHARED = {"task", "model", "data", "digits", "reward_fn", "seed", "steps", "prompts_per_step",
          "group_size", "max_new_tokens", "eval_every", "eval_limit", "save_every", "out",
          "quantize", "dtype", "lora_keys"}


def parse_arm(spec: str) -> tuple[str, dict]:
    """'s-grpo' or 's-grpo:lr=4e-5:sgrpo-k=48' -> (arm name, TrainConfig overrides)."""
    algo, *settings = spec.strip().split(":")
    if algo not in ALGOS:
        raise ConfigError(f"--algos: unknown algorithm {algo!r} in {spec!r}; use {', '.join(ALGOS)}, "
                          "optionally with settings, e.g. s-grpo:lr=4e-5:sgrpo-k=48")
    kinds = typing.get_type_hints(TrainConfig)
    overrides = {"algo": algo}
    for setting in settings:
        key, sep, value = setting.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in kinds or key == "algo":
            raise ConfigError(f"--algos: {setting!r} in {spec!r} is not a setting (use name=value)")
        if key in SHARED:
            raise ConfigError(f"--algos: {key.replace('_', '-')} is shared by every arm; "
                              "set it once for the whole compare")
        try:
            overrides[key] = coerce(key, value, kinds[key])
        except ConfigError as exc:
            raise ConfigError(f"--algos: {setting!r} in {spec!r}: {exc}") from None
    return spec.strip(), overrides


def arm_configs(cfg: TrainConfig, specs) -> list[tuple[str, TrainConfig]]:
    """Each arm's full config, validated before any model work; arm directories are named
    after the spec (':' -> '_')."""
    arms = [parse_arm(spec) for spec in specs]
    names = [name for name, _ in arms]
    if not arms or len(set(names)) < len(names):
        raise ConfigError("--algos: name each arm once (comma-separated)")
    out = Path(cfg.out)
    configs = [(name, replace(cfg, **overrides, out=str(out / name.replace(":", "_"))))
               for name, overrides in arms]
    for _, arm_cfg in configs:
        arm_cfg.validate()
    return configs


def read_metrics(run_dir: Path) -> list:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def evaluate_arm(cfg: TrainConfig, adapter, eval_limit: int, out: Path, on_progress=None,
                 lora_arms=()) -> dict:
    """Score a model (with `adapter`) and write its evaluation into `out`. `lora_arms`: arm
    configs whose LoRA settings are checked against the model before anything is written."""
    task = load_task(cfg.task, data=cfg.data, digits=cfg.digits, seed=cfg.seed,
                     reward_fn=cfg.reward_fn)
    model, tokenizer = load_model(cfg.model, adapter_path=adapter, dtype=cfg.dtype,
                                  quantize_bits=cfg.quantize)
    for arm_cfg in lora_arms:
        check_lora_fits(model, arm_cfg.lora_layers, arm_cfg.lora_keys)
    summary, records = evaluate(model, tokenizer, task, task.test[:eval_limit],
                                max_new_tokens=cfg.max_new_tokens, on_progress=on_progress)
    write_eval(out / "eval", summary, records)
    (out / "final_eval.json").write_text(json.dumps(summary, indent=2))
    return summary


def arm_row(name: str, summary: dict, metrics: list, base_accuracy: float | None) -> dict:
    row = {"arm": name, "accuracy": summary["accuracy"], "ci95": summary["ci95"],
           "n": summary["n"], "format_rate": summary["format_rate"],
           "delta_vs_base": None if base_accuracy is None else summary["accuracy"] - base_accuracy,
           "steps": len(metrics)}
    if metrics:
        row.update(
            selected_tokens_per_step=float(np.mean([m["selected_tokens"] for m in metrics])),
            generated_tokens_per_step=float(np.mean([m["generated_tokens"] for m in metrics])),
            # Medians: one step stalled by something else on the machine should not
            # decide an arm's cost.
            step_seconds=float(np.median([m["step_s"] for m in metrics])),
            loss_seconds=float(np.median([m["loss_s"] for m in metrics])),
            peak_memory_gb=float(max(m["peak_memory_gb"] for m in metrics)),
            signal_fraction=float(np.mean([m["signal_fraction"] for m in metrics])))
    # Runs older than the solve metrics lack them, and a run resumed across that change has
    # them only for its later steps: averaged over fewer steps than "groups with signal", they
    # would not be comparable to it, so they are shown only when every step has them.
    if metrics and all("solve_rate" in m for m in metrics):
        row.update(solve_rate=float(np.mean([m["solve_rate"] for m in metrics])),
                   solved_signal_fraction=float(np.mean([m["solved_signal_fraction"]
                                                         for m in metrics])))
    return row


def run_compare(cfg: TrainConfig, arm_specs, resume: bool = False, on_arm=None, on_step=None,
                on_eval=None):
    """Run (or continue) every arm into cfg.out; returns the table rows, base first.

    Every arm is scored on the first cfg.eval_limit held-out examples. Callbacks:
    on_arm(name, arm config or None for base, finished already), on_step(train metrics),
    on_eval(examples done, total)."""
    out, eval_limit = Path(cfg.out), cfg.eval_limit
    arms = arm_configs(cfg, arm_specs)
    rows = []
    base_dir = out / "base"
    done = base_dir / "final_eval.json"
    finished = resume and done.exists()
    if on_arm:
        on_arm("base", None, finished)
    # The base evaluation loads the task and the model first: bad data, model or LoRA keys
    # stop the compare before anything is written.
    base = (json.loads(done.read_text()) if finished
            else evaluate_arm(cfg, None, eval_limit, base_dir, on_eval,
                              lora_arms=[arm_cfg for _, arm_cfg in arms]))
    (out / "compare_config.json").write_text(json.dumps(
        {"config": cfg.__dict__, "algos": [name for name, _ in arms]}, indent=2))
    rows.append(arm_row("base", base, [], None))
    for name, arm_cfg in arms:
        arm_dir = Path(arm_cfg.out)
        done = arm_dir / "final_eval.json"
        finished = resume and done.exists()
        if on_arm:
            on_arm(name, arm_cfg, finished)
        if not finished:
            started = resume and latest_checkpoint(arm_dir) is not None
            train(arm_cfg, resume=started, on_step=on_step)
            evaluate_arm(arm_cfg, arm_dir, eval_limit, arm_dir, on_eval)
        summary = json.loads(done.read_text())
        rows.append(arm_row(name, summary, read_metrics(arm_dir), base["accuracy"]))
    write_tables(out, rows, cfg)
    plot(out, [(name, Path(arm_cfg.out)) for name, arm_cfg in arms])
    return rows


def markdown_table(rows) -> str:
    lines = ["| arm | held-out accuracy (95% CI) | vs base | format rate | train steps | "
             "tokens in loss / step | tokens generated / step | train solve rate | "
             "groups with signal | of which on correctness | "
             "median step s | median loss+grad s | peak GB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        low, high = r["ci95"]
        delta = "" if r["delta_vs_base"] is None else f"{r['delta_vs_base'] * 100:+.1f} pts"
        cells = [r["arm"], f"{r['accuracy']:.1%} ({low:.1%}-{high:.1%}, n={r['n']})", delta,
                 f"{r['format_rate']:.0%}", str(r["steps"])]
        if "step_seconds" in r:
            solved = "solve_rate" in r
            cells += [f"{r['selected_tokens_per_step']:.0f}", f"{r['generated_tokens_per_step']:.0f}",
                      f"{r['solve_rate']:.1%}" if solved else "n/a", f"{r['signal_fraction']:.0%}",
                      f"{r['solved_signal_fraction']:.0%}" if solved else "n/a",
                      f"{r['step_seconds']:.1f}", f"{r['loss_seconds']:.1f}",
                      f"{r['peak_memory_gb']:.2f}"]
        else:
            cells += [""] * 8
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_tables(out: Path, rows, cfg: TrainConfig):
    (out / "compare.json").write_text(json.dumps({"config": cfg.__dict__, "rows": rows}, indent=2))
    (out / "compare.md").write_text(markdown_table(rows))


def plot_smoothed(ax, metrics, key, label, color, window=5):
    """A per-step metric as a trailing mean (single steps are noisy with 8 prompts)."""
    points = [(m["step"], m[key]) for m in metrics if key in m]
    if not points:
        return
    steps, values = zip(*points)
    window = min(window, len(values))
    ax.plot(steps[window - 1:], np.convolve(values, np.ones(window) / window, mode="valid"),
            label=label, color=color)


def figure(out: Path, arms, plt):
    """Held-out accuracy, train reward and (where logged) train solve rate vs step, one line
    per (name, run dir) arm. The solve rate panel matters with --format-reward, where the
    reward also pays for the format."""
    runs = [(arm, arm_dir, read_metrics(arm_dir)) for arm, arm_dir in arms]
    solved = any("solve_rate" in m for _, _, metrics in runs for m in metrics)
    fig, axes = plt.subplots(1, 3 if solved else 2, figsize=(16 if solved else 11, 4))
    ax_acc, ax_rew = axes[:2]
    base = json.loads((out / "base" / "final_eval.json").read_text())["accuracy"]
    ax_acc.axhline(base, color="grey", linestyle="--", label="base")
    # One colour per arm in every panel: matplotlib's colour cycle advances per line drawn, so
    # an arm missing from a panel would shift the others' colours there.
    palette = plt.get_cmap("tab10" if len(runs) <= 10 else "tab20")
    for i, (arm, arm_dir, metrics) in enumerate(runs):
        color = palette(i % palette.N)
        evals = [(0, base)] + [(m["step"], m["eval_accuracy"]) for m in metrics
                               if "eval_accuracy" in m]
        final = json.loads((arm_dir / "final_eval.json").read_text())["accuracy"]
        if metrics:
            evals.append((metrics[-1]["step"], final))
        ax_acc.plot(*zip(*evals), marker="o", label=arm, color=color)
        plot_smoothed(ax_rew, metrics, "reward_mean", arm, color)
        if solved:
            plot_smoothed(axes[2], metrics, "solve_rate", arm, color)
    ax_acc.set(xlabel="step", ylabel="held-out accuracy (greedy)", title="Held-out accuracy")
    ax_rew.set(xlabel="step", ylabel="mean train reward (5-step mean)", title="Train reward")
    if solved:
        axes[2].set(xlabel="step", ylabel="share of samples right (5-step mean)",
                    title="Train solve rate")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot(out: Path, arms):
    """compare.png from `figure` (needs matplotlib, an optional extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig = figure(out, arms, plt)
    path = out / "compare.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
