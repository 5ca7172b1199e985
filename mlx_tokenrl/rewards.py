"""Answer extraction and verifiers: completion text -> reward in [0, 1]. Pure Python."""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .messages import first_line

MARKER = "####"
BOX = "\\boxed{"  # Qwen-family and most math-tuned models end with \boxed{N}

_NUMBER = re.compile(
    r"""
    (?:(?<![\w)\]])(?P<sign>[-+\u2212]))?   # a '-' right after a word or ')' is subtraction
    (?:\$\s*)?
    (?<![\d.])                               # never start inside another number
    (?P<num>(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)
    (?:/(?P<den>\d+(?:\.\d+)?))?
    %?
    """,
    re.VERBOSE,
)
# Wrapping a final answer in markdown / LaTeX is common and should not cost the reward.
_WRAPPERS = " \t\r\n*_`"
# LaTeX a model writes around a number, rewritten to what _NUMBER reads. Only numeric fractions:
# a symbolic one has no number to compare.
_LATEX = [
    (re.compile(r"\\[dt]?frac\{\s*([-\u2212]?[\d.,]+)\s*\}\{\s*([\d.,]+)\s*\}"), r"\1/\2"),
    (re.compile(r"\\(?:text|textbf|mathrm|mathbf)\{([^{}]*)\}"), r"\1"),
    (re.compile(r"\{,\}"), ","),  # 1{,}000
    (re.compile(r"\\[,!]"), ""),  # thin spaces, also used as thousands separators
    (re.compile(r"\\([$%])"), r"\1"),  # \$5, 5\%
]
_BOXED = re.compile(r"^\\boxed\{(.*)\}$")


def _value(match: re.Match) -> float | None:
    value = float(match["num"].replace(",", ""))
    if match["den"] is not None:
        den = float(match["den"])
        if den == 0:
            return None
        value /= den
    return -value if match["sign"] in ("-", "\u2212") else value


def _numbers(text: str) -> list[float]:
    values = (_value(m) for m in _NUMBER.finditer(text))
    return [v for v in values if v is not None]


def _plain_latex(text: str) -> str:
    for pattern, replacement in _LATEX:
        text = pattern.sub(replacement, text)
    return text


def _closing_brace(text: str, open_at: int) -> int | None:
    """Index of the '}' matching the '{' at `open_at` (escaped \\{ \\} skipped); None if unclosed."""
    depth = 0
    i = open_at
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return i
        i += 1
    return None


def parse_number(text: str) -> float | None:
    """Parse a whole string as one number ("$1,234.00", "**42**", "-3/4", "50%"); else None."""
    s = text.strip(_WRAPPERS)
    boxed = _BOXED.match(s)
    if boxed:
        s = boxed.group(1).strip(_WRAPPERS)
    s = s.rstrip(".").strip(_WRAPPERS)
    if s[:1] in "-+\u2212" and s[1:2] == "$":
        s = s[0] + s[2:]  # "-$5": move the sign past the currency symbol
    match = _NUMBER.fullmatch(s)
    return _value(match) if match else None


@dataclass(frozen=True)
class FinalAnswer:
    """What a final-answer marker holds: a box's content, or everything after '####'."""
    text: str
    boxed: bool


def final_answer(text: str) -> FinalAnswer | None:
    """The last final-answer marker in `text`, whichever kind: '####' or a closed '\\boxed{...}'.

    The one that starts last wins, so a model that revises its answer is read at its final word,
    and "#### \\boxed{12}" reads the box. An unclosed box (a cut-off answer) is no marker.
    """
    hashes = text.rfind(MARKER)
    start = text.rfind(BOX)
    while start > hashes:
        close = _closing_brace(text, start + len(BOX) - 1)
        if close is not None:
            return FinalAnswer(text[start + len(BOX):close], boxed=True)
        start = text.rfind(BOX, 0, start)
    return FinalAnswer(text[hashes + len(MARKER):], boxed=False) if hashes >= 0 else None


def extract_answer(text: str) -> tuple[float | None, bool]:
    """(the number the last final-answer marker holds, True); else (last number in text, False);
    else (None, False). After '####' that is the first number; in a box, the first number after
    its last '=' ("\\boxed{x = 5}")."""
    final = final_answer(text)
    if final is not None:
        claim = final.text.rpartition("=")[2] if final.boxed else final.text
        after = _numbers(_plain_latex(claim))
        if after:
            return after[0], True
    numbers = _numbers(_plain_latex(text))
    return (numbers[-1], False) if numbers else (None, False)


def numbers_equal(a: float, b: float) -> bool:
    """Equal up to a relative tolerance of 1e-6 (plus a tiny absolute one for zero)."""
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)


def numeric_reward(completion: str, answer: str | float) -> float:
    """1.0 if the extracted answer equals the numeric gold answer, else 0.0."""
    gold = parse_number(answer) if isinstance(answer, str) else float(answer)
    if gold is None:
        raise ValueError(f"gold answer {answer!r} is not a number")
    value, _ = extract_answer(completion)
    return 1.0 if value is not None and numbers_equal(value, gold) else 0.0


SOLVED_REWARD = 1.0


def is_solved(reward: float) -> bool:
    """A full reward, as eval counts correct: a format bonus alone never reaches it."""
    return reward >= SOLVED_REWARD


def format_score(completion: str, answer) -> float:
    """1.0 when the completion's answer is given as '#### N' or '\\boxed{N}': the format bonus."""
    return 1.0 if extract_answer(completion)[1] else 0.0


