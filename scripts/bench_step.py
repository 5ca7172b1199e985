"""Per-algorithm RL step cost: rollout time, and loss+grad time and peak memory of the
trainer's loss, side by side with the loss as it was at an earlier commit (--before, read
from git; by default the last one where every row of a group ran the group's prompt again),
in the trainer's own loss loop.

A 135M-parameter Qwen2-shaped random model (SmolLM2-135M's dimensions), LoRA rank 8 on every
layer, B=4 prompts x G=8 completions, 128 new tokens, prompts of 100-150 tokens (about a
SVAMP chat prompt); or `--model` a real one on SVAMP's questions. Rewards are a fixed
pseudo-random 0/1 per completion text (the random model cannot solve anything): every group
carries signal, and T-SPMO replays.
Each step's rows are computed both ways, in alternating order; the first step compiles.

    python scripts/bench_step.py --out results/bench_step.json
"""

import argparse
import hashlib
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path
from unittest.mock import patch

import mlx_tokenrl  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from rich.console import Console

from mlx_tokenrl import trainer
from mlx_tokenrl.config import ALGOS, TrainConfig
from mlx_tokenrl import loss as loss_module
from mlx_tokenrl.models import add_lora, load_model, lora_config
from mlx_tokenrl.tasks import Example, Task, load_task
from mlx_tokenrl.toy import SHAPE_135M, build_toy_model

from before import module_at
from tables import markdown_table, print_table

PER_ROW = "a2e7e9a"  # the last commit whose loss ran every row's whole context
WORDS = ("what is times plus minus has had how many apples more less each total the a of and "
         "to in is was he she they there are were left gave bought").split()


def coin_reward(text: str, answer: str) -> float:
    return float(hashlib.sha256(text.encode()).digest()[0] % 2)


def questions_of_length(tokenizer, task, count, low, high, seed=0):
    """`count` word-salad questions whose full chat prompt is low..high tokens."""
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < count:
        target = int(rng.integers(low, high + 1))
        words = []
        while len(tokenizer.encode(task.prompt(tokenizer, " ".join(words)))) < target:
            words.append(str(rng.choice(WORDS)) if rng.random() < 0.8 else str(rng.integers(100)))
        out.append(" ".join(words))
    return out


def shareable_prefix_tokens(loss_rows, triples):
    """Completion tokens that rows of one context run more than once (a prefix tree would run
    them once), and all tokens the shared-context loss runs (contexts once, then rows)."""
    crop = {}
    for row, pos, _ in triples:
        crop[row] = max(crop.get(row, 0), pos)
    prefixes, run, contexts = set(), 0, set()
    for row, length in crop.items():
        context, completion = tuple(loss_rows[row].context), loss_rows[row].completion
        contexts.add(context)
        run += length
        prefixes.update((context, tuple(completion[:k])) for k in range(1, length + 1))
    return run - len(prefixes), run + sum(map(len, contexts))


def positions(batch) -> int:
    """Token positions a microbatch's forward runs, padding included: its contexts and rows,
    as one array each (older commits) or a list of passes; the per-row loss had no contexts."""
    def size(value):
        return sum(a.size for a in value) if isinstance(value, list) else value.size
    return size(batch.inputs) + (size(batch.contexts) if hasattr(batch, "contexts") else 0)


def measure(model, variant, cfg, rows, triples, totals):
    """The trainer's loss+grad of a step, with `variant`'s microbatches and compiled step:
    its time, its peak, and what the loss added to the memory held before it (weights,
    LoRA and optimizer state: the activations, gradients and the graph's temporaries);
    token positions run through the model, padding included (what costs), in all and in
    the largest microbatch (what sets the peak)."""
    make_microbatches, loss_and_grad = variant
    batches = []

    def recorded(*args):
        batches.extend(make_microbatches(*args))
        return batches

    mx.clear_cache()
    held = mx.get_active_memory()
    mx.reset_peak_memory()
    start = time.perf_counter()
    with patch.object(trainer, "make_microbatches", recorded):
        value = trainer.loss_and_grads(model, loss_and_grad, cfg, trainer.LossInput(rows, triples),
                                       totals).loss
    took = time.perf_counter() - start
    run = [positions(b) for b in batches]
    return {"loss_s": took, "peak_gb": mx.get_peak_memory() / 1e9,
            "activation_gb": (mx.get_peak_memory() - held) / 1e9, "loss": float(value),
            "positions_run": sum(run), "largest_microbatch_positions": max(run)}


def as_today(loss_and_grad):
    """An older commit's loss step returned (loss, grads): give it today's result."""
    def step(batch):
        out = loss_and_grad(batch)
        if isinstance(out, loss_module.LossAndGrads):
            return out
        return loss_module.LossAndGrads(*out, mx.zeros_like(batch.weights))

    return step


