"""One policy-gradient loss for every algorithm, computed only where it is needed.

    L = -sum_s w_s * A_s * log pi(y_s | context_s)   (+ beta * sum_s w_s * k3_s)

over selected tokens s, with normalisation weights w_s from `normalisation_weights`; with
several updates per rollout batch, log pi enters through PPO's clipped ratio (`policy_loss`). The
transformer runs only up to each row's last selected position (rows are cropped), and the
model's own output head + log-softmax are applied to the selected positions' hidden states
only, so an S-GRPO / T-SPMO step never materialises full-vocabulary logits for every position.
A group's rows share their context (the prompt, plus a replayed prefix): each microbatch
runs each of its contexts once, and its rows attend to the context's keys and values
through mlx-lm's batched KV cache, inside the differentiated function, so the gradient of
every row reaches the context's LoRA weights (summed over the rows).
Contexts (and rows) of very different lengths run in separate passes, each padded only to
its own width, so one long replay context does not pad every other context of its
microbatch to its length: padding runs through every layer like a real token, while the
caches are joined afterwards for the price of their keys and values alone. Shapes are
bucketed (widths to a multiple of 16, selections to a power of two) so compiled steps are
reused across steps.
"""

import contextlib
import copy
from dataclasses import dataclass, fields
from functools import partial
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_lm.models.cache import BatchKVCache

from .models import ModelLoadError, model_type
from .rollout import batch_cache
from .rounding import in_float32, judge, logprobs, own_rounding, settle

WIDTH_BUCKET = 16
MIN_SELECTIONS = 32
# A sequence joins a pass (of longest-first sequences) while its bucketed width is at least this
# share of the pass's: a pass wastes little more than a quarter of its positions on padding.
PASS_FILL = 0.75


@dataclass
class LossRow:
    context: list  # prompt tokens (plus a replayed prefix), conditioning only
    completion: list  # sampled tokens; selected positions index into this
    group: int = 0  # which of the step's groups it came from (T-SPMO normalises per group)


@dataclass
class MicroBatch:
    """One loss call: contexts, each run once, and rows that continue them, each in passes
    of similar lengths (lists: one array per pass). Contexts are numbered across their
    passes in order (slot c of pass 0, then of pass 1, ...)."""
    contexts: list  # (C_p, W_p) int32, left-padded: every context ends at column W_p - 1
    context_padding: list  # (C_p,) int32, the padding columns before each context
    inputs: list  # (R_p, V_p) int32, right-padded: each row's completion, cropped
    row_context: list  # (R_p,) int32, the context (numbered across passes) each row continues
    picks: mx.array  # (S,) where, in the flattened hidden states of the context passes then
    #                  the row passes, is the state that predicts each selected token
    targets: mx.array  # (S,) the selected token ids
    advantages: mx.array  # (S,) float32
    weights: mx.array  # (S,) float32, 0 on padding
    ref_logprobs: mx.array | None = None  # (S,) under the base model, for the KL term
    # (S,) under the policy before the step's first update: that update's own (trainer)
    old_logprobs: mx.array | None = None

    @property
    def positions(self) -> int:
        """Token positions its forward runs, padding included: what sets its memory."""
        return sum(tokens.size for tokens in self.contexts + self.inputs)


@dataclass
class Pick:
    """A selected token of a forward row."""
    pos: int  # its index in the row's completion
    target: int  # its token id (the completion's, except in start-up checks)
    advantage: float
    weight: float


@dataclass
class ForwardRow:
    """A row of a microbatch: its context and completion, and the tokens read from it."""
    context: list
    completion: list
    picks: list  # of Pick

    @property
    def crop(self) -> list:
        """The completion tokens it runs: up to (without) its last selected one."""
        return self.completion[:max(p.pos for p in self.picks)]


