"""SwiGLU and attention for rollouts on MLX's CPU backend, where `exp` is slow.

MLX's CPU exp (and the sigmoid and softmax built on it) runs about 19 ns per element, an
order of magnitude slower than numpy's vectorised exp. In a decode step of the 0.5B at 32
rows, the 24 layers' SwiGLU took ~60 ms of ~680 ms (one BLAS thread, busy machine), and
attention's softmax grows with the context: 32 rows x 14 heads x 450 positions is 200k exps
per layer. Written from cheap ops (2^x as a polynomial times a power of two built from the
exponent bits) and compiled into one kernel, SwiGLU takes 0.4 ms instead of 2.5 ms per layer,
within 1e-5 of mlx-lm's in float32 (in half precision it rounds once, where mlx-lm rounds
twice: one ulp apart at most); attention at 450 positions ~3.7 ms instead of ~7.6 ms.

Only rollouts use them: the bit trick has no gradient in MLX, and the loss must
differentiate the model's own function. mlx-lm's families call `swiglu` and
`scaled_dot_product_attention` from their module's namespace, so for a rollout those names
are pointed at these and put back afterwards; on a GPU (Metal, where exp is fast) and for
families that do not call mlx-lm's functions nothing changes.
"""

import sys
from contextlib import contextmanager

import mlx.core as mx
from mlx_lm.models import activations, base

LOG2_E = 1.4426950408889634
# 2^f for |f| <= 1/2: Taylor coefficients of exp(f ln 2); degree 6 leaves 1.2e-7.
EXP2_COEFFICIENTS = (0.00015403530393381606, 0.0013333558146428443, 0.009618129107628477,
                     0.05550410866482158, 0.2402265069591007, 0.6931471805599453, 1.0)


def exp2(y: mx.array) -> mx.array:
    """2^y for y in [-126, 126], from a polynomial and the float32 exponent bits."""
    whole = mx.floor(y + 0.5)
    fraction = y - whole
    poly = EXP2_COEFFICIENTS[0]
    for c in EXP2_COEFFICIENTS[1:]:
        poly = poly * fraction + c
    return poly * ((whole.astype(mx.int32) + 127) << 23).view(mx.float32)


@mx.compile
def swiglu(gate: mx.array, x: mx.array) -> mx.array:
    """silu(gate) * x = gate * x / (1 + e^-gate); 0 below gate -88, where the clipped
    exponent (2^126 from gate -87.3 on) would leave a remainder of ~1e-36 x gate x."""
    gate32 = gate.astype(mx.float32)
    e = exp2(mx.clip(gate32 * -LOG2_E, -126.0, 126.0))
    value = gate32 * x.astype(mx.float32) / (1.0 + e)
    return mx.where(gate32 < -88.0, 0.0, value).astype(x.dtype)  # a NaN gate stays NaN


def attention(queries, keys, values, cache, scale: float, mask, sinks=None):
    """mlx-lm's `scaled_dot_product_attention` with its softmax's exp from cheap ops. What a
    rollout's batched cache never gives (a quantized cache, attention sinks, the "causal"
    string mask of an unbatched prefill, a mask per head) goes to mlx-lm's own."""
    per_head = isinstance(mask, mx.array) and mask.ndim == 4 and mask.shape[1] != 1
    if sinks is not None or hasattr(cache, "bits") or isinstance(mask, str) or per_head:
        return base.scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks)
    if mask is None:
        mask = mx.array(True)
    return _attention(queries, keys, values, mask, scale)


@mx.compile
def _attention(queries, keys, values, mask, scale):
    """softmax(q k^T * scale + mask) v for (B, H, N, D) queries and (B, KV, L, D) keys and
    values, H a multiple of KV (grouped-query heads read their KV head without a copy).
    A boolean mask keeps where True, a float mask is added; the softmax runs in float32.
    A query with every key masked (left padding in a prefill) gets a finite average."""
    batch, heads, length, dim = queries.shape
    kv_heads = keys.shape[1]
    grouped = (queries * scale).reshape(batch, kv_heads, heads // kv_heads, length, dim)
    scores = (grouped @ mx.expand_dims(keys, 2).swapaxes(-1, -2)).astype(mx.float32)
    if mask.ndim == 4:  # (B, 1, N, L): make room for the grouped heads' axis
        mask = mx.expand_dims(mask, 2)
    if mask.dtype == mx.bool_:
        scores = mx.where(mask, scores, mx.finfo(mx.float32).min)
    else:
        scores = scores + mask.astype(mx.float32)
    shifted = (scores - scores.max(axis=-1, keepdims=True)) * LOG2_E
    weights = exp2(mx.maximum(shifted, -126.0))  # below 2^-126 is below float32's resolution
    weights = weights / weights.sum(axis=-1, keepdims=True)
    out = weights.astype(values.dtype) @ mx.expand_dims(values, 2)
    return out.reshape(batch, heads, length, dim)


def family_module(model):
    """The mlx-lm module of the model's outermost class (a family that wraps another's
    blocks, e.g. mistral3, is then left as it is: its module has no swiglu)."""
    for module in model.modules():
        name = type(module).__module__
        if name.startswith("mlx_lm.models.") and name != "mlx_lm.models.base":
            return sys.modules[name]
    return None


# name in a family's module: (mlx-lm's function, the name of ours in this module)
SWAPS = {"swiglu": (activations.swiglu, "swiglu"),
         "scaled_dot_product_attention": (base.scaled_dot_product_attention, "attention")}


@contextmanager
def cpu_kernels(model):
    """Within the block, the model's family uses this module's swiglu and attention where
    it calls mlx-lm's (CPU only)."""
    module = family_module(model)
    swapped = [] if mx.default_device() != mx.cpu else [
        name for name, (theirs, _) in SWAPS.items() if getattr(module, name, None) is theirs]
    for name in swapped:
        # Looked up at entry, so a test can count calls by replacing ours in this module.
        setattr(module, name, globals()[SWAPS[name][1]])
    try:
        yield
    finally:
        for name in swapped:
            setattr(module, name, SWAPS[name][0])
