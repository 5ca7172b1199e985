"""Batched rollouts: B prompts x G completions each, all in flight together.

Why our own decode loop instead of `mlx_lm.batch_generate`: measured on SmolLM2-135M on
CPU, batch_generate spends more time around the model (per-sequence bookkeeping,
detokenising every step, stop-condition checks) than in it. RL needs none of that per step:
we keep token ids on the device, look at them once per step as one small host array, and
detokenise once at the end. The model, its cache (mlx-lm's factory, batched as
`BatchKVCache`) and top-p filter are mlx-lm's.

Each prompt is prefilled once; its KV rows are then repeated for its G completions.
Finished rows are dropped from the batch (cache compaction) so a few long completions do
not keep every row busy. Sampling uses one random key per completion, advanced every step:
what is sampled for a prompt depends on its seed only, not on which other prompts share the
batch or when rows are compacted (`sampling.py`).
"""

from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import BatchKVCache, KVCache, make_prompt_cache

from .cpu_kernels import cpu_kernels
from .messages import first_line
from .models import ModelLoadError, model_type
from .rounding import in_float32, judge, logprobs, own_rounding, settle
from .sampling import advance_keys, row_keys, sample_tokens, token_stats

# Drop finished rows once at least this share of the batch has finished: compaction copies
# the KV cache, so doing it for every single finished row would cost more than it saves.
COMPACT_FRACTION = 0.25


@dataclass
class SamplingParams:
    temperature: float = 0.6
    top_p: float = 1.0
    max_new_tokens: int = 256


@dataclass
class Completion:
    prompt_index: int  # index into the prompts passed to `rollout`
    tokens: list  # sampled ids, EOS included when it was produced
    truncated: bool  # hit max_new_tokens before EOS
    text: str = ""  # decoded without the EOS token
    reward: float = 0.0
    # With `token_stats`, per token: its log-prob and the entropy at its position under the
    # model's own distribution (sampling.token_stats)
    logprobs: list | None = None
    entropies: list | None = None


def _left_pad(sequences, pad_id: int = 0):
    width = max(len(s) for s in sequences)
    padding = [width - len(s) for s in sequences]
    batch = np.full((len(sequences), width), pad_id, dtype=np.int32)
    for row, (seq, pad) in enumerate(zip(sequences, padding)):
        batch[row, pad:] = seq
    return mx.array(batch), padding


def batch_cache(model, left_padding):
    """The model's own cache (mlx-lm's factory: one entry per cached layer, which need not
    be one per layer), batched for left-padded rows.

    Only a plain `KVCache` on every layer: its batched form, `BatchKVCache` (what
    `KVCache.merge` builds for mlx-lm's batch generation), masks our left padding and
    repeats and drops rows with `filter`. Other kinds are refused, since neither is known to
    work with the left-padded prefill used here: rotating (sliding-window) caches, which
    mlx-lm batches with right padding (`prepare`/`finalize`), and recurrent state
    (`ArraysCache`: Mamba, hybrid models), where keeping pad tokens out of the state is up to
    each family's own masking."""
    layers = make_prompt_cache(model)
    kinds = sorted({type(c).__name__ for c in layers if type(c) is not KVCache})
    if kinds:
        raise ModelLoadError(
            f"model type {model_type(model)!r} is not supported: its cache has "
            f"{', '.join(kinds)} layers (sliding-window or recurrent); batched rollouts need "
            f"a plain KVCache on every layer")
    return [BatchKVCache(left_padding) for _ in layers]


def prefill(model, prompt_tokens):
    """Run every prompt once (left-padded together); return the cache and last logits."""
    batch, padding = _left_pad(prompt_tokens)
    cache = batch_cache(model, padding)
    logits = model(batch, cache=cache)[:, -1, :]
    return cache, logits


def _keep_rows(cache, rows: mx.array):
    for layer_cache in cache:
        layer_cache.filter(rows)