def normalisation_weights(triples, norm: str, num_units: int, num_selected: int,
                          unit_of_row=None, constant: int = 0):
    """Per-triple weight. `sequence`: 1 / (U * |T_u|), a mean over units of each unit's mean,
    where a unit is a completion (GRPO, S-GRPO: the paper's per-completion mean) or a group
    (T-SPMO: `unit_of_row` maps loss rows to groups) and T_u is what the unit selected;
    `token`: 1 / (total selected); `constant` (Dr. GRPO): 1 / `constant`, the step's
    completions x --max-new-tokens, the same for every token of every step. U, the total and
    the constant are passed in, not counted here, because with several ranks they are global
    (and units that selected nothing still count in U)."""
    if norm == "token":
        return np.full(len(triples), 1.0 / max(num_selected, 1), dtype=np.float32)
    if norm == "constant":
        return np.full(len(triples), 1.0 / max(constant, 1), dtype=np.float32)
    if norm != "sequence":
        raise ValueError(f"unknown loss norm {norm!r}: use sequence, token or constant")
    units = [row if unit_of_row is None else unit_of_row[row] for row, _, _ in triples]
    per_unit = {}
    for unit in units:
        per_unit[unit] = per_unit.get(unit, 0) + 1
    return np.array([1.0 / (num_units * per_unit[unit]) for unit in units], dtype=np.float32)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pow2(n: int, minimum: int = 1) -> int:
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def make_microbatches(loss_rows, triples, weights, rows_per_batch: int):
    """Group the selected tokens by row into microbatches of up to `rows_per_batch` cropped
    rows, the rows of one context together."""
    by_row, home_of = {}, {}
    for (row, pos, adv), weight in zip(triples, weights):
        ctx, comp = loss_rows[row].context, loss_rows[row].completion
        if not ctx:
            raise ValueError("a loss row needs at least one context token")
        # Rows with the same context and completion prefix have the same hidden state at
        # `pos`: read every such token from the first of them. A group's branch points (all
        # of T-SPMO's pairs after one prefix) then cost one forward row, not one per branch.
        home = home_of.setdefault((tuple(ctx), tuple(comp[:pos])), row)
        by_row.setdefault(home, []).append(Pick(pos, comp[pos], adv, float(weight)))
    rows = [ForwardRow(loss_rows[r].context, loss_rows[r].completion, picks)
            for r, picks in by_row.items()]
    # A context's rows together, so it runs once per microbatch (twice if its rows straddle
    # two); longest contexts and crops first, so padding inside a microbatch stays small.
    longest = {}
    for row in rows:
        key = tuple(row.context)
        longest[key] = max(longest.get(key, 0), len(row.context) + len(row.crop))
    rows.sort(key=lambda row: (-longest[tuple(row.context)], tuple(row.context), -len(row.crop)))
    plain = [rows[start:start + rows_per_batch] for start in range(0, len(rows), rows_per_batch)]
    even = even_parts(rows, rows_per_batch)
    cuts = [plain] if [len(p) for p in even] == [len(p) for p in plain] else [plain, even]
    # even_parts leaves out the padding of passes, which can make its largest microbatch the
    # larger one: the plain cut is kept unless the other lowers the peak. (Full microbatches,
    # as GRPO's usually are, leave one cut: it is packed once.)
    packed = [[pack_microbatch(part) for part in cut] for cut in cuts]
    return min(packed, key=lambda batches: max((b.positions for b in batches), default=0))


