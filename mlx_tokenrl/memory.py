"""`--max-memory`: the loss's microbatch rows (and gradient checkpointing) chosen from its
measured peak memory, so that loss+grad stays under a budget.

A probe is a loss+grad call on a made-up microbatch of the worst kind a step can hold at
given lengths: every row its own context (nothing shared) and every completion position
selected. Its peak (`mx.get_peak_memory`, the figure metrics.jsonl logs as
loss_peak_memory_gb: weights included) bounds any real microbatch with as many rows, no
longer contexts and no longer crops (the probe's one pass of contexts and one of rows is
the widest way to run them). Rows are a power of two, picked as the most whose probe fits.
"""

import os
from dataclasses import dataclass

import mlx.core as mx

from .config import ConfigError
from .loss import ForwardRow, Pick, checkpoint_blocks, make_loss_and_grad, pack_microbatch
from .rollout import encode_prompts

DEFAULT_SHARE = 0.75  # of the machine's memory (Metal: its recommended working set)
LENGTH_BUCKET = 64  # probed lengths are rounded up to this, so few lengths are probed
MAX_ROWS = 32  # past this, bigger microbatches buy little and compile more shapes
HEADROOM = 1.5  # a step needing a new plan has it probed at this much longer rows


def machine_memory_bytes() -> int:
    """What the loss can use at most: Metal's recommended working set, else physical RAM."""
    info = mx.device_info()
    if "max_recommended_working_set_size" in info:
        return int(info["max_recommended_working_set_size"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def budget_bytes(max_memory_gb: float | None) -> int:
    if max_memory_gb is None:
        return int(DEFAULT_SHARE * machine_memory_bytes())
    return int(max_memory_gb * 1e9)


@dataclass(frozen=True)
class RowShape:
    """The longest context and the longest crop (completion tokens run) of a step's rows."""
    context: int
    crop: int

    def covers(self, other: "RowShape") -> bool:
        return self.context >= other.context and self.crop >= other.crop


def _bucket(n: int) -> int:
    return max(LENGTH_BUCKET, -(-n // LENGTH_BUCKET) * LENGTH_BUCKET)


def step_shape(loss_rows, triples) -> RowShape:
    """The step's longest context and crop."""
    crop = {}
    for row, pos, _ in triples:
        crop[row] = max(crop.get(row, 0), pos)
    return RowShape(max(len(loss_rows[row].context) for row in crop), max(crop.values()))


def probe_batch(shape: RowShape, rows: int):
    """`rows` rows of `shape`, each with its own context, every position selected."""
    completion = [3] * (shape.crop + 1)
    picks = [Pick(pos, 3, 1.0, 1.0) for pos in range(shape.crop + 1)]
    return pack_microbatch([ForwardRow([1 + row] + [2] * (shape.context - 1), completion, picks)
                            for row in range(rows)])


def probe_peak(loss_and_grad, shape: RowShape, rows: int) -> int:
    """Peak bytes of one loss+grad call on a probe microbatch."""
    batch = probe_batch(shape, rows)
    mx.eval(batch.contexts, batch.inputs, batch.picks)
    mx.synchronize()
    mx.reset_peak_memory()
    mx.eval(*loss_and_grad(batch))
    peak = mx.get_peak_memory()
    mx.reset_peak_memory()  # a step's logged loss peak is its own microbatches'
    return peak


@dataclass
class Plan:
    """Microbatch rows for rows no longer than a probed shape, and what their probe took."""
    rows: int
    peak: int  # the probe's peak bytes (weights and everything else then held included)
    held: int  # bytes held before the probe: what a later step holds beyond it adds to the peak


def fitting_plan(loss_and_grad, shape: RowShape, budget: int) -> Plan:
    """The most rows (a power of two, at most MAX_ROWS) whose probe at `shape` peaks under
    `budget` bytes; one row even when that does not fit.

    The first guess divides what is left after the memory held by one row's cost counted
    with the fixed costs of a call (so it errs low); each guess is measured, and halved
    while it does not fit."""
    held = mx.get_active_memory()
    one = probe_peak(loss_and_grad, shape, 1)
    guess = min(MAX_ROWS, max(1, (budget - held) // max(one - held, 1)))
    rows, peak = 1 << (int(guess).bit_length() - 1), one
    while rows > 1:
        peak = probe_peak(loss_and_grad, shape, rows)
        if peak <= budget:
            break
        rows //= 2
        peak = one
    return Plan(rows, peak, held)


def planned_rows(loss_and_grad, loss_rows, triples, budget: int, max_new_tokens: int) -> int:
    """Microbatch rows for a step, from the plans of this `loss_and_grad` (kept on it, as
    `memory_plans`, since its compiled graphs are what was measured): the most rows of any
    plan whose shape covers the step's and whose peak, with what is held now, still fits;
    probed anew when none does (rows longer than any probed)."""
    plans = loss_and_grad.__dict__.setdefault("memory_plans", {})
    shape = step_shape(loss_rows, triples)
    held = mx.get_active_memory()
    fits = [plan.rows for probed, plan in plans.items()
            if probed.covers(shape) and plan.peak - plan.held + held <= budget]
    if not fits:
        # Probed with headroom, since each probe is a loss+grad of its own (~100 s on the
        # 0.5B, 3-5x a T-SPMO step's loss) and rows grow over the first steps; a crop never
        # past --max-new-tokens. When not even one row fits with the headroom, the step's
        # own lengths are probed instead (that plan would be refused at every later step).
        roomy = RowShape(_bucket(int(shape.context * HEADROOM)),
                         min(_bucket(int(shape.crop * HEADROOM)), _bucket(max_new_tokens)))
        own = RowShape(_bucket(shape.context), _bucket(shape.crop))
        for probed in dict.fromkeys((roomy, own)):  # once when the headroom adds no bucket
            plans[probed] = fitting_plan(loss_and_grad, probed, budget)
            if plans[probed].peak <= budget:
                break
        fits = [plans[probed].rows]
    return max(fits)


def check_run_fits(model, tokenizer, task, cfg) -> int:
    """Start-up, with the loss planned from --max-memory: one row of the longest a step can
    hold (the longest training prompt, --max-new-tokens of completion) must fit the budget,
    without gradient checkpointing if it can, else with it (turned on here). Otherwise one
    line (ConfigError) before any training. Returns the budget in bytes."""
    budget = budget_bytes(cfg.max_memory)
    prompts = encode_prompts(tokenizer, [task.prompt(tokenizer, e.question) for e in task.train])
    shape = RowShape(_bucket(max(map(len, prompts))), _bucket(cfg.max_new_tokens))
    need = probe_peak(make_loss_and_grad(model, cfg.beta, cfg.compile), shape, 1)
    if need > budget and not cfg.grad_checkpoint:
        checkpoint_blocks(model)
        # A new loss function: compiled graphs keep the forward they were traced with.
        need = probe_peak(make_loss_and_grad(model, cfg.beta, cfg.compile), shape, 1)
    if need > budget:
        raise ConfigError(
            f"--max-memory {budget / 1e9:.3g} GB is too small: the loss needs {need / 1e9:.3g} "
            f"GB for one row of {shape.context} prompt and {shape.crop} completion tokens, "
            f"even with gradient checkpointing")
    return budget
