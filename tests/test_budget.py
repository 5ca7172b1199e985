"""--time-budget: where a run stops, the schedule it plans, and that a resume plans the same."""

import json
import math
from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from mlx_tokenrl import budget, trainer
from mlx_tokenrl.config import ConfigError, TrainConfig
from mlx_tokenrl.distributed import World


def test_the_plan_buys_the_steps_that_first_reach_the_budget_at_the_median_time():
    cfg = TrainConfig(time_budget=100, steps=50)
    # spent 62 s, 38 s left at a median of 12 s: 4 more steps (48 s) first reach it
    assert budget.planned_steps(cfg, [40, 10, 12]) == 3 + 4
    assert budget.planned_steps(TrainConfig(time_budget=100, steps=5), [40, 10, 12]) == 5
    assert budget.planned_steps(cfg, [60, 50]) == 2  # already spent: no more
    assert budget.planned_steps(cfg, [50, 50]) == 2  # exactly spent


def test_spent_means_the_budget_is_reached_and_never_without_one():
    cfg = TrainConfig(time_budget=100)
    assert not budget.spent(cfg, [60, 39.9]) and budget.spent(cfg, [60, 40])
    assert not budget.spent(TrainConfig(), [1e9])


def test_a_budget_must_be_positive():
    for bad in (0, -5, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="--time-budget"):
            TrainConfig(time_budget=bad).validate()


# Fake step times by step number (not by call), so that a resumed run sees the same ones.
STEP_SECONDS = {1: 30.0, 2: 10.0, 3: 10.0, 4: 10.0, 5: 10.0, 6: 10.0, 7: 10.0}


@pytest.fixture
def fake_clock(monkeypatch):
    """The trainer's steps, each reporting STEP_SECONDS[step] as its step_s; `crash_at`: a
    step that is interrupted (the way Ctrl-C would) before it runs."""
    real = trainer.run_step
    state = {"crash_at": None}

    def run_step(*args, **kwargs):
        step = args[7] + 1
        if step == state["crash_at"]:
            raise KeyboardInterrupt
        metrics = real(*args, **kwargs)
        metrics["step_s"] = STEP_SECONDS[step]
        return metrics

    monkeypatch.setattr(trainer, "run_step", run_step)
    return state


def budget_config(tiny_model_dir, dense_files, out):
    # budget 65 s; after warmup (2 steps: 30 + 10 s, median 20 s) 25 s are left: 2 more steps
    # planned (4), but the times that follow (10 s each) first reach 65 s at step 5 (70 s),
    # which is saved although not a --save-every step
    return TrainConfig(model=str(tiny_model_dir), out=str(out), task="jsonl",
                       data=str(dense_files / "data.jsonl"),
                       reward_fn=f"{dense_files / 'reward.py'}:digits", algo="grpo", steps=50,
                       time_budget=65, warmup_steps=2, prompts_per_step=4, group_size=8,
                       max_new_tokens=16, temperature=1.0, lr=1e-3, save_every=3)


def hand_rates(peak=1e-3):
    """Warmup over 2 steps, then the cosine planned for 4 steps: over 2, to peak/10 and held."""
    floor = peak * 0.1
    cosine = [floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * k / 2)) for k in (1, 2, 2)]
    return [peak / 2, peak, *cosine]


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def check_the_optimizer_took_the_planned_rate(out, metrics):
    """The rate in the optimizer's state saved after the last step is the planned one (1e-4),
    not the 50-step cosine's (near the peak). (A step without signal would leave it as it
    was: the last one needs an update.)"""
    assert metrics[-1]["updates"] == 1
    state = mx.load(str(out / "checkpoints" / "step-000005" / "optimizer.safetensors"))
    assert float(state["learning_rate"]) == pytest.approx(1e-4, rel=1e-5)


def test_a_budget_stops_at_the_first_step_that_reaches_it_on_the_planned_schedule(
        tiny_model_dir, dense_files, tmp_path, fake_clock):
    out = tmp_path / "run"
    trainer.train(budget_config(tiny_model_dir, dense_files, out))
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5]
    assert [m["lr"] for m in metrics] == pytest.approx(hand_rates(), rel=1e-5)
    assert [m.get("planned_steps") for m in metrics] == [None, 4, 4, 4, 4]
    check_the_optimizer_took_the_planned_rate(out, metrics)


@pytest.mark.parametrize("crash_at", [2, 3, 4])  # before, at and after the plan point
def test_a_resumed_budget_run_plans_the_same_and_a_spent_one_trains_no_more(
        tiny_model_dir, dense_files, tmp_path, fake_clock, crash_at):
    out = tmp_path / "run"
    cfg = budget_config(tiny_model_dir, dense_files, out)
    fake_clock["crash_at"] = crash_at
    with pytest.raises(KeyboardInterrupt):
        trainer.train(cfg)
    assert [m["step"] for m in read_metrics(out)] == list(range(1, crash_at))
    fake_clock["crash_at"] = None
    trainer.train(cfg, resume=True)
    metrics = read_metrics(out)
    assert [m["lr"] for m in metrics] == pytest.approx(hand_rates(), rel=1e-5)
    check_the_optimizer_took_the_planned_rate(out, metrics)
    trainer.train(cfg, resume=True)
    assert read_metrics(out) == metrics