@dataclass(frozen=True)
class WeightedRewards:
    """Several reward functions, each `fn(completion_text, answer) -> float`; the reward is
    their weighted sum (TRL's reward_funcs and reward_weights).

    The first function is the correctness reward: a completion is solved (the solve rate,
    T-SPMO's replay, eval accuracy) when that function gives it a full reward, whatever the
    others add or take away. A weighted sum cannot tell: 1 * format + 1 * length would reach 1
    with a wrong answer."""
    names: tuple[str, ...]
    functions: tuple[Callable[[str, str], float], ...]
    weights: tuple[float, ...]

    def scores(self, completion: str, answer) -> dict[str, float]:
        """Each function's own (unweighted) score, by name."""
        return {name: float(fn(completion, answer)) for name, fn in zip(self.names, self.functions)}

    def total(self, scores: dict[str, float]) -> float:
        return sum(weight * scores[name] for name, weight in zip(self.names, self.weights))

    def solved(self, scores: dict[str, float]) -> bool:
        return is_solved(scores[self.names[0]])

    def __call__(self, completion: str, answer) -> float:
        return self.total(self.scores(completion, answer))


CORRECTNESS = "correct"  # the name a task's own reward goes by among several


def weighted(reward) -> WeightedRewards:
    """`reward` as WeightedRewards: a single function is one named "correct", weight 1."""
    if isinstance(reward, WeightedRewards):
        return reward
    return WeightedRewards((CORRECTNESS,), (reward,), (1.0,))


def correctness_reward(reward):
    """The function that decides what counts as correct: the first of several."""
    return weighted(reward).functions[0]


def unique_names(names) -> tuple[str, ...]:
    """Names made distinct for logging: a repeated one gets _2, _3, ... (a.py:score, b.py:score)."""
    out: list[str] = []
    for name in names:
        candidate, n = name, 1
        while candidate in out:
            n += 1
            candidate = f"{name}_{n}"
        out.append(candidate)
    return tuple(out)


def with_format_bonus(reward_fn, weight: float) -> WeightedRewards:
    """`reward_fn` plus `weight` when the answer is given as '#### N' or '\\boxed{N}' (a
    function named "format" among the rewards). A small model rarely answers a hard task
    right, so most groups carry no signal; crediting the format gives them some, and keeps a
    trained model from drifting off the format."""
    rewards = weighted(reward_fn)
    return WeightedRewards(unique_names(rewards.names + ("format",)),
                           rewards.functions + (format_score,), rewards.weights + (weight,))


def _normalise_text(text: str) -> str:
    text = " ".join(text.split()).strip(_WRAPPERS)
    return text.removesuffix(".").strip(_WRAPPERS).casefold()


def exact_match_reward(completion: str, answer: str | float) -> float:
    """1.0 if the last marker's answer (a box's content, or the first line after '####'),
    or else the whole completion, equals the answer."""
    final = final_answer(completion)
    if final is None:
        candidate = completion
    elif final.boxed:
        candidate = _plain_latex(final.text)
    else:
        # Models often keep talking after the answer line; only that line is the answer.
        lines = [line for line in final.text.splitlines() if line.strip()]
        candidate = lines[0] if lines else ""
    return 1.0 if _normalise_text(candidate) == _normalise_text(str(answer)) else 0.0


def _import_module(name: str):
    path = Path(name)
    if name.endswith(".py") or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {name}")
        mod_name = f"_tokenrl_reward_{path.stem}"
        spec = importlib.util.spec_from_file_location(mod_name, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot import {name}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module  # so dataclasses/pickle inside the module work
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(mod_name, None)
            raise
        return module
    return importlib.import_module(name)


class RewardFunctionError(Exception):
    """A --reward-fn function raised, or returned no number: a bug in the user's function,
    to be shown with its own traceback and a line naming it, not as one of tokenrl-mlx's."""


@dataclass(frozen=True)
class UserReward:
    """A reward function the user named with --reward-fn; its result as a float."""
    spec: str
    fn: Callable[[str, str], float]

    def __call__(self, completion: str, answer) -> float:
        given = f"completion {completion[:60]!r}, answer {answer!r}"
        try:
            value = self.fn(completion, answer)
        except Exception as exc:
            raise RewardFunctionError(f"--reward-fn {self.spec} raised {type(exc).__name__} "
                                      f"({first_line(exc)}) on {given}") from exc
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number):  # a NaN reward would skip every update, silently
            raise RewardFunctionError(f"--reward-fn {self.spec} returned {value!r}, not a "
                                      f"finite number, on {given}")
        return number


def load_reward_fn(spec: str) -> UserReward:
    """Load a reward function `fn(completion, answer) -> float` from "module:function" or "file.py:function"."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"reward function {spec!r} must look like 'module:function' or 'file.py:function'")
    try:
        module = _import_module(module_name)
    except Exception as exc:
        raise ValueError(f"cannot import reward function {spec!r}: {type(exc).__name__}: {exc}") from exc
    fn = getattr(module, attr, None)
    if fn is None:
        raise ValueError(f"cannot load reward function {spec!r}: {module_name} has no attribute {attr!r}")
    if not callable(fn):
        raise ValueError(f"reward function {spec!r} is not callable")
    return UserReward(spec, fn)


def load_reward_fns(specs: list[str], weights: list[float] | None = None) -> WeightedRewards:
    """Several reward functions ("module:function" or "file.py:function"), each named after
    its function, weighted by `weights` (default: 1 each). The first is the correctness reward."""
    if weights is not None and len(weights) != len(specs):
        raise ValueError(f"--reward-weights has {len(weights)} weight(s) for {len(specs)} "
                         f"--reward-fn function(s): give one weight per function")
    return WeightedRewards(unique_names(spec.rpartition(":")[2] for spec in specs),
                           tuple(load_reward_fn(spec) for spec in specs),
                           tuple(weights) if weights is not None else (1.0,) * len(specs))
