import fnmatch
import hashlib
import json
import sys
import types
from pathlib import Path

import pytest

from mlx_tokenrl.rewards import exact_match_reward, numeric_reward
from mlx_tokenrl.tasks import INSTRUCTION, Example, TaskError, format_prompt, load_task

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def write_json(path: Path, records) -> Path:
    path.write_text(json.dumps(records, indent=2))
    return path


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def svamp_rec(body="Tom has 3 apples.", question="He eats 1. How many are left?", answer="2"):
    return {"Body": body, "Question": question, "Answer": answer}


def gsm8k_rec(question="What is 500 + 500?", answer="500 + 500 = 1,000\n#### 1,000"):
    return {"question": question, "answer": answer}


# ---------------------------------------------------------------- real shared data


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "svamp" / "train.json").is_file():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


def test_svamp_real_data(shared_data):
    task = load_task("svamp", data=str(shared_data / "svamp"))
    assert (len(task.train), len(task.test)) == (700, 300)
    first = task.train[0]
    assert first.answer == "145"
    assert first.question.startswith("There are 87 oranges and 290 bananas")
    assert first.question.endswith("groups How big is each group of bananas?")
    assert task.test[0].answer == "27"
    assert task.reward is numeric_reward
    assert task.reward("... #### 145", first.answer) == 1.0


def test_gsm8k_real_data(shared_data):
    task = load_task("gsm8k", data=str(shared_data / "gsm8k"))
    assert (len(task.train), len(task.test)) == (7473, 1319)
    assert task.train[0].answer == "72"
    assert task.train[0].question.startswith("Natalia sold clips")


# ---------------------------------------------------------------- svamp / gsm8k from tmp files


def test_svamp_dir_json(tmp_path):
    write_json(tmp_path / "train.json", [svamp_rec(), svamp_rec(answer=5.0)])
    write_json(tmp_path / "test.json", [svamp_rec(body="  A  b\n c. ", question=" Q? ", answer=7)])
    task = load_task("svamp", data=str(tmp_path))
    assert task.name == "svamp"
    assert task.train[0] == Example("Tom has 3 apples. He eats 1. How many are left?", "2")
    assert task.train[1].answer == "5"
    assert task.test == [Example("A b c. Q?", "7")]
    assert task.split("train") is task.train and task.split("test") is task.test


def test_svamp_dir_jsonl(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [svamp_rec()])
    write_jsonl(tmp_path / "test.jsonl", [svamp_rec(answer="1,000")])
    task = load_task("svamp", data=str(tmp_path))
    assert task.test[0].answer == "1000"


def test_single_file_is_used_for_both_splits(tmp_path):
    path = write_json(tmp_path / "svamp.json", [svamp_rec(), svamp_rec(answer="3")])
    task = load_task("svamp", data=str(path))
    assert task.train == task.test and len(task.train) == 2


def test_gsm8k_local(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [gsm8k_rec(), gsm8k_rec(answer="#### 1 #### -4")])
    write_jsonl(tmp_path / "test.jsonl", [gsm8k_rec(answer="2.5 * 2 = 5\n#### 5")])
    task = load_task("gsm8k", data=str(tmp_path))
    assert [e.answer for e in task.train] == ["1000", "-4"]
    assert task.test == [Example("What is 500 + 500?", "5")]
    assert task.reward is numeric_reward


def fake_datasets(monkeypatch, load_dataset):
    fake = types.ModuleType("datasets")
    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)


def never(*args, **kwargs):
    raise AssertionError("must not be called")


@pytest.fixture
def hub_answers(monkeypatch):
    """The probe finds the hub reachable (nothing is sent), so datasets is asked."""
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("mlx_tokenrl.tasks.unreachable_reason", lambda: None)


