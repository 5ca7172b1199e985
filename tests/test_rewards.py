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
    assert fn is numeric_reward


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