def check_batched_rollouts(model):
    """Start-up check: refuse, in one line, a model whose rollouts cannot be batched.

    First its cache kinds (`batch_cache`). A plain KVCache is not enough on its own: the
    family's attention must also take the batch's left-padding mask (gemma2 with grouped-
    query attention cannot: its 5-d attention scores do not broadcast with it). So two
    prompts of different lengths run as `generate_tokens` runs them (prefilled together,
    rows repeated, one dropped), and every step's log-probs are compared with the model's own
    forward of each row alone. A wrong mask or offset moves them by whole units; rounding is
    judged, in float32, against what the model's own forward shows here (`rounding.py`)."""
    batch_cache(model, [0])
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9]]
    # Prompt 0 once, prompt 1 twice (a group); row 1 finishes after one token and is dropped.
    rows = [prompts[0] + [10, 13], prompts[1] + [11], prompts[1] + [12, 14]]
    with in_float32(model):
        try:
            cache, first = prefill(model, prompts)
            _keep_rows(cache, mx.array([0, 1, 1]))
            second = model(mx.array([[10], [11], [12]]), cache=cache)[:, -1, :]
            _keep_rows(cache, mx.array([0, 2]))
            third = model(mx.array([[13], [14]]), cache=cache)[:, -1, :]
        except ValueError as exc:  # mlx's shape errors inside the family's attention
            raise ModelLoadError(f"model type {model_type(model)!r} is not supported: batched "
                                 f"rollouts fail in its forward ({first_line(exc)})") from None
        batched = [[first[0], second[0], third[0]], [first[1], second[1]],
                   [first[1], second[2], third[1]]]
        difference = 0.0
        for row, steps in zip(rows, batched):
            alone = model(mx.array(row)[None])[0, len(row) - len(steps):]
            difference = max(difference, mx.abs(logprobs(mx.stack(steps))
                                                 - logprobs(alone)).max().item())
        verdict = judge(difference, own_rounding(model, rows))
    settle(verdict, f"model type {model_type(model)!r}: batched rollouts differ from its own "
                    f"forward {verdict.describe()} in log-prob", "it is not supported",
           "attention that misreads left padding")


@dataclass
class Generated:
    tokens: list  # per row, the sampled ids
    truncated: list  # per row, hit its budget before EOS
    stats: list | None = None  # per row, per token: (log-prob, entropy) (sampling.token_stats)


def generate_tokens(model, prompt_tokens, group_size: int, params: SamplingParams,
                    eos_ids, seeds, budgets=None, token_stats=False) -> Generated:
    """Sample `group_size` completions per prompt. `budgets` caps each prompt's completions
    below `params.max_new_tokens`; `token_stats` records each token's log-prob and entropy."""
    with cpu_kernels(model):
        return _generate_tokens(model, prompt_tokens, group_size, params, eos_ids, seeds,
                                budgets, token_stats)


