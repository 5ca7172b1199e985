import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from mlx_tokenrl.loss import (LossRow, attach_ref_logprobs, lora_disabled, make_loss_and_grad,
                              make_microbatches, normalisation_weights)





def make_case(seed=0):
    rng = np.random.default_rng(seed)
    rows = [LossRow(rng.integers(3, 300, size=n).tolist(), rng.integers(3, 300, size=m).tolist())
            for n, m in [(5, 12), (9, 7), (3, 20), (6, 1)]]
    triples = [(0, 0, 1.0), (0, 5, 1.0), (0, 11, 1.0), (1, 3, -0.5), (2, 0, 0.7),
               (2, 19, 0.7), (3, 0, -2.0)]
    return rows, triples


def token_logprob(model, rows, triple):
    """Full logits for every position of the whole row, then pick the selected one."""
    row, pos, _ = triple
    seq = rows[row].context + rows[row].completion
    logp = nn.log_softmax(model(mx.array(seq)[None])[0].astype(mx.float32), axis=-1)
    idx = len(rows[row].context) + pos
    return logp[idx - 1, seq[idx]]


def naive_loss(model, rows, triples, weights, beta=0.0, ref=None):
    total = mx.array(0.0)
    for i, (triple, w) in enumerate(zip(triples, weights.tolist())):
        lp = token_logprob(model, rows, triple)
        total = total - w * triple[2] * lp
        if beta:
            lr = ref[i] - lp
            total = total + beta * w * (mx.exp(lr) - lr - 1)
    return total


def summed_loss_and_grads(model, batches, beta=0.0, compiled=True):
    step = make_loss_and_grad(model, beta=beta, compile=compiled)
    loss, grads = mx.array(0.0), None
    for batch in batches:
        batch_loss, batch_grads = step(batch)
        loss = loss + batch_loss
        grads = batch_grads if grads is None else tree_map(mx.add, grads, batch_grads)
    return loss, grads


@pytest.mark.parametrize("beta", [0.0, 0.3])
@pytest.mark.parametrize("norm", ["sequence", "token"])
@pytest.mark.parametrize("compiled", [False, True])
def test_selective_loss_matches_full_logits_reference(lora_model, norm, compiled, beta):
    rows, triples = make_case()
    weights = normalisation_weights(triples, norm, num_completions=6, num_selected=len(triples))
    batches = make_microbatches(rows, triples, weights, rows_per_batch=2)
    ref = None
    if beta:
        attach_ref_logprobs(lora_model, batches)
        with lora_disabled(lora_model):
            ref = [mx.stop_gradient(token_logprob(lora_model, rows, t)) for t in triples]
    loss, grads = summed_loss_and_grads(lora_model, batches, beta, compiled)
    ref_fn = nn.value_and_grad(
        lora_model, lambda: naive_loss(lora_model, rows, triples, weights, beta, ref))
    ref_loss, ref_grads = ref_fn()
    assert abs(loss.item() - ref_loss.item()) < 1e-5
    flat, ref_flat = dict(tree_flatten(grads)), dict(tree_flatten(ref_grads))
    assert flat.keys() == ref_flat.keys()
    for k in flat:
        np.testing.assert_allclose(np.array(flat[k]), np.array(ref_flat[k]), atol=1e-5, rtol=1e-4)
    assert max(float(mx.abs(g).max()) for g in flat.values()) > 1e-4  # gradients are not all zero


def test_shared_prefixes_share_a_forward_row(lora_model):
    """Branches after a common prefix are read from one row: fewer rows, same loss and grads."""
    ctx = [5, 6, 7]
    rows = [LossRow(ctx, [10, 11, 12]), LossRow(ctx, [10, 13]), LossRow(ctx, [14, 15])]
    triples = [(0, 0, 0.5), (2, 0, -0.5), (0, 1, 0.3), (1, 1, -0.3), (2, 1, 0.2)]
    weights = normalisation_weights(triples, "sequence", num_completions=3, num_selected=5)
    batches = make_microbatches(rows, triples, weights, rows_per_batch=8)
    assert len(batches) == 1 and batches[0].inputs.shape[0] == 2  # rows 0 and 2 only
    loss, grads = summed_loss_and_grads(lora_model, batches)
    ref_loss, ref_grads = nn.value_and_grad(
        lora_model, lambda: naive_loss(lora_model, rows, triples, weights))()
    assert abs(loss.item() - ref_loss.item()) < 1e-5
    for (k, g), (_, r) in zip(tree_flatten(grads), tree_flatten(ref_grads)):
        np.testing.assert_allclose(np.array(g), np.array(r), atol=1e-5, rtol=1e-4)
