"""A fixed pseudo-random 0/1 per completion text (as scripts/bench_step.py uses), so that
every group carries signal and full-token GRPO puts all 32 completions in its loss."""

import hashlib


def coin(completion: str, answer) -> float:
    return float(hashlib.sha256(completion.encode()).digest()[0] % 2)
