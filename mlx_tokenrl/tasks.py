"""Tasks: prompts plus a verifier, loaded and fully validated before any model work.

Built-in tasks:
  svamp     SVAMP (Body, Question, Answer). Local data or the bundled copy of ChilleD/SVAMP's
            700/300 split (mlx_tokenrl/data/svamp, MIT; see NOTICE.md there): never the hub.
  gsm8k     GSM8K (question, answer with '#### N'). Local data or the hub's openai/gsm8k
            (checked to be reachable first: one line at once, not huggingface_hub's retries).
  multiply  a times b, generated from `digits` ("3x3"), seeded, train/test disjoint.
  custom    your own data: local files or any Hugging Face dataset, with the fields that hold
            question and answer (default prompt, answer); numeric reward if every answer is
            a number (or a '#### N' solution), else exact match. `jsonl` is its older name.

`data` is either a directory holding train/test files (`train.json`, `train.jsonl` or
`train.parquet`, same for test; `custom` can rename the splits) or a single file, which is
then used for BOTH splits (handy for quick runs; the test accuracy is then measured on
training data). Files may be JSON arrays, JSON Lines or Parquet.

The prompt is the question, then the task's instruction (or one given instead: a
`{question}` in it places the question), in the tokenizer's chat template after an optional
system prompt.
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .config import existing_dir, read_json_object
from .hub import unreachable_reason
from .messages import InputError, first_line
from .rewards import (MARKER, RewardFunctionError, exact_match_reward, load_reward_fns,
                      numeric_reward, parse_number)

INSTRUCTION = "Think step by step, then give the final answer as a single number after '####'."
QUESTION = "{question}"  # where an instruction that holds it places the question
SPLITS = ("train", "test")
SUFFIXES = (".jsonl", ".json", ".parquet")
SVAMP_DIR = Path(__file__).parent / "data" / "svamp"  # shipped as package data (pyproject.toml)

Reward = Callable[[str, str], float]
Record = tuple[str, dict]  # (where it came from, for error messages; the record)


class TaskError(InputError, ValueError):
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
    system_prompt: str | None = None

    def prompt(self, tokenizer: Any, question: str) -> str:
        """The prompt text for `question`, as training and evaluation ask it."""
        return format_prompt(tokenizer, question, self.instruction, self.system_prompt)

    def split(self, name: str) -> list[Example]:
        """The examples of split "train" or "test"."""
        if name not in SPLITS:
            raise TaskError(f"unknown split {name!r}; expected one of {', '.join(SPLITS)}")
        return getattr(self, name)


def user_message(question: str, instruction: str) -> str:
    """The user's turn: the question, then the instruction on a line of its own; an instruction
    holding {question} is the whole message, the question in its place (other braces stay)."""
    if QUESTION in instruction:
        return instruction.replace(QUESTION, question)
    return f"{question}\n{instruction}" if instruction else question


def format_prompt(tokenizer: Any, question: str, instruction: str = INSTRUCTION,
                  system_prompt: str | None = None) -> str:
    """The prompt text: the tokenizer's chat template if it has one, else a plain Q/A layout
    (the system prompt, if any, first)."""
    content = user_message(question, instruction)
    if getattr(tokenizer, "chat_template", None):
        system = [{"role": "system", "content": system_prompt}] if system_prompt else []
        try:
            return tokenizer.apply_chat_template(system + [{"role": "user", "content": content}],
                                                 add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # gemma's template, for one, raises on a system message
            if not system:
                raise
            raise TaskError(f"--system-prompt: the model's chat template refuses a system "
                            f"message ({type(exc).__name__}: {exc})") from None
    plain = f"Question: {content}\nAnswer:"
    return f"{system_prompt}\n\n{plain}" if system_prompt else plain


# ---------------------------------------------------------------- reading and validating


def _read_records(path: Path) -> list[Record]:
    """Records of a JSON array, JSON Lines or Parquet file, each tagged "<path>, line N" /
    "<path>, record I" / "<path>, row I"."""
    if path.suffix == ".parquet":
        return _parquet_records(path)
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


def _parquet_records(path: Path) -> list[Record]:
    import pyarrow  # installed with datasets
    import pyarrow.parquet

    try:
        rows = pyarrow.parquet.read_table(path).to_pylist()
    except (pyarrow.ArrowException, OSError) as exc:
        raise TaskError(f"{path}: not a readable Parquet file ({first_line(exc)})") from exc
    if not rows:
        raise TaskError(f"{path}: file has no records")
    return [(f"{path}, row {i} (0-based)", row) for i, row in enumerate(rows)]


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
        fields = ", ".join(repr(k) for k, v in record.items() if v is not None) or "none"
        raise TaskError(f"{where}: missing field {name!r} (fields there: {fields})")
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
    """A numeric answer as canonical text ("1,000" -> "1000", 145.0 -> "145"). NaN, infinities
    and numbers beyond float range (JSON reads NaN and Infinity) match no completion: bad data."""
    try:
        number = parse_number(value) if isinstance(value, str) else float(value)
    except OverflowError:  # an int too large for a float
        number = math.inf
    if number is None:
        raise TaskError(f"{where}: non-numeric answer {value!r} in field {name!r}")
    if not math.isfinite(number):
        shown = value if isinstance(value, float) or len(str(value)) <= 40 else f"{str(value)[:20]}..."
        raise TaskError(f"{where}: field {name!r} holds {shown!r}, not a finite number")
    if number.is_integer() and abs(number) < 2**53:
        return str(int(number))
    return repr(number)


def _split_paths(data: str, task: str, names: dict[str, str]) -> dict[str, Path]:
    """The file of each split: `data` itself, or NAME.jsonl/.json/.parquet in the directory
    `data` (NAME: the split's name there, `names[split]`)."""
    path = Path(data).expanduser()
    if one_file_for_both_splits(data):
        return {split: path for split in SPLITS}
    if not path.is_dir():
        raise TaskError(f"{path}: no such file or directory (data for task {task!r})")
    paths = {}
    for split in SPLITS:
        found = [path / f"{names[split]}{ext}" for ext in SUFFIXES if (path / f"{names[split]}{ext}").is_file()]
        if not found:
            raise TaskError(f"{path}: no {' or '.join(names[split] + ext for ext in SUFFIXES)} "
                            f"(data for task {task!r})")
        paths[split] = found[0]
    return paths


def _local_records(data: str, task: str, names: dict[str, str] | None = None) -> dict[str, list[Record]]:
    paths = _split_paths(data, task, names or dict(zip(SPLITS, SPLITS)))
    return {split: _read_records(p) for split, p in paths.items()}


def _hub_records(repo: str, config: str | None, names: dict[str, str] | None = None) -> dict[str, list[Record]]:
    names = names or dict(zip(SPLITS, SPLITS))
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
    except Exception as exc:
        raise TaskError(f"could not load {repo!r} from the Hugging Face hub ({type(exc).__name__}: "
                        f"{first_line(exc)}); pass --data PATH to use local files") from exc
    missing = [name for name in names.values() if name not in dataset]
    if missing:
        raise TaskError(f"{repo} has no split {missing[0]!r} (it has: {', '.join(dataset)}); "
                        f"name them with --train-split and --test-split")
    records = {split: [(f"{repo} {names[split]} row {i}", dict(row)) for i, row in enumerate(dataset[names[split]])]
               for split in SPLITS}
    empty = [names[split] for split in SPLITS if not records[split]]
    if empty:
        raise TaskError(f"{repo}: split {empty[0]!r} has no rows")
    return records


def _records(data: str | None, task: str, repo: str, config: str | None = None,
             names: dict[str, str] | None = None) -> dict[str, list[Record]]:
    return _local_records(data, task, names) if data is not None else _hub_records(repo, config, names)


def _convert(records: dict[str, list[Record]], example: Callable[[dict, str], Example]) -> dict[str, list[Example]]:
    return {split: [example(rec, where) for where, rec in recs] for split, recs in records.items()}


# ---------------------------------------------------------------- one loader per task


def _svamp_example(rec: dict, where: str) -> Example:
    body = _text(_field(rec, "Body", where), "Body", where)
    question = _text(_field(rec, "Question", where), "Question", where)
    answer = _field(rec, "Answer", where, (str, int, float))
    return Example(f"{body} {question}", _number_text(answer, "Answer", where))


def _solution_answer(solution: str, name: str, where: str) -> str:
    """The number after the last '####' of a GSM8K-style solution."""
    _, marker, gold = solution.rpartition(MARKER)
    if not marker:
        raise TaskError(f"{where}: field {name!r} has no '{MARKER}' before the final answer")
    return _number_text(gold, name, where)


def _gsm8k_example(rec: dict, where: str) -> Example:
    question = _field(rec, "question", where)
    solution = _field(rec, "answer", where)
    return Example(_text(question, "question", where), _solution_answer(solution, "answer", where))


def _custom_example(rec: dict, where: str, question_field: str, answer_field: str) -> Example:
    prompt = _field(rec, question_field, where)
    answer = _field(rec, answer_field, where, (str, int, float))
    if isinstance(answer, str) and MARKER in answer:
        answer = _solution_answer(answer, answer_field, where)
    else:
        answer = answer.strip() if isinstance(answer, str) else _number_text(answer, answer_field, where)
    if not answer:
        raise TaskError(f"{where}: field {answer_field!r} is empty")
    if not prompt.strip():
        raise TaskError(f"{where}: field {question_field!r} is empty")
    return Example(prompt.strip(), answer)  # user prompts keep their own line breaks


def _load_svamp(data: str | None, **_) -> Task:
    # SVAMP is small and MIT-licensed, so its split ships with the package: no hub needed.
    source = str(SVAMP_DIR) if data is None else data
    splits = _convert(_local_records(source, "svamp"), _svamp_example)
    return Task("svamp", splits["train"], splits["test"], numeric_reward)


def _load_gsm8k(data: str | None, **_) -> Task:
    splits = _convert(_records(data, "gsm8k", "openai/gsm8k", "main"), _gsm8k_example)
    return Task("gsm8k", splits["train"], splits["test"], numeric_reward)


def _load_custom(data: str | None, hf_dataset: str | None = None, hf_config: str | None = None,
                 question_field: str | None = None, answer_field: str | None = None,
                 train_split: str = "train", test_split: str = "test", name: str = "custom",
                 **_) -> Task:
    if data is None and hf_dataset is None:
        raise TaskError(f"task {name!r} needs data: pass --data PATH (a .jsonl, .json or .parquet "
                        f"file, or a directory with train and test files) or --hf-dataset NAME")
    names = {"train": train_split, "test": test_split}
    records = (_local_records(data, name, names) if data is not None
               else _hub_records(hf_dataset, hf_config, names))
    fields = (question_field or "prompt", answer_field or "answer")
    splits = _convert(records, lambda rec, where: _custom_example(rec, where, *fields))
    answers = [ex.answer for split in splits.values() for ex in split]
    numeric = all(parse_number(a) is not None for a in answers)
    return Task(name, splits["train"], splits["test"], numeric_reward if numeric else exact_match_reward)


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
    "custom": _load_custom,
}
OLD_NAMES = {"jsonl": "custom"}  # still accepted, no longer listed


