"""Rollout throughput: ours vs mlx_lm.batch_generate vs the bare decode-step forward.

For each B x G shape, all three columns are measured side by side in one run on the same
model and prompts (machines here are shared: compare ratios, not absolute numbers across
runs). The ceiling is the model's forward for one decode step with B*G rows in a plain
batched KV cache: no sampling, no bookkeeping.

    python scripts/bench_rollout.py --out results/bench_rollout.json
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import mlx_tokenrl  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
import mlx_lm
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_sampler
from rich.console import Console
from rich.table import Table

from mlx_tokenrl import backend
from mlx_tokenrl.rollout import SamplingParams, generate_tokens
from mlx_tokenrl.toy import SHAPE_135M, build_toy_model

QUESTIONS = [
    "what is 12 times 7 ? think step by step",
    "he had 5 apples and gave 2 . how many are left ?",
    "there are 31 birds , 4 left . how many are there ?",
    "what is 408 plus 17 , then minus 9 ?",
    "she bought 3 each of 12 total . how many more ?",
    "the total of 9 and 90 is what number ?",
    "they were 44 and 7 more came . how many ?",
    "what is the final answer of 6 times 6 ?",
]


def timed(fn):
    mx.synchronize()
    start = time.perf_counter()
    result = fn()
    mx.synchronize()
    return result, time.perf_counter() - start


def ours(model, tokenizer, prompts, group, params):
    produced, _ = generate_tokens(model, prompts, group, params,
                                  set(tokenizer.eos_token_ids), seeds=range(len(prompts)))
    return sum(len(t) for t in produced)


def mlx_lm_batch(model, tokenizer, prompts, group, params):
    rows = [p for p in prompts for _ in range(group)]
    response = mlx_lm.batch_generate(
        model, tokenizer, rows, max_tokens=params.max_new_tokens,
        sampler=make_sampler(temp=params.temperature),
        completion_batch_size=len(rows), prefill_batch_size=len(rows),
        return_token_ids=True)
    return sum(len(t) for t in response.token_ids)


def ceiling(model, prompts, group, params):
    """Time only decode steps of a plain batched forward: the prefill is not part of it."""
    rows = len(prompts) * group
    cache = make_prompt_cache(model)
    mx.eval(model(mx.zeros((rows, max(len(p) for p in prompts)), dtype=mx.int32), cache=cache))
    step = mx.zeros((rows, 1), dtype=mx.int32)
    mx.synchronize()
    start = time.perf_counter()
    for _ in range(params.max_new_tokens):
        mx.eval(model(step, cache=cache))
    return rows * params.max_new_tokens, time.perf_counter() - start


def bench_model(name, path, shapes, params, repeats, console):
    model, tokenizer = mlx_lm.load(str(path))
    model.set_dtype(mx.float32)
    prompt_tokens = [tokenizer.encode(tokenizer.apply_chat_template(
        [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False),
        add_special_tokens=False) for q in QUESTIONS]
    ours(model, tokenizer, prompt_tokens[:1], 2, SamplingParams(0.6, 1.0, 4))  # warm-up
    rows = []
    for shape in shapes:
        batch, group = (int(x) for x in shape.split("x"))
        prompts = prompt_tokens[:batch]
        row = {"model": name, "shape": shape, "sequences": batch * group}
        # Columns interleaved, best of `repeats`: a shared machine's noise hits all alike.
        for _ in range(repeats):
            for column, fn in (("ours", ours), ("batch_generate", mlx_lm_batch)):
                tokens, seconds = timed(lambda: fn(model, tokenizer, prompts, group, params))
                best = max(row.get(f"{column}_tok_s", 0.0), tokens / seconds)
                row[f"{column}_tok_s"], row[f"{column}_tokens"] = best, tokens
            tokens, seconds = ceiling(model, prompts, group, params)
            row["ceiling_tok_s"] = max(row.get("ceiling_tok_s", 0.0), tokens / seconds)
        row["ours_vs_ceiling"] = row["ours_tok_s"] / row["ceiling_tok_s"]
        row["ours_vs_batch_generate"] = row["ours_tok_s"] / row["batch_generate_tok_s"]
        console.print(row)
        rows.append(row)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,135m")
    parser.add_argument("--shapes", default="1x8,2x8,4x8,8x8")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--repeats", type=int, default=2, help="best of N per column")
    parser.add_argument("--out", default="results/bench_rollout.json")
    args = parser.parse_args()
    console = Console()
    params = SamplingParams(args.temperature, 1.0, args.max_new_tokens)
    shapes = args.shapes.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            overrides = SHAPE_135M if name == "135m" else {}
            path = build_toy_model(Path(tmp) / name, **overrides)
            rows += bench_model(name, path, shapes, params, args.repeats, console)

    table = Table(title=f"Rollout tokens/s ({args.max_new_tokens} new tokens, "
                        f"T={args.temperature}, OpenBLAS={'yes' if backend.openblas_path else 'no'})")
    for col in ("model", "B x G", "ours", "batch_generate", "ceiling", "ours/ceiling",
                "ours/batch_generate"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["model"], r["shape"], f"{r['ours_tok_s']:.0f}",
                      f"{r['batch_generate_tok_s']:.0f}", f"{r['ceiling_tok_s']:.0f}",
                      f"{r['ours_vs_ceiling']:.2f}", f"{r['ours_vs_batch_generate']:.2f}")
    console.print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "openblas": backend.openblas_path,
                               "mlx": mx.__version__, "rows": rows}, indent=2))
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
