import itertools

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map
from mlx_lm.models import llama

from mlx_tokenrl import loss as loss_module
from mlx_tokenrl.loss import (ForwardRow, LossRow, Pick, attach_ref_logprobs,
                              check_selected_logprobs, even_parts, lora_disabled,
                              make_loss_and_grad, make_microbatches, normalisation_weights,
                              selected_logprobs)
from mlx_tokenrl.models import ModelLoadError, add_lora, lora_config
from mlx_tokenrl.toy import TINY, tiny_family_model

# Output heads of other mlx-lm families, each applied in its own Model.__call__ after the body.
# Soft-cap and scale are set so that leaving them out changes log-probs far beyond rounding.
# Shapes the loss's left-padded contexts (and batched rollouts) support: gemma2 without
# grouped-query attention, gemma3 without sliding-window layers.
HEADS = {
    "llama, tied": ("llama", {}),
    "llama, untied lm_head": ("llama", {"tie_word_embeddings": False}),
    "phi3, untied lm_head": ("phi3", {}),
    "gemma2, final logit soft-capping": ("gemma2", {"final_logit_softcapping": 2.0,
                                                    "num_key_value_heads": 4}),
    "cohere, logit scale": ("cohere", {"logit_scale": 0.25}),
    "minicpm, width-scaled head": ("minicpm", {"dim_model_base": 16, "scale_depth": 1.4,
                                               "scale_emb": 12}),
    "gemma3, body inside a wrapper": ("gemma3", {"text_config": {
        "model_type": "gemma3_text", **TINY, "vocab_size": 320, "head_dim": 16,
        "sliding_window": 8, "sliding_window_pattern": 1}}),
}


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
        batch_loss, batch_grads, _ = step(batch)
        loss = loss + batch_loss
        grads = batch_grads if grads is None else tree_map(mx.add, grads, batch_grads)
    return loss, grads


def assert_matches_full_logits_reference(model, batches, rows, triples, weights, beta=0.0,
                                         ref=None, compiled=True):
    """Loss and gradients of the microbatches equal the naive full-logits loss's; returns
    the gradients."""
    loss, grads = summed_loss_and_grads(model, batches, beta, compiled)
    ref_loss, ref_grads = nn.value_and_grad(
        model, lambda: naive_loss(model, rows, triples, weights, beta, ref))()
    assert abs(loss.item() - ref_loss.item()) < 1e-5
    flat, ref_flat = dict(tree_flatten(grads)), dict(tree_flatten(ref_grads))
    assert flat.keys() == ref_flat.keys()
    for k in flat:
        np.testing.assert_allclose(np.array(flat[k]), np.array(ref_flat[k]), atol=1e-5, rtol=1e-4)
    return flat


@pytest.mark.parametrize("beta", [0.0, 0.3])
@pytest.mark.parametrize("norm", ["sequence", "token"])
@pytest.mark.parametrize("compiled", [False, True])
def test_selective_loss_matches_full_logits_reference(lora_model, norm, compiled, beta):
    rows, triples = make_case()
    weights = normalisation_weights(triples, norm, num_units=6, num_selected=len(triples))
    batches = make_microbatches(rows, triples, weights, rows_per_batch=2)
    ref = None
    if beta:
        attach_ref_logprobs(lora_model, batches)
        with lora_disabled(lora_model):
            ref = [mx.stop_gradient(token_logprob(lora_model, rows, t)) for t in triples]
    flat = assert_matches_full_logits_reference(lora_model, batches, rows, triples, weights,
                                                beta, ref, compiled)
    assert max(float(mx.abs(g).max()) for g in flat.values()) > 1e-4  # gradients are not all zero


