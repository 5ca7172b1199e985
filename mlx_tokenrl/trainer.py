"""The RL loop: prompts -> rollouts -> selected tokens with advantages -> loss -> update.

One policy update per rollout batch, LoRA on the policy, no critic. Data-parallel over
`mx.distributed` (`mlx.launch -n 2 --backend ring tokenrl-mlx train ...`): each rank takes a
disjoint shard of every step's prompts (whole groups), runs its rollouts, selection and
loss+grad; the loss is normalised by global counts, so the sum of the ranks' gradients is
the one-process gradient on the union of their rollouts, and every rank applies that same
update. Everything random is derived from (seed, step, prompt position), never from the
rank, so which rank draws a prompt changes nothing about what is sampled or selected for
it, and a run can be resumed with a different number of ranks. Rank 0 alone writes the run
directory. Collectives and failure handling: `distributed.py`.
"""

import json
import math
import time
from dataclasses import asdict, astuple, dataclass, field, fields, replace
from pathlib import Path
from typing import NamedTuple

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from . import budget, step_log
from .checkpoint import (atomic_write_bytes, latest_checkpoint, load_checkpoint,
                         save_checkpoint)
from .distributed import World, as_world, init_world, start_timeout
from .evaluate import evaluate, summary_from_counts
from .loss import (ClipRange, LossRow, attach_ref_logprobs, check_selected_logprobs,
                   checkpoint_blocks, make_loss_and_grad, make_microbatches, normalisation_weights)
from .config import ConfigError, TrainConfig, config_from_dict
from .models import (add_lora, check_adapter_files, init_from_adapter, load_model, lora_config,
                     save_adapter_config)
from .memory import (budget_bytes, check_run_fits, mlx_peak_bytes, planned_rows, reset_peak,
                     resident_peak_bytes, start_run_peak)
from .messages import warn, warn_once
from .rewards import final_answer, weighted, with_format_bonus
from .rollout import SamplingParams, check_batched_rollouts, encode_prompts, rollout
from .samples import SampleLog, SelectedGroup
from .seeds import DATA_ORDER, SAMPLING, SELECTION, derived_rng, derived_seed
from .algorithms import ALGORITHMS
from .algorithms.base import GroupRecord, Selection, has_signal
from .sync import broadcast_training_state, check_configs_agree, check_inputs_agree, ensure_ranks_agree
from .tasks import one_file_for_both_splits, task_from_config
from .tracking import Tracker, start_tracker

# ---- what each step draws -------------------------------------------------------------

def step_prompt_indices(num_examples: int, step: int, batch: int, seed: int) -> list:
    """The B example indices of a step: consecutive slices of per-epoch permutations."""
    out = []
    for pos in range(step * batch, (step + 1) * batch):
        epoch, offset = divmod(pos, num_examples)
        order = derived_rng(seed, DATA_ORDER, epoch).permutation(num_examples)
        out.append(int(order[offset]))
    return out


def shard(items, rank: int, world: int):
    """Rank `rank`'s share: every world-th item (sizes differ by at most one)."""
    return items[rank::world]


# ---- selection ------------------------------------------------------------------------

def group_rng(cfg: TrainConfig, step: int, position: int):
    """Selection randomness of one group: fixed by (seed, step, prompt position), not rank."""
    return derived_rng(cfg.seed, SELECTION, step, position)


def masked_truncated(cfg: TrainConfig, completion) -> bool:
    """--mask-truncated (DAPO's overlong filtering): a completion that hit --max-new-tokens
    before EOS with no final answer ('#### N' or a closed '\\boxed{}') adds nothing to the
    loss. One that wrote its answer and ran on is kept: its reward is a fair judgment."""
    return cfg.mask_truncated and completion.truncated and final_answer(completion.text) is None


def group_record(cfg: TrainConfig, context, completions) -> GroupRecord:
    recorded = completions[0].entropies is not None  # (rollout's token_stats: all or none)
    return GroupRecord(context, [c.tokens for c in completions], [c.reward for c in completions],
                       [c.logprobs for c in completions] if recorded else None,
                       [c.entropies for c in completions] if recorded else None,
                       [masked_truncated(cfg, c) for c in completions])


@dataclass
class LossInput:
    """What a step's loss reads: its rows and the tokens selected in them."""
    rows: list = field(default_factory=list)  # of loss.LossRow
    selection: Selection = field(default_factory=Selection)  # rows index `rows`


