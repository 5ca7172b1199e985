"""The next token of every row: one uniform draw per row, read off the inverse CDF.

Why not Gumbel-max (mlx-lm's `categorical` and our first sampler): it draws a uniform and
takes two logs for every vocabulary entry, 151k per row per step for Qwen. On MLX's CPU
backend, where the random bits and `mx.exp`/`mx.log` run an order of magnitude slower than
numpy's, that noise cost 52 ms of a ~430 ms decode step of the 0.5B at 32 rows (two BLAS
threads, quiet machine; scripts/bench_rollout.py now measures ours: 7 ms). The inverse
CDF needs one uniform per row: the token is the first index where the running sum of
exp((logit - max) / T) passes u times the total.

On the CPU backend that sum runs in numpy, whose exp is vectorised; on a GPU (Metal) the
same formula runs in MLX, on the device, from the same uniforms, so both pick the same token
up to float rounding. Each row has its own PRNG key, advanced every step, so what a row
samples depends on its seed only.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.sample_utils import apply_top_p

# Running sums are taken per block of this many tokens, then across blocks: few blocks
# remain (149 for Qwen), and one block is short to scan.
SEARCH_BLOCK = 1024


def row_keys(seeds, group_size: int) -> mx.array:
    """One PRNG key per completion, (len(seeds) * group_size, 2), prompt-major."""
    keys = [mx.random.split(mx.random.key(int(s)), group_size) for s in seeds]
    return mx.concatenate(keys, axis=0)


advance_keys = mx.vmap(lambda k: mx.random.split(k)[0])
_uniform_per_row = mx.vmap(lambda k: mx.random.uniform(key=k))


def sample_tokens(logits: mx.array, keys: mx.array, temperature: float,
                  top_p: float = 1.0) -> mx.array:
    """Sample one token per row of (rows, vocab) logits; greedy at temperature 0."""
    if temperature == 0:
        return mx.argmax(logits, axis=-1).astype(mx.int32)
    scaled = logits.astype(mx.float32) * (1.0 / temperature)
    if top_p < 1.0:
        scaled = apply_top_p(scaled - mx.logsumexp(scaled, axis=-1, keepdims=True), top_p)
    uniforms = _uniform_per_row(keys)
    if mx.default_device() == mx.cpu:
        return mx.array(inverse_cdf_numpy(np.asarray(scaled), np.asarray(uniforms)))
    return inverse_cdf(scaled, uniforms)


def token_stats(logits: mx.array, tokens: mx.array) -> mx.array:
    """(rows, 2): the log-prob of each row's sampled token and the entropy of its row, under
    the model's own distribution (temperature 1, no top-p), which is the policy the loss's
    log-probs and ratio read, not the tempered one the token was drawn from. On the CPU in
    numpy (the sampler has just read these logits there, and MLX's exp on the CPU is ~10x
    slower), elsewhere in MLX, on the device."""
    if mx.default_device() == mx.cpu:
        return mx.array(token_stats_numpy(np.asarray(logits.astype(mx.float32)),
                                          np.asarray(tokens)))
    logp = nn.log_softmax(logits.astype(mx.float32), axis=-1)
    chosen = mx.take_along_axis(logp, tokens[:, None].astype(mx.int32), axis=-1)[:, 0]
    probs = mx.exp(logp)  # a token masked to -inf adds 0 (not 0 x -inf = NaN) to the sum
    entropy = -mx.where(probs > 0, probs * logp, 0.0).sum(axis=-1)
    return mx.stack([chosen, entropy], axis=1)


def token_stats_numpy(logits: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """`token_stats` in numpy: with x the logits less their maximum, Z = sum exp(x),
    log p(token) = x[token] - log Z and the entropy is log Z - sum exp(x) x / Z."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    weights = np.exp(shifted)
    total = weights.sum(axis=-1)
    log_total = np.log(total)
    chosen = shifted[np.arange(len(tokens)), tokens] - log_total
    finite = np.where(weights > 0, shifted, 0.0)  # -inf logits: 0, not 0 x -inf = NaN
    entropy = log_total - np.einsum("rv,rv->r", weights, finite) / total
    return np.stack([chosen, entropy], axis=1).astype(np.float32)


def inverse_cdf(scaled: mx.array, uniforms: mx.array) -> mx.array:
    """The token of each row of (rows, vocab) tempered logits at its uniform, in MLX."""
    rows, vocab = scaled.shape
    weights = mx.exp(scaled - scaled.max(axis=-1, keepdims=True))
    blocks = mx.pad(weights, [(0, 0), (0, -vocab % SEARCH_BLOCK)]).reshape(rows, -1, SEARCH_BLOCK)
    # The running sum in two levels, inside blocks and across them: float32 then rounds over
    # a block's terms, not over all 151k (one long cumsum moved draws of flat rows). Each
    # block starts from the sum the blocks before it end on, so the total never steps down
    # (a dip before a masked block would let the target land on a zero-weight token).
    within = mx.cumsum(blocks, axis=-1)
    before = mx.cumsum(within[..., -1:], axis=1, inclusive=False)
    totals = (before + within).reshape(rows, -1)[:, :vocab]
    targets = uniforms[:, None] * totals[:, -1:]
    # u * total can round up to the total itself; the last index before the sum reaches its
    # total is then the last token with any weight.
    return mx.minimum((totals <= targets).sum(axis=-1),
                      (totals < totals[:, -1:]).sum(axis=-1)).astype(mx.int32)


def inverse_cdf_numpy(scaled: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """The same draw row by row in numpy: a reused row-sized buffer stays in cache, where
    (rows, vocab) temporaries cost more in fresh pages than in arithmetic, and the running
    sum is taken over blocks first, then inside the one block the target falls in (a full
    cumsum is sequential: slower than the exp)."""
    vocab = scaled.shape[-1]
    starts = np.arange(0, vocab, SEARCH_BLOCK)
    weights = np.empty(vocab, dtype=np.float32)
    tokens = np.empty(len(scaled), dtype=np.int32)
    for row, (logits, u) in enumerate(zip(scaled, uniforms)):
        np.subtract(logits, logits.max(), out=weights)
        np.exp(weights, out=weights)
        block_totals = np.cumsum(np.add.reduceat(weights, starts, dtype=np.float64))
        target = float(u) * block_totals[-1]
        block = min(np.searchsorted(block_totals, target, side="right"),
                    np.searchsorted(block_totals, block_totals[-1], side="left"))
        before = block_totals[block - 1] if block else 0.0
        inside = weights[starts[block]:starts[block] + SEARCH_BLOCK]
        index = np.searchsorted(before + np.cumsum(inside, dtype=np.float64), target, "right")
        # Rounding between the block sums and this sum can put the target past the block.
        if index == len(inside):
            index = np.flatnonzero(inside)[-1]
        tokens[row] = starts[block] + index
    return tokens
