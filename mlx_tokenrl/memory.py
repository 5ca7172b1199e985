"""`--max-memory`: the loss's microbatch rows (and gradient checkpointing) chosen so that
loss+grad stays under a budget, from its peak memory measured on small probes; and the
process's peak memory, as a run reports it.

A probe is a loss+grad call on a made-up microbatch of the worst kind a step can hold at
given lengths: every row its own context (nothing shared) and every completion position
selected. Its peak (`mx.get_peak_memory`: weights included) bounds any real microbatch with
as many rows, no longer contexts and no longer crops (the probe's one pass of contexts and
one of rows is the widest way to run them). A probe's memory is a line in its rows: each
row adds its own activations, attention and selected logits. The start-up check probes one
row of the longest a run can hold, and the line through what was held and that row (it
errs high: it counts a call's fixed costs as the row's) plans every step: no step probes.
A step takes the most rows that line puts under the budget, a power of two (the loss pads
its selections to a power of two, and rows x a row's padded selections is then exactly what
they pad to), and never more rows than it has. Without that plan (callers other than
train), a step's lengths are probed at one and two rows (`fitting_plan`).
"""

import os
import sys
from dataclasses import dataclass

import mlx.core as mx

from .config import ConfigError
from .loss import ForwardRow, Pick, checkpoint_blocks, make_loss_and_grad, pack_microbatch
from .rollout import encode_prompts

DEFAULT_SHARE = 0.75  # of the machine's memory (Metal: its recommended working set)
LENGTH_BUCKET = 64  # probed lengths are rounded up to this, so few lengths are probed
MAX_ROWS = 32  # past this, bigger microbatches buy little and compile more shapes
HEADROOM = 1.5  # a step needing a new plan has it probed at this much longer rows


# ---- what the process took ------------------------------------------------------------
# MLX has one peak counter; a window of the run (a rollout, a loss, a probe) is measured by
# resetting it, so each reset first keeps what it held here: the process's peak so far.
_peak_before_last_reset = 0


def start_run_peak() -> None:
    """Count from here as the process's start: `compare` trains its arms one after another in
    one process, and each arm's peak is its own. (The OS's resident peak cannot be reset: it
    stays the whole process's.)"""
    global _peak_before_last_reset
    _peak_before_last_reset = 0
    mx.reset_peak_memory()


def reset_peak() -> None:
    """Start a new window of MLX's peak counter, the last one's kept in `mlx_peak_bytes`."""
    global _peak_before_last_reset
    _peak_before_last_reset = max(_peak_before_last_reset, mx.get_peak_memory())
    mx.reset_peak_memory()


def mlx_peak_bytes() -> int:
    """The most bytes MLX's arrays held at once since the process started (every window:
    loading, start-up checks, probes, rollouts, losses, evaluations). MLX's own count: on
    Metal it includes GPU buffers; it leaves out the interpreter, libraries and MLX's cache
    of freed buffers."""
    return max(_peak_before_last_reset, mx.get_peak_memory())


def resident_peak_bytes(platform: str = sys.platform) -> int | None:
    """The process's largest resident set so far, as the OS counts it (getrusage's
    ru_maxrss: kilobytes on Linux, bytes on macOS); everything it held in RAM, MLX's cached
    buffers and the interpreter included (on Apple silicon, Metal's buffers may not be
    counted). None where there is no getrusage (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    return maxrss_bytes(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, platform)


def maxrss_bytes(maxrss: int, platform: str = sys.platform) -> int:
    """getrusage's ru_maxrss in bytes: it counts kilobytes on Linux, bytes on macOS."""
    return maxrss if platform == "darwin" else maxrss * 1024


# ---- the budget and the plan ------------------------------------------------------------

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
    """Peak bytes of one loss+grad call on a probe microbatch (kept in the process's peak:
    `reset_peak`)."""
    batch = probe_batch(shape, rows)
    mx.eval(batch.contexts, batch.inputs, batch.picks)
    mx.synchronize()
    reset_peak()
    mx.eval(*loss_and_grad(batch))
    peak = mx.get_peak_memory()
    reset_peak()  # a step's logged loss peak is its own microbatches'
    return peak


