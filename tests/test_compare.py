import json
import re

import pytest
from typer.testing import CliRunner

from mlx_tokenrl.compare import arm_configs, arm_row, figure
from mlx_tokenrl.config import TrainConfig
from tokenrl_cli.main import app


def test_compare_writes_table_json_plot_and_resumes(tiny_model_dir, tmp_path):
    out = tmp_path / "cmp"
    args = ["compare", "multiply", "--digits", "1x1", "--model", str(tiny_model_dir),
            "--algos", "grpo,t-spmo", "--steps", "2", "--prompts-per-step", "2",
            "--group-size", "4", "--max-new-tokens", "8", "--eval-limit", "6",
            "--eval-every", "1", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "compare.json").read_text())
    assert [r["arm"] for r in data["rows"]] == ["base", "grpo", "t-spmo"]
    assert all(r["n"] == 6 for r in data["rows"])
    assert data["rows"][1]["steps"] == 2 and data["rows"][0]["delta_vs_base"] is None
    table = (out / "compare.md").read_text()
    assert "| grpo |" in table and "| t-spmo |" in table
    assert (out / "compare.png").stat().st_size > 10_000
    stamps = {a: (out / a / "final_eval.json").stat().st_mtime_ns for a in ("base", "grpo", "t-spmo")}
    result = CliRunner().invoke(app, args + ["--resume"])
    assert result.exit_code == 0, result.output
    assert stamps == {a: (out / a / "final_eval.json").stat().st_mtime_ns for a in stamps}


def test_compare_rejects_unknown_algorithms(tiny_model_dir, tmp_path):
    result = CliRunner().invoke(app, ["compare", "multiply", "--algos", "grpo,ppo",
                                      "--model", str(tiny_model_dir), "--out", str(tmp_path)])
    assert result.exit_code == 1 and "--algos" in result.output


def test_arm_specs_override_only_their_own_settings(tmp_path):
    cfg = TrainConfig(task="multiply", steps=7, lr=2e-5, out=str(tmp_path))
    arms = arm_configs(cfg, ["grpo", "s-grpo:lr=4e-5:sgrpo-k=48", "t-spmo:tspmo_replay=0:compile=false"])
    assert [name for name, _ in arms] == ["grpo", "s-grpo:lr=4e-5:sgrpo-k=48",
                                          "t-spmo:tspmo_replay=0:compile=false"]
    grpo, sgrpo, tspmo = (c for _, c in arms)
    assert (grpo.algo, grpo.lr, grpo.sgrpo_k) == ("grpo", 2e-5, 24)
    assert (sgrpo.algo, sgrpo.lr, sgrpo.sgrpo_k, sgrpo.steps) == ("s-grpo", 4e-5, 48, 7)
    assert (tspmo.tspmo_replay, tspmo.compile, tspmo.lr) == (0, False, 2e-5)
    assert sgrpo.out == str(tmp_path / "s-grpo_lr=4e-5_sgrpo-k=48")


@pytest.mark.parametrize("specs, message", [
    (["ppo"], "unknown algorithm 'ppo'"),
    (["s-grpo:lr"], "is not a setting"),
    (["s-grpo:learning_rate=1"], "is not a setting"),
    (["s-grpo:steps=5"], "steps is shared by every arm"),
    (["s-grpo:sgrpo-k=4.5"], "sgrpo-k=4.5"),
    (["t-spmo:compile=maybe"], "expected true or false"),
    (["s-grpo:sgrpo-alpha=30"], "--sgrpo-alpha must not exceed --sgrpo-k"),
    (["grpo", "grpo"], "name each arm once"),
    ([], "name each arm once"),
])
def test_bad_arm_specs_fail_before_any_model_work(specs, message, tmp_path):
    with pytest.raises(ValueError, match=re.escape(message)):
        arm_configs(TrainConfig(out=str(tmp_path)), specs)


def test_compare_sweep_arms_train_with_their_settings(tiny_model_dir, tmp_path):
    out = tmp_path / "sweep"
    result = CliRunner().invoke(app, [
        "compare", "multiply", "--digits", "1x1", "--model", str(tiny_model_dir),
        "--algos", "s-grpo,s-grpo:lr=3e-4:sgrpo-k=6", "--steps", "1", "--prompts-per-step", "2",
        "--group-size", "4", "--max-new-tokens", "8", "--eval-limit", "4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert [r["arm"] for r in rows] == ["base", "s-grpo", "s-grpo:lr=3e-4:sgrpo-k=6"]
    tuned = json.loads((out / "s-grpo_lr=3e-4_sgrpo-k=6" / "config.json").read_text())
    assert (tuned["lr"], tuned["sgrpo_k"], tuned["algo"]) == (3e-4, 6, "s-grpo")
    assert json.loads((out / "s-grpo" / "config.json").read_text())["sgrpo_k"] == 24
    assert "| s-grpo:lr=3e-4:sgrpo-k=6 |" in (out / "compare.md").read_text()


def step_metrics(step, signal, solved=None):
    m = {"step": step, "selected_tokens": 10, "generated_tokens": 100, "step_s": 1.0, "loss_s": 0.5,
         "peak_memory_gb": 1.0, "signal_fraction": signal}
    if solved is not None:
        m.update(solve_rate=solved, solved_signal_fraction=signal)
    return m


def test_solve_metrics_shown_only_when_every_step_logged_them():
    summary = {"accuracy": 0.5, "ci95": [0.4, 0.6], "n": 100, "format_rate": 0.0}
    full = arm_row("a", summary, [step_metrics(1, 0.5, 0.25), step_metrics(2, 0.0, 0.75)], 0.25)
    assert full["solve_rate"] == 0.5
    assert full["solved_signal_fraction"] == full["signal_fraction"] == 0.25
    # Resumed across the change: step 1 predates the solve metrics.
    partial = arm_row("a", summary, [step_metrics(1, 0.5), step_metrics(2, 0.0, 0.75)], 0.25)
    assert partial["signal_fraction"] == 0.25
    assert "solve_rate" not in partial and "solved_signal_fraction" not in partial


def test_plot_gives_each_arm_one_colour_in_every_panel(tmp_path):
    plt = pytest.importorskip("matplotlib.pyplot")
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "final_eval.json").write_text(json.dumps({"accuracy": 0.2}))
    arms = []
    # The first arm predates the solve metrics, so it has no line in the third panel.
    for name, solved in (("old", None), ("new", 0.5)):
        arm_dir = tmp_path / name
        arm_dir.mkdir()
        (arm_dir / "final_eval.json").write_text(json.dumps({"accuracy": 0.4}))
        lines = [{**step_metrics(step, 0.5, solved), "reward_mean": 0.3} for step in range(1, 8)]
        (arm_dir / "metrics.jsonl").write_text("\n".join(json.dumps(m) for m in lines))
        arms.append((name, arm_dir))
    fig = figure(tmp_path, arms, plt)
    colours = [{line.get_label(): line.get_color() for line in ax.lines} for ax in fig.axes]
    plt.close(fig)
    assert set(colours[2]) == {"new"}
    assert colours[0]["new"] == colours[1]["new"] == colours[2]["new"] != colours[0]["old"]
