"""GRPO: every token of every completion, with its completion's group advantage."""

from .base import Algorithm, per_completion


def select(record, cfg, rng):
    return per_completion(record, cfg, lambda row: range(len(record.completions[row])))


ALGORITHM = Algorithm("grpo", "all tokens", select)
