import json
import os
import re
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mlx_tokenrl.compare import (arm_configs, arm_row, base_reference, head_to_head,
                                 markdown_table, paired, run_compare)
from mlx_tokenrl.compare_plot import ArmCurves, BaseReference, figure
from mlx_tokenrl.config import TrainConfig
from tokenrl_cli.main import app


def test_compare_writes_table_json_plot_and_resumes(tiny_model_dir, tmp_path):
    out = tmp_path / "cmp"
    args = ["compare", "multiply", "--digits", "1x1", "--model", str(tiny_model_dir),
            "--algos", "grpo,t-spmo", "--steps", "2", "--prompts-per-step", "2",
            "--group-size", "4", "--max-new-tokens", "8", "--eval-limit", "3",
            "--final-eval-limit", "6", "--eval-every", "1", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "compare.json").read_text())
    assert [r["arm"] for r in data["rows"]] == ["base", "grpo", "t-spmo"]
    assert data["final_eval_limit"] == 6 and data["config"]["eval_limit"] == 3
    assert all(r["n"] == 6 for r in data["rows"])  # final evaluations: --final-eval-limit
    assert data["rows"][1]["steps"] == 2 and data["rows"][0]["delta_vs_base"] is None
    for row in data["rows"][1:]:
        step_s = [json.loads(line)["step_s"] for line in open(out / row["arm"] / "metrics.jsonl")]
        assert row["train_seconds"] == pytest.approx(sum(step_s))
        assert 0 <= row["truncation_rate"] <= 1 and row["loss_peak_memory_gb"] >= 0
    base_correct = data["rows"][0]["accuracy"] * 6
    for row in data["rows"][1:]:  # the paired counts agree with the two accuracies
        net = row["fixed_vs_base"] - row["broke_vs_base"]
        assert net == round(row["accuracy"] * 6 - base_correct)
        assert 0 <= row["paired_p_vs_base"] <= 1
    # One pair, and it tells the same story as the two rows against the base.
    [pair] = data["head_to_head"]
    assert (pair["arm"], pair["against"]) == ("t-spmo", "grpo")
    net = pair["fixed"] - pair["broke"]
    assert net == round((data["rows"][2]["accuracy"] - data["rows"][1]["accuracy"]) * 6)
    table = (out / "compare.md").read_text()
    assert "| grpo |" in table and "| t-spmo |" in table
    assert (out / "compare.png").stat().st_size > 10_000
    assert "compare.md and compare.png" in result.output
    # Not a terminal: one plain line per step, named after its arm; the tables after them.
    for arm in ("grpo", "t-spmo"):
        steps = re.findall(rf"^{arm} step (\d+): reward .* GB$", result.output, re.MULTILINE)
        assert steps == ["1", "2"], result.output
    assert "train s" in result.output and "truncated" in result.output
    stamps = {a: (out / a / "final_eval.json").stat().st_mtime_ns for a in ("base", "grpo", "t-spmo")}
    result = CliRunner().invoke(app, args + ["--resume"])
    assert result.exit_code == 0, result.output
    assert stamps == {a: (out / a / "final_eval.json").stat().st_mtime_ns for a in stamps}
    # How a step is computed or saved is not what it learns: those may change on resume.
    result = CliRunner().invoke(app, args + ["--max-memory", "4", "--save-every", "3",
                                             "--grad-checkpoint", "--resume"])
    assert result.exit_code == 0, result.output
    # Resuming with other settings would mix them into one table: one line, nothing touched.
    for what in ("this compare", "arm grpo"):  # the compare's own record, then each arm's
        result = CliRunner().invoke(app, args + ["--lr", "3e-5", "--resume"])
        assert result.exit_code == 1 and f"{what} was run with other settings" in result.stderr
        assert re.search(r"\(--lr: run [0-9.e-]+, given 3e-05\)", result.stderr), result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        (out / "compare_config.json").unlink(missing_ok=True)
    assert stamps == {a: (out / a / "final_eval.json").stat().st_mtime_ns for a in stamps}