def add_groups(cfg, groups, contexts, rngs, into: LossInput, first_group: int = 0,
               selections=None):
    """Select within each group (with its own rng) and append its rows and tokens to `into`;
    loss rows remember their group (numbered from `first_group`) for a per-group norm.
    `selections`, if given, gets each group's Selection, rows counted within the group.
    Returns the groups with signal and the completions --mask-truncated kept out."""
    algorithm = ALGORITHMS[cfg.algo]
    signal = masked = 0
    for number, (context, group, rng) in enumerate(zip(contexts, groups, rngs), first_group):
        record = group_record(cfg, context, group)
        signal += has_signal(record.rewards)
        masked += sum(record.masked)
        chosen = algorithm.select(record, cfg, rng).without_rows(record.is_masked)
        if selections is not None:
            selections.append(chosen)
        used = sorted(set(chosen.rows))
        row_id = {row: len(into.rows) + i for i, row in enumerate(used)}
        into.rows += [LossRow(context, group[row].tokens, number) for row in used]
        into.selection.extend(chosen, row_id.__getitem__)
    return GroupsAdded(signal, masked)


@dataclass
class GroupsAdded:
    with_signal: int
    masked: int  # completions --mask-truncated kept out of the loss


# ---- one step -------------------------------------------------------------------------

def no_phase(name: str):
    """The default `on_phase`: a live display is told what a long step is doing (rollout,
    replay, loss, eval n/N)."""


@dataclass
class StepRollout:
    """A rank's rollouts of a step, selected: the loss's input and what to report."""
    loss: LossInput
    stats: dict


def rollout_and_select(model, tokenizer, task, cfg, step, examples, indices, positions=None,
                       world=None, on_phase=no_phase, on_selected=None) -> StepRollout:
    """Rollouts for this rank's prompts (+ the algorithm's replay), then selection. No
    gradients yet.

    `indices` are the example indices of this rank's prompts, `positions` their places in
    the step's batch (default: 0..len-1, one process)."""
    world = as_world(world)
    algorithm = ALGORITHMS[cfg.algo]
    positions = list(range(len(indices))) if positions is None else list(positions)
    params = SamplingParams(cfg.temperature, cfg.top_p, cfg.max_new_tokens)
    prompts = encode_prompts(tokenizer, [task.prompt(tokenizer, examples[i].question)
                                         for i in indices])
    answers = [examples[i].answer for i in indices]
    seeds = [derived_seed(cfg.seed, SAMPLING, step, i) for i in indices]
    completions = (rollout(model, tokenizer, prompts, cfg.group_size, params, seeds,
                           token_stats=algorithm.needs_token_stats) if indices else [])
    # Scored here, not in rollout, to keep each reward function's own score.
    reward = weighted(task.reward)
    scores = [reward.scores(c.text, answers[c.prompt_index]) for c in completions]
    for completion, score in zip(completions, scores):
        completion.reward = reward.total(score)
    G = cfg.group_size
    groups = [completions[g * G:(g + 1) * G] for g in range(len(indices))]
    loss = LossInput()
    selections = []
    added = add_groups(cfg, groups, prompts, [group_rng(cfg, step, p) for p in positions],
                       loss, selections=selections)
    if on_selected:  # samples.py: the step's own groups and what the loss takes from them
        on_selected([SelectedGroup(p, examples[i], group, chosen) for p, i, group, chosen
                     in zip(positions, indices, groups, selections)])
    # With --format-reward or several reward functions, groups can carry signal from the
    # others alone; these say how much came from correctness (the first function).
    solved = [[reward.solved(s) for s in scores[g * G:(g + 1) * G]] for g in range(len(groups))]
    stats = {"rewards": [c.reward for c in completions],
             "reward_sums": {name: sum(s[name] for s in scores) for name in reward.names},
             "lengths": [len(c.tokens) for c in completions],
             "truncated": sum(c.truncated for c in completions),
             "groups": len(groups), "groups_with_signal": added.with_signal,
             "masked": added.masked,
             "solved": sum(map(sum, solved)),
             "groups_with_solved_signal": sum(has_signal(s) for s in solved),
             "completions": len(completions), "replay_groups": 0}

    if algorithm.replay is not None:
        on_phase("replay")
        replayed = algorithm.replay(model, tokenizer, task, cfg, step, world, groups, solved,
                                    prompts, answers, indices, positions)
        replay_added = add_groups(cfg, [r.completions for r in replayed],
                                  [r.context for r in replayed], [r.rng for r in replayed], loss,
                                  first_group=len(groups))
        stats["masked"] += replay_added.masked
        stats["replay_groups"] = len(replayed)
        stats["lengths"] += [len(c.tokens) for r in replayed for c in r.completions]
    return StepRollout(loss, stats)


@dataclass
class StepTotals:
    """Counts over all ranks that normalise the loss."""
    completions: float  # the step's sampled completions, replay included
    groups: float  # the step's groups, replay groups included
    selected: float  # tokens (T-SPMO: pairs) in the loss


def loss_units(cfg: TrainConfig, totals: StepTotals, loss_rows):
    """`--loss-norm sequence` averages over completions or groups (the algorithm's
    `normalised_over`): how many there are in the step, and the unit of each loss row (None:
    the row itself)."""
    if ALGORITHMS[cfg.algo].normalised_over == "group":
        return int(totals.groups), [row.group for row in loss_rows]
    return int(totals.completions), None


