"""The rollouts' CPU SwiGLU and attention: equal to a float64 hand computation (and so to
mlx-lm's) within float32 rounding, used only inside rollouts on the CPU, and mlx-lm's own
put back afterwards."""

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx_lm.models import activations, base, qwen2

from mlx_tokenrl import cpu_kernels
from mlx_tokenrl.cpu_kernels import attention, cpu_kernels as kernels_for, exp2, swiglu
from mlx_tokenrl.rollout import SamplingParams, generate_tokens
from mlx_tokenrl.toy import tiny_family_model


def test_exp2_matches_numpy_over_its_range():
    y = np.linspace(-126, 126, 200_001, dtype=np.float32)
    ours = np.asarray(exp2(mx.array(y)), dtype=np.float64)
    assert np.max(np.abs(ours / np.exp2(y.astype(np.float64)) - 1)) < 5e-7


@pytest.mark.parametrize("spread", [0.1, 3.0, 30.0, 1e4])
def test_swiglu_matches_mlx_lms_within_1e5(spread):
    rng = np.random.default_rng(0)
    gate = (rng.standard_normal((8, 3, 4864)) * spread).astype(np.float32)
    gate[0, 0, :4] = [0.0, -0.0, 1e30, -1e30]
    x = rng.standard_normal((8, 3, 4864)).astype(np.float32)
    gate[0, 1, 0] = np.nan  # stays NaN, as in mlx-lm's
    # silu in float64 by hand, the reference mlx-lm's float32 function meets too; under 1e-34
    # both underflow (gate below -87: e^-gate is past float32's range)
    g64 = gate.astype(np.float64)
    expected = g64 * x / (1 + np.exp(np.minimum(-g64, 700)))
    for candidate in (swiglu, activations.swiglu):
        got = np.asarray(candidate(mx.array(gate), mx.array(x)), dtype=np.float64)
        assert np.isnan(got[0, 1, 0])
        got[0, 1, 0] = expected[0, 1, 0] = 0
        assert np.all(np.abs(got - expected) <= 1e-5 * np.abs(expected) + 1e-34), candidate


def attention_by_hand(q, k, v, scale, mask):
    """float64 numpy: grouped-query heads repeated, True/added mask, softmax over keys."""
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    repeat = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, repeat, axis=1), np.repeat(v, repeat, axis=1)
    scores = q @ k.swapaxes(-1, -2) * scale
    if mask is not None and mask.dtype == np.bool_:
        scores = np.where(mask, scores, -np.inf)
    elif mask is not None:
        scores = scores + mask
    with np.errstate(invalid="ignore"):  # a query that sees no key: NaN, left out below
        weights = np.exp(scores - scores.max(-1, keepdims=True))
    return (weights / weights.sum(-1, keepdims=True)) @ v


def left_padded_causal(batch, queries, length, padding):
    """What mlx-lm's BatchKVCache gives a layer: causal over the last `queries` positions,
    and no key inside a row's left padding."""
    cols = np.arange(length)
    rows = np.arange(length - queries, length)[:, None]
    return (cols <= rows)[None, None] & (cols >= np.array(padding)[:, None, None, None])


CASES = {  # (heads, kv heads, queries, keys, mask kind)
    "decode, grouped heads, left padding": (4, 2, 1, 37, "padding"),
    "prefill, grouped heads, left padding": (4, 2, 9, 9, "padding"),
    "decode, one kv head per head": (3, 3, 1, 20, "padding"),
    "continued prefill, no mask": (4, 1, 5, 12, None),
    "additive mask": (4, 2, 6, 6, "additive"),
}


@pytest.mark.parametrize("case", CASES)
def test_attention_matches_a_hand_computation(case):
    heads, kv_heads, queries, length, kind = CASES[case]
    rng = np.random.default_rng(0)
    batch, dim, scale = 3, 16, 16 ** -0.5
    q = rng.standard_normal((batch, heads, queries, dim)).astype(np.float32) * 3
    k = rng.standard_normal((batch, kv_heads, length, dim)).astype(np.float32) * 3
    v = rng.standard_normal((batch, kv_heads, length, dim)).astype(np.float32)
    padding = [0, 2, 4]
    mask = {None: None, "padding": left_padded_causal(batch, queries, length, padding),
            "additive": np.where(np.tril(np.ones((queries, length), dtype=bool)), 0.0,
                                 -1e9).astype(np.float32)}[kind]
    ours = np.asarray(attention(mx.array(q), mx.array(k), mx.array(v), None, scale,
                                None if mask is None else mx.array(mask)))
    expected = attention_by_hand(q, k, v, scale, mask)
    # Queries inside a row's left padding see no key: theirs is any finite value (nothing
    # reads it); mlx-lm's own gives NaN there.
    seen = np.isfinite(expected).all(-1)
    assert np.isfinite(ours).all()
    assert np.abs(ours - expected)[seen].max() < 2e-6
    if kind == "padding" and queries > 1:
        assert not seen.all()  # the case has such queries


