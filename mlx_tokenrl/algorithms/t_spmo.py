"""T-SPMO: token-level advantages from prefix matching, plus replay from solved completions.

Each (prefix, next token) pair is unique per group (it belongs to every completion through
its prefix, not to one of them), so `--loss-norm sequence` averages each group's pairs, then
the groups.
"""

from .base import Algorithm, Option, Selection, has_signal


def select(record, cfg, rng, eps: float = 1e-9):
    """For every prefix p shared by some completions and next token v:
    R(p) = mean reward of the completions that start with p and A(p, v) = R(p+v) - R(p).
    Pairs with A != 0 sit where completions branch and the outcomes differ. Each unique
    (p, v) is selected once, at the first completion that continues p with v (any of them
    gives the same log-prob), preferring one that --mask-truncated keeps: a pair is masked
    only when every completion through it is. Over `--tspmo-max-pairs`, a random subset is
    kept, drawn from the pairs in token order so the draw does not depend on the completions'
    order.
    """
    import numpy as np

    completions = record.completions
    if not has_signal(record.rewards):
        return Selection()
    rewards = np.asarray(record.rewards, dtype=np.float64)
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
            # Read from a completion --mask-truncated keeps; a pair only masked completions
            # reach adds nothing, and must not take a place under --tspmo-max-pairs.
            home = next((row for row in rows if not record.is_masked(row)), None)
            if abs(advantage) > eps and home is not None:
                pairs.append((home, pos, float(advantage)))
            for row in rows:
                node_of_row[row] = child
    if len(pairs) > cfg.tspmo_max_pairs:
        pairs.sort(key=lambda pair: completions[pair[0]][:pair[1] + 1])
        keep = sorted(rng.choice(len(pairs), size=cfg.tspmo_max_pairs, replace=False))
        pairs = [pairs[i] for i in keep]
    selection = Selection()
    for row, pos, advantage in pairs:
        selection.add(row, pos, advantage)
    return selection


def replay(model, tokenizer, task, cfg, step, world, groups, solved, prompts, answers, indices,
           positions):
    from ..replay import replay_step  # (MLX: imported when a step runs, not for --help)

    if cfg.tspmo_replay == 0:
        return []
    return replay_step(model, tokenizer, task, cfg, step, world, groups, solved, prompts, answers,
                       indices, positions)


ALGORITHM = Algorithm(
    "t-spmo", "prefix matching", select, normalised_over="group", replay=replay,
    panel="T-SPMO", options=(
        Option("tspmo_max_pairs", int, 256, "Most (prefix, token) pairs per group (random "
               "subset when over).", at_least=1),
        Option("tspmo_replay", int, 2, "Successful completions per step re-sampled from a "
               "random cut.", at_least=0)))