def even_parts(rows, rows_per_batch: int) -> list:
    """`rows` cut in order into as few microbatches as `rows_per_batch` allows, where the
    largest one runs the fewest positions (padding aside: each context once, every row's
    crop). The largest microbatch sets the loss's peak memory, and in longest-first order
    cutting every `rows_per_batch` rows fills the first one most (T-SPMO: a few rows, each
    with a long replay context). Binary search on that largest number of positions; for a
    given bound, filling each microbatch as far as it allows gives the fewest microbatches."""
    most = -(-len(rows) // rows_per_batch)
    keys = [tuple(row.context) for row in rows]
    crops = [len(row.crop) for row in rows]

    def cut(bound):
        parts, size, seen = [], 0, set()
        for row, key, crop in zip(rows, keys, crops):
            extra = crop + (0 if key in seen else len(key))
            if not parts or len(parts[-1]) == rows_per_batch or size + extra > bound:
                parts.append([])
                size, seen, extra = 0, set(), crop + len(key)
            parts[-1].append(row)
            size += extra
            seen.add(key)
        return parts

    low = max((crop + len(key) for key, crop in zip(keys, crops)), default=0)
    high = sum(crop + len(key) for key, crop in zip(keys, crops))
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if len(cut(middle)) <= most else (middle + 1, high)
    return cut(high)


def passes(lengths) -> list:
    """Indices of `lengths` in passes, longest first: a length joins the current pass if its
    bucketed width is at least PASS_FILL of the pass's (same-bucket lengths always share)."""
    widths = [_round_up(n, WIDTH_BUCKET) for n in lengths]
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    out = []
    for i in order:
        if out and widths[i] >= PASS_FILL * widths[out[-1][0]]:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def pack_microbatch(rows) -> MicroBatch:
    """Arrays of one microbatch of `ForwardRow`s, in passes of similar widths.

    A row that reads only its context's last state (a first token) takes no row slot; when
    no row needs one, there is no row pass. Padding is never a whole sequence: a padding row
    or context would cost a forward of its pass's width."""
    contexts = list(dict.fromkeys(tuple(row.context) for row in rows))
    context_passes = passes([len(c) for c in contexts])
    slot_of = {}  # context -> its number across passes
    context_tokens, context_padding, ends = [], [], []
    offset = 0  # flattened hidden states of the passes so far
    for members in context_passes:
        width = _round_up(len(contexts[members[0]]), WIDTH_BUCKET)
        tokens = np.zeros((len(members), width), dtype=np.int32)
        padding = np.zeros(len(members), dtype=np.int32)
        for k, c in enumerate(members):
            padding[k] = width - len(contexts[c])
            tokens[k, padding[k]:] = contexts[c]
        for k, c in enumerate(members):
            slot_of[contexts[c]] = len(slot_of)
            ends.append(offset + (k + 1) * width - 1)  # its last state, flattened
        offset += tokens.size
        context_tokens.append(tokens)
        context_padding.append(padding)
    running = [i for i, row in enumerate(rows) if row.crop]
    row_passes = passes([len(rows[i].crop) for i in running])
    state_of = {}  # row -> flattened index of its state at completion position 0
    inputs, row_context = [], []
    for members in row_passes:
        width = _round_up(len(rows[running[members[0]]].crop), WIDTH_BUCKET)
        tokens = np.zeros((len(members), width), dtype=np.int32)
        continues = np.zeros(len(members), dtype=np.int32)
        for k, m in enumerate(members):
            row = rows[running[m]]
            tokens[k, :len(row.crop)] = row.crop
            continues[k] = slot_of[tuple(row.context)]
            state_of[running[m]] = offset + k * width
        offset += tokens.size
        inputs.append(tokens)
        row_context.append(continues)
    selected = []
    for i, row in enumerate(rows):
        for p in row.picks:
            # The state before completion[pos]: the context's last for pos 0, else the
            # row's own at pos - 1.
            if p.pos == 0:
                index = ends[slot_of[tuple(row.context)]]
            else:
                index = state_of[i] + p.pos - 1
            selected.append((index, p.target, p.advantage, p.weight))
    padded = _pow2(len(selected), MIN_SELECTIONS)
    cols = np.zeros((4, padded), dtype=np.float64)
    cols[:, :len(selected)] = np.array(selected, dtype=np.float64).T
    return MicroBatch(
        contexts=[mx.array(t) for t in context_tokens],
        context_padding=[mx.array(p) for p in context_padding],
        inputs=[mx.array(t) for t in inputs], row_context=[mx.array(c) for c in row_context],
        picks=mx.array(cols[0].astype(np.int32)), targets=mx.array(cols[1].astype(np.int32)),
        advantages=mx.array(cols[2].astype(np.float32)),
        weights=mx.array(cols[3].astype(np.float32)))


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


def _joined(caches):
    """One batched cache holding the contexts of every pass (layer by layer), each pass's
    keys and values left-padded to the widest: padding here costs memory for keys and
    values only, not a forward."""
    width = max(cache.size() for cache in caches)
    keys, values, offsets, paddings = [], [], [], []
    for cache in caches:
        k, v = cache.keys_and_values()
        extra = width - cache.size()
        pad = [(0, 0), (0, 0), (extra, 0), (0, 0)]
        keys.append(mx.pad(k, pad) if extra else k)
        values.append(mx.pad(v, pad) if extra else v)
        offsets.append(cache.offset)
        paddings.append(cache.left_padding + extra)
    joined = BatchKVCache([0] * sum(k.shape[0] for k in keys))
    joined.state = (mx.concatenate(keys), mx.concatenate(values), mx.concatenate(offsets),
                    mx.concatenate(paddings), width)
    return joined


def _continued(cache, row_context):
    """A batched cache whose row r holds the keys and values of context row_context[r].

    A gather, not mlx-lm's `filter` (which reads the padding back to the host, and so
    cannot be compiled): its gradient adds every row's share back into its context's keys
    and values, so the context's LoRA weights get the sum over the rows that read it."""
    keys, values = cache.keys_and_values()
    rows = BatchKVCache([0] * row_context.shape[0])
    rows.state = (keys[row_context], values[row_context], cache.offset[row_context],
                  cache.left_padding[row_context], cache.size())
    return rows


def selected_logprobs(model, batch: MicroBatch) -> mx.array:
    """log pi(target | context) at the selected positions only: the body runs once over the
    contexts (prefilled into the model's cache, left-padded as in rollouts), pass by pass,
    then over the cropped rows that continue them, and the model's own head only on the
    selected positions' hidden states."""
    body, head, key = body_and_head(model)
    hidden, caches = [], []
    for tokens, padding in zip(batch.contexts, batch.context_padding):
        cache = batch_cache(model, [0] * tokens.shape[0])
        for layer in cache:  # padding as an array, so that one compiled graph serves any
            layer.prepare(left_padding=padding)
        hidden.append(body(tokens, cache=cache))
        caches.append(cache)
    if batch.inputs:  # the number of passes and their shapes: fixed within one graph
        joined = caches[0] if len(caches) == 1 else [_joined(layers) for layers in zip(*caches)]
        for tokens, row_context in zip(batch.inputs, batch.row_context):
            row_cache = [_continued(layer, row_context) for layer in joined]
            hidden.append(body(tokens, cache=row_cache))
    states = mx.concatenate([h.reshape(-1, h.shape[-1]) for h in hidden])
    logits = apply_head(head, key, body, states[batch.picks][None])[0].astype(mx.float32)
    target_logits = mx.take_along_axis(logits, batch.targets[:, None], axis=-1)[:, 0]
    return target_logits - mx.logsumexp(logits, axis=-1)


def check_selected_logprobs(model, length: int = 8):
    """Start-up check: on a short input, the loss's log-probs equal the model's own
    (log_softmax of `model(x)`), at each position's most likely token and at random ones.
    Refuses (one line) a model whose output head cannot be run on picked hidden states, or
    whose attention misreads left-padded contexts through the cache.

    The input is read as two rows, after contexts of 1 and 3 tokens (left-padded together,
    as the loss runs them). The body sees the same input both ways, so only rounding can
    differ; the difference is judged, in float32, against the rounding the model's own
    forward shows on this machine (`rounding.py`)."""
    with in_float32(model):
        tokens = list(range(1, length + 1))
        full = logprobs(model(mx.array(tokens)[None])[0])
        half = length // 2
        random_ids = np.random.default_rng(0).integers(0, full.shape[-1], length - half)
        targets = np.concatenate([np.array(mx.argmax(full[:half], axis=-1)), random_ids])
        rows = [ForwardRow(tokens[:split], tokens[split:],
                           [Pick(col + 1 - split, int(targets[col]), 1.0, 1.0)
                            for col in range(split - 1, length)])
                for split in (1, 3)]
        batch = pack_microbatch(rows)
        expected = np.concatenate([np.array(full[col, targets[col]]).reshape(1)
                                   for split in (1, 3) for col in range(split - 1, length)])
        ours = np.array(selected_logprobs(model, batch))[:len(expected)]
        verdict = judge(float(np.abs(ours - expected).max()), own_rounding(model, [tokens]))
    settle(verdict, f"model type {model_type(model)!r}: the loss's log-probs differ from the "
                    f"model's own {verdict.describe()}",
           "its output head or its attention over left-padded contexts is not supported",
           "an unsupported output head or attention")


def checkpoint_blocks(model):
    """Gradient checkpointing of every transformer block (all instances of its class): the
    backward pass recomputes each block's activations instead of keeping them.

    Why not mlx-lm's `grad_checkpoint`: the recomputation calls the block again with the
    same cache object, whose `update_and_fetch` then appends the keys and values a second
    time. Here the cache's arrays go into and out of the checkpointed function, which
    updates a copy of the cache, so every recomputation starts from the cache as it was."""
    block = type(model.layers[0])
    forward = block.__call__
    if getattr(forward, "checkpointed", False):
        return  # patched before (another model of the same family)

    def checkpointed(layer, x, mask=None, cache=None):
        if cache is None:
            def plain(params, x):
                layer.update(params)
                return forward(layer, x, mask)

            return mx.checkpoint(plain)(layer.trainable_parameters(), x)
        before = cache.state
        takes = [i for i, value in enumerate(before) if isinstance(value, mx.array)]
        after = []  # the cache's state after each call (the first: the forward pass)

        def inner(params, x, *arrays):
            layer.update(params)
            copied = copy.copy(cache)
            given = dict(zip(takes, arrays))
            copied.state = tuple(given.get(i, value) for i, value in enumerate(before))
            out = forward(layer, x, mask, copied)
            after.append(list(copied.state))
            return (out, *(value for value in after[-1] if isinstance(value, mx.array)))

        out, *arrays = mx.checkpoint(inner)(layer.trainable_parameters(), x,
                                            *(before[i] for i in takes))
        state = after[0]
        gives = [i for i, value in enumerate(state) if isinstance(value, mx.array)]
        for i, value in zip(gives, arrays):
            state[i] = value
        cache.state = tuple(state)
        return out

    checkpointed.checkpointed = True
    block.__call__ = checkpointed


@dataclass(frozen=True)
class ClipRange:
    """PPO's clip of the ratio pi / pi_old to [1 - low, 1 + high]."""
    low: float = 0.2
    high: float = 0.2


def clipped_objective(ratio, advantages, clip: ClipRange):
    """PPO's per-token objective min(r A, clip(r) A): where the clip holds it (A > 0 and
    r > 1 + high, or A < 0 and r < 1 - low) it is a constant, with no gradient; elsewhere
    r A. Written with `where`, not `minimum`, so that at r = 1 the gradient is A's exactly."""
    unclipped = ratio * advantages
    clipped = mx.clip(ratio, 1 - clip.low, 1 + clip.high) * advantages
    return mx.where(unclipped <= clipped, unclipped, clipped)


def policy_loss(model, batch: MicroBatch, beta: float = 0.0, clip: ClipRange = ClipRange(),
                fresh=True):
    """(loss, log-probs at the selected tokens).

    The policy term is -sum w * (A * old + (min(r A, clip(r) A) - A)) with r = pi / pi_old:
    its gradient is PPO's clipped surrogate's, and its value is the plain policy-gradient
    loss -sum w A log pi when r = 1, so a step's first update (`fresh`: old = its own
    log-probs, without gradient) has today's loss and gradient exactly and the logged loss
    keeps its meaning. Later updates read `batch.old_logprobs`."""
    logp = selected_logprobs(model, batch)
    old = mx.where(fresh, mx.stop_gradient(logp), batch.old_logprobs)
    ratio = mx.exp(logp - old)
    surrogate = clipped_objective(ratio, batch.advantages, clip) - batch.advantages
    loss = -(batch.weights * batch.advantages * old).sum() - (batch.weights * surrogate).sum()
    if beta > 0:
        # k3 estimator of KL(pi || pi_ref) on the selected tokens.
        log_ratio = batch.ref_logprobs - logp
        loss = loss + beta * (batch.weights * (mx.exp(log_ratio) - log_ratio - 1)).sum()
    return loss, logp


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


class LossAndGrads(NamedTuple):
    loss: mx.array
    grads: dict  # of the trainable parameters
    logprobs: mx.array  # (S,) at the batch's selected tokens, without gradient


def make_loss_and_grad(model, beta: float = 0.0, compile: bool = True,
                       clip: ClipRange = ClipRange()):
    """Return f(batch) -> LossAndGrads. A batch without `old_logprobs` is a step's first
    update: its own log-probs are the old policy's."""
    names = [f.name for f in fields(MicroBatch)]

    def loss_fn(fresh, *arrays):
        return policy_loss(model, MicroBatch(**dict(zip(names, arrays))), beta, clip, fresh)

    value_and_grad = nn.value_and_grad(model, loss_fn)
    if compile:
        # value_and_grad swaps traced parameters into the model: declare the model's
        # state as both input and output so the compiled graph leaves it intact.
        value_and_grad = partial(mx.compile, inputs=model.state, outputs=model.state)(value_and_grad)

    def step(batch: MicroBatch) -> LossAndGrads:
        # Absent optional arrays are passed as zeros, so one compiled graph serves all.
        given = {name: getattr(batch, name) for name in names}
        for name in ("ref_logprobs", "old_logprobs"):
            if given[name] is None:
                given[name] = mx.zeros_like(batch.weights)
        (loss, logprobs), grads = value_and_grad(mx.array(batch.old_logprobs is None),
                                                 *given.values())
        return LossAndGrads(loss, grads, mx.stop_gradient(logprobs))

    return step
