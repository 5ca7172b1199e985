"""`compare`: base model vs each algorithm, same model, seed, data order and step count.

Every arm trains into `<out>/<algo>/` with the trainer (so an unfinished arm resumes from
its checkpoint), then all arms are scored greedily on the same held-out examples.
A finished arm leaves `<out>/<arm>/final_eval.json` and is skipped on `--resume`.
"""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from .evaluate import evaluate, write_eval
from .models import load_model
from .tasks import load_task
from .checkpoint import latest_checkpoint
from .trainer import TrainConfig, train


def read_metrics(run_dir: Path) -> list:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def evaluate_arm(cfg: TrainConfig, adapter, eval_limit: int, out: Path) -> dict:
    task = load_task(cfg.task, data=cfg.data, digits=cfg.digits, seed=cfg.seed,
                     reward_fn=cfg.reward_fn)
    model, tokenizer = load_model(cfg.model, adapter_path=adapter, dtype=cfg.dtype,
                                  quantize_bits=cfg.quantize)
    summary, records = evaluate(model, tokenizer, task, task.test[:eval_limit],
                                max_new_tokens=cfg.max_new_tokens)
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
    return row


def run_compare(cfg: TrainConfig, algos, resume: bool = False, on_arm=None, on_step=None):
    """Run (or continue) every arm into cfg.out; returns the table rows, base first.

    Every arm is scored on the first cfg.eval_limit held-out examples."""
    out, eval_limit = Path(cfg.out), cfg.eval_limit
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare_config.json").write_text(json.dumps(
        {"config": cfg.__dict__, "algos": list(algos)}, indent=2))
    rows = []
    base_dir = out / "base"
    base_dir.mkdir(exist_ok=True)
    if on_arm:
        on_arm("base", None)
    done = base_dir / "final_eval.json"
    base = (json.loads(done.read_text()) if resume and done.exists()
            else evaluate_arm(cfg, None, eval_limit, base_dir))
    rows.append(arm_row("base", base, [], None))
    for algo in algos:
        arm_dir = out / algo
        arm_cfg = replace(cfg, algo=algo, out=str(arm_dir))
        if on_arm:
            on_arm(algo, arm_cfg)
        done = arm_dir / "final_eval.json"
        if not (resume and done.exists()):
            started = resume and latest_checkpoint(arm_dir) is not None
            train(arm_cfg, resume=started, on_step=on_step)
            evaluate_arm(arm_cfg, arm_dir, eval_limit, arm_dir)
        summary = json.loads(done.read_text())
        rows.append(arm_row(algo, summary, read_metrics(arm_dir), base["accuracy"]))
    write_tables(out, rows, cfg)
    plot(out, [r["arm"] for r in rows[1:]])
    return rows


def markdown_table(rows) -> str:
    lines = ["| arm | held-out accuracy (95% CI) | vs base | format rate | train steps | "
             "tokens in loss / step | tokens generated / step | groups with signal | "
             "median step s | median loss+grad s | peak GB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        low, high = r["ci95"]
        delta = "" if r["delta_vs_base"] is None else f"{r['delta_vs_base'] * 100:+.1f} pts"
        cells = [r["arm"], f"{r['accuracy']:.1%} ({low:.1%}-{high:.1%}, n={r['n']})", delta,
                 f"{r['format_rate']:.0%}", str(r["steps"])]
        if "step_seconds" in r:
            cells += [f"{r['selected_tokens_per_step']:.0f}", f"{r['generated_tokens_per_step']:.0f}",
                      f"{r['signal_fraction']:.0%}", f"{r['step_seconds']:.1f}",
                      f"{r['loss_seconds']:.1f}", f"{r['peak_memory_gb']:.2f}"]
        else:
            cells += [""] * 6
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_tables(out: Path, rows, cfg: TrainConfig):
    (out / "compare.json").write_text(json.dumps({"config": cfg.__dict__, "rows": rows}, indent=2))
    (out / "compare.md").write_text(markdown_table(rows))


def plot(out: Path, arms):
    """Held-out accuracy and train reward vs step, one line per algorithm (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax_acc, ax_rew) = plt.subplots(1, 2, figsize=(11, 4))
    base = json.loads((out / "base" / "final_eval.json").read_text())["accuracy"]
    ax_acc.axhline(base, color="grey", linestyle="--", label="base")
    for arm in arms:
        metrics = read_metrics(out / arm)
        evals = [(0, base)] + [(m["step"], m["eval_accuracy"]) for m in metrics
                               if "eval_accuracy" in m]
        final = json.loads((out / arm / "final_eval.json").read_text())["accuracy"]
        if metrics:
            evals.append((metrics[-1]["step"], final))
        ax_acc.plot(*zip(*evals), marker="o", label=arm)
        steps = [m["step"] for m in metrics]
        rewards = np.array([m["reward_mean"] for m in metrics])
        if len(rewards):
            window = min(5, len(rewards))
            smooth = np.convolve(rewards, np.ones(window) / window, mode="valid")
            ax_rew.plot(steps[window - 1:], smooth, label=arm)
    ax_acc.set(xlabel="step", ylabel="held-out accuracy (greedy)", title="Held-out accuracy")
    ax_rew.set(xlabel="step", ylabel="mean train reward (5-step mean)", title="Train reward")
    for ax in (ax_acc, ax_rew):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "compare.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
