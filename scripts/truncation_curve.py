"""How a smaller --max-new-tokens would have truncated a greedy evaluation.

Greedy decoding with a smaller budget gives a prefix of the same completion, so one `eval`
with a generous budget answers for every smaller one: the share of answers a budget cuts
short, and the accuracy that remains counting only answers that end within it (a lower
bound: a cut answer may still end in the right number). Prints a table, writes JSON.

    python scripts/truncation_curve.py RUN/eval-svamp-test/examples.jsonl --out truncation.json
"""

import argparse
import json
from pathlib import Path

from rich.console import Console

from tables import print_table


def curve(records, budgets):
    n = len(records)
    return [{"max_new_tokens": b,
             "truncated": sum(r["tokens"] >= b for r in records) / n,
             "accuracy_lower_bound": sum(r["correct"] and r["tokens"] < b for r in records) / n}
            for b in budgets]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("examples", type=Path, help="examples.jsonl written by tokenrl-mlx eval")
    parser.add_argument("--budgets", default="128,192,256,300,350,400")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    records = [json.loads(line) for line in args.examples.read_text().splitlines() if line]
    rows = curve(records, [int(b) for b in args.budgets.split(",")])
    print_table(Console(), f"{args.examples} ({len(records)} answers)",
                ["max new tokens", "truncated", "accuracy (lower bound)"],
                [[str(r["max_new_tokens"]), f"{r['truncated']:.1%}",
                  f"{r['accuracy_lower_bound']:.1%}"] for r in rows])
    if args.out:
        args.out.write_text(json.dumps({"examples": str(args.examples), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
