"""One policy-gradient loss for all three algorithms, computed only where it is needed.

    L = -sum_s w_s * A_s * log pi(y_s | context_s)   (+ beta * sum_s w_s * k3_s)

over selected tokens s, with normalisation weights w_s from `normalisation_weights`. The
transformer runs only up to each row's last selected position (rows are cropped), and the
model's own output head + log-softmax are applied to the selected positions' hidden states
only, so an S-GRPO / T-SPMO step never materialises full-vocabulary logits for every position.
Shapes are bucketed (width to a multiple of 16, selections to a power of two, a fixed
number of rows per microbatch) so the compiled step is reused across steps.
"""

import contextlib
from dataclasses import dataclass
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .models import ModelLoadError, model_type

WIDTH_BUCKET = 16
MIN_SELECTIONS = 32


@dataclass
class LossRow:
    context: list  # prompt tokens (plus a replayed prefix), conditioning only
    completion: list  # sampled tokens; selected positions index into this
    group: int = 0  # which of the step's groups it came from (T-SPMO normalises per group)


@dataclass
class MicroBatch:
    inputs: mx.array  # (rows, width) int32, right-padded
    rows: mx.array  # (S,) row of each selected token
    cols: mx.array  # (S,) input position whose hidden state predicts it
    targets: mx.array  # (S,) the selected token ids
    advantages: mx.array  # (S,) float32
    weights: mx.array  # (S,) float32, 0 on padding
    ref_logprobs: mx.array | None = None  # (S,) under the base model, for the KL term


def normalisation_weights(triples, norm: str, num_units: int, num_selected: int,
                          unit_of_row=None):
    """Per-triple weight. `sequence`: 1 / (U * |T_u|), a mean over units of each unit's mean,
    where a unit is a completion (GRPO, S-GRPO: the paper's per-completion mean) or a group
    (T-SPMO: `unit_of_row` maps loss rows to groups) and T_u is what the unit selected;
    `token`: 1 / (total selected). U and the total are passed in, not counted here, because
    with several ranks they are global (and units that selected nothing still count in U)."""
    if norm == "token":
        return np.full(len(triples), 1.0 / max(num_selected, 1), dtype=np.float32)
    if norm != "sequence":
        raise ValueError(f"unknown loss norm {norm!r}: use sequence or token")
    units = [row if unit_of_row is None else unit_of_row[row] for row, _, _ in triples]
    per_unit = {}
    for unit in units:
        per_unit[unit] = per_unit.get(unit, 0) + 1
    return np.array([1.0 / (num_units * per_unit[unit]) for unit in units], dtype=np.float32)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pow2(n: int) -> int:
    return max(MIN_SELECTIONS, 1 << (max(n, 1) - 1).bit_length())


