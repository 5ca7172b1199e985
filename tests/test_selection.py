import numpy as np
import pytest

from mlx_tokenrl.algorithms import grpo, s_grpo, t_spmo
from mlx_tokenrl.algorithms.base import STD_EPS, GroupRecord, group_advantages
from mlx_tokenrl.algorithms.s_grpo import sgrpo_positions
from mlx_tokenrl.config import TrainConfig


def selected(algorithm, completions, rewards, rng=None, **settings):
    """The group's selection as (row, position, advantage) tuples."""
    cfg = TrainConfig(algo=algorithm.ALGORITHM.name, **settings)
    return list(algorithm.select(GroupRecord([1], completions, rewards), cfg, rng))


def grpo_selection(completions, rewards, scale_rewards=True):
    return selected(grpo, completions, rewards, scale_rewards="group" if scale_rewards else "none")


def tspmo_selection(completions, rewards, max_pairs, rng):
    return selected(t_spmo, completions, rewards, rng, tspmo_max_pairs=max_pairs)


def sgrpo_selection(completions, rewards, alpha, k, p, rng):
    return selected(s_grpo, completions, rewards, rng, sgrpo_alpha=alpha, sgrpo_k=k, sgrpo_p=p)


def test_grpo_every_token_with_group_advantage():
    completions = [[5, 6, 2], [5, 2], [7, 8, 9, 2]]
    rewards = [1.0, 0.0, 0.0]
    mean, std = 1 / 3, np.std([1.0, 0.0, 0.0])
    triples = grpo_selection(completions, rewards)
    assert [(r, p) for r, p, _ in triples] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1),
                                               (2, 0), (2, 1), (2, 2), (2, 3)]
    assert triples[0][2] == pytest.approx((1 - mean) / (std + STD_EPS))
    assert triples[3][2] == pytest.approx((0 - mean) / (std + STD_EPS))


def test_grpo_without_std_scaling_and_flat_groups():
    assert grpo_selection([[1], [2]], [0.5, 0.5]) == []
    triples = grpo_selection([[1], [2]], [1.0, 0.0], scale_rewards=False)
    assert triples == [(0, 0, 0.5), (1, 0, -0.5)]
    assert np.allclose(group_advantages([2.0, 0.0], scale_rewards=False), [1.0, -1.0])


def test_tspmo_hand_computed_tree():
    # Prompt's group: two share the prefix [1, 2], one shares only [1], one starts apart.
    completions = [[1, 2, 3], [1, 2, 4], [1, 5], [6]]
    rewards = [1.0, 0.0, 1.0, 0.0]
    triples = {(r, p): a for r, p, a in tspmo_selection(completions, rewards, 100, np.random.default_rng(0))}
    root = 0.5
    r1, r12 = 2 / 3, 0.5
    expected = {
        (0, 0): r1 - root,     # [] -> 1
        (3, 0): 0.0 - root,    # [] -> 6
        (0, 1): r12 - r1,      # [1] -> 2
        (2, 1): 1.0 - r1,      # [1] -> 5
        (0, 2): 1.0 - r12,     # [1,2] -> 3
        (1, 2): 0.0 - r12,     # [1,2] -> 4
    }
    assert triples.keys() == expected.keys()
    for key, value in expected.items():
        assert triples[key] == pytest.approx(value)


def test_tspmo_identical_truncated_and_flat():
    rng = np.random.default_rng(0)
    # Identical completions carry no branch; rewards all equal: nothing at all.
    assert tspmo_selection([[1, 2], [1, 2], [1, 2]], [1.0, 1.0, 1.0], 10, rng) == []
    # Identical sequences with different rewards cannot be told apart: A = 0 everywhere.
    assert tspmo_selection([[1, 2], [1, 2]], [1.0, 0.0], 10, rng) == []
    # A truncated completion is a prefix of another: it lowers R([1]) but adds no pair itself.
    triples = tspmo_selection([[1], [1, 2]], [0.0, 1.0], 10, rng)
    assert triples == [(1, 1, pytest.approx(0.5))]


def test_tspmo_cap_takes_a_random_subset():
    completions = [[i, 9] for i in range(8)]
    rewards = [float(i % 2) for i in range(8)]
    full = tspmo_selection(completions, rewards, 100, np.random.default_rng(0))
    assert len(full) == 8
    capped = tspmo_selection(completions, rewards, 3, np.random.default_rng(1))
    assert len(capped) == 3 and set(capped) <= set(full)


def test_sgrpo_statistics():
    rng = np.random.default_rng(0)
    alpha, k, p = 4, 20, 0.3
    sizes, rates = [], []
    for _ in range(2000):
        chosen = sgrpo_positions(100, alpha, k, p, rng)
        assert chosen[:alpha] == list(range(alpha))
        assert len(chosen) <= k and chosen == sorted(chosen)
        sizes.append(len(chosen))
        # inclusion rate among the positions scanned after alpha
        last = chosen[-1]
        rates.append((len(chosen) - alpha, last - alpha + 1))
    picked, scanned = np.array(rates).sum(axis=0)
    assert picked / scanned == pytest.approx(p, abs=0.02)
    assert max(sizes) == k
    assert sgrpo_positions(3, alpha, k, p, rng) == [0, 1, 2]


def test_sgrpo_selection_uses_group_advantages():
    rng = np.random.default_rng(0)
    triples = sgrpo_selection([[1] * 50, [2] * 50], [1.0, 0.0], 2, 5, 0.5, rng)
    rows = [r for r, _, _ in triples]
    assert rows.count(0) == 5 and rows.count(1) == 5
    assert all(a == pytest.approx(0.5 / (0.5 + STD_EPS)) for r, _, a in triples if r == 0)
    assert sgrpo_selection([[1], [2]], [0.0, 0.0], 2, 5, 0.5, rng) == []
