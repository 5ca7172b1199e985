"""What recording each token's log-prob and entropy during the rollout costs (`--algo
top-entropy` asks for them; the other algorithms do not): the rollout with and without
`token_stats`, interleaved, best of `--repeats`, on the same prompts and seeds (both sample
the same tokens), and the stats' own cost per decode step on (rows, vocab) logits.

    python scripts/bench_token_stats.py --model /work/models/smollm2-135m \
        --out results/bench_token_stats_smollm2.json
"""

import argparse
import json
import shlex
import sys
from pathlib import Path

import mlx_tokenrl  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
from rich.console import Console

from mlx_tokenrl.models import load_model
from mlx_tokenrl.rollout import SamplingParams, encode_prompts, rollout
from mlx_tokenrl.sampling import token_stats
from mlx_tokenrl.tasks import load_task

from bench_rollout import timed
from tables import markdown_table, print_table


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--shapes", default="2x8,4x8")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--conditions", default="a 2-core machine shared with other agents' "
                        "test runs: times are noisy; the two columns alternate")
    parser.add_argument("--out", default="results/bench_token_stats.json")
    args = parser.parse_args()
    console = Console(width=160)
    model, tokenizer = load_model(args.model)
    task = load_task("svamp")
    params = SamplingParams(0.6, 1.0, args.max_new_tokens)
    rows = []
    for shape in args.shapes.split(","):
        batch, group = (int(x) for x in shape.split("x"))
        prompts = encode_prompts(tokenizer, [task.prompt(tokenizer, e.question)
                                             for e in task.train[:batch]])
        seeds = list(range(batch))
        best = {False: float("inf"), True: float("inf")}
        tokens = {}
        rollout(model, tokenizer, prompts, group, params, seeds)  # warm-up
        for _ in range(args.repeats):
            for stats in (False, True):
                out, seconds = timed(lambda: rollout(model, tokenizer, prompts, group, params,
                                                     seeds, token_stats=stats))
                best[stats] = min(best[stats], seconds)
                tokens[stats] = [c.tokens for c in out]
        assert tokens[False] == tokens[True]  # recording changes nothing sampled
        logits = mx.random.normal((batch * group, model.args.vocab_size)) * 3
        sampled = mx.zeros((batch * group,), dtype=mx.int32)
        mx.eval(logits)
        stats_ms = min(timed(lambda: mx.eval(token_stats(logits, sampled)))[1]
                       for _ in range(5)) * 1e3
        generated = sum(len(t) for t in tokens[True])
        rows.append({"shape": shape, "rollout_s": best[False], "with_stats_s": best[True],
                     "overhead": best[True] / best[False] - 1, "stats_ms_per_step": stats_ms,
                     "generated_tokens": generated})
        console.print(rows[-1])
    name = Path(args.model).name
    title = (f"Recording log-probs and entropies in the rollout: {name}, "
             f"{args.max_new_tokens} new tokens, best of {args.repeats}")
    header = ["B x G", "rollout s", "with token stats s", "overhead", "stats ms / step"]
    cells = [[r["shape"], f"{r['rollout_s']:.2f}", f"{r['with_stats_s']:.2f}",
              f"{r['overhead']:+.1%}", f"{r['stats_ms_per_step']:.1f}"] for r in rows]
    print_table(console, title, header, cells)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "mlx": mx.__version__, "rows": rows}, indent=2))
    command = f"python scripts/bench_token_stats.py {shlex.join(sys.argv[1:])}"
    lines = [f"# {title}", "", f"`{command}` (MLX {mx.__version__}, float32 on CPU; "
             f"{args.conditions}).", ""] + markdown_table(header, cells)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    console.print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
