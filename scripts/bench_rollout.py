"""Rollout throughput: ours (today's, and as it was at BEFORE) vs mlx_lm.batch_generate vs
the bare decode-step forward vs the physical limit of this machine.

For each B x G shape, every column is measured side by side in one run on the same model and
prompts (machines here are shared: compare ratios, not absolute numbers across runs).
"ours, mlx-lm's ops" is today's rollout without the CPU kernels (`cpu_kernels.py`: SwiGLU
and attention from cheap ops), so the last column is what they buy.
"forward only" is the model's forward for one decode step with B*G rows in a plain batched
KV cache: no sampling, no bookkeeping. The limit comes from two probes in the same run: the
best fp32 GEMM rate over the model's own weight shapes at B*G rows, and the weight-read
bandwidth of a one-row product with the largest weight (the LM head); a decode step cannot
take less than its matmul FLOPs at that rate, nor less than reading every weight once. It is a
limit for decode steps at this BLAS thread count, at the average context (KV-cache reads, ~4%
of the bytes at 32 rows, left out), while "ours" also includes the prefill: a generous limit.

    python scripts/bench_rollout.py --models qwen0.5b --shapes 4x8,8x8 \
        --out results/bench_rollout_qwen0.5b.json
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from unittest.mock import patch

import mlx_tokenrl  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
import mlx_lm
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_sampler
from rich.console import Console

from mlx.utils import tree_flatten

from mlx_tokenrl import backend, cpu_kernels
from mlx_tokenrl.rollout import SamplingParams, generate_tokens
from mlx_tokenrl.sampling import row_keys, sample_tokens
from mlx_tokenrl.toy import SHAPE_135M, SHAPE_QWEN_0_5B, build_toy_model

from before import module_at
from tables import markdown_table, print_table

SHAPES = {"tiny": {}, "135m": SHAPE_135M, "qwen0.5b": SHAPE_QWEN_0_5B}
BEFORE = "0daf49e"  # the last commit that sampled by Gumbel-max
ROLLOUT_BEFORE = module_at(BEFORE, "mlx_tokenrl/rollout.py")

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


def ours(model, tokenizer, prompts, group, params, generate=generate_tokens):
    out = generate(model, prompts, group, params, set(tokenizer.eos_token_ids),
                   seeds=range(len(prompts)))
    produced = out.tokens if hasattr(out, "tokens") else out[0]  # (BEFORE's: a tuple)
    return sum(len(t) for t in produced)


def ours_before(model, tokenizer, prompts, group, params):
    """Our rollout as it was at BEFORE (Gumbel-max sampling in MLX)."""
    return ours(model, tokenizer, prompts, group, params, ROLLOUT_BEFORE.generate_tokens)


def ours_without_kernels(model, tokenizer, prompts, group, params):
    """Today's rollout with mlx-lm's own SwiGLU and attention (no CPU kernel swapped in)."""
    with patch.dict(cpu_kernels.SWAPS, clear=True):
        return ours(model, tokenizer, prompts, group, params)


def mlx_lm_batch(model, tokenizer, prompts, group, params):
    rows = [p for p in prompts for _ in range(group)]
    response = mlx_lm.batch_generate(
        model, tokenizer, rows, max_tokens=params.max_new_tokens,
        sampler=make_sampler(temp=params.temperature),
        completion_batch_size=len(rows), prefill_batch_size=len(rows),
        return_token_ids=True)
    return sum(len(t) for t in response.token_ids)


def forward_only(model, prompts, group, params):
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


def best_time(fn, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        _, seconds = timed(fn)
        best = min(best, seconds)
    return best


def weight_shapes(model):
    """(out, in) of every weight a decode step multiplies by, with its count: each layer's
    matrices, and the output head (the embedding matrix when tied)."""
    counts = {}
    for name, weight in tree_flatten(model.parameters()):
        if weight.ndim == 2 and "embed_tokens" not in name:
            counts[weight.shape] = counts.get(weight.shape, 0) + 1
    if model.args.tie_word_embeddings:
        head = model.model.embed_tokens.weight.shape
        counts[head] = counts.get(head, 0) + 1
    return counts


def physical_limit(model, rows: int, context: int) -> dict:
    """Seconds per decode step at `rows` rows and an average `context` length, from a GEMM
    probe and a bandwidth probe run now, with what each gives."""
    shapes = weight_shapes(model)
    args = model.args
    head_dim = args.hidden_size // args.num_attention_heads
    attention_flops = (4 * rows * context * args.num_attention_heads * head_dim
                       * args.num_hidden_layers)
    matmul_flops = sum(2 * rows * o * i * n for (o, i), n in shapes.items())
    weight_bytes = sum(4 * o * i * n for (o, i), n in shapes.items())
    rates = []
    for out_dim, in_dim in shapes:
        x, w = mx.random.normal((rows, in_dim)), mx.random.normal((in_dim, out_dim))
        mx.eval(x, w)
        rates.append(2 * rows * in_dim * out_dim / best_time(lambda: mx.eval(x @ w)))
    out_dim, in_dim = max(shapes, key=lambda s: s[0] * s[1])
    x, w = mx.random.normal((1, in_dim)), mx.random.normal((in_dim, out_dim))
    mx.eval(x, w)
    bandwidth = 4 * in_dim * out_dim / best_time(lambda: mx.eval(x @ w))
    compute_s = (matmul_flops + attention_flops) / max(rates)
    read_s = weight_bytes / bandwidth
    return {"gemm_gflops": max(rates) / 1e9, "read_gb_s": bandwidth / 1e9,
            "compute_ms": compute_s * 1e3, "read_ms": read_s * 1e3,
            "limit_tok_s": rows / max(compute_s, read_s)}


def sampling_ms(vocab: int, rows: int, temperature: float) -> float:
    """One step of our sampler on (rows, vocab) logits."""
    logits = mx.random.normal((rows, vocab)) * 3
    keys = row_keys(range(rows), 1)
    mx.eval(logits, keys)
    return 1e3 * best_time(lambda: mx.eval(sample_tokens(logits, keys, temperature)))


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
        sequences = batch * group
        row = {"model": name, "shape": shape, "sequences": sequences}
        # Columns interleaved, best of `repeats`: a shared machine's noise hits all alike.
        for _ in range(repeats):
            for column, fn in (("ours", ours), ("ours_before", ours_before),
                               ("ours_without_kernels", ours_without_kernels),
                               ("batch_generate", mlx_lm_batch)):
                tokens, seconds = timed(lambda: fn(model, tokenizer, prompts, group, params))
                best = max(row.get(f"{column}_tok_s", 0.0), tokens / seconds)
                row[f"{column}_tok_s"], row[f"{column}_tokens"] = best, tokens
            tokens, seconds = forward_only(model, prompts, group, params)
            row["forward_tok_s"] = max(row.get("forward_tok_s", 0.0), tokens / seconds)
        context = (sum(len(p) for p in prompts) / batch) + params.max_new_tokens / 2
        row.update(physical_limit(model, sequences, int(context)))
        row["sampling_ms"] = sampling_ms(model.args.vocab_size, sequences, params.temperature)
        row["forward_ms"] = 1e3 * sequences / row["forward_tok_s"]
        row["ours_vs_limit"] = row["ours_tok_s"] / row["limit_tok_s"]
        row["ours_vs_forward"] = row["ours_tok_s"] / row["forward_tok_s"]
        row["ours_vs_batch_generate"] = row["ours_tok_s"] / row["batch_generate_tok_s"]
        row["ours_vs_before"] = row["ours_tok_s"] / row["ours_before_tok_s"]
        row["kernels_gain"] = row["ours_tok_s"] / row["ours_without_kernels_tok_s"]
        console.print(row)
        rows.append(row)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,135m", help=", ".join(SHAPES))
    parser.add_argument("--shapes", default="1x8,2x8,4x8,8x8")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--repeats", type=int, default=2, help="best of N per column")
    parser.add_argument("--out", default="results/bench_rollout.json")
    args = parser.parse_args()
    console = Console(width=200)
    params = SamplingParams(args.temperature, 1.0, args.max_new_tokens)
    shapes = args.shapes.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            path = build_toy_model(Path(tmp) / name, **SHAPES[name])
            rows += bench_model(name, path, shapes, params, args.repeats, console)

    title = (f"Rollout tokens/s ({args.max_new_tokens} new tokens, T={args.temperature}, "
             f"OpenBLAS={'yes' if backend.openblas_path else 'no'}, MLX {mx.__version__})")
    header = ["model", "B x G", "ours", f"ours at {BEFORE}", "ours, mlx-lm's ops",
              "batch_generate", "forward only",
              "limit", "ours/limit", "ours/forward", "ours/batch_generate", "forward ms/step",
              "sampling ms/step", "GEMM GFLOP/s", "read GB/s", "kernels' gain"]
    cells = [[r["model"], r["shape"], f"{r['ours_tok_s']:.0f}", f"{r['ours_before_tok_s']:.0f}",
              f"{r['ours_without_kernels_tok_s']:.0f}",
              f"{r['batch_generate_tok_s']:.0f}",
              f"{r['forward_tok_s']:.0f}", f"{r['limit_tok_s']:.0f}", f"{r['ours_vs_limit']:.2f}",
              f"{r['ours_vs_forward']:.2f}", f"{r['ours_vs_batch_generate']:.2f}",
              f"{r['forward_ms']:.0f}", f"{r['sampling_ms']:.1f}", f"{r['gemm_gflops']:.0f}",
              f"{r['read_gb_s']:.1f}", f"{r['kernels_gain']:.2f}x"] for r in rows]
    print_table(console, title, header, cells, left=("model",))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "openblas": backend.openblas_path,
                               "mlx": mx.__version__, "rows": rows}, indent=2))
    command = " ".join(["python", *sys.argv])
    markdown = [f"{title}\n", f"`{command}`\n", *markdown_table(header, cells, left=("model",))]
    out.with_suffix(".md").write_text("\n".join(markdown) + "\n")
    console.print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
