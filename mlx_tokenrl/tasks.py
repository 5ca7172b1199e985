"""Tasks: prompts plus a verifier, loaded and fully validated before any model work.

Built-in tasks:
  svamp     SVAMP (Body, Question, Answer). Local data or the bundled copy of ChilleD/SVAMP's
            700/300 split (mlx_tokenrl/data/svamp, MIT; see NOTICE.md there): never the hub.
  gsm8k     GSM8K (question, answer with '#### N'). Local data or the hub's openai/gsm8k
            (checked to be reachable first: one line at once, not huggingface_hub's retries).
  multiply  a times b, generated from `digits` ("3x3"), seeded, train/test disjoint.
  jsonl     your own data (prompt, answer); numeric reward if every answer is a number.

`data` is either a directory holding train/test files (`train.json` or `train.jsonl`, same for
test) or a single file, which is then used for BOTH splits (handy for quick runs; the test
accuracy is then measured on training data). Files may be JSON arrays or JSON Lines.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .hub import unreachable_reason
from .rewards import MARKER, exact_match_reward, load_reward_fn, numeric_reward, parse_number

INSTRUCTION = "Think step by step, then give the final answer as a single number after '####'."
SPLITS = ("train", "test")
SVAMP_DIR = Path(__file__).parent / "data" / "svamp"  # shipped as package data (pyproject.toml)

Reward = Callable[[str, str], float]
Record = tuple[str, dict]  # (where it came from, for error messages; the record)


class TaskError(ValueError):
    """Bad task name or bad task data; the message names the file, line/record and problem."""


@dataclass
class Example:
    question: str
    answer: str


@dataclass
class Task:
    name: str
    train: list[Example]
    test: list[Example]
    reward: Reward
    instruction: str = INSTRUCTION

    def split(self, name: str) -> list[Example]:
        """The examples of split "train" or "test"."""
        if name not in SPLITS:
            raise TaskError(f"unknown split {name!r}; expected one of {', '.join(SPLITS)}")
        return getattr(self, name)


def format_prompt(tokenizer: Any, question: str, instruction: str = INSTRUCTION) -> str:
    """The prompt text: the tokenizer's chat template if it has one, else a plain Q/A layout."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": f"{question}\n{instruction}"}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return f"Question: {question}\n{instruction}\nAnswer:"


# ---------------------------------------------------------------- reading and validating


