"""The start-up checks tell a real defect from rounding on any machine and dtype.

They judge against the rounding the model's own forward shows (`rounding.py`), so these
tests vary the rounding itself: dtypes, a simulated machine that rounds 100x worse, the real
SmolLM2 at 1 and 2 BLAS threads; and plant each defect the checks exist for."""

import os
import subprocess
import sys
import textwrap

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.cache import BatchKVCache

from mlx_tokenrl import loss as loss_module
from mlx_tokenrl import messages, rounding
from mlx_tokenrl.loss import check_selected_logprobs
from mlx_tokenrl.models import ModelLoadError
from mlx_tokenrl.rollout import check_batched_rollouts
from mlx_tokenrl.toy import tiny_family_model

CHECKS = [check_selected_logprobs, check_batched_rollouts]
FAMILIES = {"llama": {}, "qwen2": {}, "cohere": {"logit_scale": 0.25},
            "gemma2": {"final_logit_softcapping": 2.0, "num_key_value_heads": 4}}


DTYPES = pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16], ids=str)


@pytest.fixture(autouse=True)
def fresh_warnings():
    messages.warn_once.cache_clear()
    yield
    messages.warn_once.cache_clear()


def tiny(model_type, dtype=mx.float32):
    model = tiny_family_model(model_type, **FAMILIES[model_type])
    model.set_dtype(dtype)
    return model


@DTYPES
@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_supported_models_pass_silently_in_every_dtype(check, model_type, dtype, capsys):
    """... and leave the weights as they were: each in its own dtype, bit for bit."""
    model = tiny(model_type, dtype)
    before = dict(tree_flatten(model.parameters()))
    check(model)
    assert "warning" not in capsys.readouterr().err
    after = dict(tree_flatten(model.parameters()))
    assert all(after[k].dtype == w.dtype and mx.array_equal(after[k], w).item()
               for k, w in before.items())


def rounds_worse(model, relative: float):
    """Every block's output moved by fresh random noise of `relative` size at each call, as a
    machine whose kernels round far worse (or differently per shape) would."""
    block = type(model.layers[0])
    forward = block.__call__

    def noisy(layer, x, *args, **kwargs):
        out = forward(layer, x, *args, **kwargs)
        return out + relative * mx.abs(out).mean() * mx.random.normal(out.shape, dtype=out.dtype)

    return block, "__call__", noisy


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_a_machine_that_rounds_far_worse_is_not_refused(check, monkeypatch, capsys):
    """Rounding of 1e-4 relative per block (~1000 float32 ulps): a fixed tolerance in ulps of
    the logits refuses such a machine; the measured noise grows with it."""
    model = tiny("llama")
    monkeypatch.setattr(*rounds_worse(model, 1e-4))
    mx.random.seed(0)
    check(model)
    assert "warning" not in capsys.readouterr().err


def scaled_head(factor):
    apply_head = loss_module.apply_head
    return lambda head, key, body, hidden: factor * apply_head(head, key, body, hidden)


def projection_only(head, key, body, hidden):  # no soft-cap, no logit scale
    return body.embed_tokens.as_linear(hidden)


@DTYPES
@pytest.mark.parametrize("model_type, planted", [
    ("gemma2", projection_only),  # the final soft-cap dropped
    ("cohere", projection_only),  # the logit scale dropped
    ("llama", scaled_head(1.1)),  # a head that is not the model's own
], ids=["soft-cap dropped", "logit scale dropped", "head scaled by 1.1"])
def test_a_head_the_loss_does_not_run_as_the_model_does_is_refused(model_type, planted, dtype,
                                                                   monkeypatch):
    model = tiny(model_type, dtype)
    check_selected_logprobs(model)
    monkeypatch.setattr(loss_module, "apply_head", planted)
    with pytest.raises(ModelLoadError) as refused:
        check_selected_logprobs(model)
    message = str(refused.value)
    assert f"model type {model_type!r}: the loss's log-probs differ" in message
    assert "not supported" in message and "\n" not in message


@DTYPES
@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_attention_that_ignores_the_padding_mask_is_refused(check, dtype, monkeypatch):
    model = tiny("qwen2", dtype)
    check(model)
    monkeypatch.setattr(BatchKVCache, "make_mask", lambda self, *a, **k: "causal")
    with pytest.raises(ModelLoadError, match="model type 'qwen2': .* not supported"):
        check(model)


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_a_difference_the_check_cannot_place_warns_once_and_goes_on(check, monkeypatch, capsys):
    """The planted defects against a machine whose rounding were 1/30 of what they move."""
    model = tiny("llama")
    monkeypatch.setattr(loss_module, "apply_head", scaled_head(1.1))
    monkeypatch.setattr(BatchKVCache, "make_mask", lambda self, *a, **k: "causal")
    monkeypatch.setattr(sys.modules[check.__module__], "judge",
                        lambda difference, noise: rounding.judge(difference, difference / 30))
    check(model)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: model type 'llama'")
    assert "30x the rounding of its own forward" in err and "training goes on" in err


@pytest.mark.parametrize("difference, noise, outcome", [
    (1e-4, 1e-5, "rounding"), (5e-5, 1e-6, "unsure"), (2e-4, 1e-6, "defect"),
    (0.0, 0.0, "rounding"), (1e-9, 0.0, "defect"),
    (float("nan"), 1e-5, "defect"), (1.0, float("nan"), "unsure")])
def test_judge_by_hand(difference, noise, outcome):
    assert rounding.judge(difference, noise).outcome == outcome


def test_noise_is_at_least_one_ulp_of_the_largest_logit():
    """Layouts that round identically (common in half precision) still leave the logits'
    own resolution: a difference of one ulp is rounding, whatever the layouts showed."""
    model = tiny("llama", mx.bfloat16)
    row = list(range(1, 9))
    largest = mx.abs(model(mx.array(row)[None])).max().item()
    assert rounding.own_rounding(model, [row]) >= mx.finfo(mx.bfloat16).eps * largest


def test_noise_sees_each_layout(monkeypatch):
    """Each layout's difference counts: one layout made to differ by 0.5 sets the noise."""
    model = tiny("llama")
    layouts = rounding._layouts
    for moved in range(1, 5):
        def one_moved(model, row, moved=moved):
            out = layouts(model, row)
            out[moved] = out[moved] + 0.5 * (mx.arange(out[moved].shape[-1]) == 0)
            return out

        monkeypatch.setattr(rounding, "_layouts", one_moved)
        assert 0.4 < rounding.own_rounding(model, [list(range(1, 9))]) < 0.6


REAL_MODEL = os.environ.get("TOKENRL_TEST_SMOLLM2")


@pytest.mark.skipif(not REAL_MODEL, reason="TOKENRL_TEST_SMOLLM2 (a converted SmolLM2-135M "
                                           "directory) not set; CI sets it")
@pytest.mark.parametrize("threads", ["1", "2"])
def test_real_smollm2_passes_silently_at_1_and_2_blas_threads(threads):
    script = textwrap.dedent(f"""
        import mlx_tokenrl
        from mlx_tokenrl.models import load_model
        from mlx_tokenrl.loss import check_selected_logprobs
        from mlx_tokenrl.rollout import check_batched_rollouts
        model, _ = load_model({REAL_MODEL!r})
        check_batched_rollouts(model)
        check_selected_logprobs(model)
    """)
    env = {**os.environ, "OPENBLAS_NUM_THREADS": threads}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "warning" not in done.stderr
