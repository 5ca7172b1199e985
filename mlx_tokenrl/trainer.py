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
from dataclasses import asdict, replace
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map
from mlx_lm.tuner.trainer import grad_checkpoint
from mlx_lm.tuner.utils import build_schedule

from .checkpoint import (atomic_write_bytes, latest_checkpoint, load_checkpoint,
                         save_checkpoint)
from .distributed import World, as_world, init_world, start_timeout
from .evaluate import evaluate, summary_from_counts
from .loss import (LossRow, attach_ref_logprobs, check_selected_logprobs, make_loss_and_grad,
                   make_microbatches, normalisation_weights)
from .config import ConfigError, TrainConfig, config_from_dict
from .models import add_lora, load_model, lora_config, save_adapter_config
from .rewards import with_format_bonus
from .rollout import SamplingParams, check_batched_rollouts, encode_prompts, rollout
from .selection import grpo_selection, has_signal, sgrpo_selection, tspmo_selection
from .sync import broadcast_training_state, check_configs_agree, check_inputs_agree, ensure_ranks_agree
from .tasks import format_prompt, load_task

# ---- what each step draws -------------------------------------------------------------

def derived_seed(*parts) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def step_prompt_indices(num_examples: int, step: int, batch: int, seed: int) -> list:
    """The B example indices of a step: consecutive slices of per-epoch permutations."""
    out = []
    for pos in range(step * batch, (step + 1) * batch):
        epoch, offset = divmod(pos, num_examples)
        order = np.random.default_rng(derived_seed(seed, 1, epoch)).permutation(num_examples)
        out.append(int(order[offset]))
    return out


def shard(items, rank: int, world: int):
    """Rank `rank`'s share: every world-th item (sizes differ by at most one)."""
    return items[rank::world]


# ---- selection ------------------------------------------------------------------------

def select_group(cfg: TrainConfig, completions, rewards, rng):
    scale = cfg.scale_rewards == "group"
    if cfg.algo == "grpo":
        return grpo_selection(completions, rewards, scale)
    if cfg.algo == "s-grpo":
        return sgrpo_selection(completions, rewards, cfg.sgrpo_alpha, cfg.sgrpo_k, cfg.sgrpo_p,
                               rng, scale)
    return tspmo_selection(completions, rewards, cfg.tspmo_max_pairs, rng)


def group_rng(cfg: TrainConfig, step: int, position: int):
    """Selection randomness of one group: fixed by (seed, step, prompt position), not rank."""
    return np.random.default_rng(derived_seed(cfg.seed, 2, step, position))


def add_groups(cfg, groups, contexts, rngs, loss_rows, triples):
    """Select within each group (with its own rng) and append its rows and triples."""
    signal = 0
    for context, group, rng in zip(contexts, groups, rngs):
        rewards = [c.reward for c in group]
        signal += has_signal(rewards)
        chosen = select_group(cfg, [c.tokens for c in group], rewards, rng)
        used = sorted({row for row, _, _ in chosen})
        row_id = {row: len(loss_rows) + i for i, row in enumerate(used)}
        loss_rows += [LossRow(context, group[row].tokens) for row in used]
        triples += [(row_id[row], pos, adv) for row, pos, adv in chosen]
    return signal


def replay_candidates(groups, positions):
    """(prompt position, completion, length) of each group's best successful completions."""
    out = []
    for position, group in zip(positions, groups):
        best = max(c.reward for c in group)
        out += [(position, j, len(c.tokens)) for j, c in enumerate(group)
                if c.reward > 0 and c.reward == best and len(c.tokens) >= 2]
    return out


def replay_prefixes(candidates, count: int, rng):
    """T-SPMO replay: pick `count` of the step's candidates, cut each at a random position.
    Returns (pick, prompt position, completion, cut length); every rank draws the same."""
    picks = rng.choice(len(candidates), size=min(count, len(candidates)), replace=False) \
        if candidates else []
    return [(k, *candidates[i][:2], int(rng.integers(1, candidates[i][2])))
            for k, i in enumerate(picks)]


def gather_candidates(world: World, local, capacity: int):
    """Every rank's replay candidates, in prompt-position order (as one process has them)."""
    if world.size() == 1:
        return sorted(local)
    table = np.full((capacity, 3), -1.0)
    if local:
        table[:len(local)] = local
    rows = world.gather(table.reshape(-1), "the T-SPMO replay exchange").reshape(-1, 3)
    return sorted(tuple(int(x) for x in row) for row in rows if row[0] >= 0)