def bench_algo(cfg, task, steps, model, tokenizer, before, names):
    modules = {"shared": loss_module, "before": before}
    variants = {name: (modules[name].make_microbatches,
                       as_today(modules[name].make_loss_and_grad(model, cfg.beta, cfg.compile)))
                for name in names}
    measured = {name: [] for name in variants}
    rollout_s, selected, prompt_tokens, shareable = [], [], [], []
    for step in range(steps + 1):  # step 0 compiles and warms up
        start = time.perf_counter()
        indices = trainer.step_prompt_indices(len(task.train), step, cfg.prompts_per_step,
                                              cfg.seed)
        rolled = trainer.rollout_and_select(model, tokenizer, task, cfg, step, task.train,
                                            indices)
        took = time.perf_counter() - start
        rows, triples, stats = rolled.loss.rows, rolled.loss.selection, rolled.stats
        totals = trainer.StepTotals(
            completions=stats["completions"] + stats["replay_groups"] * cfg.group_size,
            groups=stats["groups"] + stats["replay_groups"], selected=len(triples))
        order = list(reversed(names)) if step % 2 else list(names)
        results = {name: measure(model, variants[name], cfg, rows, triples, totals)
                   for name in order}
        # The same loss both ways (up to float rounding), or the comparison means nothing.
        losses = [r["loss"] for r in results.values()]
        assert max(losses) - min(losses) < 1e-4, results
        if step == 0:
            continue
        rollout_s.append(took)
        selected.append(len(triples))
        prompt_tokens += [len(row.context) for row in rows]
        shared_tokens, run_tokens = shareable_prefix_tokens(rows, triples)
        shareable.append(shared_tokens / run_tokens)
        for name in measured:
            measured[name].append(results[name])
    out = {"rollout_s": float(np.mean(rollout_s)), "selected_tokens": float(np.mean(selected)),
           "mean_context_tokens": float(np.mean(prompt_tokens)),
           "shareable_completion_prefix_share": float(np.mean(shareable))}
    for name, runs in measured.items():
        for key in ("loss_s", "peak_gb", "activation_gb", "positions_run",
                    "largest_microbatch_positions"):
            out[f"{name}_{key}"] = float(np.mean([r[key] for r in runs]))
    if len(names) == 2:
        out["time_shared_vs_before"] = out["shared_loss_s"] / out["before_loss_s"]
        out["memory_shared_vs_before"] = out["shared_peak_gb"] / out["before_peak_gb"]
    return out


def versus_grpo(results):
    """Each algorithm's shared-loss time and activation memory over GRPO's, same run."""
    grpo = results.get("grpo")
    if grpo is None:
        return {}
    return {algo: {"time": r["shared_loss_s"] / grpo["shared_loss_s"],
                   "activation": r["shared_activation_gb"] / grpo["shared_activation_gb"]}
            for algo, r in results.items()}


def model_described(args) -> str:
    if args.model:
        return f"{Path(args.model).name} (float32) on SVAMP's first 32 training questions"
    return (f"a 135M-parameter Qwen2-shaped random model (SmolLM2-135M's dimensions), prompts "
            f"of {args.prompt_tokens[0]}-{args.prompt_tokens[1]} tokens")


def algo_table(results):
    """Header and rows: each algorithm's step with the trainer's (shared-context) loss."""
    ratios = versus_grpo(results)
    header = ["algo", "rollout s", "tokens in loss", "positions run", "largest microbatch",
              "loss+grad s", "peak GB", "activation GB", "time vs GRPO", "activation vs GRPO"]
    rows = []
    for algo, r in results.items():
        vs = ratios.get(algo)
        rows.append([algo, f"{r['rollout_s']:.1f}", f"{r['selected_tokens']:.0f}",
                     f"{r['shared_positions_run']:.0f}",
                     f"{r['shared_largest_microbatch_positions']:.0f}",
                     f"{r['shared_loss_s']:.2f}", f"{r['shared_peak_gb']:.2f}",
                     f"{r['shared_activation_gb']:.2f}",
                     f"{vs['time']:.2f}x" if vs else "", f"{vs['activation']:.2f}x" if vs else ""])
    return header, rows


def before_table(results, commit):
    """Header and rows: today's loss against the loss at `commit`."""
    header = ["algo", f"loss+grad s at {commit}", "loss+grad s", "time now/before",
              f"peak GB at {commit}", "peak GB", "memory now/before"]
    rows = [[algo, f"{r['before_loss_s']:.2f}", f"{r['shared_loss_s']:.2f}",
             f"{r['time_shared_vs_before']:.2f}x", f"{r['before_peak_gb']:.2f}",
             f"{r['shared_peak_gb']:.2f}", f"{r['memory_shared_vs_before']:.2f}x"]
            for algo, r in results.items() if "before_loss_s" in r]
    return header, rows


