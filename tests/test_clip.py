"""Several updates per rollout batch: PPO's clipped ratio, the old policy taken from the first
update's own forward, the step as a unit, and the step's learning rate for every update."""

from types import SimpleNamespace

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from mlx_tokenrl import trainer
from mlx_tokenrl.config import TrainConfig
from mlx_tokenrl.distributed import World
from mlx_tokenrl.loss import (ClipRange, LossRow, attach_ref_logprobs, clipped_objective,
                              lora_disabled, make_loss_and_grad, make_microbatches,
                              normalisation_weights, selected_logprobs)
from mlx_tokenrl.tasks import Example, Task


def objective_and_grad(ratio, advantages, clip):
    """min(r A, clip(r) A) per token and its derivative in r, from MLX."""
    ratio, advantages = mx.array(ratio), mx.array(advantages)
    value = clipped_objective(ratio, advantages, clip)
    grad = mx.grad(lambda r: clipped_objective(r, advantages, clip).sum())(ratio)
    return np.array(value), np.array(grad)


def test_clipped_objective_by_hand():
    # eps 0.2: [0.8, 1.2].  r = 1.5, A = +1: min(1.5, 1.2) = 1.2, clipped: no gradient.
    # r = 0.5, A = +1: min(0.5, 0.8) = 0.5, gradient A = 1 (a worse token is not clipped).
    # r = 1.5, A = -1: min(-1.5, -1.2) = -1.5, gradient -1. r = 0.5, A = -1: min(-0.5, -0.8)
    # = -0.8, clipped. r = 1.1, A = 2: inside, 2.2 with gradient 2. r = 1, A = -3: -3, grad -3.
    value, grad = objective_and_grad([1.5, 0.5, 1.5, 0.5, 1.1, 1.0], [1, 1, -1, -1, 2, -3],
                                     ClipRange(0.2, 0.2))
    np.testing.assert_allclose(value, [1.2, 0.5, -1.5, -0.8, 2.2, -3.0], rtol=1e-6)
    np.testing.assert_array_equal(grad, [0, 1, -1, 0, 2, -3])
    # DAPO's clip-higher: [0.8, 1.28] lets r = 1.25 with A > 0 keep its gradient.
    _, grad = objective_and_grad([1.25, 1.3, 0.75], [1, 1, -1], ClipRange(0.2, 0.28))
    np.testing.assert_array_equal(grad, [1, 0, 0])
    _, grad = objective_and_grad([1.25], [1], ClipRange(0.2, 0.2))
    np.testing.assert_array_equal(grad, [0])


def naive_objective(ratio, advantages, low, high):
    """PPO's min(r A, clip(r) A) and its derivative in r, token by token in plain Python."""
    values, grads = [], []
    for r, a in zip(ratio, advantages):
        clipped_r = min(max(r, 1 - low), 1 + high)
        values.append(min(r * a, clipped_r * a))
        grads.append(0.0 if clipped_r * a < r * a else a)
    return np.array(values), np.array(grads)


def test_clipped_objective_matches_a_naive_implementation_on_random_ratios():
    rng = np.random.default_rng(0)
    for _ in range(20):
        low, high = rng.uniform(0.05, 0.4), None
        high = low + rng.uniform(0, 0.2)
        ratio = np.exp(rng.normal(0, 0.4, 64)).astype(np.float32)
        advantages = rng.normal(0, 1, 64).astype(np.float32)
        value, grad = objective_and_grad(ratio, advantages, ClipRange(low, high))
        want_value, want_grad = naive_objective(ratio.tolist(), advantages.tolist(), low, high)
        np.testing.assert_allclose(value, want_value, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-6)
        assert 0 < (grad == 0).sum() < 64  # both regions are exercised


def test_ratio_statistics_by_hand():
    """eps 0.2 below, 0.1 above: r = 1.15 with A > 0 and r = 0.7 with A < 0 are clipped;
    0.85 with A < 0 is not (0.85 > 0.8), nor are 1.05 and 0.5 with A > 0; the padding pick
    (weight 0) does not count."""
    ratios = [1.15, 0.85, 0.7, 1.05, 0.5, 5.0]
    batch = SimpleNamespace(weights=mx.array([1.0, 1, 1, 1, 1, 0]),
                            advantages=mx.array([1.0, -1, -1, 1, 1, 1]),
                            old_logprobs=mx.full((6,), -2.0))
    stats = trainer.RatioStats()
    stats.add(batch, mx.array(np.log(ratios) - 2.0), 0.2, 0.1)
    real = np.array(ratios[:5])
    assert (stats.tokens, stats.clipped) == (5, 2)
    assert stats.ratio_sum == pytest.approx(real.sum())
    assert (stats.ratio_min, stats.ratio_max) == (pytest.approx(0.5), pytest.approx(1.15))
    assert stats.kl_sum == pytest.approx((real - 1 - np.log(real)).sum())


