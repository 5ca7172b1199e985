"""Which completion tokens enter the loss, with which advantage, normalised over what.

With T-SPMO's replay (replay.py, which adds groups to the step), this is the only place
the three algorithms differ. Each function takes ONE group (the G completions of one
prompt, as lists of token ids, EOS included) and their rewards, and returns (row, position,
advantage) triples: `row` indexes `completions`, `position` is 0-based in that completion.
A group whose rewards are all equal carries no signal and returns no triples, so it costs
no forward pass in the loss. What a group selects depends on its completions as a set, not
on their order: reordering a group never changes the loss.
"""

import numpy as np

STD_EPS = 1e-4

# What `--loss-norm sequence` averages over (loss.normalisation_weights): GRPO and S-GRPO
# select tokens of a completion, so each completion's tokens are averaged and then the
# completions. T-SPMO's pairs are unique per group (a pair belongs to every completion
# through its prefix, not to one of them), so each group's pairs are averaged, then the groups.
NORMALISED_OVER = {"grpo": "completion", "s-grpo": "completion", "t-spmo": "group"}


def group_advantages(rewards, scale_rewards: bool = True) -> np.ndarray:
    """GRPO's A_i = (r_i - mean r) / (std r + eps); population std (ddof=0)."""
    rewards = np.asarray(rewards, dtype=np.float64)
    centred = rewards - rewards.mean()
    if scale_rewards:
        centred = centred / (rewards.std() + STD_EPS)
    return centred


def has_signal(rewards) -> bool:
    rewards = np.asarray(rewards, dtype=np.float64)
    return rewards.size > 1 and bool(np.ptp(rewards) > 0)


def grpo_selection(completions, rewards, scale_rewards: bool = True):
    """Every token of every completion, with its completion's group advantage."""
    if not has_signal(rewards):
        return []
    advantages = group_advantages(rewards, scale_rewards)
    return [(row, pos, float(advantages[row]))
            for row, tokens in enumerate(completions) for pos in range(len(tokens))]


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


def sgrpo_selection(completions, rewards, alpha: int, k: int, p: float, rng,
                    scale_rewards: bool = True):
    """GRPO's advantages on a stochastic subset of each completion's tokens.

    Each completion's subset is drawn from a generator seeded by the group's draw and the
    completion's own tokens, so it does not depend on where the completion sits in the group."""
    if not has_signal(rewards):
        return []
    advantages = group_advantages(rewards, scale_rewards)
    group_seed = int(rng.integers(2**63))
    return [(row, pos, float(advantages[row]))
            for row, tokens in enumerate(completions)
            for pos in sgrpo_positions(len(tokens), alpha, k, p,
                                       np.random.default_rng([group_seed, *map(int, tokens)]))]


def tspmo_selection(completions, rewards, max_pairs: int, rng, eps: float = 1e-9):
    """T-SPMO: token-level advantages from prefix matching.

    For every prefix p shared by some completions and next token v:
    R(p) = mean reward of the completions that start with p and A(p, v) = R(p+v) - R(p).
    Pairs with A != 0 sit where completions branch and the outcomes differ. Each unique
    (p, v) is returned once, at the first completion that continues p with v (any of them
    gives the same log-prob). Over `max_pairs`, a random subset is kept, drawn from the pairs
    in token order so the draw does not depend on the completions' order.
    """
    if not has_signal(rewards):
        return []
    rewards = np.asarray(rewards, dtype=np.float64)
    # Walk all completions position by position; prefixes are trie nodes, numbered as met.
    node_of_row = [0] * len(completions)
    node_mean = {0: rewards.mean()}
    pairs = []
    for pos in range(max(len(c) for c in completions)):
        children = {}
        for row, tokens in enumerate(completions):
            if pos < len(tokens):
                children.setdefault((node_of_row[row], tokens[pos]), []).append(row)
        for (parent, _token), rows in children.items():
            child = len(node_mean)
            node_mean[child] = rewards[rows].mean()
            advantage = node_mean[child] - node_mean[parent]
            if abs(advantage) > eps:
                pairs.append((rows[0], pos, float(advantage)))
            for row in rows:
                node_of_row[row] = child
    if len(pairs) > max_pairs:
        pairs.sort(key=lambda pair: completions[pair[0]][:pair[1] + 1])
        keep = sorted(rng.choice(len(pairs), size=max_pairs, replace=False))
        pairs = [pairs[i] for i in keep]
    return pairs
