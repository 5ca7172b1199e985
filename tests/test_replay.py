"""T-SPMO replay: which completions are cut, where, and what the replayed groups hold."""

import mlx_lm
import numpy as np
import pytest

from mlx_tokenrl import trainer
from mlx_tokenrl.config import TrainConfig
from mlx_tokenrl.distributed import World
from mlx_tokenrl.loss import make_loss_and_grad
from mlx_tokenrl.replay import (Candidate, ReplayCut, choose_cuts, distinct_prefixes, replay_step,
                                solved_candidates)
from mlx_tokenrl.rollout import Completion, SamplingParams, encode_prompts, rollout
from mlx_tokenrl.tasks import Example, Task, format_prompt


def completion(tokens, reward):
    return Completion(0, list(tokens), False, "", float(reward))


def test_only_distinct_solved_completions_with_room_to_cut_are_candidates():
    groups = [[completion([1, 2, 3], 1.1),  # right and formatted
               completion([1, 2, 4], 0.1),  # only the format bonus: not a success
               completion([4], 1.0),  # solved, but one token leaves nothing to re-sample
               completion([5, 6], 1.0),
               completion([1, 2, 3], 1.1)],  # the same answer again: one chance, not two
              [completion([7, 8, 9], 0.9), completion([7, 8], 0.0)]]  # partial credit only
    # "Solved" comes from the correctness reward, not from the (weighted) total.
    solved = [[True, False, True, True, True], [False, False]]
    assert solved_candidates(groups, solved, positions=[3, 5]) == [Candidate(3, 0, 3),
                                                                   Candidate(3, 3, 2)]


def test_cuts_that_repeat_a_prompt_and_prefix_are_replayed_once():
    cuts = [ReplayCut(0, 3, 0, 2), ReplayCut(1, 3, 1, 2), ReplayCut(2, 5, 0, 2),
            ReplayCut(3, 3, 2, 3)]
    prefixes = [[1, 2], [1, 2], [1, 2], [1, 2, 7]]
    kept = distinct_prefixes(cuts, prefixes)
    assert [c.pick for c, _ in kept] == [0, 2, 3]


def test_cuts_keep_at_least_one_token_and_leave_at_least_one():
    candidates = [Candidate(0, j, length) for j, length in enumerate([2, 3, 10, 50])]
    seen = set()
    for seed in range(200):
        cuts = choose_cuts(candidates, 3, np.random.default_rng(seed))
        assert len(cuts) == 3 and len({(c.position, c.completion) for c in cuts}) == 3
        assert [c.pick for c in cuts] == [0, 1, 2]
        for c in cuts:
            assert 1 <= c.cut <= candidates[c.completion].length - 1
            seen.add((c.completion, c.cut))
    assert (0, 1) in seen and (3, 49) in seen and (3, 1) in seen
    assert choose_cuts(candidates, 9, np.random.default_rng(0)).__len__() == 4
    assert choose_cuts([], 2, np.random.default_rng(0)) == []


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    return mlx_lm.load(str(tiny_model_dir))


def test_budgets_cap_each_prompts_completions(model_and_tokenizer):
    model, tok = model_and_tokenizer
    prompts = encode_prompts(tok, [format_prompt(tok, q) for q in ["a b c", "what is 2?"]])
    params = SamplingParams(temperature=1.0, max_new_tokens=40)
    out = rollout(model, tok, prompts, 4, params, seeds=[1, 2], budgets=[3, 40])
    eos = set(tok.eos_token_ids)
    for c in out:
        budget = 3 if c.prompt_index == 0 else 40
        assert 1 <= len(c.tokens) <= budget
        assert c.truncated == (c.tokens[-1] not in eos)
    assert any(c.truncated and len(c.tokens) == 3 for c in out if c.prompt_index == 0)
    assert max(len(c.tokens) for c in out if c.prompt_index == 1) > 3


