"""What `--loss-norm` means for each algorithm, and that a group's order never matters."""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_tokenrl import trainer
from mlx_tokenrl.config import ALGOS, TrainConfig
from mlx_tokenrl.loss import make_loss_and_grad, normalisation_weights
from mlx_tokenrl.rollout import Completion


def completion(tokens, reward):
    # Entropies as a rollout records them (for --algo top-entropy), fixed by each token.
    return Completion(0, list(tokens), False, "", float(reward), [0.0] * len(tokens),
                      [(int(t) * 7919 % 101) / 100 for t in tokens])


def weighted_advantages(cfg, groups, contexts):
    """(context + prefix + token) -> weight x advantage, as the loss will use them."""
    loss = trainer.LossInput()
    trainer.add_groups(cfg, groups, contexts, [np.random.default_rng(0) for _ in groups], loss)
    rows, triples = loss.rows, loss.selection
    totals = trainer.StepTotals(completions=sum(map(len, groups)), groups=len(groups),
                                selected=len(triples))
    units, unit_of_row = trainer.loss_units(cfg, totals, rows)
    weights = normalisation_weights(triples, cfg.loss_norm, units, len(triples), unit_of_row)
    return {tuple(rows[r].context + rows[r].completion[:p + 1]): w * a
            for (r, p, a), w in zip(triples, weights)}


def test_tspmo_sequence_norm_is_a_mean_over_each_groups_pairs_then_over_groups():
    # Group 0: [1,2,..] solved, [1,3,..] not. Pairs (hand): ([1],2) A = 1 - 1/2 = +1/2,
    # ([1],3) A = 1/3 - 1/2 = -1/6, ([1,3],4) A = 1 - 1/3 = +2/3, ([1,3],5) A = 0 - 1/3 = -1/3
    # (two [1,3,5] completions). ([],1) has A = 0. Group 1 has one pair each way:
    # ([],7) A = +1/2, ([],8) A = -1/2. Two groups: weight 1 / (2 x pairs in the group).
    groups = [[completion([1, 2, 9], 1), completion([1, 3, 5], 0), completion([1, 3, 4], 1),
               completion([1, 3, 5], 0)],
              [completion([7], 1), completion([8], 0), completion([7], 1), completion([8], 0)]]
    contexts = [[100], [200]]
    cfg = TrainConfig(algo="t-spmo", group_size=4, tspmo_replay=0)
    got = weighted_advantages(cfg, groups, contexts)
    expected = {(100, 1, 2): 0.5 / 8, (100, 1, 3): (-1 / 6) / 8, (100, 1, 3, 4): (2 / 3) / 8,
                (100, 1, 3, 5): (-1 / 3) / 8, (200, 7): 0.5 / 4, (200, 8): -0.5 / 4}
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-6), key
    # `token`: every pair weighs 1 / (all pairs of the step).
    cfg_token = TrainConfig(algo="t-spmo", group_size=4, tspmo_replay=0, loss_norm="token")
    got = weighted_advantages(cfg_token, groups, contexts)
    assert got[(100, 1, 3, 4)] == pytest.approx((2 / 3) / 6, rel=1e-6)


def test_grpo_sequence_norm_is_a_mean_over_completions_of_their_token_means():
    # Rewards 1, 0: A = +-0.5 / (0.5 + 1e-4). N = 4 completions in the step (the second group
    # has no signal but still counts), so a token of a 2-token completion weighs 1 / (4 x 2).
    groups = [[completion([1, 2], 1), completion([3, 4, 5], 0)],
              [completion([6], 1), completion([7], 1)]]
    got = weighted_advantages(TrainConfig(algo="grpo", group_size=2), groups, [[100], [200]])
    a = 0.5 / (0.5 + 1e-4)
    assert got[(100, 1)] == pytest.approx(a / 8, rel=1e-6)
    assert got[(100, 3, 4, 5)] == pytest.approx(-a / 12, rel=1e-6)
    assert len(got) == 5


def sample_groups(seed, num_groups=3, group_size=6):
    """Random groups whose completions share openings, so T-SPMO has branches to find."""
    rng = np.random.default_rng(seed)
    contexts, groups = [], []
    for g in range(num_groups):
        contexts.append(rng.integers(3, 300, size=int(rng.integers(3, 8))).tolist())
        stems = [rng.integers(3, 300, size=int(rng.integers(1, 4))).tolist() for _ in range(2)]
        group = []
        for i in range(group_size):
            tail = rng.integers(3, 300, size=int(rng.integers(1, 9))).tolist()
            group.append(completion(stems[i % 2] + tail, rng.choice([0.0, 0.1, 1.0, 1.1])))
        group[0].reward, group[1].reward = 0.0, 1.0
        groups.append(group)
    return contexts, groups


def step_loss_and_grads(model, cfg, contexts, groups, step=3):
    loss = trainer.LossInput()
    trainer.add_groups(cfg, groups, contexts,
                       [trainer.group_rng(cfg, step, p) for p in range(len(groups))], loss)
    totals = trainer.StepTotals(completions=sum(map(len, groups)), groups=len(groups),
                                selected=len(loss.selection))
    result = trainer.loss_and_grads(model, make_loss_and_grad(model, cfg.beta, compile=False),
                                    cfg, loss, totals)
    return float(result.loss), dict(tree_flatten(result.grads))


@pytest.mark.parametrize("norm", ["sequence", "token"])
@pytest.mark.parametrize("algo", ALGOS)
def test_reordering_a_group_changes_neither_loss_nor_gradient(lora_model, algo, norm):
    # Small caps so S-GRPO's random subsets and T-SPMO's random pair subset are exercised.
    cfg = TrainConfig(algo=algo, loss_norm=norm, group_size=6, sgrpo_alpha=1, sgrpo_k=3,
                      sgrpo_p=0.5, tspmo_max_pairs=5, beta=0.05)
    contexts, groups = sample_groups(seed=1)
    loss, grads = step_loss_and_grads(lora_model, cfg, contexts, groups)
    rng = np.random.default_rng(7)
    for _ in range(2):
        shuffled = [[group[i] for i in rng.permutation(len(group))] for group in groups]
        loss2, grads2 = step_loss_and_grads(lora_model, cfg, contexts, shuffled)
        assert loss2 == pytest.approx(loss, abs=1e-6)
        for name, g in grads.items():
            np.testing.assert_allclose(np.array(grads2[name]), np.array(g), atol=1e-6, rtol=1e-4)
    assert max(float(mx.abs(g).max()) for g in grads.values()) > 1e-5