def case(seed=0):
    rng = np.random.default_rng(seed)
    rows = [LossRow(rng.integers(3, 300, size=n).tolist(), rng.integers(3, 300, size=m).tolist())
            for n, m in [(5, 12), (9, 7), (3, 20)]]
    triples = [(0, 0, 1.0), (0, 5, 1.0), (0, 11, 1.0), (1, 3, -0.5), (2, 0, 0.7), (2, 19, -1.3)]
    weights = normalisation_weights(triples, "sequence", num_units=4, num_selected=len(triples))
    return rows, triples, weights


def todays_loss(model, batch, beta):
    """The loss before this change: -sum w A log pi (+ beta k3), no ratio."""
    logp = selected_logprobs(model, batch)
    loss = -(batch.weights * batch.advantages * logp).sum()
    if beta > 0:
        log_ratio = batch.ref_logprobs - logp
        loss = loss + beta * (batch.weights * (mx.exp(log_ratio) - log_ratio - 1)).sum()
    return loss


@pytest.mark.parametrize("beta", [0.0, 0.3])
@pytest.mark.parametrize("compiled", [False, True])
def test_first_update_has_todays_loss_and_gradients_exactly(lora_model, beta, compiled):
    rows, triples, weights = case()
    batches = make_microbatches(rows, triples, weights, rows_per_batch=2)
    if beta:
        attach_ref_logprobs(lora_model, batches)
    step = make_loss_and_grad(lora_model, beta, compiled, ClipRange(0.1, 0.1))
    for batch in batches:
        loss, grads, logprobs = step(batch)
        want_loss, want_grads = nn.value_and_grad(lora_model, lambda: todays_loss(
            lora_model, batch, beta))()
        # Uncompiled, the same operations in the same order: equal to the last bit. A
        # compiled graph may fuse the two sums of the loss differently (not the gradients).
        if compiled:
            assert loss.item() == pytest.approx(want_loss.item(), rel=1e-6, abs=1e-7)
        else:
            assert loss.item() == want_loss.item()
        for (name, g), (_, want) in zip(tree_flatten(grads), tree_flatten(want_grads)):
            np.testing.assert_array_equal(np.array(g), np.array(want), err_msg=name)
        np.testing.assert_allclose(np.array(logprobs),
                                   np.array(selected_logprobs(lora_model, batch)),
                                   rtol=1e-5, atol=1e-6)


def full_logprob(model, row, pos):
    tokens = row.context + row.completion
    logp = nn.log_softmax(model(mx.array(tokens)[None])[0].astype(mx.float32), axis=-1)
    return logp[len(row.context) + pos - 1, row.completion[pos]]


