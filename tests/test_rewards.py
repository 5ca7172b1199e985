import pytest

from mlx_tokenrl.rewards import (
    exact_match_reward,
    extract_answer,
    final_answer,
    load_reward_fn,
    numbers_equal,
    numeric_reward,
    parse_number,
)

EXTRACT_CASES = [
    # (text, value, formatted)
    ("#### 42", 42.0, True),
    ("####42", 42.0, True),
    ("#### $1,234.00", 1234.0, True),
    ("#### 1,000,000", 1000000.0, True),
    ("#### -5", -5.0, True),
    ("####-5", -5.0, True),
    ("#### \u22127", -7.0, True),
    ("#### +8", 8.0, True),
    ("#### 3.75", 3.75, True),
    ("#### .5", 0.5, True),
    ("#### 3/4", 0.75, True),
    ("#### 50%", 50.0, True),
    ("#### 12.", 12.0, True),
    ("**#### 7**", 7.0, True),
    ("#### **19**", 19.0, True),
    ("#### $ 6", 6.0, True),
    ("#### -$5", -5.0, True),
    ("2 + 3 = 5\n#### 5", 5.0, True),
    ("#### 12\nwait, recheck\n#### 13", 13.0, True),
    ("I have 10 apples #### 12 #### 13 is final", 13.0, True),
    ("#### 42 apples, because 40 + 2 = 42. Also 99.", 42.0, True),
    ("#### The answer is 17 dollars", 17.0, True),
    ("48/2 = <<48/2=24>>24 clips\n#### 72", 72.0, True),
    ("She has 3 cats and 4 dogs. #### 7", 7.0, True),
    # no number after the last marker: fall back to the last number anywhere
    ("first 3 then 9 ####", 9.0, False),
    ("#### 5 and later #### none", 5.0, False),
    # no marker at all
    ("The answer is 5.", 5.0, False),
    ("So she pays $1,234.50 in total.", 1234.5, False),
    ("It drops to -12 degrees", -12.0, False),
    ("7 minus 3 leaves 4", 4.0, False),
    ("5-3", 3.0, False),
    ("x = 2.5 and y = 0.25", 0.25, False),
    ("answer: **42**", 42.0, False),
    ("about 30% of them", 30.0, False),
    ("version 1.2.3", 1.2, False),
    # nothing to find
    ("no number here", None, False),
    ("", None, False),
    ("#### ", None, False),
    ("####", None, False),
    ("twenty-one apples", None, False),
    # \boxed{...}: a final-answer marker beside '####'
    ("\\boxed{7}", 7.0, True),
    ("So 3 + 4 = 7.\n\\[\\boxed{7}\\]", 7.0, True),
    ("\\boxed{\\frac{1}{2}}", 0.5, True),
    ("\\boxed{\\dfrac{3}{4}}", 0.75, True),
    ("\\boxed{-\\frac{1}{2}}", -0.5, True),
    ("\\boxed{{5}}", 5.0, True),
    ("\\boxed{1,000}", 1000.0, True),
    ("\\boxed{1{,}000}", 1000.0, True),
    ("\\boxed{1\\,000}", 1000.0, True),
    ("\\boxed{ 12 }", 12.0, True),
    ("\\boxed{12.0}", 12.0, True),
    ("\\boxed{x = 5}", 5.0, True),
    ("\\boxed{3 \\times 4 = 12}", 12.0, True),
    ("\\boxed{\\$5}", 5.0, True),
    ("\\boxed{-\\$5}", -5.0, True),
    ("\\boxed{5\\%}", 5.0, True),
    ("\\boxed{\\text{8 apples}}", 8.0, True),
    ("\\boxed{\\{3\\}}", 3.0, True),
    ("\\boxed{\\left\\{ 3 \\right.}", 3.0, True),  # an escaped brace neither opens nor closes
    ("\\boxed{12} apples, since 10 + 2 = 12. Also 99.", 12.0, True),
    ("First \\boxed{3}, no wait: \\boxed{4}", 4.0, True),
    # whichever marker starts last wins
    ("#### 5\nActually \\boxed{6}", 6.0, True),
    ("\\boxed{6}\nso\n#### 5", 5.0, True),
    ("#### \\boxed{12}", 12.0, True),
    ("#### \\\\boxed{12}", 12.0, True),  # a doubled backslash (escaped text) still opens a box
    ("#### 13 is \\boxed{x = 12}", 12.0, True),
    ("\\boxed{3} then \\boxed{}", 3.0, False),  # an empty last box holds no answer
    # an unclosed box (cut off) is no marker
    ("so it is \\boxed{12", 12.0, False),
    ("\\boxed{7} and then \\boxed{12", 7.0, True),
    ("#### 9 \\boxed{12", 9.0, True),
    ("the answer is \\frac{1}{4}", 0.25, False),
]


