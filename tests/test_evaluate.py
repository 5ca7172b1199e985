import json
import math

import pytest
from typer.testing import CliRunner

from mlx_tokenrl import evaluate as evaluate_module
from mlx_tokenrl.evaluate import evaluate, sign_test_p, summarize, summary_from_counts
from mlx_tokenrl.rollout import Completion
from mlx_tokenrl.tasks import Example, Task
from mlx_tokenrl.rewards import numeric_reward
from tokenrl_cli.main import app


class PlainTokenizer:
    """No chat template, no BOS: prompts stay plain text."""
    bos_token = None
    chat_template = None

    def encode(self, text, add_special_tokens=True):
        return [ord(ch) for ch in text]


# (completion text, tokens produced, hit max_new_tokens before EOS)
SCRIPTED = [("2 + 1 = 3\n#### 3", 9, False),
            ("it is \\boxed{4}", 6, False),
            ("first 2 then 2 more, so the total is \\boxed{4", 16, True),
            ("lots of words and still going on and on", 16, True)]


def test_evaluate_reports_truncation_rate(monkeypatch):
    def scripted_rollout(model, tokenizer, prompt_tokens, group_size, params, seeds, answers,
                         reward_fn):
        assert params.max_new_tokens == 16 and params.temperature == 0.0
        return [Completion(i, [0] * n, truncated, text, reward_fn(text, answer))
                for i, ((text, n, truncated), answer) in enumerate(zip(SCRIPTED, answers))]

    monkeypatch.setattr(evaluate_module, "rollout", scripted_rollout)
    examples = [Example("1 + 2?", "3"), Example("2 + 2?", "4"), Example("2 + 2?", "4"),
                Example("5 + 5?", "10")]
    task = Task("t", [], examples, numeric_reward)
    summary, records = evaluate(None, PlainTokenizer(), task, examples, max_new_tokens=16)
    assert [r["truncated"] for r in records] == [False, False, True, True]
    assert [r["correct"] for r in records] == [True, True, True, False]
    assert [r["formatted"] for r in records] == [True, True, False, False]  # unclosed box
    assert summary["truncation_rate"] == 0.5
    assert summary["format_rate"] == 0.5
    assert summary["mean_tokens"] == (9 + 6 + 16 + 16) / 4


def test_summary_truncation_rate_from_records():
    records = [{"correct": c, "formatted": True, "tokens": 5, "truncated": t}
               for c, t in [(True, False), (False, True), (False, False), (True, False),
                            (False, True)]]
    assert summarize(records)["truncation_rate"] == pytest.approx(2 / 5)
    assert summarize([])["truncation_rate"] == 0.0
    # Training's sharded eval sums only the four counts: no rate rather than a made-up one.
    assert "truncation_rate" not in summary_from_counts(5, 2, 5, 25)


def test_cli_eval_prints_truncation(tiny_model_dir, tmp_path):
    # The random toy model never emits EOS greedily within 6 tokens: every answer is cut off.
    out = tmp_path / "eval"
    result = CliRunner().invoke(app, ["eval", "multiply", "--digits", "1x1", "--model",
                                      str(tiny_model_dir), "--limit", "3", "--max-new-tokens", "6",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    # Not a terminal (a log file): the summary is one line, not wrapped at 80 columns.
    [summary] = [line for line in result.output.splitlines() if line.startswith("accuracy ")]
    assert len(summary) > 80 and summary.endswith("| truncated 100.0% at 6 tokens"), result.output
    assert json.loads((out / "summary.json").read_text())["truncation_rate"] == 1.0


@pytest.mark.parametrize("fixed, broke, p", [
    (0, 5, 2 / 32),                 # all five changes one way: 2 * (1/2)^5
    (1, 9, 2 * (1 + 10) / 1024),    # 2 * P(at most 1 of 10)
    (3, 3, 1.0), (0, 0, 1.0), (4, 5, 1.0)])  # even splits cannot be more even: capped at 1
def test_sign_test_by_hand(fixed, broke, p):
    assert sign_test_p(fixed, broke) == pytest.approx(p)
    assert sign_test_p(broke, fixed) == pytest.approx(p)


@pytest.mark.parametrize("fixed, broke", [(52, 27), (66, 43), (35, 37), (0, 1), (12, 2)])
def test_sign_test_against_every_split_at_least_as_uneven(fixed, broke):
    """Naive reference: add up every split of the changed answers whose imbalance is at least
    the observed one, each with its binomial(n, 1/2) chance."""
    n = fixed + broke
    chances = [math.comb(n, k) / 2 ** n for k in range(n + 1)]
    reference = sum(c for k, c in enumerate(chances) if abs(2 * k - n) >= abs(fixed - broke))
    assert sign_test_p(fixed, broke) == pytest.approx(min(1.0, reference))
