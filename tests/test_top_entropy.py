"""--algo top-entropy: GRPO's advantages on each completion's highest-entropy positions, the
entropies recorded by the rollout."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_tokenrl import trainer
from mlx_tokenrl.algorithms.top_entropy import top_entropy_positions
from mlx_tokenrl.config import ConfigError, TrainConfig
from mlx_tokenrl.distributed import World
from mlx_tokenrl.loss import make_loss_and_grad
from mlx_tokenrl.models import load_model
from mlx_tokenrl import rollout as rollout_module
from mlx_tokenrl.rollout import Completion, SamplingParams, generate_tokens, rollout


def naive_top(entropies, quantile):
    """By hand: sort positions by entropy, highest first, ties to the earlier position."""
    count = max(1, int(np.ceil(quantile * len(entropies) - 1e-9)))
    order = np.lexsort((np.arange(len(entropies)), -np.asarray(entropies)))
    return sorted(order[:count].tolist())


def test_positions_ties_and_short_completions():
    assert top_entropy_positions([0.1, 3.0, 0.5, 2.0, 0.2], 0.4) == [1, 3]
    assert top_entropy_positions([0.7], 0.2) == [0]  # a one-token completion keeps its token
    assert top_entropy_positions([0.3, 0.9], 0.2) == [1]  # ceil(0.4) = 1
    assert top_entropy_positions([1.0, 1.0, 1.0, 1.0], 0.5) == [0, 1]  # ties: earlier first
    assert top_entropy_positions([2.0, 1.0, 1.0, 1.0], 0.5) == [0, 1]
    assert top_entropy_positions(list(np.linspace(1, 0, 100)), 0.07) == list(range(7))  # not 8
    assert top_entropy_positions([0.5, 0.1, 0.3], 1.0) == [0, 1, 2]
    rng = np.random.default_rng(0)
    for _ in range(200):
        entropies = rng.choice([0.0, 0.5, 1.0, 2.0], size=int(rng.integers(1, 40))).tolist()
        quantile = float(rng.choice([0.05, 0.2, 0.5, 0.99, 1.0]))
        assert top_entropy_positions(entropies, quantile) == naive_top(entropies, quantile)


def full_logits_stats(model, prompt, tokens):
    """A separate forward of prompt + completion: log-prob of each completion token and the
    entropy of the model's distribution where it was sampled."""
    logits = model(mx.array(prompt + tokens)[None])[0, len(prompt) - 1:-1].astype(mx.float32)
    logp = nn.log_softmax(logits, axis=-1)
    chosen = np.array(mx.take_along_axis(logp, mx.array(tokens)[:, None], axis=-1)[:, 0])
    entropy = np.array(-(mx.exp(logp) * logp).sum(axis=-1))
    return chosen, entropy