@pytest.mark.parametrize("text,value,formatted", EXTRACT_CASES)
def test_extract_answer(text, value, formatted):
    got, got_formatted = extract_answer(text)
    assert got_formatted is formatted
    if value is None:
        assert got is None
    else:
        assert got == pytest.approx(value)


@pytest.mark.parametrize("text,value", [
    ("42", 42.0),
    (" 42 ", 42.0),
    ("1,000", 1000.0),
    ("$1,234.00", 1234.0),
    ("12.", 12.0),
    ("7.0", 7.0),
    ("7.00", 7.0),
    ("**42**", 42.0),
    ("`3`", 3.0),
    ("50%", 50.0),
    ("+3", 3.0),
    ("-3", -3.0),
    ("\u22123", -3.0),
    ("-$5", -5.0),
    ("3/4", 0.75),
    ("-1/2", -0.5),
    (".5", 0.5),
    ("\\boxed{12}", 12.0),
    ("\\boxed{ -3 }", -3.0),
])
def test_parse_number(text, value):
    assert parse_number(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["", "   ", "abc", "42 apples", "1/0", "1,2", "4-2", "--3", "$",
                                  "\\boxed{1} \\boxed{2}", "\\boxed{12"])
def test_parse_number_rejects(text):
    assert parse_number(text) is None


def test_numbers_equal():
    assert numbers_equal(0.1 + 0.2, 0.3)
    assert numbers_equal(1e9, 1e9 + 0.5)
    assert numbers_equal(0.0, -0.0)
    assert not numbers_equal(1.0, 1.001)
    assert not numbers_equal(0.0, 1e-3)


@pytest.mark.parametrize("completion,answer,reward", [
    ("#### 145", "145", 1.0),
    ("#### 145.0", "145", 1.0),
    ("#### 1,000", "1000", 1.0),
    ("#### $1,000.00", 1000, 1.0),
    ("The answer is 145.", "145", 1.0),
    ("#### 144", "145", 0.0),
    ("#### 145 #### 146", "145", 0.0),
    ("no idea", "145", 0.0),
    ("#### 0.5", 0.5, 1.0),
    ("#### 1/2", "0.5", 1.0),
    ("#### -3", "-3", 1.0),
    ("\\boxed{12.0}", "12", 1.0),
    ("\\boxed{1,000}", "1000", 1.0),
    ("\\boxed{12} \\boxed{13}", "12", 0.0),
    ("\\boxed{\\frac{1}{2}}", 0.5, 1.0),
])
def test_numeric_reward(completion, answer, reward):
    assert numeric_reward(completion, answer) == reward


def test_numeric_reward_bad_gold():
    with pytest.raises(ValueError, match="not a number"):
        numeric_reward("#### 1", "abc")


@pytest.mark.parametrize("completion,answer,reward", [
    ("#### Paris", "Paris", 1.0),
    ("#### paris", "PARIS", 1.0),
    ("reasoning...\n####   New   York  ", "new york", 1.0),
    ("**#### Paris.**", "Paris", 1.0),
    ("#### Paris\nI hope that helps.", "Paris", 1.0),
    ("#### London #### Paris", "Paris", 1.0),
    ("  Paris \n", "paris", 1.0),
    ("The capital is Paris", "Paris", 0.0),
    ("#### Lyon", "Paris", 0.0),
    ("\\boxed{Paris}", "Paris", 1.0),
    ("\\boxed{\\text{New York}}.", "new york", 1.0),
    ("#### Lyon\nno, \\boxed{Paris}", "Paris", 1.0),
    ("\\boxed{Paris} #### Lyon", "Paris", 0.0),
    ("####", "Paris", 0.0),
])
def test_exact_match_reward(completion, answer, reward):
    assert exact_match_reward(completion, answer) == reward