def test_a_crash_while_an_arm_records_its_finish_leaves_it_unfinished(tiny_model_dir, tmp_path,
                                                                     monkeypatch):
    """final_eval.json marks an arm finished for --resume: a crash while it is written (here:
    before its bytes are in place) must leave no file rather than part of one."""
    out = tmp_path / "cmp"
    args = ["compare", "multiply", "--digits", "1x1", "--model", str(tiny_model_dir),
            "--algos", "grpo", "--steps", "1", "--prompts-per-step", "2", "--group-size", "2",
            "--max-new-tokens", "4", "--eval-limit", "3", "--out", str(out)]
    real_replace = os.replace

    def crash_on_the_arms_finish(src, dst):
        if Path(dst) == out / "grpo" / "final_eval.json":
            raise OSError("the machine went down")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_the_arms_finish)
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0 and "the machine went down" in result.stderr
    assert not (out / "grpo" / "final_eval.json").exists()
    assert not list((out / "grpo").glob(".final_eval.json*"))  # nor a temporary copy of it
    assert json.loads((out / "compare_config.json").read_text())["algos"] == ["grpo"]
    monkeypatch.setattr(os, "replace", real_replace)
    result = CliRunner().invoke(app, args + ["--resume"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "grpo" / "final_eval.json").read_text())["n"] == 3


def test_a_second_start_into_a_compare_is_refused_before_any_work(tiny_model_dir, tmp_path):
    """Without --resume, the same command again would redo the base's evaluation and overwrite
    its record before the first arm refused its checkpoints: one line instead, nothing written."""
    out = tmp_path / "cmp"
    args = ["compare", "multiply", "--digits", "1x1", "--model", str(tiny_model_dir),
            "--algos", "grpo", "--steps", "1", "--prompts-per-step", "2", "--group-size", "2",
            "--max-new-tokens", "4", "--eval-limit", "2", "--out", str(out)]
    assert CliRunner().invoke(app, args).exit_code == 0
    kept = [out / "base" / "final_eval.json", out / "compare_config.json", out / "compare.json"]
    before = [(path.read_bytes(), path.stat().st_mtime_ns) for path in kept]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert result.stderr.strip() == (f"error: --out {out} already holds a compare: continue it "
                                     "with the same command plus --resume, or choose another --out")
    assert before == [(path.read_bytes(), path.stat().st_mtime_ns) for path in kept]


@pytest.mark.parametrize("left", ["compare_config.json", "base/final_eval.json",
                                  "grpo/final_eval.json", "grpo/checkpoints/step-000001"])
def test_any_part_of_a_compare_refuses_a_fresh_start(left, tmp_path):
    """A compare stopped at any point (here: before the base's record, or with only an arm's
    checkpoint) is refused too; the missing model shows that nothing was loaded."""
    out = tmp_path / "cmp"
    if left.endswith(".json"):
        (out / left).parent.mkdir(parents=True)
        (out / left).write_text("{}")
    else:  # a complete checkpoint, as the trainer leaves it
        (out / left).mkdir(parents=True)
        for name in ("adapters.safetensors", "optimizer.safetensors", "state.json"):
            (out / left / name).write_text("")
    before = sorted(out.rglob("*"))
    result = CliRunner().invoke(app, ["compare", "multiply", "--algos", "grpo", "--model",
                                      str(tmp_path / "none"), "--out", str(out)])
    assert result.exit_code == 1 and "already holds a compare" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert sorted(out.rglob("*")) == before