def test_attention_in_half_precision_is_within_its_rounding():
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal(shape).astype(np.float32)
               for shape in ((2, 4, 1, 32), (2, 2, 50, 32), (2, 2, 50, 32)))
    mask = left_padded_causal(2, 1, 50, [0, 7])
    ours = attention(*(mx.array(a).astype(mx.bfloat16) for a in (q, k, v)), None, 32 ** -0.5,
                     mx.array(mask))
    assert ours.dtype == mx.bfloat16
    assert np.abs(np.asarray(ours.astype(mx.float32))
                  - attention_by_hand(q, k, v, 32 ** -0.5, mask)).max() < 0.03


def test_attention_leaves_what_rollouts_never_pass_to_mlx_lm(monkeypatch):
    calls = []
    monkeypatch.setattr(base, "scaled_dot_product_attention",
                        lambda *args, **kwargs: calls.append(args) or "mlx-lm's")
    q = mx.zeros((1, 2, 3, 8))
    assert attention(q, q, q, None, 1.0, "causal") == "mlx-lm's"
    assert attention(q, q, q, None, 1.0, None, sinks=mx.zeros(2)) == "mlx-lm's"
    assert attention(q, q, q, None, 1.0, mx.ones((1, 2, 3, 3), dtype=mx.bool_)) == "mlx-lm's"
    assert len(calls) == 3


def counting(monkeypatch):
    calls = {"swiglu": 0, "attention": 0}

    def counted(name, function):
        def call(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        monkeypatch.setattr(cpu_kernels, name, call)

    counted("swiglu", swiglu)
    counted("attention", attention)
    return calls


def mlx_lms_in_place():
    return (qwen2.swiglu is activations.swiglu
            and qwen2.scaled_dot_product_attention is base.scaled_dot_product_attention)


def test_rollouts_use_them_and_put_mlx_lms_back(tiny_model_dir, monkeypatch):
    model, tok = mlx_lm.load(str(tiny_model_dir))
    calls = counting(monkeypatch)
    generate_tokens(model, [[1, 2, 3]], 2, SamplingParams(0.0, 1.0, 3), set(tok.eos_token_ids),
                    seeds=[0])
    assert calls["swiglu"] and calls["attention"]  # the family called ours in the rollout
    assert mlx_lms_in_place()
    with pytest.raises(RuntimeError), kernels_for(model):
        assert qwen2.swiglu is not activations.swiglu
        assert qwen2.scaled_dot_product_attention is not base.scaled_dot_product_attention
        raise RuntimeError("a failing rollout")
    assert mlx_lms_in_place()


def test_a_block_inside_a_block_leaves_ours_in_place(tiny_model_dir):
    model, _ = mlx_lm.load(str(tiny_model_dir))
    with kernels_for(model):
        with kernels_for(model):
            pass
        assert qwen2.swiglu is not activations.swiglu
    assert mlx_lms_in_place()


def test_not_on_a_gpu(tiny_model_dir, monkeypatch):
    model, _ = mlx_lm.load(str(tiny_model_dir))
    monkeypatch.setattr(cpu_kernels.mx, "default_device", lambda: mx.gpu)
    with kernels_for(model):
        assert mlx_lms_in_place()


def test_families_without_mlx_lms_functions_are_left_alone():
    model = tiny_family_model("gemma2")  # gelu MLP, its own attention: neither name
    module = cpu_kernels.family_module(model)
    attention_before = getattr(module, "scaled_dot_product_attention", None)
    with kernels_for(model):
        assert getattr(module, "scaled_dot_product_attention", None) is attention_before
    assert not hasattr(module, "swiglu")