@dataclass(frozen=True)
class Plan:
    """The loss's peak at a probed shape as a line in the rows: fixed + per_row x rows, with
    `held` bytes held when it was measured."""
    fixed: int
    per_row: int
    held: int

    def rows(self, budget: int, held: int) -> int:
        """The most rows (a power of two, at most MAX_ROWS) whose peak, with `held` bytes held
        now instead, stays under `budget`; 0 when not even one row does."""
        room = budget - held + self.held - self.fixed
        fits = min(MAX_ROWS, room // max(self.per_row, 1)) if room >= self.per_row else 0
        return 1 << (int(fits).bit_length() - 1) if fits else 0


def fitting_plan(loss_and_grad, shape: RowShape, budget: int) -> Plan:
    """A line through the probe peak of two rows at `shape`, rising per row by the larger of
    what the second row added to the first and half of what two rows added to what was held.
    The second errs high (it counts a call's fixed costs as the rows'), and bounds the first
    where the two probes' peaks are measured a few percent off (MLX frees buffers as its
    stream runs, so a peak varies a little from run to run).

    Two rows are probed only if they fit the budget even when a row costs all that one row
    added to what was held; otherwise that line is the plan (it allows one row, if that
    fits)."""
    held = mx.get_active_memory()
    one = probe_peak(loss_and_grad, shape, 1)
    if 2 * one - held > budget:
        return Plan(fixed=held, per_row=one - held, held=held)
    two = probe_peak(loss_and_grad, shape, 2)
    per_row = max(two - one, (two - held) // 2, 1)
    return Plan(fixed=two - 2 * per_row, per_row=per_row, held=held)


def step_rows(triples) -> int:
    """Forward rows the step's loss runs at most (make_microbatches may merge some)."""
    return len({row for row, _, _ in triples})


def plans_of(model) -> dict:
    """The loss's plans for `model` by probed shape, kept on it (outside its parameters):
    they hold for any loss function of it, since check_run_fits settles its gradient
    checkpointing before the first."""
    return vars(model).setdefault("memory_plans", {})


def planned_rows(model, loss_and_grad, loss_rows, triples, budget: int,
                 max_new_tokens: int) -> int:
    """Microbatch rows for a step: the most rows any of `model`'s plans whose shape covers
    the step's puts under the budget with what is held now, and never more than the step
    has. The start-up plan (check_run_fits) covers every step of a run, so a step probes
    nothing; steps longer than any plan (a caller without that check) are probed."""
    plans = plans_of(model)
    shape = step_shape(loss_rows, triples)
    held = mx.get_active_memory()
    fits = [plan.rows(budget, held) for probed, plan in plans.items() if probed.covers(shape)]
    if not any(fits):
        # Probed with headroom, since rows grow over the first steps and each probe is a
        # loss+grad of its own; a crop never past --max-new-tokens. When not even one row
        # fits with the headroom, the step's own lengths are probed instead (that plan
        # would be refused at every later step).
        roomy = RowShape(_bucket(int(shape.context * HEADROOM)),
                         min(_bucket(int(shape.crop * HEADROOM)), _bucket(max_new_tokens)))
        own = RowShape(_bucket(shape.context), _bucket(shape.crop))
        for probed in dict.fromkeys((roomy, own)):  # once when the headroom adds no bucket
            plans[probed] = fitting_plan(loss_and_grad, probed, budget)
            fits = [plans[probed].rows(budget, held)]
            if fits[0]:
                break
    return max(1, min(max(fits), step_rows(triples)))


def check_run_fits(model, tokenizer, task, cfg) -> int:
    """Start-up, with the loss planned from --max-memory: one row of the longest a step can
    hold (the longest training prompt, or with T-SPMO's replay that prompt and a completion
    prefix; --max-new-tokens of completion) must fit the budget, without gradient
    checkpointing if it can, else with it (turned on here). Otherwise one line (ConfigError)
    before any training. Its probe is kept as the model's first plan, a line through what
    was held and that one row (erring high, it covers every step without a probe of its
    own). Returns the budget in bytes."""
    budget = budget_bytes(cfg.max_memory)
    prompts = encode_prompts(tokenizer, [task.prompt(tokenizer, e.question) for e in task.train])
    replayed = cfg.max_new_tokens if cfg.algo == "t-spmo" and cfg.tspmo_replay > 0 else 0
    shape = RowShape(_bucket(max(map(len, prompts)) + replayed), _bucket(cfg.max_new_tokens))
    held = mx.get_active_memory()
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
    plans_of(model)[shape] = Plan(fixed=held, per_row=need - held, held=held)
    return budget
