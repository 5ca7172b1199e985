"""compare.png: held-out accuracy against step and against training time, train reward and
(where logged) train solve rate, one colour, line style and marker per arm in every panel.

Accuracy is plotted against cumulative training time as well as steps because the argument
for token-efficient steps is about budgets: at equal wall-clock a cheaper step buys more.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

LINE_STYLES = ("-", "--", "-.", ":")  # arms whose curves coincide stay distinguishable
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")
MAX_MARKERS = 15  # per line: markers on every step of a long run would hide the line


@dataclass
class BaseReference:
    accuracy: float  # on the in-training evaluations' examples: the curves' start and reference
    n: int
    final_accuracy: float  # on the final evaluation's examples, like the arms' stars
    final_n: int


@dataclass
class ArmCurves:
    name: str
    metrics: list  # metrics.jsonl, one dict per step in step order
    final_accuracy: float
    final_n: int


def smoothing_window(steps: int, longest: int = 5) -> int:
    """Trailing-mean window for per-step train metrics (noisy with few prompts per step);
    short runs keep every step."""
    return max(1, min(longest, steps // 4))


def trailing_mean(values, window: int):
    return np.convolve(values, np.ones(window) / window, mode="valid")


def time_unit(seconds: float):
    """(divisor, name) that keeps cumulative training time readable."""
    if seconds >= 2 * 3600:
        return 3600, "h"
    if seconds >= 600:
        return 60, "min"
    return 1, "s"


@dataclass
class EvalCurve:
    """In-training held-out accuracy, starting from the base model at step 0 and 0 s."""
    steps: list
    seconds: list  # cumulative step_s up to each evaluation (evaluation time not counted)
    accuracy: list
    total_seconds: float  # of all the arm's steps: where its final evaluation stands


def eval_curve(metrics: list, base_accuracy: float) -> EvalCurve:
    curve = EvalCurve([0], [0.0], [base_accuracy], 0.0)
    for m in metrics:
        curve.total_seconds += m["step_s"]
        if "eval_accuracy" in m:
            curve.steps.append(m["step"])
            curve.seconds.append(curve.total_seconds)
            curve.accuracy.append(m["eval_accuracy"])
    return curve


def arm_style(i: int, arms: int, palette) -> dict:
    """Colour, line style and marker of the i-th of `arms` arms. Earlier arms are drawn wider
    and with bigger markers, so a later arm's line over an identical curve leaves them
    visible around it."""
    under = (arms - 1 - i) / max(arms - 1, 1)  # 1 for the first arm drawn, 0 for the last
    return {"color": palette(i % palette.N), "linestyle": LINE_STYLES[i % len(LINE_STYLES)],
            "marker": MARKERS[i % len(MARKERS)], "linewidth": 1.5 + 2.5 * under,
            "markersize": 5 + 5 * under}


def sparse_markers(style: dict, points: int) -> dict:
    return {**style, "markevery": max(1, points // MAX_MARKERS)}


def plot_smoothed(ax, metrics: list, key: str, window: int, label: str, style: dict):
    """A per-step train metric as a trailing mean (a shorter run: over all its steps)."""
    points = [(m["step"], m[key]) for m in metrics if key in m]
    if not points:
        return
    steps, values = zip(*points)
    window = min(window, len(values))
    ax.plot(steps[window - 1:], trailing_mean(values, window), label=label,
            **sparse_markers(style, len(values)))


def figure(base: BaseReference, arms: list, plt):
    """Accuracy vs step, accuracy vs cumulative training time, train reward and (when some
    arm logged it) train solve rate. Lines: in-training evaluations; stars: final ones."""
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    solved = any("solve_rate" in m for arm in arms for m in arm.metrics)
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    ax_step, ax_time, ax_reward, ax_solved = axes.flat
    if not solved:
        ax_solved.remove()
    curves = [eval_curve(arm.metrics, base.accuracy) for arm in arms]
    per, unit = time_unit(max((c.total_seconds for c in curves), default=0.0))
    window = smoothing_window(max((len(arm.metrics) for arm in arms), default=0))
    star = {"marker": "*", "markersize": 13, "linestyle": "none"}
    for ax in (ax_step, ax_time):
        ax.axhline(base.accuracy, color="grey", linestyle="--", label=f"base (n={base.n})")
        ax.plot(0, base.final_accuracy, color="grey",
                label=f"final evaluations, n={base.final_n} (grey: base)", **star)
    # One colour per arm in every panel: matplotlib's colour cycle advances per line drawn, so
    # an arm missing from a panel would shift the others' colours there.
    palette = plt.get_cmap("tab10" if len(arms) <= 10 else "tab20")
    for i, (arm, curve) in enumerate(zip(arms, curves)):
        style = arm_style(i, len(arms), palette)
        line = sparse_markers(style, len(curve.steps))
        ax_step.plot(curve.steps, curve.accuracy, label=arm.name, **line)
        ax_time.plot(np.array(curve.seconds) / per, curve.accuracy, label=arm.name, **line)
        if arm.metrics:  # the final evaluation, after the last step
            ax_step.plot(arm.metrics[-1]["step"], arm.final_accuracy, color=style["color"], **star)
            ax_time.plot(curve.total_seconds / per, arm.final_accuracy, color=style["color"],
                         **star)
        plot_smoothed(ax_reward, arm.metrics, "reward_mean", window, arm.name, style)
        if solved:
            plot_smoothed(ax_solved, arm.metrics, "solve_rate", window, arm.name, style)
    mean = "per step" if window == 1 else f"{window}-step mean"
    ax_step.set(xlabel="step", ylabel="held-out accuracy (greedy)", title="Held-out accuracy")
    ax_time.set(xlabel=f"cumulative training time ({unit}; evaluations not counted)",
                ylabel="held-out accuracy (greedy)", title="Held-out accuracy per training time")
    ax_reward.set(xlabel="step", ylabel=f"mean train reward ({mean})", title="Train reward")
    rate_axes, step_axes = [ax_step, ax_time], [ax_step, ax_reward]
    if solved:  # a removed panel takes no labels
        ax_solved.set(xlabel="step", ylabel=f"share of samples right ({mean})",
                      title="Train solve rate")
        rate_axes.append(ax_solved)
        step_axes.append(ax_solved)
    for ax in rate_axes:
        ax.yaxis.set_major_formatter(PercentFormatter(xmax=1))
        low, high = ax.get_ylim()  # no room for rates below 0% or above 100%
        ax.set_ylim(max(low, -0.02), min(high, 1.02))
    for ax in step_axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in fig.axes:
        if ax.get_legend_handles_labels()[0]:  # arms without logged steps draw no reward line
            ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def save_figure(path: Path, base: BaseReference, arms: list):
    """Write `figure` to `path` (needs matplotlib, an optional extra); None without it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig = figure(base, arms, plt)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