def step_weights(cfg: TrainConfig, loss: LossInput, totals: StepTotals):
    """Each selected token's weight: --loss-norm with the step's global counts."""
    num_units, unit_of_row = loss_units(cfg, totals, loss.rows)
    return normalisation_weights(loss.selection, cfg.loss_norm, num_units, int(totals.selected),
                                 unit_of_row, int(totals.completions) * cfg.max_new_tokens)


def step_microbatches(model, loss_and_grad, cfg, loss: LossInput, totals: StepTotals) -> list:
    """The step's loss microbatches, weights carrying the global normalisers (and the
    reference log-probs with --beta): made once, read by every update of the step."""
    weights = step_weights(cfg, loss, totals)
    rows = cfg.microbatch_rows or planned_rows(model, loss_and_grad, loss.rows, loss.selection,
                                                budget_bytes(cfg.max_memory), cfg.max_new_tokens)
    batches = make_microbatches(loss.rows, loss.selection, weights, rows)
    if cfg.beta > 0:
        attach_ref_logprobs(model, batches)
    return batches


@dataclass
class RatioStats:
    """The ratio pi / pi_old at the selected tokens of one update's forward (this rank)."""
    tokens: float = 0.0
    ratio_sum: float = 0.0
    ratio_min: float = math.inf
    ratio_max: float = -math.inf
    clipped: float = 0.0  # tokens where the clip holds the objective (no gradient)
    kl_sum: float = 0.0  # k3 estimate of KL(old || new): (r - 1) - log r

    def add(self, batch, logprobs, low: float, high: float):
        real = np.array(batch.weights) > 0
        log_ratio = (np.array(logprobs, dtype=np.float64)
                     - np.array(batch.old_logprobs, dtype=np.float64))[real]
        ratio = np.exp(log_ratio)
        advantage = np.array(batch.advantages, dtype=np.float64)[real]
        self.tokens += real.sum()
        self.ratio_sum += ratio.sum()
        self.ratio_min = min(self.ratio_min, ratio.min(initial=math.inf))
        self.ratio_max = max(self.ratio_max, ratio.max(initial=-math.inf))
        self.clipped += (((advantage > 0) & (ratio > 1 + high))
                         | ((advantage < 0) & (ratio < 1 - low))).sum()
        self.kl_sum += (ratio - 1 - log_ratio).sum()

    @staticmethod
    def combined(parts) -> "RatioStats":
        parts = list(parts)
        return RatioStats(tokens=sum(p.tokens for p in parts),
                          ratio_sum=sum(p.ratio_sum for p in parts),
                          ratio_min=min((p.ratio_min for p in parts), default=math.inf),
                          ratio_max=max((p.ratio_max for p in parts), default=-math.inf),
                          clipped=sum(p.clipped for p in parts),
                          kl_sum=sum(p.kl_sum for p in parts))


class UpdateGrads(NamedTuple):
    loss: mx.array
    grads: dict
    ratios: RatioStats


def update_grads(loss_and_grad, cfg, batches) -> UpdateGrads:
    """Sum of the microbatches' losses and gradients at the current weights. The first update
    of a step records each microbatch's log-probs as the old policy's (its ratio is 1)."""
    loss, grads, ratios = mx.array(0.0), None, RatioStats()
    for batch in batches:
        out = loss_and_grad(batch)
        if batch.old_logprobs is None:
            batch.old_logprobs = mx.stop_gradient(out.logprobs)
        loss = loss + out.loss
        grads = out.grads if grads is None else tree_map(mx.add, grads, out.grads)
        mx.eval(loss, grads, batch.old_logprobs, out.logprobs)
        ratios.add(batch, out.logprobs, cfg.clip_epsilon, cfg.clip_high)
    return UpdateGrads(loss, grads, ratios)


def loss_and_grads(model, loss_and_grad, cfg, loss: LossInput, totals: StepTotals) -> UpdateGrads:
    """A step's first update: its microbatches made, then their summed loss and gradients."""
    return update_grads(loss_and_grad, cfg, step_microbatches(model, loss_and_grad, cfg, loss,
                                                              totals))


def zero_grads(model):
    return tree_map(mx.zeros_like, model.trainable_parameters())


def gradient_bytes(model) -> int:
    """Bytes one rank contributes to the gradient all-reduce (the LoRA parameters)."""
    return sum(v.nbytes for _, v in tree_flatten(model.trainable_parameters()))


def apply_update(model, optimizer, grads, clip: float, step: int):
    """Check, clip, step (gradients already summed over ranks). Returns (grad_norm, skipped).

    The learning rate follows the training step, not the count of applied updates, so a
    step without signal or a skipped update does not shift the schedule."""
    clipped, norm = optim.clip_grad_norm(grads, clip) if clip > 0 else (grads, None)
    if norm is None:
        norm = mx.sqrt(sum((g * g).sum() for _, g in tree_flatten(grads)))
    norm = float(norm)
    if not math.isfinite(norm):
        return norm, True  # never let a NaN/inf reach the adapter
    optimizer.state["step"] = mx.array(step, dtype=mx.uint64)
    optimizer.update(model, clipped)
    mx.eval(model.trainable_parameters(), optimizer.state)
    return norm, False