def test_shared_prefixes_share_a_forward_row(lora_model):
    """Branches after a common prefix are read from one row: fewer rows, same loss and grads."""
    ctx = [5, 6, 7]
    rows = [LossRow(ctx, [10, 11, 12]), LossRow(ctx, [10, 13]), LossRow(ctx, [14, 15])]
    triples = [(0, 0, 0.5), (2, 0, -0.5), (0, 1, 0.3), (1, 1, -0.3), (2, 1, 0.2)]
    weights = normalisation_weights(triples, "sequence", num_units=3, num_selected=5)
    batches = make_microbatches(rows, triples, weights, rows_per_batch=8)
    assert len(batches) == 1  # and in it rows 0 and 2 only:
    assert sum(t.shape[0] for t in batches[0].inputs) == 2
    assert_matches_full_logits_reference(lora_model, batches, rows, triples, weights)


def forward_row(context_token, context_length, crop_length):
    """A row whose last selected token is at `crop_length`, of a longer completion."""
    return ForwardRow([context_token] * context_length, [1] * (crop_length + 5),
                      [Pick(crop_length // 2, 1, 1.0, 1.0), Pick(crop_length, 1, 1.0, 1.0)])


def run_positions(part):
    """By hand: each distinct context once, every row's tokens before its last pick."""
    contexts = {tuple(row.context): len(row.context) for row in part}
    return sum(contexts.values()) + sum(max(p.pos for p in row.picks) for row in part)


def test_microbatches_are_cut_where_the_largest_runs_fewest_positions():
    """One long context (100) and two short ones (20, rows of 10 tokens), 4 rows a microbatch:
    cutting every 4 rows runs 100+10 + 20+3*10 = 160 positions in the first; cutting after
    the third row runs 150 and 80, and no cut into two does better."""
    rows = ([forward_row(7, 100, 10)] + [forward_row(8, 20, 10) for _ in range(4)]
            + [forward_row(9, 20, 10) for _ in range(2)])
    parts = even_parts(rows, 4)
    assert [len(p) for p in parts] == [3, 4]
    assert [run_positions(p) for p in parts] == [150, 80]


def test_the_loss_runs_those_microbatches():
    """The same case through make_microbatches (rows as the trainer gives them, in any
    order): its microbatches hold 3 and 4 rows, not 4 and 3."""
    lengths = [(7, 100)] + [(8, 20)] * 4 + [(9, 20)] * 2
    rows = [LossRow([token] * length, [100 + i] * 11) for i, (token, length) in enumerate(lengths)]
    order = [3, 6, 0, 1, 5, 2, 4]
    triples = [(row, 10, 1.0) for row in order]
    batches = make_microbatches(rows, triples, np.ones(len(triples), np.float32), 4)
    assert [sum(t.shape[0] for t in batch.inputs) for batch in batches] == [3, 4]


def test_the_plain_cut_stays_where_padding_would_make_the_other_larger():
    """Context A (39 tokens) with crops of 32 and 13, context B (2) with 25, two rows a
    microbatch. Without padding, (A32) (A13, B25) runs 71 and 79 positions against 84 and 27
    for (A32, A13) (B25); padded to widths of 16 in passes (A's crops 32 and 13 are two
    passes, and so are contexts 39 and 2 and crops 25 and 13) it is 80 and 112 against 96
    and 48, so the plain cut stays."""
    rows = [LossRow([1] * 39, [10] * 40), LossRow([1] * 39, [11] * 40), LossRow([2] * 2, [12] * 40)]
    triples = [(0, 32, 1.0), (1, 13, 1.0), (2, 25, 1.0)]
    batches = make_microbatches(rows, triples, np.ones(3, np.float32), 2)
    assert [b.positions for b in batches] == [96, 48]
    assert [sum(t.shape[0] for t in b.inputs) for b in batches] == [2, 1]


def best_cut_by_brute_force(rows, rows_per_batch):
    """Every way to cut `rows` in order into ceil(n / rows_per_batch) parts of at most
    rows_per_batch rows: the smallest largest part, in positions."""
    most = -(-len(rows) // rows_per_batch)
    best = None
    for cuts in itertools.combinations(range(1, len(rows)), most - 1):
        bounds = (0, *cuts, len(rows))
        parts = [rows[a:b] for a, b in zip(bounds, bounds[1:])]
        if all(len(p) <= rows_per_batch for p in parts):
            largest = max(run_positions(p) for p in parts)
            best = largest if best is None else min(best, largest)
    return best


@pytest.mark.parametrize("seed", range(40))
def test_microbatch_cuts_match_a_brute_force_search(seed):
    rng = np.random.default_rng(seed)
    contexts = [(int(token), int(rng.integers(1, 60))) for token in range(rng.integers(1, 5))]
    rows = []
    for token, length in contexts:  # a context's rows together, as make_microbatches has them
        rows += [forward_row(token, length, int(rng.integers(0, 40)))
                 for _ in range(rng.integers(1, 5))]
    rows_per_batch = int(rng.integers(1, 5))
    parts = even_parts(rows, rows_per_batch)
    assert [row for part in parts for row in part] == rows  # in order, every row once
    assert len(parts) == -(-len(rows) // rows_per_batch)  # no more microbatches than before
    assert all(len(p) <= rows_per_batch for p in parts)
    assert max(run_positions(p) for p in parts) == best_cut_by_brute_force(rows, rows_per_batch)


@pytest.fixture(params=HEADS)
def family_model(request):
    model_type, config = HEADS[request.param]
    return tiny_family_model(model_type, **config)


def test_selected_logprobs_are_the_models_own(family_model):
    """Each selected token's log-prob equals log_softmax of the model's own forward."""
    rows, triples = make_case()
    for triple in triples:
        [batch] = make_microbatches(rows, [triple], np.ones(1, dtype=np.float32), rows_per_batch=1)
        ours = selected_logprobs(family_model, batch)[0].item()
        assert abs(ours - token_logprob(family_model, rows, triple).item()) < 1e-5


def test_compiled_lora_loss_uses_the_models_own_head(family_model):
    add_lora(family_model, lora_config(rank=4, scale=10.0))
    rows, triples = make_case()
    weights = normalisation_weights(triples, "token", 4, len(triples))
    batches = make_microbatches(rows, triples, weights, rows_per_batch=2)
    assert_matches_full_logits_reference(family_model, batches, rows, triples, weights)


def test_startup_check_passes_the_models_own_heads(family_model):
    check_selected_logprobs(family_model)


def test_startup_check_refuses_a_dropped_soft_cap(monkeypatch):
    def projection_only(head, key, body, hidden):  # what the loss did before: no cap, no scale
        return body.embed_tokens.as_linear(hidden)

    monkeypatch.setattr(loss_module, "apply_head", projection_only)
    model_type, config = HEADS["gemma2, final logit soft-capping"]
    with pytest.raises(ModelLoadError, match="model type 'gemma2': the loss's log-probs differ"):
        check_selected_logprobs(tiny_family_model(model_type, **config))


def test_startup_check_refuses_attention_that_mishandles_left_padded_contexts():
    """gemma2 with grouped-query attention broadcasts the batch's padding mask over its
    key-value heads: the loss's contexts would be read wrongly, so the model is refused."""
    model = tiny_family_model("gemma2", final_logit_softcapping=2.0)  # 4 heads, 2 KV heads
    with pytest.raises(ModelLoadError, match="model type 'gemma2': the loss's log-probs differ"):
        check_selected_logprobs(model)


class HeadReadsTokens(llama.Model):
    """A head that reads the token ids as well as the body's output: it cannot be run on
    picked hidden states alone."""

    def __call__(self, inputs, cache=None, input_embeddings=None):
        logits = super().__call__(inputs, cache)
        return logits + 3.0 * (inputs[..., None] == mx.arange(logits.shape[-1]))  # "copy" boost


def test_startup_check_refuses_a_head_it_cannot_run_in_one_line():
    model = HeadReadsTokens(llama.ModelArgs.from_dict(
        {"model_type": "llama", **TINY, "vocab_size": 320, "rms_norm_eps": 1e-6}))
    with pytest.raises(ModelLoadError) as refused:
        check_selected_logprobs(model)
    assert "model type 'llama'" in str(refused.value) and "\n" not in str(refused.value)
