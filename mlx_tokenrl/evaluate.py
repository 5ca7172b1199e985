"""Greedy, batched held-out accuracy, how often an answer marker (`####` or `\\boxed{}`) was
kept, and how often answers ran out of tokens."""

import json
import math
from pathlib import Path

from .rewards import correctness_reward, extract_answer, is_solved
from .rollout import SamplingParams, encode_prompts, rollout


def wilson_interval(correct: int, total: int, z: float = 1.96):
    """95% interval for a proportion; sane at 0% and 100% unlike the normal approximation."""
    if total == 0:
        return 0.0, 0.0
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


def sign_test_p(fixed: int, broke: int) -> float:
    """Exact two-sided McNemar test for two models scored on the same examples: the chance of a
    split of the `fixed + broke` changed answers at least this uneven if a change were as
    likely either way. Paired, it sees differences that two overlapping intervals hide."""
    changed, fewer = fixed + broke, min(fixed, broke)
    tail = sum(math.comb(changed, k) for k in range(fewer + 1)) / 2 ** changed
    return min(1.0, 2 * tail)


def evaluate(model, tokenizer, task, examples, max_new_tokens: int = 256,
             batch_size: int = 32, on_progress=None):
    """Score `examples` greedily; returns (summary dict, per-example records)."""
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)
    records = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        prompts = [task.prompt(tokenizer, ex.question) for ex in chunk]
        completions = rollout(model, tokenizer, encode_prompts(tokenizer, prompts), 1, params,
                              seeds=[0] * len(chunk), answers=[ex.answer for ex in chunk],
                              reward_fn=correctness_reward(task.reward))
        for ex, prompt, c in zip(chunk, prompts, completions):
            extracted, formatted = extract_answer(c.text)
            records.append({"question": ex.question, "prompt": prompt, "completion": c.text,
                            "extracted": extracted, "answer": ex.answer,
                            "correct": is_solved(c.reward), "formatted": formatted,
                            "truncated": c.truncated, "tokens": len(c.tokens)})
        if on_progress:
            on_progress(len(records), len(examples))
    return summarize(records), records


def summarize(records):
    return summary_from_counts(len(records), sum(r["correct"] for r in records),
                               sum(r["formatted"] for r in records),
                               sum(r["tokens"] for r in records),
                               truncated=sum(r["truncated"] for r in records))


def summary_from_counts(n: int, correct: int, formatted: int, tokens: int,
                        truncated: int | None = None):
    """The summary from counts (also how ranks combine the shards they each scored).

    `truncated` counts answers that hit max_new_tokens before EOS; a high rate means the limit
    cuts answers off (and they score 0), so raise it. None leaves the rate out."""
    low, high = wilson_interval(correct, n)
    summary = {"n": n, "correct": correct, "accuracy": correct / n if n else 0.0,
               "ci95": [low, high],
               "format_rate": formatted / n if n else 0.0,
               "mean_tokens": tokens / n if n else 0.0}
    if truncated is not None:
        summary["truncation_rate"] = truncated / n if n else 0.0
    return summary


def write_eval(out_dir, summary, records):
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "examples.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