def test_load_reward_fn_module():
    fn = load_reward_fn("mlx_tokenrl.rewards:numeric_reward")
    assert fn.fn is numeric_reward


def test_load_reward_fn_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text("def score(completion, answer):\n    return float(answer in completion)\n")
    fn = load_reward_fn(f"{path}:score")
    assert fn("the cat", "cat") == 1.0
    assert fn("the dog", "cat") == 0.0


def test_load_reward_fn_relative_file(tmp_path, monkeypatch):
    (tmp_path / "rel_rewards.py").write_text("def score(c, a):\n    return 0.5\n")
    monkeypatch.chdir(tmp_path)
    assert load_reward_fn("rel_rewards.py:score")("x", "y") == 0.5


@pytest.mark.parametrize("spec", [
    "no_colon",
    ":score",
    "mlx_tokenrl.rewards:",
    "no_such_module_xyz:score",
    "missing_file_xyz.py:score",
    "mlx_tokenrl.rewards:no_such_function",
    "mlx_tokenrl.rewards:MARKER",  # exists but is a string
])
def test_load_reward_fn_errors(spec):
    with pytest.raises(ValueError) as info:
        load_reward_fn(spec)
    assert repr(spec) in str(info.value)


def test_load_reward_fn_file_that_raises(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ValueError, match="boom"):
        load_reward_fn(f"{path}:score")


def test_format_bonus_credits_the_format_only():
    from mlx_tokenrl.rewards import numeric_reward, with_format_bonus

    reward = with_format_bonus(numeric_reward, 0.1)
    assert reward("so it is 42\n#### 42", "42") == pytest.approx(1.1)
    assert reward("#### 41", "42") == pytest.approx(0.1)
    assert reward("the answer is 42", "42") == pytest.approx(1.0)
    assert reward("no idea", "42") == 0.0
    assert reward("\\boxed{42}", "42") == pytest.approx(1.1)  # a box alone is the format
    assert reward("\\boxed{41}", "42") == pytest.approx(0.1)
    assert reward("it is \\boxed{42", "42") == pytest.approx(1.0)  # unclosed: no bonus


@pytest.mark.parametrize("text,held,boxed", [
    ("\\boxed{\\frac{1}{2}} done", "\\frac{1}{2}", True),
    ("\\boxed{{5}}", "{5}", True),
    ("#### 4\n\\boxed{a} b", "a", True),
    ("\\boxed{a} #### 4\nok", " 4\nok", False),
    ("\\boxed{a", None, None),
    ("plain", None, None),
])
def test_final_answer_marker(text, held, boxed):
    final = final_answer(text)
    if held is None:
        assert final is None
    else:
        assert (final.text, final.boxed) == (held, boxed)


# ---------------------------------------------------------------- several reward functions

SEVERAL = '''
def right_when_odd(text, answer):
    return float(len(text) % 2)

def always(text, answer):
    return 1.0

def never(text, answer):
    return 0.0

def score(text, answer):
    return 0.25

def answer_is_one(text, answer):
    return float(answer == "1")
'''


@pytest.fixture
def several(tmp_path):
    path = tmp_path / "several.py"
    path.write_text(SEVERAL)
    return lambda *names: [f"{path}:{name}" for name in names]


def test_weighted_sum_and_each_score(several):
    from mlx_tokenrl.rewards import load_reward_fns

    rewards = load_reward_fns(several("right_when_odd", "always", "score"), [2.0, 0.5, -4.0])
    assert rewards.names == ("right_when_odd", "always", "score")
    assert rewards.scores("abc", "1") == {"right_when_odd": 1.0, "always": 1.0, "score": 0.25}
    assert rewards("abc", "1") == pytest.approx(2 * 1 + 0.5 * 1 - 4 * 0.25)
    assert rewards("ab", "1") == pytest.approx(0 + 0.5 - 1)
    assert load_reward_fns(several("always", "score"))("x", "1") == pytest.approx(1.25)  # weights 1


