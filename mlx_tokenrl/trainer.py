"""The RL loop: prompts -> rollouts -> selected tokens with advantages -> loss -> update.

One policy update per rollout batch, LoRA on the policy, no critic. Rank-aware from the
start: each rank takes a disjoint shard of every step's prompts, the loss is normalised by
global counts, and gradients are summed across ranks (world size 1 by default).
Everything random is derived from (seed, step, prompt), so a resumed run, or a prompt
drawn by another rank, samples exactly the same as it would have.
"""

import json
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map
from mlx_lm.tuner.trainer import grad_checkpoint
from mlx_lm.tuner.utils import build_schedule

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .evaluate import evaluate
from .loss import LossRow, attach_ref_logprobs, make_loss_and_grad, make_microbatches, normalisation_weights
from .models import DEFAULT_MODEL, add_lora, load_model, lora_config, save_adapter_config
from .rollout import SamplingParams, encode_prompts, rollout
from .selection import grpo_selection, has_signal, sgrpo_selection, tspmo_selection
from .tasks import format_prompt, load_task

ALGOS = ("grpo", "s-grpo", "t-spmo")


@dataclass
class TrainConfig:
    # what to train
    task: str = "svamp"
    model: str = DEFAULT_MODEL
    algo: str = "t-spmo"
    data: str | None = None
    digits: str = "3x3"
    reward_fn: str | None = None
    # rollouts
    steps: int = 100
    prompts_per_step: int = 8
    group_size: int = 8
    max_new_tokens: int = 256
    temperature: float = 0.6
    top_p: float = 1.0
    seed: int = 0
    # optimisation
    lr: float = 1e-5
    warmup_steps: int = 5
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    loss_norm: str = "sequence"
    beta: float = 0.0
    scale_rewards: str = "group"
    # LoRA / model
    lora_rank: int = 8
    lora_scale: float = 20.0
    lora_layers: int = -1
    lora_keys: list[str] | None = None
    quantize: int | None = None
    dtype: str = "auto"
    # algorithm knobs
    # S-GRPO: ~24 tokens within the first ~30 of each completion. The loss's forward pass
    # then stops early (memory and time well under half of GRPO's, scripts/bench_step.py).
    sgrpo_alpha: int = 4
    sgrpo_k: int = 24
    sgrpo_p: float = 0.75
    tspmo_max_pairs: int = 256
    tspmo_replay: int = 2
    # compute
    microbatch_rows: int = 8
    grad_checkpoint: bool = False
    compile: bool = True
    # bookkeeping
    eval_every: int = 0
    eval_limit: int = 100
    save_every: int = 10
    out: str = "runs/latest"

    def validate(self):
        if self.algo not in ALGOS:
            raise ValueError(f"unknown algo {self.algo!r}: use one of {', '.join(ALGOS)}")
        if self.loss_norm not in ("sequence", "token"):
            raise ValueError(f"--loss-norm must be sequence or token, not {self.loss_norm!r}")
        if self.scale_rewards not in ("group", "none"):
            raise ValueError(f"--scale-rewards must be group or none, not {self.scale_rewards!r}")
        for name in ("steps", "prompts_per_step", "group_size", "max_new_tokens", "microbatch_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if self.group_size < 2:
            raise ValueError("--group-size must be at least 2: advantages compare a group")
        if self.sgrpo_alpha > self.sgrpo_k:
            raise ValueError("--sgrpo-alpha must not exceed --sgrpo-k")


def config_from_dict(values: dict) -> TrainConfig:
    """Build a config from a YAML/JSON mapping; keys may use dashes or underscores."""
    known = {f.name for f in fields(TrainConfig)}
    values = {k.replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown config keys: {', '.join(unknown)}")
    return TrainConfig(**values)


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


def add_groups(cfg, groups, contexts, rng, loss_rows, triples):
    """Select within each group and append its rows and (row, pos, adv) triples."""
    signal = 0
    for context, group in zip(contexts, groups):
        rewards = [c.reward for c in group]
        signal += has_signal(rewards)
        chosen = select_group(cfg, [c.tokens for c in group], rewards, rng)
        used = sorted({row for row, _, _ in chosen})
        row_id = {row: len(loss_rows) + i for i, row in enumerate(used)}
        loss_rows += [LossRow(context, group[row].tokens) for row in used]
        triples += [(row_id[row], pos, adv) for row, pos, adv in chosen]
    return signal


def replay_prefixes(groups, count: int, rng):
    """T-SPMO replay: cut `count` successful completions at a random position each."""
    best = [(g, c) for g, group in enumerate(groups)
            for c in group if c.reward > 0 and c.reward == max(x.reward for x in group)
            and len(c.tokens) >= 2]
    picks = rng.choice(len(best), size=min(count, len(best)), replace=False) if best else []
    return [(best[i][0], best[i][1].tokens[:int(rng.integers(1, len(best[i][1].tokens)))])
            for i in picks]


# ---- one step -------------------------------------------------------------------------

def rollout_and_select(model, tokenizer, task, cfg, step, examples, indices, rank):
    """Rollouts for this rank's prompts (+ replay), then selection. No gradients yet."""
    rng = np.random.default_rng(derived_seed(cfg.seed, 2, step, rank))
    params = SamplingParams(cfg.temperature, cfg.top_p, cfg.max_new_tokens)
    prompts = encode_prompts(tokenizer, [format_prompt(tokenizer, examples[i].question,
                                                       task.instruction) for i in indices])
    answers = [examples[i].answer for i in indices]
    seeds = [derived_seed(cfg.seed, 3, step, i) for i in indices]
    completions = rollout(model, tokenizer, prompts, cfg.group_size, params, seeds,
                          answers, task.reward)
    G = cfg.group_size
    groups = [completions[g * G:(g + 1) * G] for g in range(len(indices))]
    loss_rows, triples = [], []
    signal = add_groups(cfg, groups, prompts, rng, loss_rows, triples)
    stats = {"rewards": [c.reward for c in completions],
             "lengths": [len(c.tokens) for c in completions],
             "groups": len(groups), "groups_with_signal": signal,
             "completions": len(completions), "replay_completions": 0}

    if cfg.algo == "t-spmo" and cfg.tspmo_replay > 0:
        cuts = replay_prefixes(groups, cfg.tspmo_replay, rng)
        if cuts:
            shortest_cut = min(len(prefix) for _, prefix in cuts)
            replay_params = SamplingParams(cfg.temperature, cfg.top_p,
                                           max(1, cfg.max_new_tokens - shortest_cut))
            replayed = rollout(model, tokenizer, [prompts[g] for g, _ in cuts], G, replay_params,
                               [derived_seed(cfg.seed, 4, step, indices[g], len(p)) for g, p in cuts],
                               [answers[g] for g, _ in cuts], task.reward,
                               prefixes=[p for _, p in cuts])
            replay_groups = [replayed[k * G:(k + 1) * G] for k in range(len(cuts))]
            add_groups(cfg, replay_groups, [prompts[g] + p for g, p in cuts], rng, loss_rows, triples)
            stats["replay_completions"] = len(replayed)
            stats["lengths"] += [len(c.tokens) for c in replayed]
    return loss_rows, triples, stats


def all_sum(values, world):
    """Sum small host-side counters over ranks (identity for a single process)."""
    values = np.asarray(values, dtype=np.float64)
    if world.size() == 1:
        return values
    return np.array(mx.distributed.all_sum(mx.array(values, dtype=mx.float32), group=world,
                                           stream=mx.cpu))


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


def apply_update(model, optimizer, grads, world, clip: float):
    """All-reduce, check, clip, step. Returns (grad_norm, skipped)."""
    if world.size() > 1:
        grads = tree_map(lambda g: mx.distributed.all_sum(g, group=world), grads)
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


def prepare_run(cfg: TrainConfig, resume: bool):
    """Load task (first: bad data fails before model work), model with LoRA, optimizer."""
    cfg.validate()
    world = mx.distributed.init()
    if cfg.prompts_per_step < world.size():
        raise ValueError(f"--prompts-per-step {cfg.prompts_per_step} is smaller than the "
                         f"number of ranks ({world.size()})")
    task = load_task(cfg.task, data=cfg.data, digits=cfg.digits, seed=cfg.seed,
                     reward_fn=cfg.reward_fn)
    model, tokenizer = load_model(cfg.model, dtype=cfg.dtype, quantize_bits=cfg.quantize)
    lcfg = lora_config(cfg.lora_rank, cfg.lora_scale, cfg.lora_layers, cfg.lora_keys)
    mx.random.seed(cfg.seed)  # LoRA A's random init: same seed, same starting adapter
    add_lora(model, lcfg)
    if cfg.grad_checkpoint:
        grad_checkpoint(model.layers[0])
    optimizer = make_optimizer(cfg)
    out = Path(cfg.out)
    start = 0
    if resume:
        ckpt = latest_checkpoint(out)
        if ckpt is not None:
            start = load_checkpoint(ckpt, model, optimizer)["step"]
    elif world.rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
        save_adapter_config(out, lcfg, cfg.model)
        (out / "metrics.jsonl").write_text("")
    return world, task, model, tokenizer, optimizer, start


def trim_metrics(path: Path, upto_step: int):
    """Drop metrics of steps after the checkpoint we resume from (they will be redone)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= upto_step]
    path.write_text("".join(line + "\n" for line in kept))


def run_step(model, tokenizer, task, cfg, world, optimizer, loss_and_grad, step):
    rank, size = world.rank(), world.size()
    examples = task.train
    indices = shard(step_prompt_indices(len(examples), step, cfg.prompts_per_step, cfg.seed),
                    rank, size)
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    loss_rows, triples, stats = rollout_and_select(model, tokenizer, task, cfg, step, examples,
                                                   indices, rank)
    t1 = time.perf_counter()
    rollout_peak = mx.get_peak_memory()
    mx.reset_peak_memory()
    totals = all_sum([stats["completions"] + stats["replay_completions"], len(triples)], world)
    if triples:
        loss, grads = loss_and_grads(model, loss_and_grad, cfg, loss_rows, triples, totals)
    else:
        loss, grads = mx.array(0.0), zero_grads(model)
    t2 = time.perf_counter()
    loss_peak = mx.get_peak_memory()
    if totals[1] > 0:
        grad_norm, skipped = apply_update(model, optimizer, grads, world, cfg.grad_clip)
        skipped = skipped or not math.isfinite(float(loss))
    else:
        grad_norm, skipped = 0.0, False  # no group carried signal anywhere: nothing to learn
    t3 = time.perf_counter()
    rewards = np.array(stats["rewards"])
    sums = all_sum([rewards.sum(), (rewards ** 2).sum(), rewards.size, stats["groups"],
                    stats["groups_with_signal"], sum(stats["lengths"]), float(loss)], world)
    n = max(sums[2], 1)
    mean = sums[0] / n
    return {
        "step": step + 1,
        "reward_mean": mean,
        "reward_std": math.sqrt(max(sums[1] / n - mean * mean, 0.0)),
        "signal_fraction": sums[4] / max(sums[3], 1),
        "selected_tokens": int(totals[1]),
        "generated_tokens": int(sums[5]),
        "loss": float(sums[6]),
        "grad_norm": grad_norm,
        "skipped": bool(skipped),
        "lr": float(optimizer.learning_rate),
        "rollout_s": t1 - t0, "loss_s": t2 - t1, "update_s": t3 - t2,
        "step_s": t3 - t0,
        "peak_memory_gb": max(rollout_peak, loss_peak, mx.get_peak_memory()) / 1e9,
        "loss_peak_memory_gb": loss_peak / 1e9,
    }


def run_eval(model, tokenizer, task, cfg):
    summary, _ = evaluate(model, tokenizer, task, task.test[:cfg.eval_limit],
                          max_new_tokens=cfg.max_new_tokens)
    return summary


def train(cfg: TrainConfig, resume: bool = False, on_step=None, on_start=None):
    """Run (or continue) training; `on_step(metrics)` is called on every rank-0 step.

    Ctrl-C saves a checkpoint of the last finished step and returns cleanly.
    """
    world, task, model, tokenizer, optimizer, start = prepare_run(cfg, resume)
    out = Path(cfg.out)
    is_main = world.rank() == 0
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
                summary = run_eval(model, tokenizer, task, cfg)
                metrics.update(eval_accuracy=summary["accuracy"],
                               eval_format_rate=summary["format_rate"])
            if is_main:
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(metrics) + "\n")
                if done % cfg.save_every == 0 or done == cfg.steps:
                    save_checkpoint(out, done, model, optimizer, state)
                if on_step:
                    on_step(metrics)
    except KeyboardInterrupt:
        if is_main and done > start:
            save_checkpoint(out, done, model, optimizer, state)
        raise
    return out