def no_grads(model) -> UpdateGrads:
    """A rank without selected tokens: zero gradients for the all-reduce."""
    return UpdateGrads(mx.array(0.0), zero_grads(model), RatioStats())


def training_state(model, optimizer):
    """The adapter's weights and the optimizer's state, by reference: an update replaces
    MLX arrays rather than changing them, so holding them costs no copy."""
    return model.trainable_parameters(), tree_map(lambda x: x, optimizer.state)


def restore_training_state(model, optimizer, state):
    weights, optimizer_state = state
    model.update(weights)
    optimizer.state = optimizer_state


@dataclass
class UpdatesDone:
    """What a step's updates did (over all ranks)."""
    applied: int = 0
    grad_norm: float = 0.0  # the first update's
    skipped: bool = False  # an update found a NaN/inf and was not applied
    ratios: RatioStats = field(default_factory=RatioStats)  # over updates 2..N
    allreduce_bytes: int = 0
    allreduce_s: float = 0.0
    update_s: float = 0.0
    more_updates_s: float = 0.0  # the forwards and backwards of updates 2..N

    def ratio_metrics(self) -> dict:
        """Ratio pi / pi_old at the selected tokens of updates 2..N's forwards (with one
        update, or none selected: 1, and nothing clipped)."""
        r = self.ratios
        seen = r.tokens > 0
        return {"updates": self.applied,
                "ratio_mean": r.ratio_sum / r.tokens if seen else 1.0,
                "ratio_min": r.ratio_min if seen else 1.0,
                "ratio_max": r.ratio_max if seen else 1.0,
                "clip_fraction": r.clipped / r.tokens if seen else 0.0,
                "approx_kl": r.kl_sum / r.tokens if seen else 0.0}


def gathered_ratios(world: World, mine: RatioStats, step: int) -> RatioStats:
    if world.size() == 1:
        return mine
    table = world.gather(list(astuple(mine)), f"the ratio statistics of step {step + 1}")
    return RatioStats.combined(RatioStats(*map(float, row))
                               for row in table.reshape(-1, len(fields(RatioStats))))


def apply_updates(model, optimizer, loss_and_grad, cfg, world, batches, first: UpdateGrads,
                  totals: StepTotals, first_loss: float, step: int) -> UpdatesDone:
    """--updates-per-rollout updates from one rollout batch: the first from `first` (its
    loss summed over ranks is `first_loss`), each later one from a new forward and backward
    of the same microbatches. Gradients are summed over ranks before each update, every
    rank applies the same one, and all use the step's learning rate (the schedule counts
    steps, not updates: --steps and --warmup-steps keep their meaning at any N)."""
    done = UpdatesDone()
    if totals.selected == 0:
        return done  # no group carried signal anywhere: nothing to learn
    if not math.isfinite(first_loss):
        done.grad_norm, done.skipped = float("nan"), True  # never let a NaN/inf reach the adapter
        return done
    grads, later_ratios = first.grads, []
    for update in range(cfg.updates_per_rollout):
        if update > 0:
            t0 = time.perf_counter()
            later = update_grads(loss_and_grad, cfg, batches) if batches else no_grads(model)
            grads = later.grads
            later_ratios.append(later.ratios)
            done.more_updates_s += time.perf_counter() - t0
        t1 = time.perf_counter()
        if world.size() > 1:
            done.allreduce_bytes += gradient_bytes(model)
            grads = world.sum_tree(grads, f"the gradient all-reduce of update {update + 1} of "
                                          f"step {step + 1}")
        t2 = time.perf_counter()
        norm, skipped = apply_update(model, optimizer, grads, cfg.grad_clip, step)
        done.allreduce_s += t2 - t1
        done.update_s += time.perf_counter() - t2
        if update == 0:
            done.grad_norm = norm
        done.skipped |= skipped
        done.applied += not skipped
        if skipped:  # the weights did not move: the next update would recompute the same
            break
    if cfg.updates_per_rollout > 1:
        done.ratios = gathered_ratios(world, RatioStats.combined(later_ratios), step)
    return done


# ---- the run --------------------------------------------------------------------------

# Above this share of a step's completions cut off at --max-new-tokens, the run says so.
TRUNCATION_WARNING = 0.10