def test_a_later_update_takes_the_clipped_surrogate_against_the_first_updates_policy(lora_model):
    """Update 1 records pi_old; after the weights move, update 2's loss and gradients are the
    naive clipped surrogate's: -sum w min(r A, clip(r) A), r from full-logits forwards; update
    3's ratios are still to pi_old."""
    rows, triples, weights = case(1)
    clip = ClipRange(0.01, 0.05)  # tight, so the moved weights put some tokens outside
    cfg = TrainConfig(clip_epsilon=clip.low, clip_epsilon_high=clip.high)
    step = make_loss_and_grad(lora_model, 0.0, False, clip)
    batches = make_microbatches(rows, triples, weights, rows_per_batch=2)
    old = [mx.stop_gradient(full_logprob(lora_model, rows[r], p)) for r, p, _ in triples]
    before = lora_model.trainable_parameters()
    first = trainer.update_grads(step, cfg, batches)
    assert first.ratios.ratio_min == pytest.approx(1) and first.ratios.clipped == 0
    try:
        lora_model.update(tree_map(lambda w, g: w - 0.5 * g / (mx.abs(g).max() + 1e-12), before,
                                   first.grads))
        second = trainer.update_grads(step, cfg, batches)

        def naive():
            total = mx.array(0.0)
            for (r, p, a), w, lp_old in zip(triples, weights.tolist(), old):
                ratio = mx.exp(full_logprob(lora_model, rows[r], p) - lp_old)
                clipped = mx.clip(ratio, 1 - clip.low, 1 + clip.high)
                total = total - w * mx.minimum(ratio * a, clipped * a)
            return total

        _, want_grads = nn.value_and_grad(lora_model, naive)()
        for (name, g), (_, want) in zip(tree_flatten(second.grads), tree_flatten(want_grads)):
            np.testing.assert_allclose(np.array(g), np.array(want), rtol=1e-4, atol=1e-5,
                                       err_msg=name)
        ratios = np.exp(np.array([full_logprob(lora_model, rows[r], p) - lp
                                  for (r, p, _), lp in zip(triples, old)]))
        assert second.ratios.tokens == len(triples)
        assert second.ratios.ratio_min == pytest.approx(ratios.min(), rel=1e-4)
        assert second.ratios.ratio_max == pytest.approx(ratios.max(), rel=1e-4)
        advantages = np.array([a for _, _, a in triples])
        clipped = ((advantages > 0) & (ratios > 1 + clip.high)) | ((advantages < 0)
                                                                   & (ratios < 1 - clip.low))
        # A ratio within rounding (1e-4, as above) of a clip bound may fall either side.
        near = (np.abs(ratios - (1 + clip.high)) < 1e-4 * ratios) | (
            np.abs(ratios - (1 - clip.low)) < 1e-4 * ratios)
        assert abs(second.ratios.clipped - clipped.sum()) <= near.sum() and clipped.sum() > 0
        assert second.ratios.kl_sum == pytest.approx((ratios - 1 - np.log(ratios)).sum(),
                                                     rel=1e-3)
        # Update 3 (the weights moved again) still measures its ratio against the policy
        # before the step, not against update 2's.
        moved = lora_model.trainable_parameters()
        lora_model.update(tree_map(lambda w, g: w - 0.5 * g / (mx.abs(g).max() + 1e-12), moved,
                                   second.grads))
        third = trainer.update_grads(step, cfg, batches)
        ratios = np.exp(np.array([full_logprob(lora_model, rows[r], p) - lp
                                  for (r, p, _), lp in zip(triples, old)]))
        assert third.ratios.ratio_min == pytest.approx(ratios.min(), rel=1e-4)
        assert third.ratios.ratio_max == pytest.approx(ratios.max(), rel=1e-4)
    finally:
        lora_model.update(before)


# ---- the step: N updates, one learning rate, one unit ------------------------------------

def toy_task():
    return Task("toy", [Example(f"what is {i} times 3?", str(3 * i)) for i in range(6)], [],
                reward=lambda text, answer: sum(ch.isdigit() for ch in text) / max(len(text), 1))


def step_setup(tiny_model_dir, **settings):
    from mlx_tokenrl.models import add_lora, load_model, lora_config

    model, tok = load_model(str(tiny_model_dir))
    add_lora(model, lora_config(rank=4, scale=10.0))
    cfg = TrainConfig(algo="grpo", group_size=4, prompts_per_step=2, max_new_tokens=12,
                      temperature=1.0, lr=1e-2, warmup_steps=2, steps=10, microbatch_rows=4,
                      **settings)
    step = make_loss_and_grad(model, cfg.beta, False, ClipRange(cfg.clip_epsilon, cfg.clip_high))
    return model, tok, cfg, trainer.make_optimizer(cfg), step


def test_every_update_of_a_step_uses_the_steps_learning_rate(tiny_model_dir, monkeypatch):
    """The schedule counts steps: all N updates of step s take lr(s), and the metrics count
    them and their ratios."""
    model, tok, cfg, optimizer, step = step_setup(tiny_model_dir, updates_per_rollout=3)
    rates, real = [], trainer.apply_update

    def spy(model, optimizer, grads, clip, step):
        out = real(model, optimizer, grads, clip, step)
        rates.append((step, optimizer.learning_rate.item()))
        return out

    monkeypatch.setattr(trainer, "apply_update", spy)
    schedule = trainer.lr_schedule(cfg)
    for s in (0, 1, 4):
        metrics = trainer.run_step(model, tok, toy_task(), cfg, World(), optimizer, step, s)
        assert metrics["updates"] == 3 and not metrics["skipped"]
        assert metrics["ratio_min"] <= metrics["ratio_mean"] <= metrics["ratio_max"]
        assert metrics["ratio_min"] != metrics["ratio_max"]  # the later updates moved it
        assert 0 <= metrics["clip_fraction"] <= 1 and metrics["approx_kl"] >= 0
    assert [s for s, _ in rates] == [0, 0, 0, 1, 1, 1, 4, 4, 4]
    assert [lr for _, lr in rates] == pytest.approx([schedule(s).item() for s, _ in rates])
    assert len({lr for _, lr in rates}) == 3


