"""--time-budget: train for a length of time rather than a number of steps.

A run with a budget stops after the first step that brings its training time (the sum of
its steps' `step_s`; evaluations and start-up not counted) to the budget, or at --steps,
whichever comes first. Its learning-rate schedule (warmup, then cosine to lr/10) needs the
number of steps up front: it is planned once warmup is over, as the steps the budget is
estimated to buy at the median step time so far. Up to then the schedule's warmup does not
depend on the number of steps, so the plan changes no step already taken. (With no warmup
the plan follows the first step, whose rate the cosine's length hardly touches.) The first
step carries start-up costs (compilation, caches); a warmup of 3 or more steps gives a median
they do not sway.

The plan is a function of the run's step times, which metrics.jsonl keeps: a resumed run
computes the same one again, and nothing else needs saving.
"""

import math
import statistics

from .config import TrainConfig


def plan_point(cfg: TrainConfig) -> int:
    """The number of finished steps after which the schedule is planned."""
    return max(cfg.warmup_steps, 1)


def planned_steps(cfg: TrainConfig, step_times: list) -> int:
    """Steps the budget buys: those taken (`step_times`, seconds each) and, at their median,
    the ones that first reach the budget; never more than --steps, never fewer than taken."""
    if not step_times:  # a run whose metrics.jsonl was removed: plan for --steps
        return cfg.steps
    left = cfg.time_budget - sum(step_times)
    more = math.ceil(left / statistics.median(step_times)) if left > 0 else 0
    return min(len(step_times) + more, cfg.steps)


def spent(cfg: TrainConfig, step_times: list) -> bool:
    """Whether the run's training time has reached its budget (never, without one)."""
    return cfg.time_budget is not None and sum(step_times) >= cfg.time_budget