def write_markdown(path: Path, args, results, weights_gb):
    lines = [
        "# RL step cost per algorithm", "",
        f"`python scripts/bench_step.py {shlex.join(sys.argv[1:])}` (MLX {mx.__version__}, "
        f"OpenBLAS, 2-core Linux CPU, float32; "
        f"{args.conditions}): {model_described(args)}, B={args.prompts_per_step} prompts x "
        f"G={args.group_size}, {args.max_new_tokens} new tokens, LoRA rank 8 on every linear "
        f"layer, microbatch {args.microbatch_rows} rows, default settings otherwise (S-GRPO "
        f"alpha=4 k=24 P=0.75, T-SPMO with 2 replays); mean of {args.steps} steps after a "
        f"warm-up step. Rewards are a fixed pseudo-random 0/1 per completion text, so every "
        f"group carries signal. Peak memory "
        f"includes the model's {weights_gb:.2f} GB of float32 weights; *activation* is the "
        f"loss+grad peak minus the memory held just before the loss (weights, LoRA, optimizer "
        f"state). *Positions run*: token positions the loss's forward runs (contexts once per "
        f"microbatch, then the cropped rows; padding included), in all and in the largest "
        f"microbatch (which sets the peak).", ""]
    lines += markdown_table(*algo_table(results), left=("algo",))
    header, rows = before_table(results, args.before)
    if rows:
        lines += ["", "*shared* (above): each microbatch runs each group's context (prompt, or "
                  "prompt + replayed prefix) once and its rows read it through a KV cache. "
                  f"*at {args.before}*: the loss as it was at that commit (loaded from git"
                  f"{'; every row ran its whole context' if args.before == PER_ROW else ''}), "
                  "in the same trainer loop, alternating with today's. Both give the same loss "
                  "(checked every step).", ""]
        lines += markdown_table(header, rows, left=("algo",))
    share = results.get("t-spmo", {}).get("shareable_completion_prefix_share")
    if share is not None:
        lines += ["", f"T-SPMO: completion tokens that rows of one context share beyond it "
                      f"(a prefix tree over the rows would run them once) are {share:.1%} of "
                      f"the tokens its shared loss runs."]
    path.write_text("\n".join(lines) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2, help="measured steps per algorithm")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, nargs=2, default=[100, 150])
    parser.add_argument("--algos", default=",".join(ALGOS))
    parser.add_argument("--microbatch-rows", type=int, default=8,
                        help="rows per loss microbatch, the same for every algorithm")
    parser.add_argument("--before", default=PER_ROW, help="the commit of the loss to compare "
                        f"with (default {PER_ROW}: every row ran its whole context)")
    parser.add_argument("--variants", default="shared,before",
                        help="shared (the trainer's loss), and before to compare with the loss "
                        "at --before")
    parser.add_argument("--model", help="a real model instead of the random 135M one; its "
                        "prompts are then SVAMP's training questions (the bundled copy)")
    parser.add_argument("--conditions", default="the machine was busy with other runs, so "
                        "times are noisy; variants alternate within each step",
                        help="how quiet the machine was, for the markdown")
    parser.add_argument("--out", default="results/bench_step.json")
    args = parser.parse_args()
    names = args.variants.split(",")
    if "shared" not in names or not set(names) <= {"shared", "before"}:
        parser.error("--variants: shared, optionally with before")
    if args.microbatch_rows < 1:
        parser.error("--microbatch-rows: at least 1")
    console = Console()
    # The loss as it was when every row ran its whole context.
    before = module_at(args.before, "mlx_tokenrl/loss.py") if "before" in names else None
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or build_toy_model(Path(tmp) / "m135", **SHAPE_135M)
        for algo in args.algos.split(","):
            cfg = TrainConfig(model=str(path), algo=algo, steps=100,
                              prompts_per_step=args.prompts_per_step,
                              group_size=args.group_size, max_new_tokens=args.max_new_tokens,
                              microbatch_rows=args.microbatch_rows, out=tmp)
            model, tokenizer = load_model(cfg.model)
            mx.random.seed(0)
            add_lora(model, lora_config(cfg.lora_rank, cfg.lora_scale))
            task = Task("coin", [], [], coin_reward)
            questions = ([e.question for e in load_task("svamp").train[:32]] if args.model else
                         questions_of_length(tokenizer, task, 32, *args.prompt_tokens))
            task.train = [Example(q, "0") for q in questions]
            weights_gb = sum(v.nbytes for _, v in tree_flatten(model.parameters())) / 1e9
            results[algo] = bench_algo(cfg, task, args.steps, model, tokenizer, before, names)
            console.print(algo, results[algo])
            del model

    title = (f"RL step: {model_described(args)}, B={args.prompts_per_step} G={args.group_size}, "
             f"{args.max_new_tokens} new tokens (mean of {args.steps} steps)")
    print_table(console, title, *algo_table(results), left=("algo",))
    if "before" in names:
        print_table(console, f"today's loss vs at {args.before}",
                    *before_table(results, args.before), left=("algo",))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "mlx": mx.__version__, "results": results,
                               "versus_grpo": versus_grpo(results)}, indent=2))
    write_markdown(out.with_suffix(".md"), args, results, weights_gb)
    console.print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
