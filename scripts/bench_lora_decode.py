"""What LoRA layers cost a rollout's decode step, through mlx-lm's `LoRALinear` and through
ours (`cpu_kernels.lora_linear`: the low-rank product added by one addmm).

Random weights with a model's shape, rank-8 adapters on every linear layer (training's
default), B rows decoding from a short prompt in a plain batched KV cache; the three columns
alternate (in reverse order every other repeat) and each keeps its best of --repeats. Prints
a table, writes JSON and markdown.

    python scripts/bench_lora_decode.py --model qwen0.5b --rows 32,64 \\
        --out results/bench_lora_decode_qwen0.5b.json
"""

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

import mlx_tokenrl  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
import mlx_lm
from mlx_lm.tuner.lora import LoRALinear
from rich.console import Console

from mlx_tokenrl import backend, cpu_kernels
from mlx_tokenrl.models import add_lora
from mlx_tokenrl.toy import SHAPE_135M, SHAPE_QWEN_0_5B, build_toy_model

from bench_rollout import decode_seconds
from tables import markdown_table, print_table

SHAPES = {"135m": SHAPE_135M, "qwen0.5b": SHAPE_QWEN_0_5B}
# column key: (its header, the LoRA layer's forward; None: the model without adapters)
COLUMNS = {"plain": ("no LoRA ms", None),
           "mlx_lm": ("mlx-lm's LoRALinear ms", cpu_kernels.MLX_LM_LORA_LINEAR),
           "ours": ("ours ms", cpu_kernels.lora_linear)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen0.5b", choices=list(SHAPES))
    parser.add_argument("--rows", default="32,64")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=24, help="decode steps per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="best of N per column")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--conditions", default="the machine was busy with other runs",
                        help="how quiet the machine was, for the markdown")
    parser.add_argument("--out", default="results/bench_lora_decode.json")
    args = parser.parse_args()
    try:
        row_counts = [int(r) for r in args.rows.split(",")]
    except ValueError:
        parser.error(f"--rows {args.rows}: row counts separated by commas, e.g. 32,64")
    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        path = build_toy_model(Path(tmp) / args.model, **SHAPES[args.model])
        plain, adapted = (mlx_lm.load(str(path))[0] for _ in range(2))
        for model in (plain, adapted):
            model.set_dtype(mx.float32)
            mx.eval(model.parameters())
    add_lora(adapted, {"num_layers": -1, "lora_parameters": {
        "rank": args.lora_rank, "scale": 20.0, "dropout": 0.0}})
    for module in adapted.modules():
        if isinstance(module, LoRALinear):  # mlx-lm starts B at zero: give it a value
            module.lora_b = 0.01 * mx.random.normal(module.lora_b.shape)
    mx.eval(plain.parameters(), adapted.parameters())

    rows_out = []
    for rows in row_counts:
        best = {}
        for repeat in range(args.repeats):
            order = list(COLUMNS)[::-1] if repeat % 2 else list(COLUMNS)
            for key in order:
                forward = COLUMNS[key][1]
                with cpu_kernels.cpu_kernels(plain):  # as in a rollout: SwiGLU, attention too
                    if forward is not None:
                        LoRALinear.__call__ = forward
                    model = plain if forward is None else adapted
                    seconds = decode_seconds(model, rows, args.prompt_tokens,
                                             args.steps) / args.steps
                best[key] = min(best.get(key, float("inf")), seconds)
        rows_out.append({"rows": rows, **{f"{key}_ms": 1e3 * s for key, s in best.items()},
                         "mlx_lm_overhead": best["mlx_lm"] / best["plain"] - 1,
                         "ours_overhead": best["ours"] / best["plain"] - 1,
                         "mlx_lm_vs_ours": best["mlx_lm"] / best["ours"]})
        console.print(rows_out[-1])

    header = ["rows", *(name for name, _ in COLUMNS.values()), "mlx-lm's LoRA overhead",
              "our LoRA overhead", "step time, mlx-lm's / ours"]
    cells = [[str(r["rows"]), *(f"{r[f'{key}_ms']:.1f}" for key in COLUMNS),
              f"{r['mlx_lm_overhead']:.1%}", f"{r['ours_overhead']:.1%}",
              f"{r['mlx_lm_vs_ours']:.2f}x"] for r in rows_out]
    title = (f"Decode step with rank-{args.lora_rank} LoRA on every linear layer, "
             f"{args.model} shape (float32, MLX {mx.__version__})")
    print_table(console, title, header, cells)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "openblas": backend.openblas_path,
                               "mlx": mx.__version__, "rows": rows_out}, indent=2))
    command = shlex.join(["python", *sys.argv])
    out.with_suffix(".md").write_text("\n".join([
        f"# {title}\n", f"`{command}`\n",
        f"Conditions: {args.conditions}. Random weights, {args.prompt_tokens}-token prompt, "
        f"mean of {args.steps} decode steps, best of {args.repeats} alternating repeats; the "
        f"rollout's other CPU kernels (SwiGLU, attention) in place for every column.\n",
        *markdown_table(header, cells)]) + "\n")
    console.print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
