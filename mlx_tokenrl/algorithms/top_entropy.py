"""Top-entropy tokens ("Beyond the 80/20 rule", arXiv 2506.01939): GRPO's group advantages
on the positions of each completion where the policy was most uncertain.

The entropies are recorded during the rollout from the logits the sampler already had, under
the model's own distribution (temperature 1: the policy the loss's log-probs read). Each
completion keeps its ceil(q * length) highest-entropy positions (q = --entropy-quantile), so
even a one-token completion keeps one; ties go to the earlier position. The loss's forward
still runs up to each completion's last selected position.
"""

import math

from .base import Algorithm, Option, per_completion


def top_entropy_positions(entropies, quantile: float) -> list:
    """The ceil(quantile * n) positions of the highest entropies, in position order; among
    equal entropies the earlier position first. (q * n is rounded to 9 digits first, so that
    0.07 * 100 = 7.000000000000001 keeps 7, not 8.)"""
    keep = math.ceil(round(quantile * len(entropies), 9))
    ranked = sorted(range(len(entropies)), key=lambda pos: (-entropies[pos], pos))
    return sorted(ranked[:keep])


def select(record, cfg, rng):
    return per_completion(record, cfg, lambda row: top_entropy_positions(
        record.entropies[row], cfg.entropy_quantile))


ALGORITHM = Algorithm(
    "top-entropy", "highest-entropy tokens", select, panel="Top-entropy",
    needs_token_stats=True, options=(
        Option("entropy_quantile", float, 0.2, "Share of each completion's tokens in the loss: "
               "those where the policy's entropy was highest (at least one).", above=0,
               at_most=1),))