def _read_records(path: Path) -> list[Record]:
    """Records of a JSON array or JSON Lines file, each tagged "<path>, line N" / "<path>, record I"."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise TaskError(f"{path}: not UTF-8 text ({exc})") from exc
    except OSError as exc:
        raise TaskError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    if not text.strip():
        raise TaskError(f"{path}: file is empty")
    # .json files holding JSON Lines are common, so only .jsonl is trusted without a look inside.
    is_array = path.suffix != ".jsonl" and text.lstrip().startswith("[")
    records = _parse_array(path, text) if is_array else _parse_lines(path, text)
    if not records:
        raise TaskError(f"{path}: file has no records")
    for where, record in records:
        if not isinstance(record, dict):
            raise TaskError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return records


def _parse_array(path: Path, text: str) -> list[tuple[str, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TaskError(f"{path}, line {exc.lineno}: bad JSON ({exc.msg})") from exc
    return [(f"{path}, record {i} (0-based)", record) for i, record in enumerate(data)]


def _parse_lines(path: Path, text: str) -> list[tuple[str, Any]]:
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {lineno}"
        try:
            records.append((where, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise TaskError(f"{where}: bad JSON ({exc.msg})") from exc
    return records


def _field(record: dict, name: str, where: str, types: tuple = (str,)) -> Any:
    value = record.get(name)
    if value is None:
        raise TaskError(f"{where}: missing field {name!r}")
    if not isinstance(value, types) or isinstance(value, bool):
        raise TaskError(f"{where}: field {name!r} must be {' or '.join(t.__name__ for t in types)}, "
                        f"got {type(value).__name__}")
    return value


def _text(value: str, name: str, where: str) -> str:
    text = " ".join(value.split())
    if not text:
        raise TaskError(f"{where}: field {name!r} is empty")
    return text


def _number_text(value: Any, name: str, where: str) -> str:
    """A numeric answer as canonical text ("1,000" -> "1000", 145.0 -> "145")."""
    number = parse_number(value) if isinstance(value, str) else float(value)
    if number is None:
        raise TaskError(f"{where}: non-numeric answer {value!r} in field {name!r}")
    if number.is_integer() and abs(number) < 2**53:
        return str(int(number))
    return repr(number)


def _split_paths(data: str, task: str) -> dict[str, Path]:
    path = Path(data).expanduser()
    if path.is_file():
        return {split: path for split in SPLITS}
    if not path.is_dir():
        raise TaskError(f"{path}: no such file or directory (data for task {task!r})")
    paths = {}
    for split in SPLITS:
        found = [path / f"{split}{ext}" for ext in (".jsonl", ".json") if (path / f"{split}{ext}").is_file()]
        if not found:
            raise TaskError(f"{path}: no {split}.jsonl or {split}.json (data for task {task!r})")
        paths[split] = found[0]
    return paths


def _local_records(data: str, task: str) -> dict[str, list[Record]]:
    return {split: _read_records(p) for split, p in _split_paths(data, task).items()}


def _hub_records(repo: str, config: str | None) -> dict[str, list[Record]]:
    from huggingface_hub import is_offline_mode

    # Offline, datasets sends nothing (it reads its cache or fails at once); online, a hub it
    # cannot reach costs ~25 s of retries, so the probe asks first.
    reason = None if is_offline_mode() else unreachable_reason()
    if reason is not None:
        raise TaskError(f"could not load {repo!r} ({reason}); pass --data PATH to use local files, "
                        f"or set HF_HUB_OFFLINE=1 to use a copy cached before")
    try:
        import datasets

        dataset = datasets.load_dataset(repo, config)
        return {split: [(f"{repo} {split} row {i}", dict(row)) for i, row in enumerate(dataset[split])]
                for split in SPLITS}
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [""])[0][:200]
        raise TaskError(f"could not load {repo!r} from the Hugging Face hub ({type(exc).__name__}: "
                        f"{reason}); pass --data PATH to use local files") from exc


def _records(data: str | None, task: str, repo: str, config: str | None = None) -> dict[str, list[Record]]:
    return _local_records(data, task) if data is not None else _hub_records(repo, config)


def _convert(records: dict[str, list[Record]], example: Callable[[dict, str], Example]) -> dict[str, list[Example]]:
    return {split: [example(rec, where) for where, rec in recs] for split, recs in records.items()}


# ---------------------------------------------------------------- one loader per task


def _svamp_example(rec: dict, where: str) -> Example:
    body = _field(rec, "Body", where)
    question = _field(rec, "Question", where)
    answer = _field(rec, "Answer", where, (str, int, float))
    return Example(_text(f"{body} {question}", "Body/Question", where), _number_text(answer, "Answer", where))


def _gsm8k_example(rec: dict, where: str) -> Example:
    question = _field(rec, "question", where)
    solution = _field(rec, "answer", where)
    _, marker, gold = solution.rpartition(MARKER)
    if not marker:
        raise TaskError(f"{where}: field 'answer' has no '{MARKER}' before the final answer")
    return Example(_text(question, "question", where), _number_text(gold, "answer", where))


def _jsonl_example(rec: dict, where: str) -> Example:
    prompt = _field(rec, "prompt", where)
    answer = _field(rec, "answer", where, (str, int, float))
    answer = answer.strip() if isinstance(answer, str) else _number_text(answer, "answer", where)
    if not answer:
        raise TaskError(f"{where}: field 'answer' is empty")
    if not prompt.strip():
        raise TaskError(f"{where}: field 'prompt' is empty")
    return Example(prompt.strip(), answer)  # user prompts keep their own line breaks


def _load_svamp(data: str | None, **_) -> Task:
    # SVAMP is small and MIT-licensed, so its split ships with the package: no hub needed.
    source = str(SVAMP_DIR) if data is None else data
    splits = _convert(_local_records(source, "svamp"), _svamp_example)
    return Task("svamp", splits["train"], splits["test"], numeric_reward)


def _load_gsm8k(data: str | None, **_) -> Task:
    splits = _convert(_records(data, "gsm8k", "openai/gsm8k", "main"), _gsm8k_example)
    return Task("gsm8k", splits["train"], splits["test"], numeric_reward)


def _load_jsonl(data: str | None, **_) -> Task:
    if data is None:
        raise TaskError("task 'jsonl' needs data: pass --data PATH (a .jsonl file or a directory "
                        "with train.jsonl and test.jsonl)")
    splits = _convert(_local_records(data, "jsonl"), _jsonl_example)
    answers = [ex.answer for split in splits.values() for ex in split]
    numeric = all(parse_number(a) is not None for a in answers)
    return Task("jsonl", splits["train"], splits["test"], numeric_reward if numeric else exact_match_reward)


def _parse_digits(digits: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*[xX\u00d7*]\s*(\d+)\s*", digits)
    if not match or not all(1 <= int(g) <= 30 for g in match.groups()):
        raise TaskError(f"bad digits {digits!r} for task 'multiply': expected AxB with 1 <= A, B <= 30, "
                        "e.g. '3x3' or '2x1'")
    return int(match[1]), int(match[2])


def _draw_distinct(rng: random.Random, n: int, k: int, taken: set[int]) -> list[int]:
    # Rejection sampling keeps the draw order prefix-stable, so the test set for a seed does not
    # depend on train_size, and it works for pair spaces too large for random.sample(range(n)).
    out: list[int] = []
    while len(out) < k:
        i = rng.randrange(n)
        if i not in taken:
            taken.add(i)
            out.append(i)
    return out


def _split_sizes(n_pairs: int, train_size: int, test_size: int) -> tuple[int, int]:
    if train_size + test_size <= n_pairs:
        return train_size, test_size
    # Not enough distinct pairs: a held-out quarter (a test set big enough to measure on),
    # the rest for training, never overlapping.
    n_test = min(test_size, max(1, n_pairs // 4)) if test_size else 0
    return min(train_size, n_pairs - n_test), n_test


def _load_multiply(digits: str = "3x3", seed: int = 0, train_size: int = 5000, test_size: int = 500,
                   **_) -> Task:
    da, db = _parse_digits(digits)
    a_lo, b_lo = 10 ** (da - 1), 10 ** (db - 1)
    n_b = 9 * b_lo
    n_pairs = 9 * a_lo * n_b
    n_train, n_test = _split_sizes(n_pairs, max(train_size, 0), max(test_size, 0))
    rng = random.Random(seed)
    taken: set[int] = set()
    test_idx = _draw_distinct(rng, n_pairs, n_test, taken)
    train_idx = _draw_distinct(rng, n_pairs, n_train, taken)

    def example(i: int) -> Example:
        a, b = a_lo + i // n_b, b_lo + i % n_b
        return Example(f"What is {a} times {b}?", str(a * b))

    return Task("multiply", [example(i) for i in train_idx], [example(i) for i in test_idx], numeric_reward)


LOADERS: dict[str, Callable[..., Task]] = {
    "svamp": _load_svamp,
    "gsm8k": _load_gsm8k,
    "multiply": _load_multiply,
    "jsonl": _load_jsonl,
}


def load_task(name: str, data: str | None = None, digits: str = "3x3", seed: int = 0,
              reward_fn: str | None = None, train_size: int = 5000, test_size: int = 500) -> Task:
    """Load and validate a task; raises TaskError on unknown names or bad data.

    train_size/test_size only apply to `multiply`; file/hub tasks keep every record.
    `reward_fn` ("module:function" or "file.py:function") replaces the task's reward.
    """
    loader = LOADERS.get(name.strip().lower())
    if loader is None:
        raise TaskError(f"unknown task {name!r}; known tasks: {', '.join(LOADERS)}")
    custom = None
    if reward_fn is not None:
        try:
            custom = load_reward_fn(reward_fn)
        except ValueError as exc:
            raise TaskError(str(exc)) from exc
    task = loader(data=data, digits=digits, seed=seed, train_size=train_size, test_size=test_size)
    if custom is not None:
        task.reward = custom
    return task