def test_each_update_applies_the_gradient_of_its_own_forward(tiny_model_dir, monkeypatch):
    model, tok, cfg, optimizer, step = step_setup(tiny_model_dir, updates_per_rollout=3)
    computed, applied = [], []
    real_grads, real_update = trainer.update_grads, trainer.apply_update

    def grads_spy(*args):
        out = real_grads(*args)
        computed.append(out.grads)
        return out

    def update_spy(model, optimizer, grads, clip, step):
        applied.append(grads)
        return real_update(model, optimizer, grads, clip, step)

    monkeypatch.setattr(trainer, "update_grads", grads_spy)
    monkeypatch.setattr(trainer, "apply_update", update_spy)
    trainer.run_step(model, tok, toy_task(), cfg, World(), optimizer, step, 0)
    assert len(computed) == len(applied) == 3  # (one process: no all-reduce in between)
    assert all(a is c for a, c in zip(applied, computed))


def test_a_skipped_update_ends_the_steps_updates(tiny_model_dir, monkeypatch):
    """An update that found a NaN/inf moved nothing: the next would recompute the same
    forward, so the step stops there and reports it."""
    model, tok, cfg, optimizer, step = step_setup(tiny_model_dir, updates_per_rollout=3)
    forwards, real_grads, real_update = [], trainer.update_grads, trainer.apply_update

    def grads_spy(*args):
        forwards.append(1)
        return real_grads(*args)

    def update_spy(model, optimizer, grads, clip, step):
        if len(forwards) == 2:  # the second update's gradient is not finite
            return float("nan"), True
        return real_update(model, optimizer, grads, clip, step)

    monkeypatch.setattr(trainer, "update_grads", grads_spy)
    monkeypatch.setattr(trainer, "apply_update", update_spy)
    metrics = trainer.run_step(model, tok, toy_task(), cfg, World(), optimizer, step, 0)
    assert len(forwards) == 2 and metrics["updates"] == 1 and metrics["skipped"]


def test_one_update_reports_ratio_one_and_nothing_clipped(tiny_model_dir):
    model, tok, cfg, optimizer, step = step_setup(tiny_model_dir)
    metrics = trainer.run_step(model, tok, toy_task(), cfg, World(), optimizer, step, 0)
    assert metrics["updates"] == 1
    assert (metrics["ratio_mean"], metrics["ratio_min"], metrics["ratio_max"],
            metrics["clip_fraction"], metrics["approx_kl"]) == (1.0, 1.0, 1.0, 0.0, 0.0)


def test_an_interrupted_step_leaves_the_previous_steps_state(tiny_model_dir, monkeypatch):
    """Ctrl-C between a step's updates puts back its starting weights and optimizer state,
    so the checkpoint the trainer then saves is the previous step's."""
    model, tok, cfg, optimizer, step = step_setup(tiny_model_dir, updates_per_rollout=3)
    trainer.run_step(model, tok, toy_task(), cfg, World(), optimizer, step, 0)  # Adam has state
    weights = {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}
    state = {k: np.array(v) for k, v in tree_flatten(optimizer.state)}
    calls, real = [], trainer.apply_update

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(trainer, "apply_update", interrupted)
    with pytest.raises(KeyboardInterrupt):
        trainer.run_step(model, tok, toy_task(), cfg, World(), optimizer, step, 1)
    assert len(calls) == 2  # the first update of step 2 was applied, then undone
    for k, v in tree_flatten(model.trainable_parameters()):
        np.testing.assert_array_equal(np.array(v), weights[k], err_msg=k)
    after = dict(tree_flatten(optimizer.state))
    assert after.keys() == state.keys()
    for k, v in after.items():
        np.testing.assert_array_equal(np.array(v), state[k], err_msg=k)


def test_training_builds_its_loss_with_the_configured_clip(tiny_model_dir, dense_files, tmp_path,
                                                           monkeypatch):
    built, real = [], trainer.make_loss_and_grad

    def spy(model, beta, compile, clip):
        built.append(clip)
        return real(model, beta, compile, clip)

    monkeypatch.setattr(trainer, "make_loss_and_grad", spy)
    trainer.train(TrainConfig(
        task="jsonl", data=str(dense_files / "data.jsonl"),
        reward_fn=[f"{dense_files / 'reward.py'}:digits"], model=str(tiny_model_dir),
        out=str(tmp_path / "run"), steps=1, prompts_per_step=2, group_size=4, max_new_tokens=8,
        temperature=1.0, microbatch_rows=4, updates_per_rollout=2, clip_epsilon=0.1,
        clip_epsilon_high=0.3))
    assert built == [ClipRange(0.1, 0.3)]