def test_solved_is_the_first_functions_full_reward(several):
    """A weighted total says nothing about correctness: 0.5 * right + 1 * always is >= 1 for
    every completion, 2 * never + ... is < 1 for right ones."""
    from mlx_tokenrl.rewards import load_reward_fns

    rewards = load_reward_fns(several("right_when_odd", "always"), [0.5, 1.0])
    for text, solved in [("abc", True), ("ab", False)]:
        scores = rewards.scores(text, "1")
        assert rewards.total(scores) >= 1.0 and rewards.solved(scores) is solved
    small = load_reward_fns(several("right_when_odd", "never"), [0.1, 1.0])
    assert small.solved(small.scores("abc", "1")) and small("abc", "1") < 1.0


def test_names_are_made_distinct_and_weights_counted(several, tmp_path):
    from mlx_tokenrl.rewards import load_reward_fns, with_format_bonus

    other = tmp_path / "other.py"
    other.write_text("def score(text, answer):\n    return 0.0\n")
    assert load_reward_fns(several("score") + [f"{other}:score"]).names == ("score", "score_2")
    with pytest.raises(ValueError, match=r"--reward-weights has 3 weight\(s\) for 2 --reward-fn"):
        load_reward_fns(several("always", "never"), [1.0, 2.0, 3.0])
    bonus = with_format_bonus(numeric_reward, 0.1)
    assert bonus.names == ("correct", "format") and bonus.weights == (1.0, 0.1)
    assert with_format_bonus(load_reward_fns(several("always")), 0.5).names == ("always", "format")


def test_config_takes_lists_from_yaml_and_text(several):
    from mlx_tokenrl.config import ConfigError, config_from_dict

    cfg = config_from_dict({"reward-fn": several("always", "never"), "reward-weights": [1, 0.1]})
    assert cfg.reward_weights == [1.0, 0.1] and len(cfg.reward_fn) == 2
    assert config_from_dict({"reward_weights": "1, 0.1"}).reward_weights == [1.0, 0.1]
    assert config_from_dict({"reward_fn": "a.py:score"}).reward_fn == ["a.py:score"]  # old runs
    with pytest.raises(ConfigError, match="--reward-weights: expected a finite number, not 'inf'"):
        config_from_dict({"reward_weights": [1, "inf"]})


def test_training_logs_each_function_and_solves_by_the_first(tiny_model_dir, dense_files,
                                                             several, tmp_path):
    import json

    from mlx_tokenrl.config import TrainConfig
    from mlx_tokenrl.trainer import train

    cfg = TrainConfig(task="custom", data=str(dense_files / "data.jsonl"), model=str(tiny_model_dir),
                      reward_fn=several("right_when_odd", "always"), reward_weights=[0.5, 1.0],
                      steps=2, prompts_per_step=2, group_size=4, max_new_tokens=12,
                      temperature=1.0, algo="grpo", out=str(tmp_path / "run"))
    steps = [json.loads(line) for line in open(train(cfg) / "metrics.jsonl")]
    for m in steps:
        right = m["reward/right_when_odd"]
        assert m["reward/always"] == 1.0 and 0 < right < 1, m
        assert m["reward_mean"] == pytest.approx(0.5 * right + 1.0)
        assert m["solve_rate"] == pytest.approx(right)  # every total is >= 1; only odd ones solve


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from mlx_tokenrl.models import load_model

    return load_model(str(tiny_model_dir))


@pytest.mark.parametrize("names, weights, replays", [
    (("never", "always"), [1.0, 1.0], False),  # every total is 1, nothing is solved
    (("always", "never"), [0.5, 1.0], True),  # every total is 0.5, everything is solved
])
def test_replay_cuts_only_what_the_first_function_solved(tiny, several, names, weights, replays):
    from mlx_tokenrl.config import TrainConfig
    from mlx_tokenrl.rewards import load_reward_fns
    from mlx_tokenrl.tasks import Example, Task
    from mlx_tokenrl.trainer import rollout_and_select

    model, tokenizer = tiny
    examples = [Example("what is 2 times 3?", "6"), Example("say something", "x")]
    task = Task("toy", examples, [], load_reward_fns(several(*names), weights))
    cfg = TrainConfig(algo="t-spmo", group_size=4, max_new_tokens=8, temperature=1.0,
                      tspmo_replay=2, prompts_per_step=2)
    stats = rollout_and_select(model, tokenizer, task, cfg, 0, examples, [0, 1]).stats
    assert stats["replay_groups"] == (2 if replays else 0)
    assert stats["solved"] == (8 if replays else 0)