def test_a_stop_during_an_evaluation_keeps_the_step_in_metrics_and_the_plan(
        tiny_model_dir, dense_files, tmp_path, fake_clock, monkeypatch):
    """Ctrl-C in the evaluation after step 2 (the plan point): the checkpoint holds step 2,
    so metrics.jsonl must too, or the resumed run would plan from step 1's time alone."""
    out = tmp_path / "run"
    cfg = replace(budget_config(tiny_model_dir, dense_files, out), eval_every=2, eval_limit=2)
    real = trainer.run_eval

    def run_eval(*args, **kwargs):
        if len(read_metrics(out)) == 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "run_eval", run_eval)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(cfg)
    assert [m["step"] for m in read_metrics(out)] == [1, 2]
    trainer.train(cfg, resume=True)
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5]
    assert [m["lr"] for m in metrics] == pytest.approx(hand_rates(), rel=1e-5)


def test_a_spent_run_whose_last_evaluation_was_cut_short_is_evaluated_on_resume(
        tiny_model_dir, dense_files, tmp_path, fake_clock, monkeypatch):
    """Ctrl-C in the evaluation of step 5, the step that spent the budget: `train --resume`
    runs that evaluation rather than calling the run finished."""
    from typer.testing import CliRunner

    from tokenrl_cli.main import app

    out = tmp_path / "run"
    cfg = replace(budget_config(tiny_model_dir, dense_files, out), eval_every=5, eval_limit=1)
    real = trainer.run_eval

    def ctrl_c_once(*args, **kwargs):
        monkeypatch.setattr(trainer, "run_eval", real)
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "run_eval", ctrl_c_once)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(cfg)
    assert "eval_accuracy" not in read_metrics(out)[-1]
    result = CliRunner().invoke(app, ["train", "--resume", str(out)])
    assert result.exit_code == 0, result.output
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5] and "eval_accuracy" in metrics[-1]


def test_the_planned_optimizer_keeps_adams_moments(lora_model):
    """After the plan the moments go on: an update with zero gradients still moves the
    weights by the momentum (a fresh Adam would not move them)."""
    cfg = TrainConfig(lr=1e-2, steps=50, warmup_steps=2, time_budget=100)
    optimizer = trainer.make_optimizer(cfg)
    grads = tree_map(lambda p: mx.ones_like(p), lora_model.trainable_parameters())
    before = lora_model.trainable_parameters()
    try:
        trainer.apply_update(lora_model, optimizer, grads, 0.0, step=0)
        planned, optimizer = trainer.plan_schedule(cfg, optimizer, [10.0, 10.0], World())
        assert planned.steps == 10
        moved = {k: np.array(v) for k, v in tree_flatten(lora_model.trainable_parameters())}
        zeros = tree_map(mx.zeros_like, grads)
        trainer.apply_update(lora_model, optimizer, zeros, 0.0, step=2)
        after = dict(tree_flatten(lora_model.trainable_parameters()))
        assert all(not np.array_equal(np.array(after[k]), v) for k, v in moved.items())
    finally:
        lora_model.update(before)


def test_the_cli_says_where_the_budget_stopped_and_a_resume_may_extend_it(
        tiny_model_dir, dense_files, tmp_path, fake_clock):
    from typer.testing import CliRunner

    from tokenrl_cli.main import app

    out = tmp_path / "run"
    command = ["train", "jsonl", "--data", dense_files / "data.jsonl", "--reward-fn",
               f"{dense_files / 'reward.py'}:digits", "--model", tiny_model_dir, "--algo", "grpo",
               "--steps", 50, "--warmup-steps", 2, "--prompts-per-step", 2, "--group-size", 4,
               "--max-new-tokens", 8, "--out", out]
    result = CliRunner().invoke(app, [*map(str, command), "--time-budget", "65"])
    assert result.exit_code == 0, result.output
    assert "--time-budget 65 s reached after 5 steps" in result.output
    # 20 s more: the 10 s steps 6 and 7 reach 85 s
    result = CliRunner().invoke(app, [*map(str, command), "--time-budget", "85", "--resume",
                                      str(out)])
    assert result.exit_code == 0, result.output
    assert "--time-budget 85 s reached after 7 steps" in result.output
    assert len(read_metrics(out)) == 7
    # a spent run is left as it is, without loading the model
    files = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    result = CliRunner().invoke(app, ["train", "--resume", str(out)])
    assert result.exit_code == 0, result.output
    assert f"{out}: its --time-budget 85 s was spent after 7 steps" in result.output
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == files


def test_compare_gives_every_arm_the_same_time_and_each_its_own_steps(tiny_model_dir, tmp_path,
                                                                       monkeypatch):
    """An arm whose steps are cheaper takes more of them in the same --time-budget."""
    from typer.testing import CliRunner

    from tokenrl_cli.main import app

    real = trainer.run_step

    def run_step(model, tokenizer, task, cfg, *args, **kwargs):
        metrics = real(model, tokenizer, task, cfg, *args, **kwargs)
        metrics["step_s"] = 10.0 if cfg.algo == "grpo" else 5.0
        return metrics

    monkeypatch.setattr(trainer, "run_step", run_step)
    out = tmp_path / "cmp"
    result = CliRunner().invoke(app, [
        "compare", "multiply", "--digits", "1x1", "--model", str(tiny_model_dir), "--algos",
        "grpo,t-spmo", "--steps", "50", "--time-budget", "30", "--warmup-steps", "1",
        "--prompts-per-step", "2", "--group-size", "4", "--max-new-tokens", "8",
        "--eval-limit", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "arm grpo: training for 30 s of steps (at most 50)" in result.output
    rows = {r["arm"]: r for r in json.loads((out / "compare.json").read_text())["rows"]}
    assert (rows["grpo"]["steps"], rows["t-spmo"]["steps"]) == (3, 6)
    assert rows["grpo"]["train_seconds"] == rows["t-spmo"]["train_seconds"] == 30