# ---- one step -------------------------------------------------------------------------

def rollout_and_select(model, tokenizer, task, cfg, step, examples, indices, positions=None,
                       world=None):
    """Rollouts for this rank's prompts (+ replay), then selection. No gradients yet.

    `indices` are the example indices of this rank's prompts, `positions` their places in
    the step's batch (default: 0..len-1, one process)."""
    world = as_world(world)
    positions = list(range(len(indices))) if positions is None else list(positions)
    params = SamplingParams(cfg.temperature, cfg.top_p, cfg.max_new_tokens)
    prompts = encode_prompts(tokenizer, [format_prompt(tokenizer, examples[i].question,
                                                       task.instruction) for i in indices])
    answers = [examples[i].answer for i in indices]
    seeds = [derived_seed(cfg.seed, 3, step, i) for i in indices]
    completions = rollout(model, tokenizer, prompts, cfg.group_size, params, seeds,
                          answers, task.reward) if indices else []
    G = cfg.group_size
    groups = [completions[g * G:(g + 1) * G] for g in range(len(indices))]
    loss_rows, triples = [], []
    signal = add_groups(cfg, groups, prompts, [group_rng(cfg, step, p) for p in positions],
                        loss_rows, triples)
    # "Solved" is a full reward (>= 1, as eval counts correct): with --format-reward, groups
    # can carry signal from the format alone, and these say how much came from correctness.
    solved = [[c.reward >= 1.0 for c in group] for group in groups]
    stats = {"rewards": [c.reward for c in completions],
             "lengths": [len(c.tokens) for c in completions],
             "groups": len(groups), "groups_with_signal": signal,
             "solved": sum(map(sum, solved)),
             "groups_with_solved_signal": sum(has_signal(s) for s in solved),
             "completions": len(completions), "replay_completions": 0}

    if cfg.algo == "t-spmo" and cfg.tspmo_replay > 0:
        capacity = -(-cfg.prompts_per_step // world.size()) * G
        candidates = gather_candidates(world, replay_candidates(groups, positions), capacity)
        cuts = replay_prefixes(candidates, cfg.tspmo_replay,
                               np.random.default_rng(derived_seed(cfg.seed, 6, step)))
        local = {p: g for g, p in enumerate(positions)}
        mine = [(k, local[p], groups[local[p]][j].tokens[:cut]) for k, p, j, cut in cuts
                if p in local]
        if mine:
            shortest_cut = min(cut for *_, cut in cuts)  # over all ranks: same budget as one process
            replay_params = SamplingParams(cfg.temperature, cfg.top_p,
                                           max(1, cfg.max_new_tokens - shortest_cut))
            replayed = rollout(model, tokenizer, [prompts[g] for _, g, _ in mine], G, replay_params,
                               [derived_seed(cfg.seed, 4, step, indices[g], len(p)) for _, g, p in mine],
                               [answers[g] for _, g, _ in mine], task.reward,
                               prefixes=[p for _, _, p in mine])
            replay_groups = [replayed[n * G:(n + 1) * G] for n in range(len(mine))]
            add_groups(cfg, replay_groups, [prompts[g] + p for _, g, p in mine],
                       [np.random.default_rng(derived_seed(cfg.seed, 5, step, k)) for k, _, _ in mine],
                       loss_rows, triples)
            stats["replay_completions"] = len(replayed)
            stats["lengths"] += [len(c.tokens) for c in replayed]
    return loss_rows, triples, stats


def loss_and_grads(model, loss_and_grad, cfg, loss_rows, triples, totals):
    """Sum of microbatch losses and gradients; weights already carry global normalisers."""
    num_completions, num_selected = totals
    weights = normalisation_weights(triples, cfg.loss_norm, int(num_completions), int(num_selected))
    batches = make_microbatches(loss_rows, triples, weights, cfg.microbatch_rows)
    if cfg.beta > 0:
        attach_ref_logprobs(model, batches)
    loss, grads = mx.array(0.0), None
    for batch in batches:
        batch_loss, batch_grads = loss_and_grad(batch)
        loss = loss + batch_loss
        grads = batch_grads if grads is None else tree_map(mx.add, grads, batch_grads)
        mx.eval(loss, grads)
    return loss, grads


def zero_grads(model):
    return tree_map(mx.zeros_like, model.trainable_parameters())


def gradient_bytes(model) -> int:
    """Bytes one rank contributes to the gradient all-reduce (the LoRA parameters)."""
    return sum(v.nbytes for _, v in tree_flatten(model.trainable_parameters()))


def apply_update(model, optimizer, grads, clip: float):
    """Check, clip, step (gradients already summed over ranks). Returns (grad_norm, skipped)."""
    clipped, norm = optim.clip_grad_norm(grads, clip) if clip > 0 else (grads, None)
    if norm is None:
        norm = mx.sqrt(sum((g * g).sum() for _, g in tree_flatten(grads)))
    norm = float(norm)
    if not math.isfinite(norm):
        return norm, True  # never let a NaN/inf reach the adapter
    optimizer.update(model, clipped)
    mx.eval(model.trainable_parameters(), optimizer.state)
    return norm, False


# ---- the run --------------------------------------------------------------------------

def make_optimizer(cfg: TrainConfig):
    schedule = build_schedule({"name": "cosine_decay", "arguments": [cfg.lr, cfg.steps, cfg.lr * 0.1],
                               "warmup": cfg.warmup_steps})
    return optim.AdamW(learning_rate=schedule, weight_decay=cfg.weight_decay)


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
    task = load_task(cfg.task, data=cfg.data, digits=cfg.digits, seed=cfg.seed,
                     reward_fn=cfg.reward_fn)
    if cfg.format_reward:
        # Accuracy still counts only full rewards (>= 1), so the bonus alone never scores.
        task = replace(task, reward=with_format_bonus(task.reward, cfg.format_reward))
    model, tokenizer = load_model(cfg.model, dtype=cfg.dtype, quantize_bits=cfg.quantize)
    lcfg = lora_config(cfg.lora_rank, cfg.lora_scale, cfg.lora_layers, cfg.lora_keys)
    mx.random.seed(cfg.seed)  # LoRA A's random init: same seed, same starting adapter
    add_lora(model, lcfg)
    check_batched_rollouts(model)  # one-line refusals before any work: batched rollouts,
    check_selected_logprobs(model)  # and the loss's use of the model's own output head
    if cfg.grad_checkpoint:
        grad_checkpoint(model.layers[0])
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


def trim_metrics(path: Path, upto_step: int):
    """Drop metrics of steps after the checkpoint we resume from (they will be redone), and
    a last line cut short by a kill."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= upto_step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    atomic_write_bytes(path, "".join(line + "\n" for line in kept).encode())


def run_step(model, tokenizer, task, cfg, world, optimizer, loss_and_grad, step):
    """One step on this rank's shard; returns the step's metrics, aggregated over ranks.

    Collectives: totals (after rollouts), one gather of every rank's numbers (after
    loss+grad; it is also where ranks wait for the slowest), the gradient all-reduce."""
    world = as_world(world)
    rank, size = world.rank(), world.size()
    positions = shard(list(range(cfg.prompts_per_step)), rank, size)
    batch = step_prompt_indices(len(task.train), step, cfg.prompts_per_step, cfg.seed)
    indices = [batch[p] for p in positions]
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    loss_rows, triples, stats = rollout_and_select(model, tokenizer, task, cfg, step, task.train,
                                                   indices, positions, world)
    t1 = time.perf_counter()
    rollout_peak = mx.get_peak_memory()
    mx.reset_peak_memory()
    totals = world.sum([stats["completions"] + stats["replay_completions"], len(triples)],
                       f"the selection totals of step {step + 1}")
    t_totals = time.perf_counter() - t1
    if triples:
        loss, grads = loss_and_grads(model, loss_and_grad, cfg, loss_rows, triples, totals)
    else:
        loss, grads = mx.array(0.0), zero_grads(model)
    t2 = time.perf_counter()
    loss_peak = mx.get_peak_memory()
    rewards = np.array(stats["rewards"], dtype=np.float64)
    ranks = world.gather([rewards.sum(), (rewards ** 2).sum(), rewards.size, stats["groups"],
                          stats["groups_with_signal"], sum(stats["lengths"]), float(loss),
                          t1 - t0, t2 - t1 - t_totals, t2 - t0, rollout_peak, loss_peak,
                          stats["solved"], stats["groups_with_solved_signal"]],
                         f"the metrics exchange of step {step + 1}")
    t3 = time.perf_counter()
    sums = ranks.sum(axis=0)
    global_loss = float(sums[6])
    allreduce_bytes = 0
    if totals[1] > 0:
        if size > 1:
            allreduce_bytes = gradient_bytes(model)
            grads = world.sum_tree(grads, f"the gradient all-reduce of step {step + 1}")
        t4 = time.perf_counter()
        grad_norm, skipped = apply_update(model, optimizer, grads, cfg.grad_clip)
        skipped = skipped or not math.isfinite(global_loss)
    else:
        t4 = time.perf_counter()
        grad_norm, skipped = 0.0, False  # no group carried signal anywhere: nothing to learn
    t5 = time.perf_counter()
    n = max(sums[2], 1)
    mean = sums[0] / n
    # Ranks meet at the metrics exchange, so the slowest rank's step is its time up to
    # there (it did not wait) plus the all-reduce and the update every rank does together.
    step_s = float(ranks[:, 9].max()) + (t5 - t3)
    world.note_duration(step_s)
    return {
        "step": step + 1,
        "reward_mean": mean,
        "reward_std": math.sqrt(max(sums[1] / n - mean * mean, 0.0)),
        "signal_fraction": sums[4] / max(sums[3], 1),
        "solve_rate": sums[12] / n,
        "solved_signal_fraction": sums[13] / max(sums[3], 1),
        "selected_tokens": int(totals[1]),
        "generated_tokens": int(sums[5]),
        "loss": global_loss,
        "grad_norm": grad_norm,
        "skipped": bool(skipped),
        "lr": float(optimizer.learning_rate),
        "rollout_s": float(ranks[:, 7].max()), "loss_s": float(ranks[:, 8].max()),
        "sync_s": (t3 - t2) + t_totals, "allreduce_s": t4 - t3, "update_s": t5 - t4,
        "step_s": step_s,
        "ranks": size, "allreduce_bytes": allreduce_bytes,
        "peak_memory_gb": max(float(ranks[:, 10].max()), float(ranks[:, 11].max()),
                              mx.get_peak_memory()) / 1e9,
        "loss_peak_memory_gb": float(ranks[:, 11].max()) / 1e9,
    }


def run_eval(model, tokenizer, task, cfg, world=None):
    """Held-out accuracy, each rank scoring its shard of the examples."""
    world = as_world(world)
    examples = shard(task.test[:cfg.eval_limit], world.rank(), world.size())
    t0 = time.perf_counter()
    summary, records = evaluate(model, tokenizer, task, examples,
                                max_new_tokens=cfg.max_new_tokens)
    world.note_duration(time.perf_counter() - t0)
    if world.size() == 1:
        return summary
    counts = world.sum([len(records), sum(r["correct"] for r in records),
                        sum(r["formatted"] for r in records), sum(r["tokens"] for r in records)],
                       "the evaluation exchange")
    return summary_from_counts(*(int(c) for c in counts))


def train(cfg: TrainConfig, resume: bool = False, on_step=None, on_start=None):
    """Run (or continue) training; `on_step(metrics)` is called on every rank-0 step.

    Ctrl-C, or an error inside a step, saves a checkpoint of the last finished step and
    re-raises.
    """
    world, task, model, tokenizer, optimizer, start, cfg = prepare_run(cfg, resume)
    out = Path(cfg.out)
    is_main = world.is_main
    if is_main and resume:
        trim_metrics(out / "metrics.jsonl", start)
    if on_start:
        on_start(start)
    loss_and_grad = make_loss_and_grad(model, cfg.beta, cfg.compile)
    state = {"config": asdict(cfg)}
    done = start
    try:
        for step in range(start, cfg.steps):
            metrics = run_step(model, tokenizer, task, cfg, world, optimizer, loss_and_grad, step)
            done = step + 1
            if cfg.eval_every and done % cfg.eval_every == 0:
                summary = run_eval(model, tokenizer, task, cfg, world)
                metrics.update(eval_accuracy=summary["accuracy"],
                               eval_format_rate=summary["format_rate"])
            save = done % cfg.save_every == 0 or done == cfg.steps
            if save and not ensure_ranks_agree(model, optimizer, world):
                metrics["resynced"] = True  # never expected: ranks apply identical updates
            if is_main:
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(metrics) + "\n")
                if save:
                    save_checkpoint(out, done, model, optimizer, state)
                if on_step:
                    on_step(metrics)
    except (KeyboardInterrupt, Exception):
        if is_main and done > start:
            save_checkpoint(out, done, model, optimizer, state)
        raise
    return out