def warn_if_truncated(metrics: dict, cfg: TrainConfig, warned: bool) -> bool:
    """One line on stderr, the first time in a run that a step's completions were cut off
    at --max-new-tokens too often: a cut answer rarely holds its final number, so it scores
    0 however good its reasoning. Returns whether the run has warned."""
    if warned or not metrics["truncation_rate"] > TRUNCATION_WARNING:
        return warned
    warn(f"step {metrics['step']}: {metrics['truncation_rate']:.0%} of the completions hit "
         f"--max-new-tokens {cfg.max_new_tokens} before they ended; truncated answers rarely "
         f"score: raise --max-new-tokens")
    return True


def warmup_cosine(peak: float, steps: int, warmup: int, floor: float):
    """Learning rate of the update at 0-based step i: a linear warmup that is already
    peak/warmup at step 0, then a cosine that reaches `floor` exactly at the last step.

    Why not mlx-lm's build_schedule: its warmup starts at 0, so the first step's rollouts
    (minutes on a laptop) train nothing, and its cosine stops short of the floor."""
    span = max(steps - warmup, 1)

    def schedule(step):
        i = mx.array(step).astype(mx.float32)
        warm = peak * (i + 1) / max(warmup, 1)
        progress = mx.clip((i + 1 - warmup) / span, 0.0, 1.0)
        cosine = floor + (peak - floor) * 0.5 * (1 + mx.cos(math.pi * progress))
        return mx.where(i < warmup, warm, cosine)

    return schedule


def lr_schedule(cfg: TrainConfig):
    return warmup_cosine(cfg.lr, cfg.steps, cfg.warmup_steps, cfg.lr * 0.1)


def plan_schedule(cfg: TrainConfig, optimizer, step_times: list, world: World):
    """--time-budget: cfg with the steps rank 0 plans for (budget.planned_steps), and the
    optimizer, its state kept, on that schedule."""
    first = step_times[:budget.plan_point(cfg)]  # a resume after the plan: the same times
    steps = int(world.broadcast_json(budget.planned_steps(cfg, first) if world.is_main
                                     else None, "the time budget's plan"))
    planned = replace(cfg, steps=steps)
    replanned = make_optimizer(planned)
    replanned.state = optimizer.state
    return planned, replanned


def out_of_time(cfg: TrainConfig, step_times: list, world: World, done: int) -> bool:
    """Whether a run has spent its --time-budget after `done` steps: rank 0's verdict
    (budget.spent) on every rank, as their clocks differ."""
    if cfg.time_budget is None:
        return False
    return bool(world.broadcast_json(budget.spent(cfg, step_times) if world.is_main else None,
                                     f"the time budget after step {done}"))


def make_optimizer(cfg: TrainConfig):
    if cfg.steps < cfg.warmup_steps:
        warn_once(f"--steps {cfg.steps} < --warmup-steps {cfg.warmup_steps}: the run ends "
                  f"before the learning rate reaches --lr {cfg.lr:g}")
    return optim.AdamW(learning_rate=lr_schedule(cfg), weight_decay=cfg.weight_decay)


def check_batch_fits(cfg: TrainConfig, world: World):
    if cfg.prompts_per_step < world.size():
        raise ConfigError(f"--prompts-per-step {cfg.prompts_per_step} is smaller than the "
                          f"number of ranks ({world.size()}): every rank needs at least one "
                          f"prompt per step")


def prepare_run(cfg: TrainConfig, resume: bool):
    """Form the group; load task (first: bad data fails before model work), model with
    LoRA, optimizer; restore a checkpoint. Returns (world, task, model, tokenizer,
    optimizer, start, cfg): on resume every rank takes rank 0's saved config."""
    cfg.validate()
    world = init_world(resume_hint=cfg.out)
    if world.size() > 1:
        if resume:  # rank 0 read config.json; other hosts may not have the run directory
            cfg = config_from_dict(world.broadcast_json(asdict(cfg), "the config broadcast"))
        else:
            check_configs_agree(cfg, world)
    check_batch_fits(cfg, world)
    if not resume and world.is_main and latest_checkpoint(Path(cfg.out)) is not None:
        raise ConfigError(f"--out {cfg.out} already holds a run with checkpoints: continue it "
                          f"with --resume {cfg.out}, or choose another --out")
    task = task_from_config(cfg)
    if world.is_main and one_file_for_both_splits(cfg.data):  # (eval of a held-out file is fine)
        warn_once(f"--data {cfg.data}: one file serves as both train and test split, so "
                  f"held-out accuracy is measured on training examples; a directory with train "
                  f"and test files keeps them apart")
    start_adapter = cfg.adapter_path if not resume and world.is_main else None
    if start_adapter is not None:  # (other ranks get rank 0's adapter below)
        check_adapter_files(start_adapter)
    if cfg.format_reward:
        # "Solved" and accuracy go by the task's own reward (the first function) alone.
        task = replace(task, reward=with_format_bonus(task.reward, cfg.format_reward))
    model, tokenizer = load_model(cfg.model, dtype=cfg.dtype, quantize_bits=cfg.quantize)
    lcfg = lora_config(cfg.lora_rank, cfg.lora_scale, cfg.lora_layers, cfg.lora_keys)
    mx.random.seed(cfg.seed)  # LoRA A's random init: same seed, same starting adapter
    add_lora(model, lcfg)
    if start_adapter is not None:
        init_from_adapter(model, start_adapter, lcfg)
    task.prompt(tokenizer, task.train[0].question)  # a template that refuses --system-prompt
    check_batched_rollouts(model)  # one-line refusals before any work: batched rollouts,
    check_selected_logprobs(model)  # and the loss's use of the model's own output head
    if cfg.grad_checkpoint:
        checkpoint_blocks(model)
    if cfg.microbatch_rows is None:  # --max-memory: checkpointing if needed, or stop here
        check_run_fits(model, tokenizer, task, cfg)
    optimizer = make_optimizer(cfg)
    out = Path(cfg.out)
    start = 0
    if resume and world.is_main:
        ckpt = latest_checkpoint(out)
        if ckpt is not None:
            start = load_checkpoint(ckpt, model, optimizer)["step"]
    elif not resume and world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_adapter_config(out, lcfg, cfg.model)
        (out / "metrics.jsonl").write_text("")
    if world.is_main:  # also on resume: --steps may have changed, and a plain --resume keeps it
        atomic_write_bytes(out / "config.json", json.dumps(asdict(cfg), indent=2).encode())
    if world.size() > 1:
        check_inputs_agree(model, task, world, start_timeout())
        start = int(world.broadcast_json(start, "the resume-step broadcast"))
        broadcast_training_state(model, optimizer, world, with_optimizer=start > 0)
    return world, task, model, tokenizer, optimizer, start, cfg