def make_microbatches(loss_rows, triples, weights, rows_per_batch: int):
    """Group the selected tokens by row into fixed-size microbatches of cropped rows."""
    by_row, home_of = {}, {}
    for (row, pos, adv), weight in zip(triples, weights):
        ctx, comp = loss_rows[row].context, loss_rows[row].completion
        # Rows with the same context and completion prefix have the same hidden state at
        # `pos`: read every such token from the first of them. A group's branch points (all
        # of T-SPMO's pairs after one prefix) then cost one forward row, not one per branch.
        home = home_of.setdefault((tuple(ctx), tuple(comp[:pos])), row)
        by_row.setdefault(home, []).append((pos, comp[pos], adv, weight))
    # Longest crops together, so padding inside a microbatch stays small.
    order = sorted(by_row, key=lambda r: -(len(loss_rows[r].context) + max(s[0] for s in by_row[r])))
    batches = []
    for start in range(0, len(order), rows_per_batch):
        chunk = order[start:start + rows_per_batch]
        sequences, sel = [], []
        for slot, row in enumerate(chunk):
            ctx, comp = loss_rows[row].context, loss_rows[row].completion
            if not ctx:
                raise ValueError("a loss row needs at least one context token")
            last = max(s[0] for s in by_row[row])
            # The hidden state at input position len(ctx)+pos-1 predicts the token at pos.
            sequences.append(ctx + comp[:last])
            sel += [(slot, len(ctx) + pos - 1, target, adv, w) for pos, target, adv, w in by_row[row]]
        width = _round_up(max(len(s) for s in sequences), WIDTH_BUCKET)
        slots = min(rows_per_batch, 1 << (len(chunk) - 1).bit_length())
        inputs = np.zeros((slots, width), dtype=np.int32)
        for slot, seq in enumerate(sequences):
            inputs[slot, :len(seq)] = seq
        padded = _pow2(len(sel))
        cols = np.zeros((5, padded), dtype=np.float64)
        cols[:, :len(sel)] = np.array(sel, dtype=np.float64).T
        batches.append(MicroBatch(
            inputs=mx.array(inputs), rows=mx.array(cols[0].astype(np.int32)),
            cols=mx.array(cols[1].astype(np.int32)), targets=mx.array(cols[2].astype(np.int32)),
            advantages=mx.array(cols[3].astype(np.float32)),
            weights=mx.array(cols[4].astype(np.float32))))
    return batches


def _slot_holding(model, target):
    """(module, key) of the module in `model` whose child `key` is `target` or a list of
    layers holding it."""
    for _, module in model.named_modules():
        for key, value in module.items():
            if value is target or (isinstance(value, list) and any(v is target for v in value)):
                return module, key
    raise ModelLoadError(f"model type {model_type(model)!r}: cannot find its transformer body")


def body_and_head(model):
    """The transformer body (the module holding the layers) and the module whose `__call__`
    is `body(inputs, cache, ...)` followed by the output head, with the body's key in it.

    Found by identity from `model.layers` rather than by name, so a body called `model`,
    `transformer` or `backbone`, or one inside a wrapper (`language_model`), is found alike."""
    body, _ = _slot_holding(model, model.layers[0])
    head, key = _slot_holding(model, body)
    return body, head, key


class _BodyOutput:
    """Stands in for a transformer body: calling it returns hidden states computed before,
    and any other attribute (`embed_tokens` of a tied head, `args.logit_scale`) is the real
    body's, so the head reads the real (and, under value_and_grad, traced) weights."""

    def __init__(self, body, hidden):
        self._body, self._hidden = body, hidden

    def __call__(self, *args, **kwargs):
        return self._hidden

    def __getattr__(self, name):
        return getattr(self._body, name)


def apply_head(head, key, body, hidden):
    """`head`'s own output on (1, S, hidden) states: its `__call__` runs with the body slot
    holding a stand-in that returns them.

    Why not call `model.lm_head` ourselves: the head is whatever a model family does after
    its body (tied or untied projection, gemma2's final logit soft-capping, cohere's logit
    scale, minicpm's width scaling, ...), written in that family's `__call__` and nowhere
    else. Running that code is the only way to get every variant without a copy per family,
    and running it on picked states (not `model(x)` at every position) keeps the loss's
    saving: full-vocabulary logits only where a token was selected.
    The slot is swapped in place in the module's dict (dict.__setitem__: setattr would pop
    and re-insert the key, leaving the model's parameter tree in another order)."""
    dict.__setitem__(head, key, _BodyOutput(body, hidden))
    try:
        # The inputs are never read: the stand-in ignores them. Only their shape is plausible.
        return head(mx.zeros(hidden.shape[:2], dtype=mx.int32))
    finally:
        dict.__setitem__(head, key, body)


def selected_logprobs(model, batch: MicroBatch) -> mx.array:
    """log pi(target | context) at the selected positions only: the body runs once over the
    cropped rows, the model's own head only on the selected positions' hidden states."""
    body, head, key = body_and_head(model)
    picked = body(batch.inputs)[batch.rows, batch.cols]
    logits = apply_head(head, key, body, picked[None])[0].astype(mx.float32)
    target_logits = mx.take_along_axis(logits, batch.targets[:, None], axis=-1)[:, 0]
    return target_logits - mx.logsumexp(logits, axis=-1)


