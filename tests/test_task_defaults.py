"""Each per-task default is pinned to the committed measurement its comment in config.py
cites (results/svamp-qwen2.5-0.5b/): if the default or the evidence changes, this fails.
And the run says so when --max-new-tokens cuts too many answers short."""

import json
from pathlib import Path

from typer.testing import CliRunner

from mlx_tokenrl import trainer
from mlx_tokenrl.config import GENERAL_DEFAULTS, TrainConfig, task_default
from mlx_tokenrl.trainer import TRUNCATION_WARNING, warn_if_truncated
from tokenrl_cli.main import app

SVAMP = Path(__file__).resolve().parents[1] / "results" / "svamp-qwen2.5-0.5b"


def calibration_at_step_5() -> dict:
    """{lr: (held-out accuracy, format rate) at step 5} of the SVAMP calibration's arms."""
    arms = {}
    for arm in sorted((SVAMP / "calibration").glob("t-spmo_lr=*")):
        config = json.loads((arm / "config.json").read_text())
        assert config["task"] == "svamp" and config["algo"] == "t-spmo"
        for line in open(arm / "metrics.jsonl"):
            metrics = json.loads(line)
            if metrics["step"] == 5 and "eval_format_rate" in metrics:
                arms[config["lr"]] = (metrics["eval_accuracy"], metrics["eval_format_rate"])
    return arms


def test_svamp_lr_is_the_largest_calibrated_rate_that_kept_the_answer_format():
    base = json.loads((SVAMP / "calibration" / "base_final_eval.json").read_text())
    arms = calibration_at_step_5()
    kept = [lr for lr, (_, fmt) in arms.items() if fmt >= base["format_rate"] - 0.1]
    assert task_default("svamp", "lr") == max(kept) == 5e-6
    # the general default was tried there and broke the format (and lost accuracy)
    accuracy, fmt = arms[GENERAL_DEFAULTS["lr"]]
    assert fmt < base["format_rate"] - 0.3 and accuracy < base["accuracy"] - 0.1


def test_svamp_max_new_tokens_is_the_shortest_budget_that_cuts_few_answers():
    curve = json.loads((SVAMP / "base" / "truncation.json").read_text())["rows"]
    cut = {row["max_new_tokens"]: row["truncated"] for row in curve}
    enough = [tokens for tokens, share in cut.items() if share <= TRUNCATION_WARNING]
    assert task_default("svamp", "max_new_tokens") == min(enough) == 300
    assert cut[GENERAL_DEFAULTS["max_new_tokens"]] > TRUNCATION_WARNING  # 13.7% at 256


def test_the_task_default_yields_to_any_value_given():
    assert (TrainConfig().lr, TrainConfig().max_new_tokens) == (5e-6, 300)  # svamp: the default task
    assert (TrainConfig(task="multiply").lr, TrainConfig(task="gsm8k").max_new_tokens) == (1e-5, 256)
    assert TrainConfig(task="svamp", lr=1e-5, max_new_tokens=256).lr == 1e-5
    resumed = TrainConfig(**{**TrainConfig(task="multiply").__dict__, "task": "svamp"})
    assert resumed.lr == 1e-5  # a saved config keeps the values it ran with


def test_the_truncation_warning_comes_once_per_run(capsys):
    cfg = TrainConfig(max_new_tokens=40)
    warned = False
    for step, rate in enumerate([0.05, TRUNCATION_WARNING, 0.5, 0.9, 0.0], start=1):
        warned = warn_if_truncated({"step": step, "truncation_rate": rate}, cfg, warned)
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["warning: step 3: 50% of the completions hit --max-new-tokens 40 before they "
                     "ended; truncated answers rarely score: raise --max-new-tokens"]


def test_a_run_whose_completions_are_cut_warns_once(tiny_model_dir, tmp_path):
    """The toy model rarely ends within 2 tokens: nearly every completion is cut."""
    result = CliRunner().invoke(app, [
        "train", "multiply", "--digits", "1x1", "--model", str(tiny_model_dir), "--algo", "grpo",
        "--steps", "2", "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "2",
        "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    rates = [json.loads(line)["truncation_rate"] for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert len(rates) == 2 and all(rate > TRUNCATION_WARNING for rate in rates)
    warnings = [line for line in result.stderr.splitlines() if "raise --max-new-tokens" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: step 1: ")


def test_eval_scores_with_the_tasks_max_new_tokens(tiny_model_dir, tmp_path, monkeypatch):
    from mlx_tokenrl import evaluate
    from mlx_tokenrl.tasks import TaskError

    budgets = []

    def scored(net, tokenizer, task, examples, max_new_tokens, *args, **kwargs):
        budgets.append(max_new_tokens)
        raise TaskError("enough")  # (ends the command in one line, before any decoding)

    monkeypatch.setattr(evaluate, "evaluate", scored)
    for task, extra in (("svamp", []), ("multiply", []), ("svamp", ["--max-new-tokens", "64"])):
        result = CliRunner().invoke(app, ["eval", task, "--model", str(tiny_model_dir), "--limit",
                                          "1", "--out", str(tmp_path / task), *extra])
        assert "enough" in result.output
    assert budgets == [300, 256, 64]
