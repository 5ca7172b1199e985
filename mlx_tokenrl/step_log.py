"""A run's step logs: metrics.jsonl and samples.jsonl, one JSON line per record with its step.

A resumed run keeps the records of the steps its checkpoint holds (those after it are done
again) and reads what it needs from them: --time-budget its step times, and whether a stop
cut short the evaluation of the checkpoint's step (that evaluation is then run first).
"""

import json
from pathlib import Path

from .checkpoint import atomic_write_bytes


def read(path: Path, upto_step: int) -> list:
    """The records of steps 1..upto_step; a last line cut short by a kill is skipped."""
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            record = json.loads(line)
            if record["step"] <= upto_step:
                records.append(record)
        except (ValueError, KeyError, TypeError):
            continue
    return records


def append(path: Path, record: dict):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def rewrite(path: Path, records: list):
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in records).encode())


def trim(path: Path, upto_step: int) -> list:
    """Keep only the records of steps 1..upto_step (the file too). Returns them."""
    if not path.exists():
        return []
    records = read(path, upto_step)
    rewrite(path, records)
    return records


def evaluation_missed(metrics: list, step: int, eval_every: int) -> bool:
    """Whether `step` (the last of `metrics`) was due an evaluation its record lacks: a stop
    during that evaluation saves the step and its metrics without it."""
    return (bool(eval_every) and step > 0 and step % eval_every == 0 and bool(metrics)
            and metrics[-1]["step"] == step and "eval_accuracy" not in metrics[-1])