def check_selected_logprobs(model, length: int = 8):
    """Start-up check: on a short input, the loss's log-probs equal the model's own
    (log_softmax of `model(x)`), at each position's most likely token and at random ones.
    Refuses a model whose output head cannot be run on picked hidden states (one line).

    The body sees the same input both ways, so only the head's rounding can differ: the
    tolerance is 1e-4 plus two units in the last place of the logits' dtype at their size."""
    x = mx.arange(1, length + 1, dtype=mx.int32)[None]
    logits = model(x)[0]
    full = nn.log_softmax(logits.astype(mx.float32), axis=-1)
    half = length // 2
    random_ids = np.random.default_rng(0).integers(0, full.shape[-1], length - half)
    targets = mx.concatenate([mx.argmax(full[:half], axis=-1).astype(mx.int32),
                              mx.array(random_ids, dtype=mx.int32)])
    positions = mx.arange(length, dtype=mx.int32)
    ones = mx.ones(length)
    batch = MicroBatch(x, mx.zeros(length, dtype=mx.int32), positions, targets, ones, ones)
    expected = full[positions, targets]
    error = mx.abs(selected_logprobs(model, batch) - expected).max().item()
    tolerance = 1e-4 + 2 * mx.finfo(logits.dtype).eps * mx.abs(logits).max().item()
    if not error <= tolerance:
        raise ModelLoadError(
            f"model type {model_type(model)!r}: the loss's log-probs differ from the model's "
            f"own by {error:.3g} (tolerance {tolerance:.3g}); its output head is not supported")


def policy_loss(model, batch: MicroBatch, beta: float = 0.0) -> mx.array:
    logp = selected_logprobs(model, batch)
    loss = -(batch.weights * batch.advantages * logp).sum()
    if beta > 0:
        # k3 estimator of KL(pi || pi_ref) on the selected tokens.
        log_ratio = batch.ref_logprobs - logp
        loss = loss + beta * (batch.weights * (mx.exp(log_ratio) - log_ratio - 1)).sum()
    return loss


@contextlib.contextmanager
def lora_disabled(model):
    """The reference policy is the base model: LoRA layers with scale 0 (no weight copy)."""
    lora = [m for _, m in model.named_modules() if hasattr(m, "lora_a")]
    scales = [m.scale for m in lora]
    for m in lora:
        m.scale = 0.0
    try:
        yield
    finally:
        for m, s in zip(lora, scales):
            m.scale = s


def attach_ref_logprobs(model, batches):
    with lora_disabled(model):
        for batch in batches:
            batch.ref_logprobs = mx.stop_gradient(selected_logprobs(model, batch))
            mx.eval(batch.ref_logprobs)


def make_loss_and_grad(model, beta: float = 0.0, compile: bool = True):
    """Return f(batch) -> (loss, grads of the trainable parameters)."""

    def loss_fn(inputs, rows, cols, targets, advantages, weights, ref_logprobs):
        batch = MicroBatch(inputs, rows, cols, targets, advantages, weights, ref_logprobs)
        return policy_loss(model, batch, beta)

    value_and_grad = nn.value_and_grad(model, loss_fn)
    if compile:
        # value_and_grad swaps traced parameters into the model: declare the model's
        # state as both input and output so the compiled graph leaves it intact.
        value_and_grad = partial(mx.compile, inputs=model.state, outputs=model.state)(value_and_grad)

    def step(batch: MicroBatch):
        ref = batch.ref_logprobs if batch.ref_logprobs is not None else mx.zeros_like(batch.weights)
        return value_and_grad(batch.inputs, batch.rows, batch.cols, batch.targets,
                              batch.advantages, batch.weights, ref)

    return step