@dataclass
class RankNumbers:
    """What each rank reports of a step; gathered as one float vector, read back by name."""
    reward_sum: float
    reward_sq_sum: float
    samples: float
    groups: float
    groups_with_signal: float
    generated_tokens: float
    loss: float
    rollout_s: float
    loss_s: float
    step_s: float  # up to the metrics exchange, where ranks wait for the slowest
    loss_peak: float
    mlx_peak: float  # the process's, so far (memory.mlx_peak_bytes)
    resident_peak: float  # the process's, so far (memory.resident_peak_bytes; 0: unknown)
    solved: float
    groups_with_solved_signal: float
    truncated: float  # completions that hit --max-new-tokens (replay's not counted)
    masked: float  # completions --mask-truncated kept out of the loss (replay's counted)


def gather_numbers(world: World, mine: RankNumbers, what: str) -> list:
    table = world.gather(list(astuple(mine)), what).reshape(-1, len(fields(RankNumbers)))
    return [RankNumbers(*map(float, row)) for row in table]


def run_step(model, tokenizer, task, cfg, world, optimizer, loss_and_grad, step,
             on_phase=no_phase, on_selected=None):
    """One step on this rank's shard; returns the step's metrics, aggregated over ranks.

    Collectives: totals (after rollouts), one gather of every rank's numbers (after the first
    loss+grad; it is also where ranks wait for the slowest), the gradient all-reduce before
    each update, and with several updates a gather of their ratio statistics."""
    world = as_world(world)
    rank, size = world.rank(), world.size()
    positions = shard(list(range(cfg.prompts_per_step)), rank, size)
    batch = step_prompt_indices(len(task.train), step, cfg.prompts_per_step, cfg.seed)
    indices = [batch[p] for p in positions]
    reset_peak()
    t0 = time.perf_counter()
    on_phase("rollout")
    rolled = rollout_and_select(model, tokenizer, task, cfg, step, task.train, indices, positions,
                                world, on_phase, on_selected)
    stats = rolled.stats
    t1 = time.perf_counter()
    reset_peak()  # the loss's window
    mx.clear_cache()  # see train
    summed = world.sum([stats["completions"] + stats["replay_groups"] * cfg.group_size,
                        stats["groups"] + stats["replay_groups"], len(rolled.loss.selection)],
                       f"the selection totals of step {step + 1}")
    totals = StepTotals(completions=summed[0], groups=summed[1], selected=summed[2])
    t_totals = time.perf_counter() - t1
    on_phase("loss")
    batches = (step_microbatches(model, loss_and_grad, cfg, rolled.loss, totals)
               if rolled.loss.selection else [])
    first = update_grads(loss_and_grad, cfg, batches) if batches else no_grads(model)
    t2 = time.perf_counter()
    rewards = np.array(stats["rewards"], dtype=np.float64)
    ranks = gather_numbers(world, RankNumbers(
        reward_sum=rewards.sum(), reward_sq_sum=(rewards ** 2).sum(), samples=rewards.size,
        groups=stats["groups"], groups_with_signal=stats["groups_with_signal"],
        generated_tokens=sum(stats["lengths"]), loss=float(first.loss), rollout_s=t1 - t0,
        loss_s=t2 - t1 - t_totals, step_s=t2 - t0, loss_peak=mx.get_peak_memory(),
        mlx_peak=mlx_peak_bytes(), resident_peak=resident_peak_bytes() or 0,
        solved=stats["solved"], groups_with_solved_signal=stats["groups_with_solved_signal"],
        truncated=stats["truncated"], masked=stats["masked"]),
        f"the metrics exchange of step {step + 1}")
    total = RankNumbers(*(sum(getattr(r, f.name) for r in ranks) for f in fields(RankNumbers)))
    n = max(total.samples, 1)
    per_function = reward_means(world, stats["reward_sums"], n, step)
    t3 = time.perf_counter()
    # A step is a unit: an error or Ctrl-C during its updates (or their exchanges) puts back
    # the weights and optimizer state it started from, so the checkpoint the trainer then
    # saves is the previous step's, and a resume redoes this step whole.
    before = training_state(model, optimizer)
    try:
        updates = apply_updates(model, optimizer, loss_and_grad, cfg, world, batches, first,
                                totals, total.loss, step)
    except BaseException:
        restore_training_state(model, optimizer, before)
        raise
    t5 = time.perf_counter()
    mean = total.reward_sum / n
    # Ranks meet at the metrics exchange, so the slowest rank's step is its time up to
    # there (it did not wait) plus the all-reduce and the update every rank does together.
    step_s = max(r.step_s for r in ranks) + (t5 - t3)
    world.note_duration(step_s)
    return {
        "step": step + 1,
        "reward_mean": mean,
        "reward_std": math.sqrt(max(total.reward_sq_sum / n - mean * mean, 0.0)),
        "signal_fraction": total.groups_with_signal / max(total.groups, 1),
        "solve_rate": total.solved / n,
        "solved_signal_fraction": total.groups_with_solved_signal / max(total.groups, 1),
        "truncation_rate": total.truncated / n,
        "selected_tokens": int(totals.selected),
        "masked_truncated": int(total.masked),
        "generated_tokens": int(total.generated_tokens),
        "loss": total.loss,
        "grad_norm": updates.grad_norm,
        "skipped": updates.skipped,
        "lr": float(lr_schedule(cfg)(step)),
        **updates.ratio_metrics(),
        "rollout_s": max(r.rollout_s for r in ranks), "loss_s": max(r.loss_s for r in ranks),
        "sync_s": (t3 - t2) + t_totals, "allreduce_s": updates.allreduce_s,
        "update_s": updates.update_s, "more_updates_s": updates.more_updates_s,
        "step_s": step_s,
        "ranks": size, "allreduce_bytes": updates.allreduce_bytes,
        **peaks_gb(ranks, mx.get_peak_memory()),
        **per_function,
    }


