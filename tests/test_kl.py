"""The KL reference is the base model: LoRA switched off inside `lora_disabled`.

The reference here is a second, plain copy of the same saved model, loaded separately,
and its log-probs come from full logits (log_softmax of model(x)), never from the
selective code path under test."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_tokenrl.loss import (ForwardRow, Pick, attach_ref_logprobs, lora_disabled,
                              pack_microbatch)
from mlx_tokenrl.models import load_model

INPUTS = [[5, 9, 40, 41, 42, 7, 100, 101, 3, 17, 18, 19, 0, 0, 0, 0],
          [6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30, 32, 34, 36]]
# (row, input position, target token) of each selected token.
SELECTED = [(0, 0, 9), (0, 4, 7), (0, 11, 250), (1, 2, 12), (1, 9, 3), (1, 15, 1)]


@pytest.fixture(scope="module")
def plain_model(tiny_model_dir):
    """The base model alone, loaded from the same files as `lora_model`."""
    model, _ = load_model(str(tiny_model_dir))
    return model


def hand_batch():
    """Each row read after its first token (its context); the state at input position c
    predicts completion position c."""
    rows = [ForwardRow(tokens[:1], tokens[1:], [Pick(c, t, 1.0, 1.0)
                                                for r, c, t in SELECTED if r == row])
            for row, tokens in enumerate(INPUTS)]
    return pack_microbatch(rows)


def full_logit_logprobs(model) -> np.ndarray:
    """log pi(target | prefix) of each selected token, read from the full log-softmax."""
    logp = nn.log_softmax(model(mx.array(INPUTS)).astype(mx.float32), axis=-1)
    return np.array([logp[r, c, t].item() for r, c, t in SELECTED])


def test_ref_logprobs_are_the_base_models_not_the_policys(lora_model, plain_model):
    base = full_logit_logprobs(plain_model)
    policy = full_logit_logprobs(lora_model)
    # The adapter really moves the policy, so a reference equal to it would show.
    assert np.abs(policy - base).max() > 1e-2
    batch = hand_batch()
    attach_ref_logprobs(lora_model, [batch])
    np.testing.assert_allclose(np.array(batch.ref_logprobs)[:len(SELECTED)], base, atol=1e-5)
    with lora_disabled(lora_model):
        np.testing.assert_allclose(full_logit_logprobs(lora_model), base, atol=1e-5)
    # And the reference left the policy as it was.
    np.testing.assert_array_equal(full_logit_logprobs(lora_model), policy)


def test_lora_is_back_after_the_context_even_on_an_exception(lora_model):
    x = mx.array(INPUTS)
    policy = np.array(lora_model(x))
    with lora_disabled(lora_model):
        assert not np.allclose(np.array(lora_model(x)), policy, atol=1e-3)
    np.testing.assert_array_equal(np.array(lora_model(x)), policy)
    with pytest.raises(RuntimeError, match="inside"):
        with lora_disabled(lora_model):
            raise RuntimeError("raised inside the reference pass")
    np.testing.assert_array_equal(np.array(lora_model(x)), policy)