def test_replayed_groups_continue_a_solved_prefix_within_the_budget(model_and_tokenizer):
    model, tok = model_and_tokenizer
    # Reward: solved when the text is long; the tiny model's completions vary in length
    # (37-55 characters with these seeds).
    task = Task("toy", [Example("what is 2 times 3?", "6"), Example("say something", "x")], [],
                reward=lambda text, answer: 1.0 if len(text) > 43 else 0.1)
    cfg = TrainConfig(algo="t-spmo", group_size=4, max_new_tokens=24, temperature=1.0,
                      tspmo_replay=3, prompts_per_step=2)
    prompts = encode_prompts(tok, [format_prompt(tok, e.question) for e in task.train])
    G = cfg.group_size
    sampled = rollout(model, tok, prompts, G, SamplingParams(1.0, 1.0, 24), seeds=[5, 6],
                      answers=["6", "x"], reward_fn=task.reward)
    groups = [sampled[:G], sampled[G:]]
    solved = {(g, tuple(c.tokens)) for g, group in enumerate(groups) for c in group
              if c.reward >= 1.0}
    assert solved and any(c.reward < 1.0 for c in sampled)
    flags = [[c.reward >= 1.0 for c in group] for group in groups]
    replayed = replay_step(model, tok, task, cfg, step=0, world=World(), groups=groups,
                           solved=flags, prompts=prompts, answers=["6", "x"], indices=[0, 1],
                           positions=[0, 1])
    assert 1 <= len(replayed) <= min(3, len(solved))
    for r in replayed:
        source = groups[r.cut.position][r.cut.completion]
        assert (r.cut.position, tuple(source.tokens)) in solved
        prefix = source.tokens[:r.cut.cut]
        assert len(prefix) >= 1 and r.context == prompts[r.cut.position] + prefix
        assert len(r.completions) == G
        for c in r.completions:
            assert len(prefix) + len(c.tokens) <= cfg.max_new_tokens
            assert c.text.startswith(tok.decode(prefix)[:3])
    # The replayed groups go through the same selection and into the step's loss rows.
    loss = trainer.LossInput()
    trainer.add_groups(cfg, [r.completions for r in replayed], [r.context for r in replayed],
                       [r.rng for r in replayed], loss, first_group=2)
    assert all(row.group >= 2 for row in loss.rows)


def test_replayed_groups_are_groups_of_their_own_in_the_loss(model_and_tokenizer, monkeypatch):
    """T-SPMO averages per group: replayed groups must not merge with the step's own groups,
    and the step's group count (the norm's M) must include them."""
    model, tok = model_and_tokenizer
    task = Task("toy", [Example("what is 2 times 3?", "6"), Example("say something", "x")], [],
                reward=lambda text, answer: float(len(text) % 2))  # mixed, by chance
    cfg = TrainConfig(algo="t-spmo", group_size=4, max_new_tokens=24, temperature=1.0,
                      tspmo_replay=2, prompts_per_step=2, steps=1)
    prompts = {tuple(p) for p in encode_prompts(tok, [format_prompt(tok, e.question)
                                                      for e in task.train])}
    seen = {}
    real_select, real_loss = trainer.rollout_and_select, trainer.step_microbatches

    def select(*args, **kwargs):
        out = real_select(*args, **kwargs)
        seen["rows"], seen["stats"] = out.loss.rows, out.stats
        return out

    def loss(model, loss_and_grad, cfg, loss, totals):
        seen["totals"] = totals
        return real_loss(model, loss_and_grad, cfg, loss, totals)

    monkeypatch.setattr(trainer, "rollout_and_select", select)
    monkeypatch.setattr(trainer, "step_microbatches", loss)
    trainer.run_step(model, tok, task, cfg, World(), trainer.make_optimizer(cfg),
                     make_loss_and_grad(model, 0.0, compile=False), step=0)
    replays = seen["stats"]["replay_groups"]
    assert replays >= 1 and seen["totals"].groups == 2 + replays
    replayed = [row for row in seen["rows"] if tuple(row.context) not in prompts]
    own = [row for row in seen["rows"] if tuple(row.context) in prompts]
    assert replayed and {row.group for row in replayed} <= set(range(2, 2 + replays))
    assert {row.group for row in own} <= {0, 1}
