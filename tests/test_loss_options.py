"""--loss-norm constant (Dr. GRPO) and --mask-truncated (DAPO's overlong filtering), with
weights computed by hand."""

import numpy as np
import pytest

from mlx_tokenrl import trainer
from mlx_tokenrl.config import TrainConfig
from mlx_tokenrl.distributed import World
from mlx_tokenrl.loss import make_loss_and_grad
from mlx_tokenrl.rollout import Completion
from mlx_tokenrl.tasks import Example, Task

A = 0.5 / (0.5 + 1e-4)  # a two-completion group's advantages are +-A (rewards 1 and 0)


def completion(tokens, reward, truncated=False, text=""):
    return Completion(0, list(tokens), truncated, text, float(reward))


def weighted(cfg, groups, contexts):
    """(row's context + completion up to the token) -> weight x advantage, as the loss uses."""
    inputs = trainer.LossInput()
    added = trainer.add_groups(cfg, groups, contexts, [np.random.default_rng(0)] * len(groups),
                               inputs)
    totals = trainer.StepTotals(completions=sum(map(len, groups)), groups=len(groups),
                                selected=len(inputs.selection))
    weights = trainer.step_weights(cfg, inputs, totals)
    rows = inputs.rows
    return added, {tuple(rows[r].context + rows[r].completion[:p + 1]): w * a
                   for (r, p, a), w in zip(inputs.selection, weights)}


def test_constant_norm_divides_by_completions_times_max_new_tokens():
    # 4 completions in the step, --max-new-tokens 10: every token weighs 1/40, whatever its
    # completion's length (sequence would give the 3-token one 1/12 per token).
    groups = [[completion([1, 2], 1), completion([3, 4, 5], 0)],
              [completion([6], 1), completion([7], 1)]]
    cfg = TrainConfig(algo="grpo", group_size=2, loss_norm="constant", max_new_tokens=10)
    _, got = weighted(cfg, groups, [[100], [200]])
    assert got == pytest.approx({(100, 1): A / 40, (100, 1, 2): A / 40, (100, 3): -A / 40,
                                 (100, 3, 4): -A / 40, (100, 3, 4, 5): -A / 40})


def test_constant_norm_for_tspmo_pairs():
    # Pairs ([],1) +1/2 and ([],2) -1/2; 2 completions x 8 tokens.
    groups = [[completion([1, 9], 1), completion([2, 9], 0)]]
    cfg = TrainConfig(algo="t-spmo", group_size=2, loss_norm="constant", max_new_tokens=8,
                      tspmo_replay=0)
    _, got = weighted(cfg, groups, [[100]])
    assert got == pytest.approx({(100, 1): 0.5 / 16, (100, 2): -0.5 / 16})


def test_mask_truncated_drops_cut_off_completions_without_an_answer():
    # Row 1 hit the limit with no '#### N': its tokens leave the loss, but its reward still
    # shapes the advantages (rewards 1, 0, 0, 1: A = +-1 / (0.5 + 1e-4) * 0.5) and it still
    # counts among the 4 completions of --loss-norm sequence. Row 2 was cut off after its
    # answer: kept. Row 3 ended by itself: kept.
    group = [completion([1, 2], 1), completion([3, 4, 5], 0, truncated=True, text="so 3 +"),
             completion([6, 7], 0, truncated=True, text="#### 13 and"), completion([8], 1)]
    cfg = TrainConfig(algo="grpo", group_size=4, mask_truncated=True)
    added, got = weighted(cfg, [group], [[100]])
    assert added.masked == 1
    assert got == pytest.approx({(100, 1): A / 8, (100, 1, 2): A / 8, (100, 6): -A / 8,
                                 (100, 6, 7): -A / 8, (100, 8): A / 4})
    cfg_off = TrainConfig(algo="grpo", group_size=4)
    added, got = weighted(cfg_off, [group], [[100]])
    assert added.masked == 0 and got[(100, 3, 4, 5)] == pytest.approx(-A / 12)


def test_mask_truncated_keeps_a_tspmo_pair_an_unmasked_completion_shares():
    # ([],1): completions 0 (masked) and 1 share it, R = 1/2 vs root 1/3: +1/6, kept through
    # completion 1 in either order. ([1],5) only in the masked one: dropped. ([1],6): +1/2.
    # ([],2): -1/3. Token norm over the 3 pairs left.
    group = [completion([1, 5], 0, truncated=True, text="x"), completion([1, 6], 1),
             completion([2], 0)]
    cfg = TrainConfig(algo="t-spmo", group_size=3, tspmo_replay=0, mask_truncated=True,
                      loss_norm="token")
    for order in ([0, 1, 2], [1, 0, 2], [2, 0, 1]):
        _, got = weighted(cfg, [[group[i] for i in order]], [[100]])
        assert got == pytest.approx({(100, 1): (1 / 6) / 3, (100, 1, 6): 0.5 / 3,
                                     (100, 2): (-1 / 3) / 3})


def test_pairs_only_masked_completions_reach_take_no_place_under_the_pair_cap():
    # Rows 0-2 are masked and branch at every position; row 3, unmasked, branches from them
    # at its first token only: with --tspmo-max-pairs 1 that pair must be the one kept.
    group = [completion([1, 5, 6], 0, truncated=True, text="x"),
             completion([1, 7, 8], 1, truncated=True, text="x"),
             completion([1, 9, 4], 0, truncated=True, text="x"), completion([2], 1)]
    cfg = TrainConfig(algo="t-spmo", group_size=4, tspmo_replay=0, mask_truncated=True,
                      tspmo_max_pairs=1, loss_norm="token")
    for seed in range(5):
        inputs = trainer.LossInput()
        trainer.add_groups(cfg, [group], [[100]], [np.random.default_rng(seed)], inputs)
        assert [(inputs.rows[r].completion, p) for r, p, _ in inputs.selection] == [([2], 0)]


def test_masked_completions_are_counted_in_the_metrics(tiny_model_dir):
    from mlx_tokenrl.models import add_lora, load_model, lora_config

    model, tok = load_model(str(tiny_model_dir))
    add_lora(model, lora_config(rank=4, scale=10.0))
    task = Task("toy", [Example(f"what is {i} times 3?", str(3 * i)) for i in range(4)], [],
                reward=lambda text, answer: sum(ch.isdigit() for ch in text) / max(len(text), 1))
    # 6 new tokens: the random model never stops nor writes '####', so every completion is cut.
    cfg = TrainConfig(algo="grpo", group_size=4, prompts_per_step=2, max_new_tokens=6,
                      temperature=1.0, microbatch_rows=4, mask_truncated=True)
    metrics = trainer.run_step(model, tok, task, cfg, World(), trainer.make_optimizer(cfg),
                               make_loss_and_grad(model, compile=False), 0)
    assert metrics["masked_truncated"] == 8 and metrics["selected_tokens"] == 0
    assert metrics["updates"] == 0