def test_hub_failure_is_one_line(monkeypatch, hub_answers):
    def load_dataset(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'openai/gsm8k'\non the Hub (LocalEntryNotFoundError)")

    fake_datasets(monkeypatch, load_dataset)
    with pytest.raises(TaskError) as info:
        load_task("gsm8k")
    msg = str(info.value)
    assert "\n" not in msg
    assert "hub" in msg.lower() and "--data PATH" in msg


def test_hub_rows_are_validated(monkeypatch, hub_answers):
    fake_datasets(monkeypatch, lambda repo, config=None: {
        "train": [gsm8k_rec()], "test": [gsm8k_rec(answer="so 5")]})
    with pytest.raises(TaskError, match=r"openai/gsm8k test row 0: field 'answer' has no '####'"):
        load_task("gsm8k")


@pytest.mark.parametrize("task, repo", [(dict(name="gsm8k"), "openai/gsm8k"),
                                        (dict(name="custom", hf_dataset="me/sums"), "me/sums")])
def test_unreachable_hub_fails_before_datasets(monkeypatch, task, repo):
    # datasets would retry for ~25 s; the probe's verdict ends it at once.
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("mlx_tokenrl.tasks.unreachable_reason",
                        lambda: "cannot reach the Hugging Face hub at http://x (refused)")
    fake_datasets(monkeypatch, never)
    with pytest.raises(TaskError) as info:
        load_task(**task)
    msg = str(info.value)
    assert msg.startswith(f"could not load '{repo}' (cannot reach the Hugging Face hub at http://x")
    assert "--data PATH" in msg and "HF_HUB_OFFLINE=1" in msg and "\n" not in msg


def test_offline_gsm8k_reads_the_datasets_cache(monkeypatch):
    # Offline, datasets makes no requests (so no retries): it may still have a cached copy.
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("mlx_tokenrl.tasks.unreachable_reason", never)
    fake_datasets(monkeypatch, lambda repo, config=None: {"train": [gsm8k_rec()], "test": [gsm8k_rec()]})
    task = load_task("gsm8k")
    assert task.train[0].answer == task.test[0].answer == "1000"


BUNDLED_SVAMP = Path(__file__).resolve().parents[1] / "mlx_tokenrl" / "data" / "svamp"


def test_svamp_without_data_is_bundled_and_never_asks_the_hub(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("mlx_tokenrl.tasks.unreachable_reason", never)
    fake_datasets(monkeypatch, never)
    task = load_task("svamp")
    assert (len(task.train), len(task.test)) == (700, 300)
    assert task.train[0].answer == "145" and task.test[0].answer == "27"
    assert task.train[0].question.startswith("There are 87 oranges and 290 bananas")
    assert not {e.question for e in task.train} & {e.question for e in task.test}


def test_bundled_svamp_is_the_documented_split():
    # sha256 of ChilleD/SVAMP's split as recovered in /work/shared/data/README.md.
    expected = {"train.json": "4ea164c631c9492016907e001da83fd58a17e4749ccc5f95d04cd4db75288ee0",
                "test.json": "e71a2f47774bf4e2380b844b88cb721a1e83a67ae9d38389ae40a475198da6f8"}
    for name, digest in expected.items():
        assert hashlib.sha256((BUNDLED_SVAMP / name).read_bytes()).hexdigest() == digest
    notice = (BUNDLED_SVAMP / "NOTICE.md").read_text()
    assert "Copyright (c) 2021 Arkil Patel" in notice and "MIT License" in notice


def test_pyproject_ships_the_bundled_data():
    # `pip install .` (not only -e) must carry the files: they are package data of their own
    # package. (`pip wheel . --no-deps` lists them; too slow to build here.)
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((BUNDLED_SVAMP.parents[2] / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "mlx_tokenrl.data.svamp" in config["packages"]
    patterns = config["package-data"]["mlx_tokenrl.data.svamp"]
    for path in BUNDLED_SVAMP.iterdir():
        if path.is_file():
            assert any(fnmatch.fnmatch(path.name, p) for p in patterns), path.name


# ---------------------------------------------------------------- jsonl


def test_jsonl_numeric(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"prompt": "1+1?", "answer": "2"},
                                                 {"prompt": "half of 1?", "answer": 0.5}])
    task = load_task("jsonl", data=str(path))
    assert [e.answer for e in task.train] == ["2", "0.5"]
    assert task.reward is numeric_reward


def test_jsonl_text_answers_use_exact_match(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": "Capital of France?", "answer": "Paris"}])
    write_jsonl(tmp_path / "test.jsonl", [{"prompt": "2+2?", "answer": "4"}])
    task = load_task("jsonl", data=str(tmp_path))
    assert task.reward is exact_match_reward
    assert task.reward("#### paris", task.train[0].answer) == 1.0


def test_jsonl_custom_reward(tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", [{"prompt": "say hi", "answer": "hi"}])
    module = tmp_path / "my_rewards.py"
    module.write_text("def score(completion, answer):\n    return 0.25\n")
    task = load_task("jsonl", data=str(data), reward_fn=f"{module}:score")
    assert task.reward("anything", "hi") == 0.25


def test_bad_reward_fn_is_task_error(tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", [{"prompt": "say hi", "answer": "hi"}])
    with pytest.raises(TaskError, match="nope_module:score"):
        load_task("jsonl", data=str(data), reward_fn="nope_module:score")


def test_jsonl_needs_data():
    with pytest.raises(TaskError, match="--data"):
        load_task("jsonl")


# ---------------------------------------------------------------- bad data


JSONL_BAD = [
    # (task, lines, line number, expected text)
    ("jsonl", ['{"prompt": "a", "answer": "1"}', '{"prompt": "b"}'], 2, "missing field 'answer'"),
    ("jsonl", ['{"prompt": "a", "answer": "1"}', "", '{"answer": "1"}'], 3, "missing field 'prompt'"),
    ("jsonl", ['{"prompt": "a", "answer": "1"}', '{"prompt": "a", "answer": 1'], 2, "bad JSON"),
    ("jsonl", ['[1, 2]'], 1, "expected a JSON object"),
    ("jsonl", ['{"prompt": "  ", "answer": "1"}'], 1, "'prompt' is empty"),
    ("jsonl", ['{"prompt": "a", "answer": true}'], 1, "'answer' must be"),
    ("gsm8k", [json.dumps(gsm8k_rec()), json.dumps(gsm8k_rec(answer="it is 5"))], 2, "'####'"),
    ("gsm8k", [json.dumps(gsm8k_rec()), json.dumps(gsm8k_rec(answer="#### five"))], 2, "non-numeric answer"),
    ("gsm8k", [json.dumps({"answer": "#### 1"})], 1, "missing field 'question'"),
    ("svamp", [json.dumps(svamp_rec()), json.dumps(svamp_rec(answer="many"))], 2, "non-numeric answer"),
    ("svamp", [json.dumps({"Body": "b", "Answer": "1"})], 1, "missing field 'Question'"),
]


@pytest.mark.parametrize("task,lines,lineno,what", JSONL_BAD)
def test_bad_jsonl_names_file_and_line(tmp_path, task, lines, lineno, what):
    path = tmp_path / "bad_data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(TaskError) as info:
        load_task(task, data=str(path))
    msg = str(info.value)
    assert "bad_data.jsonl" in msg
    assert f"line {lineno}" in msg
    assert what in msg


JSON_ARRAY_BAD = [
    # (task, records, record index, expected text)
    ("svamp", [svamp_rec(), svamp_rec(), {"Body": "b", "Question": "q"}], 2, "missing field 'Answer'"),
    ("svamp", [svamp_rec(answer="seven")], 0, "non-numeric answer"),
    ("svamp", [svamp_rec(), "not an object"], 1, "expected a JSON object"),
    ("svamp", [svamp_rec(body=3)], 0, "'Body' must be str"),
    ("jsonl", [{"prompt": "a", "answer": "1"}, {"prompt": "b"}], 1, "missing field 'answer'"),
    # numbers no completion can match (json writes NaN and Infinity, and reads them back)
    ("svamp", [svamp_rec(), svamp_rec(answer=float("nan"))], 1, "'Answer' holds nan, not a finite"),
    ("svamp", [svamp_rec(answer=float("inf"))], 0, "'Answer' holds inf, not a finite number"),
    ("svamp", [svamp_rec(answer=-float("inf"))], 0, "'Answer' holds -inf, not a finite number"),
    ("svamp", [svamp_rec(answer=10 ** 400)], 0, "'Answer' holds '10000000000000000000...'"),
    ("svamp", [svamp_rec(answer="9" * 400)], 0, "not a finite number"),
    ("gsm8k", [gsm8k_rec(answer="#### " + "9" * 400)], 0, "'answer' holds"),
    ("jsonl", [{"prompt": "a", "answer": float("nan")}], 0, "'answer' holds nan"),
    ("jsonl", [{"prompt": "a", "answer": float("inf")}], 0, "'answer' holds inf"),
    # a SVAMP problem without its story or without its question
    ("svamp", [svamp_rec(question="")], 0, "field 'Question' is empty"),
    ("svamp", [svamp_rec(body=" \n")], 0, "field 'Body' is empty"),
]


@pytest.mark.parametrize("task,records,index,what", JSON_ARRAY_BAD)
def test_bad_json_array_names_file_and_record(tmp_path, task, records, index, what):
    path = write_json(tmp_path / "bad_array.json", records)
    with pytest.raises(TaskError) as info:
        load_task(task, data=str(path))
    msg = str(info.value)
    assert "bad_array.json" in msg
    assert f"record {index}" in msg
    assert what in msg


def test_broken_json_array_names_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"Body": "a", "Question": "b", "Answer": "1"},\n  {"Body": oops}\n]\n')
    with pytest.raises(TaskError) as info:
        load_task("svamp", data=str(path))
    assert "broken.json" in str(info.value) and "line 3" in str(info.value)
    assert "bad JSON" in str(info.value)


@pytest.mark.parametrize("name,content,what", [
    ("empty.jsonl", "", "empty"),
    ("empty.jsonl", "  \n\n", "empty"),
    ("empty.json", "", "empty"),
    ("empty.json", "[]", "no records"),
])
def test_empty_file(tmp_path, name, content, what):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(TaskError) as info:
        load_task("jsonl", data=str(path))
    assert name in str(info.value) and what in str(info.value)


def test_error_in_test_split_names_test_file(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [svamp_rec()])
    write_jsonl(tmp_path / "test.jsonl", [svamp_rec(), svamp_rec(), svamp_rec(answer="?")])
    with pytest.raises(TaskError) as info:
        load_task("svamp", data=str(tmp_path))
    assert "test.jsonl" in str(info.value) and "line 3" in str(info.value)


def test_missing_path(tmp_path):
    with pytest.raises(TaskError, match="no such file"):
        load_task("svamp", data=str(tmp_path / "nowhere"))


def test_dir_without_split_file(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [svamp_rec()])
    with pytest.raises(TaskError, match="test.jsonl"):
        load_task("svamp", data=str(tmp_path))


def test_unknown_task_lists_known():
    """jsonl, custom's older name, still loads (test_jsonl_*) but is not offered."""
    with pytest.raises(TaskError) as info:
        load_task("mnist")
    assert str(info.value) == "unknown task 'mnist'; known tasks: svamp, gsm8k, multiply, custom"


def test_bad_split_name():
    task = load_task("multiply", digits="1x1")
    with pytest.raises(TaskError, match="valid"):
        task.split("valid")


# ---------------------------------------------------------------- multiply


def pairs(examples):
    out = []
    for e in examples:
        words = e.question.removesuffix("?").split()
        out.append((int(words[2]), int(words[4])))
    return out


def test_multiply_default():
    task = load_task("multiply", train_size=300, test_size=50)
    assert (len(task.train), len(task.test)) == (300, 50)
    train, test = pairs(task.train), pairs(task.test)
    assert not set(train) & set(test)
    assert len(set(train)) == 300 and len(set(test)) == 50
    for (a, b), ex in zip(train + test, task.train + task.test):
        assert 100 <= a <= 999 and 100 <= b <= 999
        assert ex.answer == str(a * b)
        assert ex.question == f"What is {a} times {b}?"
    assert task.reward is numeric_reward


def test_multiply_digit_counts():
    task = load_task("multiply", digits="2x1", train_size=100, test_size=20)
    for a, b in pairs(task.train + task.test):
        assert 10 <= a <= 99 and 1 <= b <= 9


def test_multiply_deterministic():
    one = load_task("multiply", seed=3, train_size=50, test_size=10)
    two = load_task("multiply", seed=3, train_size=50, test_size=10)
    other = load_task("multiply", seed=4, train_size=50, test_size=10)
    assert one.train == two.train and one.test == two.test
    assert one.train != other.train


def test_multiply_test_set_independent_of_train_size():
    small = load_task("multiply", seed=1, train_size=10, test_size=20)
    big = load_task("multiply", seed=1, train_size=1000, test_size=20)
    assert small.test == big.test


def test_multiply_1x1_caps_and_never_overlaps():
    task = load_task("multiply", digits="1x1")
    train, test = pairs(task.train), pairs(task.test)
    assert len(train) + len(test) == 81
    assert 0 < len(test) < len(train)
    assert not set(train) & set(test)
    assert len(set(train)) == len(train) and len(set(test)) == len(test)


def test_multiply_1x1_small_request():
    task = load_task("multiply", digits="1x1", train_size=20, test_size=5)
    assert (len(task.train), len(task.test)) == (20, 5)
    assert not set(pairs(task.train)) & set(pairs(task.test))


@pytest.mark.parametrize("digits", ["3", "x3", "3x", "0x2", "axb", "3x3x3", "", "-1x2"])
def test_multiply_bad_digits(digits):
    with pytest.raises(TaskError, match="digits"):
        load_task("multiply", digits=digits)


# ---------------------------------------------------------------- prompts


class ChatTokenizer:
    chat_template = "{{ messages }}"

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=True):
        assert add_generation_prompt is True and tokenize is False
        return "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages) + "<assistant>"


class PlainTokenizer:
    chat_template = None

    def apply_chat_template(self, *args, **kwargs):
        raise AssertionError("must not be called without a chat template")


def test_format_prompt_chat_template():
    prompt = format_prompt(ChatTokenizer(), "What is 2 times 3?")
    assert prompt == f"<user>What is 2 times 3?\n{INSTRUCTION}</user><assistant>"


def test_format_prompt_plain():
    expected = f"Question: What is 2 times 3?\n{INSTRUCTION}\nAnswer:"
    assert format_prompt(PlainTokenizer(), "What is 2 times 3?") == expected
    assert format_prompt(object(), "What is 2 times 3?") == expected


def test_format_prompt_custom_instruction():
    assert format_prompt(object(), "Q", instruction="Be brief.") == "Question: Q\nBe brief.\nAnswer:"


# ---------------------------------------------------------------- custom: any fields, Parquet, any hub dataset


def write_parquet(path: Path, records) -> Path:
    import pyarrow
    import pyarrow.parquet

    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(records), path)
    return path


MAPPED = [{"problem": "What is 500 + 500?", "solution": "500 + 500 = 1,000\n#### 1,000", "id": 1},
          {"problem": "Half of 3?", "solution": "1.5", "id": 2},
          {"problem": "Half of 8?", "solution": "4", "id": 3}]


@pytest.mark.parametrize("write, name", [(write_jsonl, "data.jsonl"), (write_json, "data.json"),
                                         (write_parquet, "data.parquet")])
def test_custom_reads_mapped_fields_from_every_file_kind(tmp_path, write, name):
    path = write(tmp_path / name, MAPPED)
    task = load_task("custom", data=str(path), question_field="problem", answer_field="solution")
    # '#### N' solutions give N (as gsm8k's do), numbers their canonical text
    assert task.train == task.test == [Example("What is 500 + 500?", "1000"),
                                       Example("Half of 3?", "1.5"), Example("Half of 8?", "4")]
    assert task.reward is numeric_reward


def test_custom_numeric_answer_column(tmp_path):
    path = write_parquet(tmp_path / "svamp.parquet", [{"q": "87 oranges in 3 groups?", "n": 29.0},
                                                      {"q": "2 and 3?", "n": 5.5}])
    task = load_task("custom", data=str(path), question_field="q", answer_field="n")
    assert [e.answer for e in task.train] == ["29", "5.5"] and task.reward is numeric_reward


def test_custom_text_answers_use_exact_match(tmp_path):
    path = write_parquet(tmp_path / "capitals.parquet", [{"q": "Capital of France?", "a": "Paris"}])
    task = load_task("custom", data=str(path), question_field="q", answer_field="a")
    assert task.reward is exact_match_reward
    assert task.reward("#### Paris", task.train[0].answer) == 1.0


def test_custom_directory_with_named_splits(tmp_path):
    write_parquet(tmp_path / "dev.parquet", MAPPED[:1])
    write_jsonl(tmp_path / "heldout.jsonl", MAPPED[1:])
    task = load_task("custom", data=str(tmp_path), question_field="problem",
                     answer_field="solution", train_split="dev", test_split="heldout")
    assert [e.answer for e in task.train] == ["1000"]
    assert [e.answer for e in task.test] == ["1.5", "4"]
    with pytest.raises(TaskError, match=r"no train\.jsonl or train\.json or train\.parquet"):
        load_task("custom", data=str(tmp_path), question_field="problem", answer_field="solution")


@pytest.mark.parametrize("write, name, where", [
    (write_jsonl, "data.jsonl", "data.jsonl, line 2"),
    (write_json, "data.json", "data.json, record 1 (0-based)"),
    (write_parquet, "data.parquet", "data.parquet, row 1 (0-based)"),
])
def test_missing_field_names_the_record_and_the_fields_it_has(tmp_path, write, name, where):
    # (null is missing too: Parquet has a column for every field, empty where a record lacks it)
    records = [{"problem": "a", "answer": "1", "solution": None, "id": 0},
               {"problem": "b", "answer": None, "solution": "2", "id": 1}]
    path = write(tmp_path / name, records)
    with pytest.raises(TaskError) as info:
        load_task("custom", data=str(path), question_field="problem", answer_field="answer")
    assert str(info.value) == (f"{tmp_path / where}: missing field 'answer' (fields there: "
                               f"'problem', 'solution', 'id')")


def test_a_broken_parquet_file_is_one_line(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1 this is not really parquet")
    with pytest.raises(TaskError) as info:
        load_task("custom", data=str(path))
    assert str(info.value).startswith(f"{path}: not a readable Parquet file (")
    assert "\n" not in str(info.value)


def test_custom_from_the_hub_with_config_fields_and_splits(monkeypatch, hub_answers):
    asked = []

    def load_dataset(repo, config=None):
        asked.append((repo, config))
        return {"train": MAPPED[:2], "validation": MAPPED[2:]}

    fake_datasets(monkeypatch, load_dataset)
    task = load_task("custom", hf_dataset="me/sums", hf_config="main", question_field="problem",
                     answer_field="solution", test_split="validation")
    assert asked == [("me/sums", "main")]
    assert [e.answer for e in task.train] == ["1000", "1.5"] and task.test == [Example("Half of 8?", "4")]
    with pytest.raises(TaskError) as info:
        load_task("custom", hf_dataset="me/sums", question_field="problem", answer_field="solution")
    assert str(info.value) == ("me/sums has no split 'test' (it has: train, validation); name "
                               "them with --train-split and --test-split")
    with pytest.raises(TaskError) as info:
        load_task("custom", hf_dataset="me/sums", test_split="validation")
    assert str(info.value) == ("me/sums train row 0: missing field 'prompt' (fields there: "
                               "'problem', 'solution', 'id')")


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="gsm8k", question_field="q"), "--question-field: only task custom reads it, not 'gsm8k'"),
    (dict(name="multiply", hf_dataset="a/b", test_split="dev"),
     "--hf-dataset, --test-split: only task custom reads it, not 'multiply'"),
    (dict(name="custom", data="x.jsonl", hf_dataset="a/b"), "pass --data or --hf-dataset, not both"),
    (dict(name="custom"), "task 'custom' needs data: pass --data PATH"),
])
def test_custom_settings_are_checked(kwargs, message):
    with pytest.raises(TaskError) as info:
        load_task(**kwargs)
    assert str(info.value).startswith(message)