def test_recorded_entropies_pick_the_positions_a_full_forward_picks(tiny_model_dir):
    model, tok = load_model(str(tiny_model_dir))
    prompts = [[1, 2, 3, 4], [7, 8]]
    completions = rollout(model, tok, prompts, 3, SamplingParams(1.0, 1.0, 20), seeds=[3, 4],
                          token_stats=True)
    plain = rollout(model, tok, prompts, 3, SamplingParams(1.0, 1.0, 20), seeds=[3, 4])
    assert [c.tokens for c in plain] == [c.tokens for c in completions]  # recording changes
    assert plain[0].entropies is None  # nothing it samples, and is off unless asked for
    for c in completions:
        logprobs, entropies = full_logits_stats(model, prompts[c.prompt_index], c.tokens)
        assert len(c.entropies) == len(c.logprobs) == len(c.tokens)
        np.testing.assert_allclose(c.logprobs, logprobs, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(c.entropies, entropies, rtol=1e-4, atol=1e-4)
        for quantile in (0.2, 0.5):
            assert (top_entropy_positions(c.entropies, quantile)
                    == naive_top(entropies.tolist(), quantile))


def test_recorded_stats_follow_their_rows_when_finished_rows_are_dropped(tiny_model_dir,
                                                                         monkeypatch):
    """Rows that end early (a quarter of the vocabulary is EOS here) are dropped from the
    batch after every step: each row's stats stay its own."""
    monkeypatch.setattr(rollout_module, "COMPACT_FRACTION", 0.0)
    model, _ = load_model(str(tiny_model_dir))
    prompts = [[1, 2, 3, 4], [7, 8]]
    vocab = model.args.vocab_size
    generated = generate_tokens(model, prompts, 4, SamplingParams(1.0, 1.0, 12),
                                set(range(0, vocab, 4)), seeds=[5, 6], token_stats=True)
    lengths = [len(t) for t in generated.tokens]
    assert len(set(lengths)) > 2  # rows did finish at different steps
    for row, (tokens, stats) in enumerate(zip(generated.tokens, generated.stats)):
        logprobs, entropies = full_logits_stats(model, prompts[row // 4], tokens)
        np.testing.assert_allclose(np.array(stats), np.stack([logprobs, entropies], axis=1),
                                   rtol=1e-4, atol=1e-4)


def completion(tokens, reward, entropies):
    return Completion(0, list(tokens), False, "", float(reward), [0.0] * len(tokens),
                      list(entropies))


def test_loss_is_grpos_restricted_to_the_top_entropy_positions(lora_model):
    """By hand: completions of lengths 5, 3, 4, 2 keep ceil(0.5 n) = 3, 2, 2, 1 positions;
    the loss is -sum over them of A_i / (N * k_i) * log pi from full-logits forwards."""
    entropies = [[0.1, 2.0, 0.3, 1.5, 1.9], [0.2, 0.1, 0.9], [1.0, 1.0, 0.4, 1.0], [0.5, 0.6]]
    tokens = [[11, 12, 13, 14, 15], [21, 22, 23], [31, 32, 33, 34], [41, 42]]
    rewards = [1.0, 0.0, 0.0, 1.0]
    kept = [[1, 3, 4], [0, 2], [0, 1], [1]]
    context = [5, 6, 7]
    group = [completion(t, r, e) for t, r, e in zip(tokens, rewards, entropies)]
    cfg = TrainConfig(algo="top-entropy", entropy_quantile=0.5, group_size=4)
    inputs = trainer.LossInput()
    trainer.add_groups(cfg, [group], [context], [None], inputs)
    assert sorted(zip(inputs.selection.rows, inputs.selection.positions)) == [
        (row, pos) for row, positions in enumerate(kept) for pos in positions]
    totals = trainer.StepTotals(completions=4, groups=1, selected=len(inputs.selection))
    result = trainer.loss_and_grads(lora_model, make_loss_and_grad(lora_model, compile=False),
                                    cfg, inputs, totals)
    mean, std = 0.5, 0.5
    advantages = [(r - mean) / (std + 1e-4) for r in rewards]

    def naive():
        total = mx.array(0.0)
        for t, a, positions in zip(tokens, advantages, kept):
            logp = nn.log_softmax(lora_model(mx.array(context + t)[None])[0], axis=-1)
            for pos in positions:
                total = total - a / (4 * len(positions)) * logp[len(context) + pos - 1, t[pos]]
        return total

    want_loss, want_grads = nn.value_and_grad(lora_model, naive)()
    assert result.loss.item() == pytest.approx(want_loss.item(), abs=1e-5)
    for (name, g), (_, want) in zip(tree_flatten(result.grads), tree_flatten(want_grads)):
        np.testing.assert_allclose(np.array(g), np.array(want), rtol=1e-4, atol=1e-5,
                                   err_msg=name)
    # Its forward stops at each completion's last kept position: row 2 (kept 0, 1) runs 1 token.
    assert max(pos for row, pos, _ in inputs.selection if row == 2) == 1


def test_a_step_trains_on_recorded_entropies(tiny_model_dir, monkeypatch):
    from mlx_tokenrl.models import add_lora, lora_config
    from mlx_tokenrl.tasks import Example, Task

    model, tok = load_model(str(tiny_model_dir))
    add_lora(model, lora_config(rank=4, scale=10.0))
    task = Task("toy", [Example(f"what is {i} times 3?", str(3 * i)) for i in range(4)], [],
                reward=lambda text, answer: sum(ch.isdigit() for ch in text) / max(len(text), 1))
    cfg = TrainConfig(algo="top-entropy", group_size=4, prompts_per_step=2, max_new_tokens=12,
                      temperature=1.0, microbatch_rows=4, updates_per_rollout=2)
    seen = {}
    real = trainer.rollout_and_select

    def spy(*args, **kwargs):
        seen["rollout"] = out = real(*args, **kwargs)
        return out

    monkeypatch.setattr(trainer, "rollout_and_select", spy)
    metrics = trainer.run_step(model, tok, task, cfg, World(), trainer.make_optimizer(cfg),
                               make_loss_and_grad(model, compile=False), 0)
    rows = seen["rollout"].loss.rows
    per_row = {}
    for row, pos, _ in seen["rollout"].loss.selection:
        per_row.setdefault(row, []).append(pos)
    assert per_row and all(len(p) == int(np.ceil(0.2 * len(rows[r].completion) - 1e-9))
                           for r, p in per_row.items())
    assert metrics["selected_tokens"] == sum(map(len, per_row.values()))
    assert metrics["updates"] == 2


@pytest.mark.parametrize("quantile", [0.0, -0.1, 1.5])
def test_a_quantile_outside_zero_one_fails_before_model_work(quantile):
    with pytest.raises(ConfigError, match="--entropy-quantile must be"):
        TrainConfig(algo="top-entropy", entropy_quantile=quantile).validate()


@pytest.mark.parametrize("device", ["cpu", "gpu"])
def test_token_stats_on_either_device_match_float64_by_hand(device, monkeypatch):
    """The CPU's numpy formula and the device's MLX one, against log-softmax in float64."""
    from mlx_tokenrl import sampling

    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(5, 700)) * 4).astype(np.float32)
    logits[0, :] = 0.0  # uniform: entropy log(700)
    logits[1, 3] = 60.0  # nearly one-hot: entropy ~0
    logits[2, 100:200] = -np.inf  # masked tokens (a processor's ban): no NaN
    tokens = np.array([3, 3, 10, 699, 0])
    if device == "gpu":  # (the MLX formula, run on the CPU: only the branch is chosen here)
        monkeypatch.setattr(sampling.mx, "default_device", lambda: "not the cpu")
    stats = np.array(sampling.token_stats(mx.array(logits), mx.array(tokens)))
    x = logits.astype(np.float64)
    logp = x - x.max(axis=1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(stats[:, 0], logp[np.arange(5), tokens], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats[:, 1], -np.nansum(np.exp(logp) * logp, axis=1), rtol=1e-5,
                               atol=1e-5)
    assert stats[0, 1] == pytest.approx(np.log(700), rel=1e-5)
