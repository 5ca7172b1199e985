"""The rollouts' CPU SwiGLU: equal to mlx-lm's within 1e-5, used only inside rollouts on
the CPU, and mlx-lm's own put back afterwards."""

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx_lm.models import activations, qwen2

from mlx_tokenrl import cpu_kernels
from mlx_tokenrl.cpu_kernels import exp2, fast_swiglu, swiglu
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


def counting(monkeypatch):
    calls = []

    def counted(gate, x):
        calls.append(gate.shape)
        return swiglu(gate, x)

    monkeypatch.setattr(cpu_kernels, "swiglu", counted)
    return calls


def test_rollouts_use_it_and_put_mlx_lms_back(tiny_model_dir, monkeypatch):
    model, tok = mlx_lm.load(str(tiny_model_dir))
    calls = counting(monkeypatch)
    generate_tokens(model, [[1, 2, 3]], 2, SamplingParams(0.0, 1.0, 3), set(tok.eos_token_ids),
                    seeds=[0])
    assert calls  # the family's MLP called ours during the rollout
    assert qwen2.swiglu is activations.swiglu
    with pytest.raises(RuntimeError), fast_swiglu(model):
        assert qwen2.swiglu is not activations.swiglu
        raise RuntimeError("a failing rollout")
    assert qwen2.swiglu is activations.swiglu


def test_not_on_a_gpu(tiny_model_dir, monkeypatch):
    model, _ = mlx_lm.load(str(tiny_model_dir))
    monkeypatch.setattr(cpu_kernels.mx, "default_device", lambda: mx.gpu)
    with fast_swiglu(model):
        assert qwen2.swiglu is activations.swiglu


def test_families_without_mlx_lms_swiglu_are_left_alone():
    model = tiny_family_model("gemma2")  # gelu MLP: no swiglu in its module
    with fast_swiglu(model):
        pass
    assert not hasattr(cpu_kernels.family_module(model), "swiglu")
