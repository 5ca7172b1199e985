"""What several updates per rollout batch cost: per algorithm x --updates-per-rollout, the
trainer's own step (`trainer.run_step`): rollout time, the first update's loss+grad, each later
update's loss+grad, the whole step, peak memory, and how far the later updates moved the
policy (clipped fraction, largest ratio, approximate KL).

Each (algorithm, N) runs one warm-up step (it compiles), then goes back to the same LoRA
weights for `--steps` measured steps: step 1's rollouts are the same for every N. Rewards are a fixed pseudo-random 0/1 per completion text
(bench_step's), so every group carries signal and T-SPMO replays. A random 135M-parameter
Qwen2-shaped model by default, or `--model` a real one on SVAMP's questions.

    python scripts/bench_updates.py --model /work/models/smollm2-135m \
        --out results/bench_updates_smollm2.json
"""

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

import mlx_tokenrl  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
import numpy as np
from rich.console import Console

from mlx_tokenrl import trainer
from mlx_tokenrl.config import ALGOS, TrainConfig
from mlx_tokenrl.distributed import World
from mlx_tokenrl.loss import ClipRange, make_loss_and_grad
from mlx_tokenrl.models import add_lora, load_model, lora_config
from mlx_tokenrl.tasks import Example, Task, load_task
from mlx_tokenrl.toy import SHAPE_135M, build_toy_model

from bench_step import coin_reward, questions_of_length
from tables import markdown_table, print_table


def bench(model, tokenizer, task, cfg, steps, start):
    """Mean over `steps` measured steps of the trainer's metrics, after a warm-up step (it
    compiles) whose update is undone: every N then trains from the adapter `start` on the
    same rollouts of step 1."""
    loss_and_grad = make_loss_and_grad(model, cfg.beta, cfg.compile,
                                       ClipRange(cfg.clip_epsilon, cfg.clip_high))
    trainer.run_step(model, tokenizer, task, cfg, World(), trainer.make_optimizer(cfg),
                     loss_and_grad, 0)
    model.update(start)
    optimizer = trainer.make_optimizer(cfg)
    runs = [trainer.run_step(model, tokenizer, task, cfg, World(), optimizer, loss_and_grad, step)
            for step in range(1, steps + 1)]
    later = max(cfg.updates_per_rollout - 1, 1)
    mean = {key: float(np.mean([m[key] for m in runs]))
            for key in ("rollout_s", "loss_s", "step_s", "peak_memory_gb", "loss_peak_memory_gb",
                        "selected_tokens", "clip_fraction", "approx_kl", "ratio_max")}
    mean["updates_applied"] = float(np.mean([m["updates"] for m in runs]))
    mean["later_update_s"] = float(np.mean([m["more_updates_s"] for m in runs])) / later
    return mean


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a real model (SVAMP prompts) instead of a random 135M")
    parser.add_argument("--algos", default=",".join(ALGOS))
    parser.add_argument("--updates", default="1,2,4")
    parser.add_argument("--steps", type=int, default=1, help="measured steps per setting")
    parser.add_argument("--prompts-per-step", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--microbatch-rows", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--conditions", default="a 2-core machine shared with other agents' "
                        "test runs: times are noisy; compare within one run")
    parser.add_argument("--out", default="results/bench_updates.json")
    args = parser.parse_args()
    console = Console(width=200)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or build_toy_model(Path(tmp) / "m135", **SHAPE_135M)
        model, tokenizer = load_model(str(path))
        mx.random.seed(0)
        add_lora(model, lora_config(8, 20.0))
        start = model.trainable_parameters()
        task = Task("coin", [], [], coin_reward)
        questions = ([e.question for e in load_task("svamp").train[:32]] if args.model else
                     questions_of_length(tokenizer, task, 32, 100, 150))
        task.train = [Example(q, "0") for q in questions]
        for algo in args.algos.split(","):
            for updates in map(int, args.updates.split(",")):
                cfg = TrainConfig(model=str(path), algo=algo, steps=100, lr=args.lr,
                                  prompts_per_step=args.prompts_per_step,
                                  group_size=args.group_size, max_new_tokens=args.max_new_tokens,
                                  microbatch_rows=args.microbatch_rows, out=tmp,
                                  updates_per_rollout=updates)
                row = {"algo": algo, "updates": updates,
                       **bench(model, tokenizer, task, cfg, args.steps, start)}
                console.print(row)
                results.append(row)
    grpo_step = next((r["step_s"] for r in results if r["algo"] == "grpo" and r["updates"] == 1),
                     None)
    header = ["algo", "N", "rollout s", "1st loss+grad s", "later update s", "step s",
              "step / GRPO N=1", "peak GB", "tokens in loss", "clipped", "max ratio", "KL"]
    cells = [[r["algo"], str(r["updates"]), f"{r['rollout_s']:.1f}", f"{r['loss_s']:.2f}",
              f"{r['later_update_s']:.2f}" if r["updates"] > 1 else "",
              f"{r['step_s']:.1f}", f"{r['step_s'] / grpo_step:.2f}x" if grpo_step else "",
              f"{r['peak_memory_gb']:.2f}", f"{r['selected_tokens']:.0f}",
              f"{r['clip_fraction']:.1%}", f"{r['ratio_max']:.3f}", f"{r['approx_kl']:.1e}"]
             for r in results]
    model_name = Path(args.model).name if args.model else "random 135M (SmolLM2's shape)"
    title = (f"Updates per rollout batch: {model_name}, B={args.prompts_per_step} "
             f"G={args.group_size}, {args.max_new_tokens} new tokens, microbatch "
             f"{args.microbatch_rows} rows, mean of {args.steps} step(s) after a warm-up")
    print_table(console, title, header, cells, left=("algo",))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "mlx": mx.__version__, "results": results},
                              indent=2))
    command = f"python scripts/bench_updates.py {shlex.join(sys.argv[1:])}"
    lines = [f"# {title}", "", f"`{command}` (MLX {mx.__version__}, float32 on CPU; "
             f"{args.conditions}). *later update s*: the forward and backward of each update "
             f"after the first (they reuse the step's microbatches); *clipped*, *max ratio*, "
             f"*KL*: over the later updates' selected tokens.", ""]
    lines += markdown_table(header, cells, left=("algo",))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    console.print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
