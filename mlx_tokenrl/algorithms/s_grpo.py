"""S-GRPO: GRPO's advantages on a stochastic subset of each completion's tokens."""

from .base import Algorithm, Option, per_completion


def sgrpo_positions(length: int, alpha: int, k: int, p: float, rng) -> list:
    """S-GRPO's scan: the first `alpha` positions always, then each next one with
    probability `p` until `k` are chosen. Early tokens decide the path of a reasoning
    chain, so the subset leans to the start and the loss's forward pass stays short."""
    chosen = []
    for pos in range(length):
        if pos < alpha:
            chosen.append(pos)
        elif len(chosen) >= k:
            break
        elif rng.random() < p:
            chosen.append(pos)
    return chosen


def select(record, cfg, rng):
    """Each completion's subset is drawn from a generator seeded by the group's draw and the
    completion's own tokens, so it does not depend on where the completion sits in the group."""
    import numpy as np

    group_seed = int(rng.integers(2**63))

    def positions(row):
        tokens = record.completions[row]
        return sgrpo_positions(len(tokens), cfg.sgrpo_alpha, cfg.sgrpo_k, cfg.sgrpo_p,
                               np.random.default_rng([group_seed, *map(int, tokens)]))

    return per_completion(record, cfg, positions)


def check(cfg):
    if cfg.sgrpo_alpha > cfg.sgrpo_k:
        return "--sgrpo-alpha must not exceed --sgrpo-k"
    if cfg.algo == "s-grpo" and cfg.sgrpo_alpha == 0 and cfg.sgrpo_p == 0:
        return "--sgrpo-alpha 0 with --sgrpo-p 0 puts no token in the S-GRPO loss"
    return None


# ~24 tokens within the first ~30 of each completion: the loss's forward pass then stops
# early (memory and time well under half of GRPO's, scripts/bench_step.py).
ALGORITHM = Algorithm(
    "s-grpo", "stochastic subset", select, panel="S-GRPO", check=check, options=(
        Option("sgrpo_alpha", int, 4, "The first alpha completion tokens are always in the "
               "loss.", at_least=0),
        Option("sgrpo_k", int, 24, "At most k tokens per completion in the loss.", at_least=1),
        Option("sgrpo_p", float, 0.75, "Probability that each later token joins the loss "
               "until k are chosen.", at_least=0, at_most=1)))