def task_loader(name: str) -> Callable[..., Task] | None:
    key = name.strip().lower()
    return LOADERS.get(OLD_NAMES.get(key, key))


def check_task_name(name: str):
    if task_loader(name) is None:
        raise TaskError(f"unknown task {name!r}; known tasks: {', '.join(LOADERS)}")


CUSTOM_ONLY = ("hf_dataset", "hf_config", "question_field", "answer_field", "train_split", "test_split")
SPLIT_DEFAULTS = {"train_split": "train", "test_split": "test"}


def load_task(name: str, data: str | None = None, digits: str = "3x3", seed: int = 0,
              reward_fn: str | list[str] | None = None, train_size: int = 5000, test_size: int = 500,
              reward_weights: list[float] | None = None, instruction: str | None = None,
              system_prompt: str | None = None, hf_dataset: str | None = None,
              hf_config: str | None = None, question_field: str | None = None,
              answer_field: str | None = None, train_split: str = "train",
              test_split: str = "test") -> Task:
    """Load and validate a task; raises TaskError on unknown names or bad data.

    train_size/test_size only apply to `multiply`; file/hub tasks keep every record.
    `reward_fn` ("module:function" or "file.py:function", or a list of them with
    `reward_weights`) replaces the task's reward. `instruction` replaces the task's
    instruction, `system_prompt` adds a system message. The rest are settings of task
    custom: a hub dataset (instead of `data`), the fields holding question and answer, the
    names of the train and test splits.
    """
    check_task_name(name)
    key = name.strip().lower()
    loader = task_loader(key)
    custom = dict(hf_dataset=hf_dataset, hf_config=hf_config, question_field=question_field,
                  answer_field=answer_field, train_split=train_split, test_split=test_split)
    # Given to another task they would be ignored silently.
    given = {k: v for k, v in custom.items() if v is not None and v != SPLIT_DEFAULTS.get(k)}
    if loader is not _load_custom and given:
        raise TaskError(f"{', '.join('--' + k.replace('_', '-') for k in given)}: only task custom "
                        f"reads it, not {name!r}")
    if data is not None and hf_dataset is not None:
        raise TaskError("pass --data or --hf-dataset, not both")
    reward = _custom_reward(reward_fn, reward_weights)
    task = loader(data=data, digits=digits, seed=seed, train_size=train_size, test_size=test_size,
                  name=key, **given)
    if reward is not None:
        # A verifier that fails on any input fails here, before the model loads, rather than
        # minutes into the first step: scored on a training answer given as the completion.
        try:
            if task.train:
                reward.scores(str(task.train[0].answer), task.train[0].answer)
        except RewardFunctionError as exc:
            raise RewardFunctionError(f"{exc}: tried before the model loads (a model's "
                                      f"completion need not hold a marker)") from exc.__cause__
        task.reward = reward
    if instruction is not None:
        task.instruction = instruction
    task.system_prompt = system_prompt or None
    return task