def _generate_tokens(model, prompt_tokens, group_size, params, eos_ids, seeds, budgets,
                     record_stats):
    num_rows = len(prompt_tokens) * group_size
    budgets = [params.max_new_tokens] * len(prompt_tokens) if budgets is None else budgets
    row_budget = np.repeat(np.minimum(budgets, params.max_new_tokens), group_size)
    cache, logits = prefill(model, prompt_tokens)
    repeat = mx.array(np.repeat(np.arange(len(prompt_tokens)), group_size))
    _keep_rows(cache, repeat)
    logits = logits[repeat]

    keys = row_keys(seeds, group_size)
    eos = np.array(sorted(eos_ids), dtype=np.int64)
    active = np.arange(num_rows)  # global row id of each batch row, in batch order
    produced = [[] for _ in range(num_rows)]
    recorded = [[] for _ in range(num_rows)]
    finished = np.zeros(num_rows, dtype=bool)
    ended = np.zeros(num_rows, dtype=bool)  # by EOS, not by the budget

    def sample(logits, keys):
        """The next tokens (and their stats, or None), queued."""
        tokens = sample_tokens(logits, keys, params.temperature, params.top_p)
        if not record_stats:
            mx.async_eval(tokens)
            return tokens, None
        stats = token_stats(logits, tokens)
        mx.async_eval(tokens, stats)
        return tokens, stats

    tokens, stats = sample(logits, keys)
    longest = int(row_budget.max())
    for step in range(longest):
        last_step = step == longest - 1
        if not last_step:
            # Queue the next step before reading this one, so the host bookkeeping below
            # overlaps with the model's compute on a GPU (on the CPU the sampler reads the
            # logits in numpy, so the step has run by now; the bookkeeping is microseconds).
            keys = advance_keys(keys)
            next_tokens, next_stats = sample(model(tokens[:, None], cache=cache)[:, -1, :], keys)
        host = np.array(tokens)
        host_stats = np.array(stats).tolist() if record_stats else [None] * len(host)
        for row, token, row_stats in zip(active, host, host_stats):
            if not finished[row]:
                produced[row].append(int(token))
                recorded[row].append(row_stats)
        eos_now = np.isin(host, eos) & ~finished[active]
        ended[active[eos_now]] = True
        finished[active[eos_now | (step + 1 >= row_budget[active])]] = True
        if last_step or finished.all():
            break
        still = ~finished[active]
        if still.sum() <= (1 - COMPACT_FRACTION) * len(active):
            keep = mx.array(np.flatnonzero(still))
            _keep_rows(cache, keep)
            next_tokens, keys = next_tokens[keep], keys[keep]
            next_stats = next_stats[keep] if record_stats else None
            active = active[still]
        tokens, stats = next_tokens, next_stats
    truncated = [not ended[row] for row in range(num_rows)]
    return Generated(produced, truncated, recorded if record_stats else None)


def rollout(model, tokenizer, prompt_tokens, group_size: int, params: SamplingParams,
            seeds, answers=None, reward_fn=None, prefixes=None, budgets=None, token_stats=False):
    """Sample G completions for each prompt (token ids), decode and score them.

    Returns a prompt-major list of `Completion`s: rows g*G .. g*G+G-1 belong to prompt g.
    `seeds` holds one integer per prompt and fixes what is sampled for it. `prefixes`
    (T-SPMO replay) are tokens already written for a prompt's answer: they are fed after
    the prompt and count as part of the answer text that is scored. `budgets` (one per
    prompt, at most `params.max_new_tokens`) caps each prompt's new tokens.
    """
    if len(seeds) != len(prompt_tokens):
        raise ValueError("rollout needs one seed per prompt")
    prefixes = prefixes or [[] for _ in prompt_tokens]
    contexts = [list(p) + list(q) for p, q in zip(prompt_tokens, prefixes)]
    eos_ids = set(tokenizer.eos_token_ids)
    generated = generate_tokens(model, contexts, group_size, params, eos_ids, seeds, budgets,
                                token_stats)
    completions = []
    for row, (tokens, cut) in enumerate(zip(generated.tokens, generated.truncated)):
        prompt = row // group_size
        body = tokens if cut else tokens[:-1]
        completion = Completion(prompt, tokens, cut, tokenizer.decode(list(prefixes[prompt]) + body))
        if generated.stats is not None:
            completion.logprobs = [logprob for logprob, _ in generated.stats[row]]
            completion.entropies = [entropy for _, entropy in generated.stats[row]]
        if reward_fn is not None:
            completion.reward = float(reward_fn(completion.text, answers[prompt]))
        completions.append(completion)
    return completions


def encode_prompts(tokenizer, texts):
    """Token ids of prompt texts; BOS added only when the text (chat template) lacks it."""
    bos = tokenizer.bos_token
    return [tokenizer.encode(t, add_special_tokens=bool(bos) and not t.startswith(bos))
            for t in texts]