def test_final_eval_limit_is_checked_before_any_model_work(tmp_path):
    result = CliRunner().invoke(app, ["compare", "multiply", "--model", str(tmp_path / "none"),
                                      "--final-eval-limit", "0", "--out", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert result.stderr.strip() == "error: --final-eval-limit must be at least 1, not 0"
    assert not (tmp_path / "o").exists()


def test_compare_rejects_unknown_algorithms(tiny_model_dir, tmp_path):
    result = CliRunner().invoke(app, ["compare", "multiply", "--algos", "grpo,ppo", "--steps", "1",
                                      "--group-size", "2", "--max-new-tokens", "4",
                                      "--final-eval-limit", "2", "--model", str(tiny_model_dir),
                                      "--out", str(tmp_path)])
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
    (["s-grpo:time-budget=60"], "time-budget is shared by every arm"),
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
    assert all(r["n"] == 4 for r in rows)  # no --final-eval-limit: --eval-limit's examples
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


def test_arm_row_sums_training_time_and_reads_costs_by_hand():
    summary = {"accuracy": 0.5, "ci95": [0.4, 0.6], "n": 100, "format_rate": 0.9,
               "truncation_rate": 0.25, "mean_tokens": 87.4}
    metrics = [{**step_metrics(step, 0.5, 0.5), "step_s": s, "loss_peak_memory_gb": gb}
               for step, s, gb in ((1, 2.0, 0.5), (2, 9.0, 1.5), (3, 4.0, 1.0))]
    row = arm_row("a", summary, metrics, 0.25)
    assert row["train_seconds"] == 15.0  # 2 + 9 + 4: every step, not the median 4
    assert row["step_seconds"] == 4.0
    assert row["loss_peak_memory_gb"] == 1.5
    assert row["truncation_rate"] == 0.25
    line = markdown_table([row]).splitlines()[2]
    assert "| 25% | 87 | 3 | 15.0 | 4.0 |" in line and "| 1.50 | 1.00 |" in line


def test_updates_per_step_and_the_clipped_share_of_the_steps_with_several():
    """A step without signal applies no update; one update clips nothing and is left out of
    the clipped share (mean over steps of updates 2..N's share of clipped tokens)."""
    summary = {"accuracy": 0.5, "ci95": [0.4, 0.6], "n": 100, "format_rate": 0.9}
    metrics = [{**step_metrics(step, 0.5), "updates": n, "clip_fraction": clipped}
               for step, n, clipped in ((1, 4, 0.1), (2, 0, 0.0), (3, 4, 0.3), (4, 1, 0.0))]
    row = arm_row("a", summary, metrics, 0.25)
    assert row["updates_per_step"] == 9 / 4
    assert row["clip_fraction"] == pytest.approx(0.2)
    cells = [c.strip() for c in markdown_table([row]).splitlines()[2].split("|")[1:-1]]
    assert cells[13:15] == ["2.25", "20.0%"]
    one = arm_row("a", summary, [{**step_metrics(1, 0.5), "updates": 1, "clip_fraction": 0.0}],
                  0.25)
    cells = [c.strip() for c in markdown_table([one]).splitlines()[2].split("|")[1:-1]]
    assert "clip_fraction" not in one and cells[13:15] == ["1.00", "-"]


def test_older_runs_show_n_a_for_what_they_did_not_log():
    """An arm resumed from an older run: no truncation rate in its final eval, no loss+grad
    peak on its first step."""
    summary = {"accuracy": 0.5, "ci95": [0.4, 0.6], "n": 100, "format_rate": 0.9}
    metrics = [step_metrics(1, 0.5, 0.5),
               {**step_metrics(2, 0.5, 0.5), "loss_peak_memory_gb": 0.7}]
    row = arm_row("old", summary, metrics, 0.25)
    assert "truncation_rate" not in row and "loss_peak_memory_gb" not in row
    cells = [c.strip() for c in markdown_table([row]).splitlines()[2].split("|")[1:-1]]
    # paired, truncated, updates / step, clipped, loss+grad peak GB
    assert cells[3] == cells[5] == cells[13] == cells[14] == cells[18] == "n/a"
    assert cells[19] == "1.00"  # the overall peak is still known


def write_base(out, correct, final_n):
    """A base model's final evaluation on `final_n` examples, per-example records included."""
    (out / "base" / "eval").mkdir(parents=True)
    (out / "base" / "eval" / "examples.jsonl").write_text(
        "".join(json.dumps({"correct": c}) + "\n" for c in correct[:final_n]))
    (out / "base" / "final_eval.json").write_text(json.dumps(
        {"accuracy": sum(correct[:final_n]) / final_n, "n": final_n}))


def records(questions, correct):
    return [{"question": q, "correct": c} for q, c in zip(questions, correct)]


def test_paired_counts_what_the_arm_fixed_and_broke_on_each_question():
    questions = ["a", "b", "c", "d", "e", "f"]
    base = records(questions, [True, True, False, False, False, True])
    arm = records(questions, [True, False, True, True, True, True])
    vs_base = paired(base, arm)
    assert (vs_base["fixed"], vs_base["broke"]) == (3, 1)  # c, d, e / b
    assert vs_base["p"] == pytest.approx(2 * 5 / 16)  # 2 * P(at most 1 of 4)
    summary = {"accuracy": 5 / 6, "ci95": [0.4, 0.9], "n": 6, "format_rate": 1.0}
    row = arm_row("arm", summary, [], 0.5, vs_base)
    assert "| 3/1 (p=0.62) |" in markdown_table([row])


@pytest.mark.parametrize("base, arm", [
    (list("abcd"), list("abc")),   # another --final-eval-limit
    (list("abcd"), list("abxd")),  # other examples
    (list("abcd"), []),            # an arm without per-example records
    ([], [])])                     # neither has them
def test_paired_needs_the_same_questions(base, arm):
    assert paired(records(base, [True] * 4), records(arm, [False] * 4)) is None


def test_head_to_head_pairs_each_later_arm_with_each_earlier_one():
    questions = ["a", "b", "c", "d"]
    answers = {"grpo": [True, True, False, False], "s-grpo": [True, False, True, True],
               "t-spmo": [False, False, False, True], "old": []}  # old: no records
    pairs = head_to_head({name: records(questions, correct) for name, correct in answers.items()})
    found = {(p["arm"], p["against"]): (p["fixed"], p["broke"]) for p in pairs}
    assert found == {("s-grpo", "grpo"): (2, 1), ("t-spmo", "grpo"): (1, 2),
                     ("t-spmo", "s-grpo"): (0, 2)}


def write_finished_compare(out):
    """The base and arms grpo, t-spmo, each finished with its records of the same 5 questions:
    --resume over them does no model work."""
    questions = ["a", "b", "c", "d", "e"]
    answers = {"base": [True, False, False, False, False], "grpo": [True, True, True, False, False],
               "t-spmo": [False, True, True, True, True]}
    for name, correct in answers.items():
        (out / name / "eval").mkdir(parents=True)
        (out / name / "eval" / "examples.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in records(questions, correct)))
        (out / name / "final_eval.json").write_text(json.dumps(
            {"n": 5, "correct": sum(correct), "accuracy": sum(correct) / 5, "ci95": [0, 1],
             "format_rate": 1.0}))


def test_a_finished_compare_tables_its_arms_against_the_base_and_each_other(tmp_path):
    """--resume over finished arms (no model work): the paired counts reach compare.json and
    compare.md in the right direction, from the records on disk."""
    write_finished_compare(tmp_path)
    cfg = TrainConfig(task="multiply", out=str(tmp_path), eval_limit=5)
    result = run_compare(cfg, ["grpo", "t-spmo"], resume=True)
    rows, pairs = result.rows, result.pairs
    assert [(r.get("fixed_vs_base"), r.get("broke_vs_base")) for r in rows] == [
        (None, None), (2, 0), (4, 1)]
    assert [(p["arm"], p["against"], p["fixed"], p["broke"]) for p in pairs] == [
        ("t-spmo", "grpo", 2, 1)]
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert saved["head_to_head"] == pairs and saved["rows"] == rows
    table = (tmp_path / "compare.md").read_text()
    assert "| 4/1 (p=0.38) |" in table and "| t-spmo | grpo | 2 | 1 | 1 |" in table
    base_cells = [c.strip() for c in table.splitlines()[2].split("|")[1:-1]]
    assert base_cells[0] == "base" and base_cells[3] == ""  # no base against itself


def test_without_matplotlib_an_earlier_runs_plot_is_not_reported_as_written(tmp_path,
                                                                            monkeypatch):
    write_finished_compare(tmp_path)
    (tmp_path / "compare.png").write_bytes(b"an earlier run's plot")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib: ImportError
    result = CliRunner().invoke(app, ["compare", "multiply", "--algos", "grpo,t-spmo",
                                      "--eval-limit", "5", "--model", str(tmp_path / "none"),
                                      "--out", str(tmp_path), "--resume"])
    assert result.exit_code == 0, result.output
    assert "compare.md; no plot without matplotlib" in result.output
    assert "and compare.png" not in result.output
    assert (tmp_path / "compare.png").read_bytes() == b"an earlier run's plot"


def test_resume_keeps_the_final_eval_limit_the_compare_started_with(tmp_path):
    """Arms scored on another number of examples than the base have no paired counts: --resume
    refuses another --final-eval-limit, also the one it defaults to (--eval-limit), in one line
    and before any work (the model does not exist). An older compare_config.json, without
    final_eval_limit, is not held to one."""
    write_finished_compare(tmp_path)
    args = ["compare", "multiply", "--algos", "grpo,t-spmo", "--eval-limit", "3", "--model",
            str(tmp_path / "none"), "--out", str(tmp_path), "--resume"]
    assert CliRunner().invoke(app, args + ["--final-eval-limit", "5"]).exit_code == 0
    saved = tmp_path / "compare_config.json"
    before = (saved.read_bytes(), saved.stat().st_mtime_ns)
    for limit, change in ((["--final-eval-limit", "4"], "run 5, given 4"), ([], "run 5, given 3")):
        result = CliRunner().invoke(app, args + limit)
        assert result.exit_code == 1
        assert result.stderr.strip() == (
            f"error: --resume: this compare was run with other settings (--final-eval-limit: "
            f"{change}); use its settings again or choose another --out")
    assert (saved.read_bytes(), saved.stat().st_mtime_ns) == before
    older = json.loads(saved.read_text())
    del older["final_eval_limit"]
    saved.write_text(json.dumps(older))
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output


def test_base_reference_scores_the_in_training_examples(tmp_path):
    write_base(tmp_path, [True, False, False, True, True, True], 6)
    base = base_reference(tmp_path / "base", 4)
    assert (base.accuracy, base.n) == (0.5, 4)  # the first 4 examples: 2 right
    assert (base.final_accuracy, base.final_n) == (4 / 6, 6)


def curves(arm_steps):
    """Hand-made arms: (name, [(step_s, eval_accuracy or None), ...]) each."""
    arms = []
    for name, steps in arm_steps:
        metrics = []
        for step, (seconds, accuracy) in enumerate(steps, 1):
            m = {**step_metrics(step, 0.5, 0.25), "step_s": seconds, "reward_mean": 0.3}
            if accuracy is not None:
                m["eval_accuracy"] = accuracy
            metrics.append(m)
        arms.append(ArmCurves(name, metrics, final_accuracy=0.6, final_n=300))
    return arms


@pytest.fixture
def plt():
    plt = pytest.importorskip("matplotlib.pyplot")
    yield plt
    plt.close("all")


def panel(fig, title):
    return next(ax for ax in fig.axes if ax.get_title() == title)


def line(ax, label):
    return next(line for line in ax.lines if line.get_label() == label)


def test_accuracy_against_cumulative_training_time(plt):
    """x: the sum of step_s up to each evaluated step (evaluation time is not in step_s),
    y: that step's eval_accuracy, from the base model at 0 s; the base as a reference."""
    base = BaseReference(accuracy=0.2, n=100, final_accuracy=0.25, final_n=300)
    arms = curves([("cheap", [(1.0, None), (2.0, 0.3), (3.0, None), (4.0, 0.5)]),
                   ("dear", [(10.0, 0.4), (20.0, 0.45), (30.0, 0.5), (40.0, 0.55)])])
    fig = figure(base, arms, plt)
    ax = panel(fig, "Held-out accuracy per training time")
    assert list(line(ax, "cheap").get_xdata()) == [0.0, 3.0, 10.0]
    assert list(line(ax, "cheap").get_ydata()) == [0.2, 0.3, 0.5]
    assert list(line(ax, "dear").get_xdata()) == [0.0, 10.0, 30.0, 60.0, 100.0]
    assert list(line(ax, "base (n=100)").get_ydata()) == [0.2, 0.2]
    assert "(s;" in ax.get_xlabel()
    # The final evaluations (stars) stand at each arm's whole training time.
    stars = [(list(l.get_xdata()), list(l.get_ydata())) for l in ax.lines
             if l.get_marker() == "*"]
    assert ([10.0], [0.6]) in stars and ([100.0], [0.6]) in stars


def test_plot_reads_in_percent_and_whole_steps_for_a_short_run(plt):
    base = BaseReference(accuracy=0.2, n=100, final_accuracy=0.2, final_n=100)
    arms = curves([(name, [(1.0, 0.2), (1.0, 0.3), (1.0, 0.3)]) for name in ("a", "b", "c")])
    fig = figure(base, arms, plt)
    fig.canvas.draw()
    for title in ("Held-out accuracy", "Held-out accuracy per training time", "Train solve rate"):
        labels = [t.get_text() for t in panel(fig, title).get_yticklabels() if t.get_text()]
        assert labels and all(label.endswith("%") for label in labels), (title, labels)
    for title in ("Held-out accuracy", "Train reward", "Train solve rate"):
        ax = panel(fig, title)
        low, high = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if low <= t <= high]
        assert ticks and all(t == int(t) for t in ticks), (title, ticks)
    # Three steps are drawn as three points of every arm (no 5-step mean collapsing them),
    # and arms on the same curve differ in line style and marker, not only colour.
    reward = panel(fig, "Train reward")
    assert all(len(line(reward, name).get_xdata()) == 3 for name in "abc")
    assert len({line(reward, name).get_linestyle() for name in "abc"}) == 3
    assert len({line(reward, name).get_marker() for name in "abc"}) == 3


def test_plot_gives_each_arm_one_colour_in_every_panel(plt):
    base = BaseReference(accuracy=0.2, n=100, final_accuracy=0.2, final_n=100)
    arms = curves([("old", [(1.0, 0.3)] * 7), ("new", [(1.0, 0.3)] * 7)])
    for m in arms[0].metrics:  # the first arm predates the solve metrics
        del m["solve_rate"]
    fig = figure(base, arms, plt)
    colours = {ax.get_title(): {l.get_label(): l.get_color() for l in ax.lines} for ax in fig.axes}
    assert set(colours["Train solve rate"]) == {"new"}
    assert (colours["Held-out accuracy"]["new"] == colours["Train reward"]["new"]
            == colours["Train solve rate"]["new"] != colours["Held-out accuracy"]["old"])


def test_plot_without_solve_metrics_leaves_that_panel_out(plt):
    """Arms that all predate the solve metrics (or have no steps logged): three panels."""
    base = BaseReference(accuracy=0.2, n=100, final_accuracy=0.2, final_n=100)
    arms = curves([("old", [(1.0, 0.3)] * 7)])
    for m in arms[0].metrics:
        del m["solve_rate"]
    fig = figure(base, arms, plt)
    fig.canvas.draw()
    assert [ax.get_title() for ax in fig.axes] == [
        "Held-out accuracy", "Held-out accuracy per training time", "Train reward"]
    labels = [t.get_text() for t in panel(fig, "Held-out accuracy").get_yticklabels()]
    assert any(label.endswith("%") for label in labels)


def test_arms_without_logged_steps_draw_no_empty_legend(plt):
    """A compare whose arms have final evaluations but no metrics.jsonl (e.g. copied results):
    the reward panel has no lines, so no legend either (matplotlib warns on an empty one)."""
    base = BaseReference(accuracy=0.2, n=100, final_accuracy=0.2, final_n=100)
    fig = figure(base, [ArmCurves("copied", [], 0.3, 100)], plt)
    assert panel(fig, "Train reward").get_legend() is None
    assert panel(fig, "Held-out accuracy").get_legend() is not None


@pytest.mark.parametrize("damaged, message", [
    ("compare_config.json", "compare_config.json: not a compare's settings"),
    ("grpo/config.json", "grpo/config.json: not a run's config.json"),
])
@pytest.mark.parametrize("content", ["{half written", "{}"])
def test_a_damaged_settings_file_stops_a_resume_in_one_line(tmp_path, damaged, message, content):
    write_finished_compare(tmp_path)
    if content == "{}" and damaged != "compare_config.json":
        content = "[]"  # an empty mapping is a valid run config (every setting at its default)
    (tmp_path / damaged).write_text(content)
    result = CliRunner().invoke(app, ["compare", "multiply", "--algos", "grpo,t-spmo",
                                      "--eval-limit", "3", "--model", str(tmp_path / "none"),
                                      "--out", str(tmp_path), "--resume"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