def _custom_reward(reward_fn: str | list[str] | None, weights: list[float] | None):
    """The reward functions a run names, loaded before any data (a typo fails first)."""
    specs = [reward_fn] if isinstance(reward_fn, str) else list(reward_fn or [])
    if weights is not None and not specs:
        raise TaskError("--reward-weights needs --reward-fn: one weight per reward function")
    if not specs:
        return None
    try:
        return load_reward_fns(specs, weights)
    except ValueError as exc:
        raise TaskError(str(exc)) from exc


@dataclass(frozen=True)
class PromptSettings:
    instruction: str | None  # None: the task's own
    system_prompt: str | None


def saved_run(adapter: str | Path | None) -> dict | None:
    """The config.json of the training run whose directory holds `adapter`; None for no
    adapter or one made elsewhere (mlx-lm's lora writes no config.json)."""
    if adapter is not None:  # before any data loads, so that a typo fails at once
        existing_dir("adapter_path", adapter)
    saved = Path(adapter) / "config.json" if adapter is not None else None
    if saved is None or not saved.is_file():
        return None
    return read_json_object(saved, "a run's config.json")


def adapter_prompt(run: dict | None, instruction: str | None, system_prompt: str | None,
                   default_instruction: str | None = None) -> PromptSettings:
    """The prompt to ask with an adapter: what is given here, else what the training run that
    wrote the adapter saved (`run`: its saved_run), else no system prompt and
    `default_instruction`."""
    if run is None:
        return PromptSettings(instruction if instruction is not None else default_instruction,
                              system_prompt)
    if instruction is None:
        # A run that left it unset asked with the task's own: every built-in task's.
        instruction = INSTRUCTION if run.get("instruction") is None else run["instruction"]
    return PromptSettings(instruction, system_prompt if system_prompt is not None else run.get("system_prompt"))


