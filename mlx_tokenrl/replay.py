"""T-SPMO replay: give late tokens credit by re-sampling from inside solved completions.

T-SPMO's advantages sit where a group's completions branch, which is mostly near the start.
Replay cuts a few of the step's solved completions at a random position and samples a fresh
group of G continuations from there (prompt + the kept prefix as context); those groups go
through the same selection as the step's own, so their branch points, deep inside a good
answer, enter the same loss.

Which cuts a step replays is drawn once for the whole step from the solved completions of
every rank, in prompt-position order, so one process and several ranks replay the same cuts.
"""

from dataclasses import astuple, dataclass

import numpy as np

from .distributed import World
from .rollout import SamplingParams, rollout
from .seeds import REPLAY_CUTS, REPLAY_SAMPLING, REPLAY_SELECTION, derived_rng, derived_seed


@dataclass(frozen=True)
class Candidate:
    position: int  # the prompt's place in the step's batch
    completion: int  # index of the solved completion in its group
    length: int  # its tokens (EOS included)


@dataclass(frozen=True)
class ReplayCut:
    pick: int  # its place among the step's cuts: seeds the selection of its group
    position: int
    completion: int
    cut: int  # tokens kept as the replayed prefix, 1 <= cut < length


@dataclass
class ReplayGroup:
    cut: ReplayCut
    context: list  # prompt tokens + the kept prefix
    completions: list  # G `Completion`s sampled after the prefix
    rng: np.random.Generator  # its selection's randomness


def solved_candidates(groups, solved, positions) -> list:
    """Solved completions (`solved[g][j]`: judged by the correctness reward, so a format
    bonus alone is not a success) with at least two tokens, so a cut keeps one and leaves
    one to re-sample. A completion identical to an earlier one of its group is left out: it
    would double that completion's chance of a replay."""
    out = []
    for position, group, flags in zip(positions, groups, solved):
        seen = set()
        for j, (c, ok) in enumerate(zip(group, flags)):
            if ok and len(c.tokens) >= 2 and tuple(c.tokens) not in seen:
                seen.add(tuple(c.tokens))
                out.append(Candidate(position, j, len(c.tokens)))
    return out


def distinct_prefixes(cuts, prefixes):
    """Drop a cut whose prompt and prefix repeat an earlier cut's: two solved completions
    that agree up to the cut would sample the same group twice (same context, same seed)."""
    seen, kept = set(), []
    for cut, prefix in zip(cuts, prefixes):
        if (cut.position, tuple(prefix)) not in seen:
            seen.add((cut.position, tuple(prefix)))
            kept.append((cut, prefix))
    return kept


def choose_cuts(candidates, count: int, rng) -> list:
    """`count` distinct candidates, each cut uniformly in [1, length - 1]."""
    if not candidates:
        return []
    picks = rng.choice(len(candidates), size=min(count, len(candidates)), replace=False)
    return [ReplayCut(k, candidates[i].position, candidates[i].completion,
                      int(rng.integers(1, candidates[i].length)))
            for k, i in enumerate(picks)]


def gather_candidates(world: World, local, capacity: int) -> list:
    """Every rank's candidates, in prompt-position order (as one process has them)."""
    if world.size() == 1:
        return sorted(local, key=astuple)
    table = np.full((capacity, 3), -1.0)
    if local:
        table[:len(local)] = [astuple(c) for c in local]
    rows = world.gather(table.reshape(-1), "the T-SPMO replay exchange").reshape(-1, 3)
    return sorted((Candidate(*(int(x) for x in row)) for row in rows if row[0] >= 0), key=astuple)


def replay_step(model, tokenizer, task, cfg, step: int, world: World, groups, solved, prompts,
                answers, indices, positions) -> list:
    """Choose the step's cuts (over all ranks) and sample a group after each of this rank's.

    Each continuation may use what its cut left of the completion budget
    (max_new_tokens - cut), so prefix plus continuation never exceed it."""
    capacity = -(-cfg.prompts_per_step // world.size()) * cfg.group_size
    candidates = gather_candidates(world, solved_candidates(groups, solved, positions), capacity)
    cuts = choose_cuts(candidates, cfg.tspmo_replay,
                       derived_rng(cfg.seed, REPLAY_CUTS, step))
    local = {p: g for g, p in enumerate(positions)}
    mine = [c for c in cuts if c.position in local]
    # A prompt lives on one rank, so its own rank alone can drop repeated prefixes.
    kept = distinct_prefixes(mine, [groups[local[c.position]][c.completion].tokens[:c.cut]
                                    for c in mine])
    if not kept:
        return []
    mine, prefixes = [c for c, _ in kept], [p for _, p in kept]
    rows = [local[c.position] for c in mine]  # each cut's prompt among this rank's
    sampled = rollout(model, tokenizer, [prompts[g] for g in rows],
                      cfg.group_size, SamplingParams(cfg.temperature, cfg.top_p, cfg.max_new_tokens),
                      [derived_seed(cfg.seed, REPLAY_SAMPLING, step, indices[g], c.cut)
                       for g, c in zip(rows, mine)],
                      [answers[g] for g in rows], task.reward,
                      prefixes=prefixes, budgets=[cfg.max_new_tokens - c.cut for c in mine])
    G = cfg.group_size
    return [ReplayGroup(c, list(prompts[g]) + list(prefix), sampled[n * G:(n + 1) * G],
                        derived_rng(cfg.seed, REPLAY_SELECTION, step, c.pick))
            for n, (c, g, prefix) in enumerate(zip(mine, rows, prefixes))]