def peaks_gb(ranks, updates_peak: int = 0) -> dict:
    """Memory, largest over ranks: `peak_memory_gb`, the process's peak so far by MLX's count
    (probes and start-up checks included); `resident_peak_gb`, by the OS's (where known);
    `loss_peak_memory_gb`, this step's loss+grad microbatches' (by MLX's count: what
    --max-memory bounds). See memory.py for how each is measured. `updates_peak`: the loss
    window's peak on this rank after all of the step's updates (the later ones' included;
    the ranks' numbers were gathered after the first)."""
    out = {"peak_memory_gb": max(max(r.mlx_peak for r in ranks), updates_peak) / 1e9}
    if all(r.resident_peak for r in ranks):
        out["resident_peak_gb"] = max(r.resident_peak for r in ranks) / 1e9
    out["loss_peak_memory_gb"] = max(max(r.loss_peak for r in ranks), updates_peak) / 1e9
    return out


def reward_means(world: World, sums: dict, samples: float, step: int) -> dict:
    """Each reward function's mean score over all ranks (`reward/NAME`), when there are
    several (a --format-reward bonus is one, `format`)."""
    if len(sums) < 2:
        return {}
    totals = world.sum(list(sums.values()), f"the reward functions' scores of step {step + 1}")
    return {f"reward/{name}": float(total) / samples for name, total in zip(sums, totals)}


def add_evaluation(metrics: dict, model, tokenizer, task, cfg, world, on_phase):
    """The step's held-out accuracy and format rate, into its metrics."""
    mx.clear_cache()
    summary = run_eval(model, tokenizer, task, cfg, world, on_phase)
    metrics.update(eval_accuracy=summary["accuracy"], eval_format_rate=summary["format_rate"])


