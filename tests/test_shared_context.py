"""The loss runs each group's context once and its rows read it through a KV cache: loss and
LoRA gradients equal a naive per-row forward's (full logits of context + completion from
`model(x)`, one row at a time) for every algorithm, norm and KL setting."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_tokenrl import loss as loss_module
from mlx_tokenrl import trainer
from mlx_tokenrl.config import ALGOS, TrainConfig
from mlx_tokenrl.loss import (LossRow, attach_ref_logprobs, lora_disabled, make_loss_and_grad,
                              make_microbatches, normalisation_weights)
from mlx_tokenrl.rollout import Completion


def completion(tokens, reward):
    # Entropies as a rollout records them (for --algo top-entropy), fixed by each token.
    return Completion(0, list(tokens), False, "", float(reward), [0.0] * len(tokens),
                      [(int(t) * 7919 % 101) / 100 for t in tokens])


def hand_groups(rng, context_lengths, group_size=6):
    """Groups of completions that share openings (T-SPMO's branches), rewards mixed."""
    contexts, groups = [], []
    for length in context_lengths:
        contexts.append(rng.integers(3, 300, size=length).tolist())
        stems = [rng.integers(3, 300, size=int(rng.integers(1, 4))).tolist() for _ in range(2)]
        group = [completion(stems[i % 2] + rng.integers(3, 300, size=int(rng.integers(1, 12))).tolist(),
                            rng.choice([0.0, 1.0])) for i in range(group_size)]
        group[0].reward, group[1].reward = 0.0, 1.0
        groups.append(group)
    return contexts, groups


def step_rows(cfg):
    """A step's loss rows as the trainer makes them: three groups with prompts of uneven
    lengths (either side of the 16-token width bucket), then two replay-like groups whose
    contexts are a prompt plus a solved completion's opening."""
    rng = np.random.default_rng(5)
    contexts, groups = hand_groups(rng, [5, 17, 30])
    replay_contexts = [contexts[0] + groups[0][1].tokens[:2], contexts[2] + groups[2][1].tokens[:1]]
    _, replay_groups = hand_groups(rng, [1, 1])
    inputs = trainer.LossInput()
    rows, triples = inputs.rows, inputs.selection
    trainer.add_groups(cfg, groups, contexts, [np.random.default_rng(g) for g in range(3)], inputs)
    trainer.add_groups(cfg, replay_groups, replay_contexts,
                       [np.random.default_rng(g) for g in range(3, 5)], inputs,
                       first_group=3)
    totals = trainer.StepTotals(completions=30, groups=5, selected=len(triples))
    return inputs, totals


def row_logprobs(model, row):
    """log-softmax of the model's own full logits over one row's context + completion."""
    tokens = row.context + row.completion
    return nn.log_softmax(model(mx.array(tokens)[None])[0].astype(mx.float32), axis=-1)


def naive_loss(model, rows, triples, weights, beta, ref_logp):
    """The loss token by token, each row's log-probs from its own whole forward."""
    logps = {r: row_logprobs(model, rows[r]) for r in sorted({r for r, _, _ in triples})}
    total = mx.array(0.0)
    for i, ((r, pos, adv), w) in enumerate(zip(triples, weights.tolist())):
        index = len(rows[r].context) + pos
        lp = logps[r][index - 1, rows[r].completion[pos]]
        total = total - w * adv * lp
        if beta:
            log_ratio = ref_logp[i] - lp
            total = total + beta * w * (mx.exp(log_ratio) - log_ratio - 1)
    return total


def reference(model, cfg, rows, triples, totals):
    units, unit_of_row = trainer.loss_units(cfg, totals, rows)
    weights = normalisation_weights(triples, cfg.loss_norm, units, int(totals.selected),
                                    unit_of_row)
    ref_logp = None
    if cfg.beta:
        with lora_disabled(model):
            ref_logp = [row_logprobs(model, rows[r])[len(rows[r].context) + p - 1,
                                                     rows[r].completion[p]]
                        for r, p, _ in triples]
    loss, grads = nn.value_and_grad(
        model, lambda: naive_loss(model, rows, triples, weights, cfg.beta, ref_logp))()
    return loss.item(), dict(tree_flatten(grads))


def assert_close(loss, grads, ref_loss, ref_grads):
    assert abs(loss - ref_loss) < 1e-5
    assert grads.keys() == ref_grads.keys()
    for name, ref in ref_grads.items():
        np.testing.assert_allclose(np.array(grads[name]), np.array(ref), atol=1e-5, rtol=0,
                                   err_msg=name)


@pytest.mark.parametrize("beta", [0.0, 0.2])
@pytest.mark.parametrize("norm", ["sequence", "token"])
@pytest.mark.parametrize("algo", ALGOS)
def test_shared_context_loss_and_grads_equal_per_row_forwards(lora_model, algo, norm, beta):
    cfg = TrainConfig(algo=algo, loss_norm=norm, beta=beta, group_size=6, sgrpo_alpha=2,
                      sgrpo_k=4, sgrpo_p=0.5, tspmo_max_pairs=12, microbatch_rows=4)
    inputs, totals = step_rows(cfg)
    rows, triples = inputs.rows, inputs.selection
    loss, grads, _ = trainer.loss_and_grads(lora_model, make_loss_and_grad(lora_model, beta),
                                         cfg, inputs, totals)
    ref_loss, ref_grads = reference(lora_model, cfg, rows, triples, totals)
    assert_close(loss.item(), dict(tree_flatten(grads)), ref_loss, ref_grads)
    # The adapter's gradient is not vanishing, so a wrong one would show at this tolerance.
    assert max(float(mx.abs(g).max()) for g in ref_grads.values()) > 1e-3


def test_microbatches_run_each_context_once_left_padded_to_a_common_end():
    """Rows of one context share a microbatch: six GRPO rows of each of two contexts, four
    rows per microbatch, make three microbatches: (the longer context's first four), (its
    last two, two of the other's) and (the other's last four)."""
    rng = np.random.default_rng(0)
    rows = [LossRow(ctx, rng.integers(3, 300, size=5).tolist(), g)
            for g, ctx in enumerate([[1, 2, 3], [4, 5, 6, 7]]) for _ in range(6)]
    triples = [(r, p, 1.0) for r in range(12) for p in range(5)]
    first, middle, last = make_microbatches(rows, triples, np.ones(len(triples), np.float32), 4)
    [contexts], [padding], [inputs], [row_context] = (middle.contexts, middle.context_padding,
                                                      middle.inputs, middle.row_context)
    assert contexts.shape == (2, 16) and inputs.shape == (4, 16)
    assert padding.tolist() == [12, 13]  # the longer context first
    assert contexts[:, -4:].tolist() == [[4, 5, 6, 7], [0, 1, 2, 3]]
    assert row_context.tolist() == [0, 0, 1, 1]
    for batch, context_padding in ((first, 12), (last, 13)):
        assert [c.shape for c in batch.contexts] == [(1, 16)]
        assert [r.shape for r in batch.inputs] == [(4, 16)]
        assert batch.context_padding[0].tolist() == [context_padding]


def test_one_compiled_graph_serves_contexts_of_other_lengths(lora_model, monkeypatch):
    """Two steps whose contexts differ in length (and padding) but fall into the same
    buckets reuse one compiled graph, and the second step's result is still exact: the
    padding is an input of the graph, not a constant traced into it."""
    traced = []
    policy_loss = loss_module.policy_loss
    monkeypatch.setattr(loss_module, "policy_loss",
                        lambda *args: traced.append(1) or policy_loss(*args))
    cfg = TrainConfig(algo="grpo", group_size=2, microbatch_rows=4)
    step = make_loss_and_grad(lora_model, compile=True)
    for lengths in ([20, 25], [31, 18]):
        rng = np.random.default_rng(len(traced))
        contexts = [rng.integers(3, 300, size=n).tolist() for n in lengths]
        groups = [[completion(rng.integers(3, 300, size=6).tolist(), r) for r in (0, 1)]
                  for _ in lengths]
        inputs = trainer.LossInput()
        trainer.add_groups(cfg, groups, contexts, [None, None], inputs)
        rows, triples = inputs.rows, inputs.selection
        totals = trainer.StepTotals(completions=4, groups=2, selected=len(triples))
        loss, grads, _ = trainer.loss_and_grads(lora_model, step, cfg, inputs, totals)
        assert_close(loss.item(), dict(tree_flatten(grads)),
                     *reference(lora_model, cfg, rows, triples, totals))
    assert len(traced) == 1


def test_first_tokens_alone_run_only_their_contexts(lora_model):
    """T-SPMO on a group that branches at its first token reads every pair from the
    context's last state: no row runs, and loss and gradients are still exact."""
    cfg = TrainConfig(algo="t-spmo", group_size=4, microbatch_rows=8)
    contexts = [[5, 6, 7, 8, 9], list(range(20, 40))]
    groups = [[completion([t, 3], r) for t, r in [(10, 1), (11, 0), (10, 1), (12, 0)]]
              for _ in contexts]
    inputs = trainer.LossInput()
    trainer.add_groups(cfg, groups, contexts, [np.random.default_rng(0)] * 2, inputs)
    rows, triples = inputs.rows, inputs.selection
    assert {pos for _, pos, _ in triples} == {0}
    totals = trainer.StepTotals(completions=8, groups=2, selected=len(triples))
    units, unit_of_row = trainer.loss_units(cfg, totals, rows)
    weights = normalisation_weights(triples, cfg.loss_norm, units, len(triples), unit_of_row)
    [batch] = make_microbatches(rows, triples, weights, cfg.microbatch_rows)
    assert batch.inputs == []  # and each context in a pass of its own width:
    assert [c.shape for c in batch.contexts] == [(1, 32), (1, 16)]
    loss, grads, _ = trainer.loss_and_grads(lora_model, make_loss_and_grad(lora_model), cfg,
                                            inputs, totals)
    assert_close(loss.item(), dict(tree_flatten(grads)),
                 *reference(lora_model, cfg, rows, triples, totals))


def checkpoint_blocks(model, monkeypatch):
    block = type(model.layers[0])
    monkeypatch.setattr(block, "__call__", block.__call__)  # undone after the test
    loss_module.checkpoint_blocks(model)


def test_gradient_checkpointing_keeps_loss_and_grads_exact(lora_model, monkeypatch):
    """Checkpointed blocks recompute their forward in the backward pass, the context's cache
    included (mlx-lm's own checkpointing would append its keys twice)."""
    checkpoint_blocks(lora_model, monkeypatch)
    cfg = TrainConfig(algo="t-spmo", beta=0.2, group_size=6, tspmo_max_pairs=12,
                      microbatch_rows=4)
    inputs, totals = step_rows(cfg)
    rows, triples = inputs.rows, inputs.selection
    loss, grads, _ = trainer.loss_and_grads(lora_model, make_loss_and_grad(lora_model, 0.2), cfg,
                                         inputs, totals)
    assert_close(loss.item(), dict(tree_flatten(grads)),
                 *reference(lora_model, cfg, rows, triples, totals))


@pytest.mark.parametrize("checkpointed", [False, True])
@pytest.mark.parametrize("beta", [0.0, 0.2])
def test_passes_of_other_widths_keep_loss_and_grads_exact(lora_model, beta, checkpointed,
                                                          monkeypatch):
    """Contexts and rows of very different lengths run in passes of their own widths (a short
    context is not padded to a long replay context's width), and the rows read the passes'
    caches joined: two context passes and three row passes here, loss and gradients still
    equal to per-row forwards, with the KL term's reference log-probs and with gradient
    checkpointing (which re-runs each block on the joined and gathered caches)."""
    if checkpointed:
        checkpoint_blocks(lora_model, monkeypatch)
    rng = np.random.default_rng(3)
    short, long = rng.integers(3, 300, 5).tolist(), rng.integers(3, 300, 40).tolist()
    shapes = [(short, 6), (short, 45), (long, 25), (long, 3), (short, 20)]
    rows = [LossRow(ctx, rng.integers(3, 300, n).tolist(), g) for g, (ctx, n) in enumerate(shapes)]
    triples = [(r, int(p), float(rng.normal()))
               for r, row in enumerate(rows)
               for p in {0, len(row.completion) - 1, int(rng.integers(len(row.completion)))}]
    weights = normalisation_weights(triples, "token", len(rows), len(triples))
    [batch] = make_microbatches(rows, triples, weights, rows_per_batch=8)
    assert [c.shape for c in batch.contexts] == [(1, 48), (1, 16)]
    assert [r.shape for r in batch.inputs] == [(1, 48), (2, 32), (2, 16)]
    ref_logp = None
    if beta:
        attach_ref_logprobs(lora_model, [batch])
        with lora_disabled(lora_model):
            ref_logp = [row_logprobs(lora_model, rows[r])[len(rows[r].context) + p - 1,
                                                          rows[r].completion[p]]
                        for r, p, _ in triples]
    loss, grads, _ = make_loss_and_grad(lora_model, beta)(batch)
    ref_loss, ref_grads = nn.value_and_grad(
        lora_model, lambda: naive_loss(lora_model, rows, triples, weights, beta, ref_logp))()
    assert_close(loss.item(), dict(tree_flatten(grads)), ref_loss.item(),
                 dict(tree_flatten(ref_grads)))
