"""Per-algorithm RL step cost: rollout / loss+grad / update time and loss+grad peak memory.

Runs the trainer's own step (`trainer.run_step`) on a 135M-parameter Qwen2-shaped random
model, B=2 prompts x G=8 completions, 128 new tokens, LoRA rank 8 on every layer. The
random model cannot solve anything, so rewards are a fixed pseudo-random 0/1 per completion
text: every group carries signal and every algorithm gets the same rollouts.

    python scripts/bench_step.py --out results/bench_step.json
"""

import argparse
import hashlib
import json
import tempfile
from pathlib import Path

import mlx_tokenrl  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
import numpy as np
from rich.console import Console
from rich.table import Table

from mlx_tokenrl import trainer
from mlx_tokenrl.config import ALGOS, TrainConfig
from mlx_tokenrl.loss import make_loss_and_grad
from mlx_tokenrl.tasks import Example, Task
from mlx_tokenrl.toy import SHAPE_135M, build_toy_model


def coin_reward(text: str, answer: str) -> float:
    return float(hashlib.sha256(text.encode()).digest()[0] % 2)


def bench_algo(cfg, task, steps, model, tokenizer):
    optimizer = trainer.make_optimizer(cfg)
    loss_and_grad = make_loss_and_grad(model, cfg.beta, cfg.compile)
    world = mx.distributed.init()
    # Step 0 compiles and warms up; the rest are measured.
    rows = [trainer.run_step(model, tokenizer, task, cfg, world, optimizer, loss_and_grad, s)
            for s in range(steps + 1)][1:]
    keys = ("rollout_s", "loss_s", "update_s", "step_s", "loss_peak_memory_gb",
            "selected_tokens", "generated_tokens")
    return {k: float(np.mean([r[k] for r in rows])) for k in keys}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="measured steps per algorithm")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--prompts-per-step", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--out", default="results/bench_step.json")
    args = parser.parse_args()
    console = Console()
    questions = [f"what is {i} times {i + 3} ? think step by step" for i in range(32)]
    task = Task("coin", [Example(q, "0") for q in questions], [], coin_reward)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = build_toy_model(Path(tmp) / "m135", **SHAPE_135M)
        for algo in ALGOS:
            cfg = TrainConfig(model=str(path), algo=algo, steps=100,
                                      prompts_per_step=args.prompts_per_step,
                                      group_size=args.group_size,
                                      max_new_tokens=args.max_new_tokens, out=tmp)
            model, tokenizer = mlx_tokenrl.models.load_model(cfg.model)
            mx.random.seed(0)
            mlx_tokenrl.models.add_lora(model, mlx_tokenrl.models.lora_config(cfg.lora_rank, cfg.lora_scale))
            results[algo] = bench_algo(cfg, task, args.steps, model, tokenizer)
            console.print(algo, results[algo])
            del model

    grpo = results["grpo"]
    table = Table(title=f"RL step, 135M Qwen2-shaped, B={args.prompts_per_step} G={args.group_size}, "
                        f"{args.max_new_tokens} new tokens (mean of {args.steps} steps)")
    for col in ("algo", "rollout s", "loss+grad s", "update s", "loss+grad peak GB",
                "tokens in loss", "loss+grad time vs GRPO", "peak memory vs GRPO"):
        table.add_column(col, justify="right")
    for algo, r in results.items():
        r["loss_time_vs_grpo"] = r["loss_s"] / grpo["loss_s"]
        r["loss_memory_vs_grpo"] = r["loss_peak_memory_gb"] / grpo["loss_peak_memory_gb"]
        table.add_row(algo, f"{r['rollout_s']:.2f}", f"{r['loss_s']:.2f}", f"{r['update_s']:.3f}",
                      f"{r['loss_peak_memory_gb']:.2f}", f"{r['selected_tokens']:.0f}",
                      f"{r['loss_time_vs_grpo']:.2f}x", f"{r['loss_memory_vs_grpo']:.2f}x")
    console.print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "mlx": mx.__version__, "results": results}, indent=2))
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