def run_eval(model, tokenizer, task, cfg, world=None, on_phase=no_phase):
    """Held-out accuracy, each rank scoring its shard of the examples (progress: this
    rank's shard)."""
    world = as_world(world)
    examples = shard(task.test[:cfg.eval_limit], world.rank(), world.size())

    def progress(done, total):
        on_phase(f"eval {done}/{total}")

    progress(0, len(examples))  # the first batch takes a while
    t0 = time.perf_counter()
    summary, records = evaluate(model, tokenizer, task, examples,
                                max_new_tokens=cfg.max_new_tokens, on_progress=progress)
    world.note_duration(time.perf_counter() - t0)
    if world.size() == 1:
        return summary
    counts = world.sum([len(records), sum(r["correct"] for r in records),
                        sum(r["formatted"] for r in records), sum(r["tokens"] for r in records)],
                       "the evaluation exchange")
    return summary_from_counts(*(int(c) for c in counts))


def train(cfg: TrainConfig, resume: bool = False, on_step=None, on_start=None,
          on_phase=no_phase):
    """Run (or continue) training; `on_step(metrics)` is called on every rank-0 step, and
    `on_phase(name)` on rank 0 as each part of a step starts (rollout, replay, loss, eval n/N).

    Ctrl-C, or an error inside a step, saves a checkpoint of the last finished step and
    re-raises.
    """
    start_run_peak()
    world, task, model, tokenizer, optimizer, start, cfg = prepare_run(cfg, resume)
    out = Path(cfg.out)
    is_main = world.is_main
    kept = step_log.trim(out / "metrics.jsonl", start) if is_main and resume else []
    step_times = [m["step_s"] for m in kept]  # rank 0's: it decides for --time-budget
    tracker = start_tracker(cfg) if is_main else Tracker()
    samples = SampleLog(out / "samples.jsonl", tokenizer, cfg.samples_every, cfg.samples_count,
                        tracker)
    if is_main:  # steps after the checkpoint will be redone; a new run starts it empty
        step_log.trim(samples.path, start)
    if on_start:
        on_start(start)
    report_phase = on_phase if is_main else no_phase
    loss_and_grad = make_loss_and_grad(model, cfg.beta, cfg.compile,
                                       ClipRange(cfg.clip_epsilon, cfg.clip_high))
    state = {"config": asdict(cfg)}
    done = start
    warned_truncation = False
    # With --time-budget, `planned` is cfg with the steps the schedule is planned for.
    planned = cfg
    if cfg.time_budget is not None and start >= budget.plan_point(cfg):
        planned, optimizer = plan_schedule(cfg, optimizer, step_times, world)
    over = out_of_time(cfg, step_times, world, start)  # a resumed run may have spent it
    missed = step_log.evaluation_missed(kept, start, cfg.eval_every) if is_main else None
    unwritten = None  # a finished step's metrics, until they are in metrics.jsonl
    try:
        if resume and world.broadcast_json(missed, "the missed evaluation"):
            add_evaluation(kept[-1] if is_main else {}, model, tokenizer, task, cfg, world,
                           report_phase)
            if is_main:
                step_log.rewrite(out / "metrics.jsonl", kept)
                tracker.log_step(kept[-1])
                if on_step:
                    on_step(kept[-1])
        for step in range(start, cfg.steps):
            if over:
                break
            # MLX keeps freed buffers for reuse (on Metal up to its memory limit, on the CPU
            # 32 MB). One phase's (the rollout's growing KV caches and logits) fit the next
            # badly, so every phase (rollout, loss, evaluation) starts with none kept.
            mx.clear_cache()
            metrics = run_step(model, tokenizer, task, planned, world, optimizer, loss_and_grad,
                               step, on_phase=report_phase,
                               on_selected=samples.for_step(step) if is_main else None)
            done, unwritten = step + 1, metrics
            step_times.append(metrics["step_s"])  # (rank 0's alone count)
            if cfg.time_budget is not None and done == budget.plan_point(cfg):
                planned, optimizer = plan_schedule(cfg, optimizer, step_times, world)
            if planned is not cfg:
                metrics["planned_steps"] = planned.steps
            if is_main:
                warned_truncation = warn_if_truncated(metrics, cfg, warned_truncation)
            if cfg.eval_every and done % cfg.eval_every == 0:
                add_evaluation(metrics, model, tokenizer, task, cfg, world, report_phase)
            over = out_of_time(cfg, step_times, world, done)
            save = done % cfg.save_every == 0 or done == cfg.steps or over
            if save and not ensure_ranks_agree(model, optimizer, world):
                metrics["resynced"] = True  # never expected: ranks apply identical updates
            if is_main:
                step_log.append(out / "metrics.jsonl", metrics)
                unwritten = None
                tracker.log_step(metrics)
                if save:
                    save_checkpoint(out, done, model, optimizer, state)
                if on_step:
                    on_step(metrics)
    except (KeyboardInterrupt, Exception):
        if is_main and done > start:
            # The checkpoint and metrics.jsonl name the same steps (--time-budget reads its
            # step times there on resume), also when this stops a step's evaluation.
            if unwritten is not None:
                step_log.append(out / "metrics.jsonl", unwritten)
            save_checkpoint(out, done, model, optimizer, state)
        raise
    finally:
        tracker.finish()
    return out