def test_eval_counts_correct_by_the_first_function(tiny, several):
    from mlx_tokenrl.evaluate import evaluate
    from mlx_tokenrl.rewards import load_reward_fns
    from mlx_tokenrl.tasks import Example, Task

    model, tokenizer = tiny
    examples = [Example(f"what is {i} times 3?", str(i % 2)) for i in range(4)]
    # Every total is at least 1; only the answers "1" are correct.
    task = Task("toy", [], examples, load_reward_fns(several("answer_is_one", "always"), [0.5, 1.0]))
    summary, records = evaluate(model, tokenizer, task, examples, max_new_tokens=3)
    assert [r["correct"] for r in records] == [False, True, False, True]
    assert summary["accuracy"] == 0.5


FAILING = """
def always(completion, answer):
    return 1 / 0


def off_answer(completion, answer):  # fine on the answer itself, fails on anything else
    if completion == str(answer):
        return 1.0
    raise KeyError("no such field in " + completion[:10])


def verdict(completion, answer):
    return "yes"


def undefined(completion, answer):
    return float("nan")


def boolean(completion, answer):
    return completion == answer
"""


@pytest.fixture
def failing(tmp_path):
    path = tmp_path / "failing.py"
    path.write_text(FAILING)
    return lambda name: f"{path}:{name}"


def test_a_failing_reward_function_is_named_with_its_error(failing):
    from mlx_tokenrl.rewards import RewardFunctionError

    with pytest.raises(RewardFunctionError) as info:
        load_reward_fn(failing("always"))("x", "1")
    assert str(info.value) == (f"--reward-fn {failing('always')} raised ZeroDivisionError "
                               f"(division by zero) on completion 'x', answer '1'")
    assert isinstance(info.value.__cause__, ZeroDivisionError)  # the user's traceback
    for name, value in (("verdict", "'yes'"), ("undefined", "nan")):
        with pytest.raises(RewardFunctionError, match=f"returned {value}, not a finite number, on "
                                                      f"completion 'x', answer '1'"):
            load_reward_fn(failing(name))("x", "1")
    assert load_reward_fn(failing("boolean"))("1", "1") == 1.0


@pytest.fixture
def sums(tmp_path):
    path = tmp_path / "sums.jsonl"
    path.write_text("".join(f'{{"prompt": "What is {i} plus 1?", "answer": "{i + 1}"}}\n'
                            for i in range(4)))
    return str(path)


def test_a_reward_function_that_fails_on_any_input_stops_the_task_loading(failing, sums):
    from mlx_tokenrl.rewards import RewardFunctionError
    from mlx_tokenrl.tasks import load_task

    for name in ("always", "verdict"):
        with pytest.raises(RewardFunctionError, match=f"--reward-fn {failing(name)}") as info:
            load_task("custom", data=sums, reward_fn=[failing("off_answer"), failing(name)])
        assert "on completion '1', answer '1': tried before the model loads" in str(info.value)
    load_task("custom", data=sums, reward_fn=failing("off_answer"))


def test_a_reward_function_failing_in_training_is_the_users_error(failing, sums, tiny_model_dir,
                                                                   tmp_path):
    from typer.testing import CliRunner

    from tokenrl_cli.main import app

    result = CliRunner().invoke(app, [
        "train", "custom", "--data", sums, "--reward-fn", failing("off_answer"), "--model",
        str(tiny_model_dir), "--steps", "1", "--prompts-per-step", "2", "--group-size", "2",
        "--max-new-tokens", "4", "--out", str(tmp_path / "run")])
    assert result.exit_code == 1
    assert 'raise KeyError("no such field in "' in result.stderr  # where in their function
    assert (f"error: --reward-fn {failing('off_answer')} raised KeyError ('no such field in"
            in " ".join(result.stderr.split()))
    assert "a problem in your reward function" in result.stderr
    assert "internal error" not in result.stderr
