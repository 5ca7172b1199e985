"""The rounding a model's own forward shows on this machine, in its dtype: the yardstick of
the start-up checks (`loss.check_selected_logprobs`, `rollout.check_batched_rollouts`).

Each check runs the model the way training will (left-padded contexts through a batched
cache, the output head on picked hidden states) and compares log-probs with the model's
plain forward. Only rounding separates the two for a supported model, but how much rounding
depends on the CPU (BLAS kernels, thread count), the GPU and the dtype: 1e-6 nats on one
x86 CPU and 3e-4 on another for the same float32 SmolLM2, far more in bfloat16. A fixed
tolerance refuses valid models on machines it was not tuned on.

So the yardstick is measured, not assumed: the same tokens through the model's own forward
in layouts that are equal in exact arithmetic and use only paths mlx-lm itself relies on
(one row alone; in two chunks through the model's own cache, as `mlx_lm.generate` runs it;
batched with another row of the same length; as the prefix of a longer row; through a
batched cache without padding, whose explicit mask takes the checked paths' kernel). Their
largest log-prob difference is this machine's noise for this model and dtype, floored at one unit in
the last place of the largest logit (layouts can round identically, and no difference
finer than that is meaningful). A defect (a head the loss does not run, a missing
soft-cap or logit scale, attention that reads padding) moves log-probs by tenths of a nat
or more, orders of magnitude above that noise:

- difference <= PASS_RATIO x noise: rounding; the check passes;
- difference > REFUSE_RATIO x noise: a defect; the model is refused in one line;
- in between, or when the noise itself cannot be measured (non-finite logits): the check
  cannot tell; it warns in one line and training goes on.

The checks run in float32 whatever dtype the model trains in (`in_float32`): they test
structure (head, mask, cache), not precision, and in half precision one unit in the last
place of a logit of 30 is 0.125 nats (bfloat16), so the noise would hide defects of several
nats. Half-precision weights convert to float32 and back exactly; the cost is a float32
copy of the weights for the checks' few short forwards.
"""

import contextlib
import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map
from mlx_lm.models.cache import BatchKVCache, make_prompt_cache

from .messages import warn_once
from .models import ModelLoadError

PASS_RATIO = 10
REFUSE_RATIO = 100


@contextlib.contextmanager
def in_float32(model):
    """The model's floating-point weights in float32 inside the block, each back in its own
    dtype after it (quantized weights are left as they are)."""
    dtypes = tree_map(lambda weight: weight.dtype, model.parameters())
    model.set_dtype(mx.float32)
    try:
        yield
    finally:
        model.update(tree_map(lambda weight, dtype: weight.astype(dtype), model.parameters(),
                              dtypes))
        mx.eval(model.parameters())


def logprobs(logits: mx.array) -> mx.array:
    return nn.log_softmax(logits.astype(mx.float32), axis=-1)


def _layouts(model, row: list) -> list:
    """Log-probs of `row`'s positions from the model's own forward in several layouts that
    exact arithmetic would make equal; the first is the row alone."""
    alone = model(mx.array(row)[None])[0]
    cut = max(1, len(row) // 2)
    cache = make_prompt_cache(model)
    chunked = mx.concatenate([model(mx.array(row[:cut])[None], cache=cache)[0],
                              model(mx.array(row[cut:])[None], cache=cache)[0]])
    batched = model(mx.array([row, row[::-1]]))[0]
    prefix = model(mx.array(row + row[:3])[None])[0, :len(row)]
    # Through a batched cache with no padding: an explicit mask array, the attention kernel
    # the checked paths take (a GPU may pick another kernel for it than for a causal one).
    masked = model(mx.array(row)[None], cache=[BatchKVCache([0]) for _ in cache])[0]
    return [alone, chunked, batched, prefix, masked]


def own_rounding(model, rows) -> float:
    """The largest log-prob difference between layouts of the model's own forward of each
    row, at least one unit in the last place of the largest logit (NaN if not finite)."""
    noise, ulp = 0.0, 0.0
    for row in rows:
        alone, *others = _layouts(model, list(row))
        reference = logprobs(alone)
        for other in others:
            noise = max(noise, mx.abs(logprobs(other) - reference).max().item())
        ulp = max(ulp, mx.finfo(alone.dtype).eps * mx.abs(alone).max().item())
    return max(noise, ulp) if math.isfinite(noise) and math.isfinite(ulp) else math.nan


@dataclass
class Verdict:
    difference: float  # largest |log-prob difference| the check found
    noise: float  # `own_rounding` of the same model on this machine
    outcome: str  # "rounding", "defect" or "unsure"

    def describe(self) -> str:
        if not math.isfinite(self.noise):
            return f"by {self.difference:.3g} (its own forward gives non-finite logits)"
        return (f"by {self.difference:.3g}, {self.difference / self.noise:.3g}x the rounding of "
                f"its own forward here ({self.noise:.2g})")


def judge(difference: float, noise: float) -> Verdict:
    if not math.isfinite(noise):
        outcome = "unsure"
    elif not difference <= REFUSE_RATIO * noise:  # a NaN difference is a defect
        outcome = "defect"
    elif difference <= PASS_RATIO * noise:
        outcome = "rounding"
    else:
        outcome = "unsure"
    return Verdict(difference, noise, outcome)


def settle(verdict: Verdict, what: str, unsupported: str, suspect: str):
    """Refuse a defect in one line (`what`; `unsupported`), warn once where the check cannot
    tell (`suspect` being what it cannot rule out), say nothing about rounding."""
    if verdict.outcome == "defect":
        raise ModelLoadError(f"{what}; {unsupported}")
    if verdict.outcome == "unsure":
        warn_once(f"{what}: too close to tell rounding from {suspect}; training goes on")