# Where a task's examples come from: a --data or --hf-dataset given replaces all of the run's
# (its split names and fields would not fit another source).
DATA_SOURCE = ("data", "hf_dataset", "hf_config", "question_field", "answer_field",
               "train_split", "test_split")


def adapter_task_settings(run: dict | None, task: str, given: dict) -> dict:
    """load_task's settings for scoring an adapter on `task`: those given (not None), else the
    training run's own (`run`: its saved_run) when it trained on this task, so `eval` reads the
    run's data and, for multiply, draws the test problems of the run's seed (another seed's
    test set overlaps the run's training problems). Settings neither given nor saved are left
    to load_task."""
    loader = task_loader(task)
    if run is None or loader is None or task_loader(str(run.get("task", ""))) is not loader:
        return {k: v for k, v in given.items() if v is not None}
    new_source = given.get("data") is not None or given.get("hf_dataset") is not None
    taken = {k: run.get(k) for k, v in given.items()
             if v is None and not (new_source and k in DATA_SOURCE)}
    _check_run_paths(taken)
    return {k: v for k, v in {**given, **taken}.items() if v is not None}


def _check_run_paths(taken: dict):
    """A run saves its --data and --reward-fn files as typed: relative to where it ran."""
    specs = taken.get("reward_fn") or []
    modules = [spec.rpartition(":")[0] for spec in ([specs] if isinstance(specs, str) else specs)]
    files = [("--data", taken.get("data"))] + [("--reward-fn", m) for m in modules if m.endswith(".py")]
    for option, path in files:
        if path and not Path(path).expanduser().exists():
            raise TaskError(f"the adapter's run used {option} {path}, which is not found from "
                            f"{Path.cwd()} (relative to where it ran?); pass {option}")


def one_file_for_both_splits(data: str | None) -> bool:
    """--data names one file, which then serves as train and as test split."""
    return data is not None and Path(data).expanduser().is_file()


def task_from_config(cfg) -> Task:
    """The task a run's config (TrainConfig) describes: data, reward functions, prompt."""
    return load_task(cfg.task, data=cfg.data, digits=cfg.digits, seed=cfg.seed,
                     reward_fn=cfg.reward_fn, reward_weights=cfg.reward_weights,
                     instruction=cfg.instruction, system_prompt=cfg.system_prompt,
                     **{k: getattr(cfg, k) for k in CUSTOM_ONLY})
