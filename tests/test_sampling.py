"""The sampler draws from softmax(logits / T) (top-p renormalised), checked against
probabilities computed here by hand, on both of its implementations."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_tokenrl import sampling
from mlx_tokenrl.sampling import inverse_cdf, inverse_cdf_numpy, sample_tokens

ROWS = 40_000


def softmax(logits, temperature):
    z = np.asarray(logits, dtype=np.float64) / temperature
    w = np.exp(z - z.max())
    return w / w.sum()


def frequencies(tokens, vocab):
    return np.bincount(np.asarray(tokens), minlength=vocab) / len(tokens)


def assert_close_to(freq, probs, rows=ROWS):
    # 5 standard errors of a binomial frequency, plus a floor for p near 0.
    tolerance = 5 * np.sqrt(probs * (1 - probs) / rows) + 1e-4
    assert np.all(np.abs(freq - probs) <= tolerance), (freq, probs)


@pytest.fixture(params=["numpy", "mlx"])
def on_device(request, monkeypatch):
    """sample_tokens with its CPU (numpy) path, or the path a GPU takes (MLX ops)."""
    if request.param == "mlx":
        monkeypatch.setattr(sampling, "inverse_cdf_numpy", None)  # must not be reached
        monkeypatch.setattr(sampling.mx, "default_device", lambda: mx.gpu)
    return request.param


LOGITS = [2.0, 1.0, 0.5, -1.0, 3.0, -4.0]


@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.7])
def test_frequencies_follow_the_tempered_softmax(on_device, temperature):
    keys = mx.random.split(mx.random.key(7), ROWS)
    logits = mx.broadcast_to(mx.array(LOGITS), (ROWS, len(LOGITS)))
    tokens = sample_tokens(logits, keys, temperature)
    assert tokens.shape == (ROWS,)
    assert_close_to(frequencies(tokens, len(LOGITS)), softmax(LOGITS, temperature))


def test_top_p_keeps_the_smallest_head_reaching_p_and_renormalises(on_device):
    probs = np.array([0.05, 0.5, 0.15, 0.3])  # sorted: 0.5, 0.3 reach 0.75 -> tokens 1, 3
    keys = mx.random.split(mx.random.key(3), ROWS)
    logits = mx.broadcast_to(mx.array(np.log(probs), dtype=mx.float32), (ROWS, 4))
    tokens = sample_tokens(logits, keys, 1.0, top_p=0.75)
    assert_close_to(frequencies(tokens, 4), np.array([0, 0.5 / 0.8, 0, 0.3 / 0.8]))


def test_every_row_draws_with_its_own_key(on_device):
    """Rows of one call are independent draws: not one uniform shared by the batch."""
    keys = mx.random.split(mx.random.key(11), 8)
    logits = mx.zeros((8, 1000))
    assert len(set(np.asarray(sample_tokens(logits, keys, 1.0)).tolist())) > 4


# Flat to peaked rows; an offset of 1e4 is what real logits at a low temperature give
# (exp overflows without the max taken out first).
@pytest.mark.parametrize("spread, offset", [(0.1, 0), (1.0, 0), (4.0, 0), (10.0, 0), (4.0, 1e4)])
def test_both_implementations_pick_the_token_a_float64_inverse_cdf_picks(spread, offset):
    """Same uniforms, a 151k vocabulary: every row lands where an exact running sum puts it
    (a single float32 cumsum over the vocabulary moved a third of the flat rows)."""
    rng = np.random.default_rng(0)
    scaled = (rng.standard_normal((64, 151_936)) * spread + offset).astype(np.float32)
    uniforms = rng.random(64).astype(np.float32)
    running = np.cumsum(np.exp(scaled.astype(np.float64) - scaled.max(-1, keepdims=True)), -1)
    expected = [np.searchsorted(r, u * r[-1], side="right") for r, u in zip(running, uniforms)]
    assert inverse_cdf_numpy(scaled, uniforms).tolist() == expected  # float64 sums
    # The MLX path sums in float32: a token may differ only where the target lies within
    # float32 rounding (1e-6 of the total) of the token's interval of the running sum.
    device = np.asarray(inverse_cdf(mx.array(scaled), mx.array(uniforms)))
    assert (device == expected).mean() >= 0.9
    for r, u, token in zip(running, uniforms, device):
        low, high = (r[token - 1] if token else 0.0), r[token]
        assert low - 1e-6 * r[-1] <= u * r[-1] <= high + 1e-6 * r[-1]


@pytest.mark.parametrize("implementation", ["numpy", "mlx"])
def test_edges_of_the_uniform_land_on_tokens_with_weight(implementation):
    scaled = np.array([[-np.inf, 0.0, 0.0, -np.inf, -np.inf]] * 2, dtype=np.float32)
    uniforms = np.array([0.0, 1.0], dtype=np.float32)  # 1.0: u * total rounds up to total
    if implementation == "numpy":
        tokens = inverse_cdf_numpy(scaled, uniforms)
    else:
        tokens = np.asarray(inverse_cdf(mx.array(scaled), mx.array(uniforms)))
    assert tokens.tolist() == [1, 2]


def test_temperature_zero_is_argmax():
    logits = mx.array([[0.1, 3.0, -1.0], [5.0, 4.9, 0.0]])
    assert sample_tokens(logits, mx.random.split(mx.random.key(0), 2), 0).tolist() == [1, 0]


@pytest.mark.parametrize("implementation", ["numpy", "mlx"])
def test_masked_blocks_are_never_drawn_even_at_their_edges(implementation):
    """Whole blocks of zero weight (top-p, -inf) between weighted ones: uniforms right at a
    block's end must still land on weighted tokens."""
    block = sampling.SEARCH_BLOCK
    row = np.full(5 * block, -np.inf, dtype=np.float32)
    row[:block] = 0.0  # block 0 weighted, blocks 1-3 masked, block 4 weighted
    row[4 * block:] = 0.0
    edges = np.array([0.5 - 1e-7, 0.5, 0.5 + 1e-7, np.nextafter(np.float32(1), 0)],
                     dtype=np.float32)
    scaled = np.stack([row] * len(edges))
    if implementation == "numpy":
        tokens = inverse_cdf_numpy(scaled, edges)
    else:
        tokens = np.asarray(inverse_cdf(mx.array(scaled), mx.array(edges)))
    assert all(np.isfinite(row[t]) for t in tokens), tokens
