"""The paired counts docs/results.md quotes beyond table.py's: top-entropy against GRPO on
each half of the test split (test[:100], which the in-training curves score, and
test[100:300]), and the equal-steps arm against GRPO, the base and the 29-step arm.

    python results/svamp-qwen2.5-0.5b/equal-time/pairs.py   (writes pairs.md beside it)
"""

from pathlib import Path

from mlx_tokenrl.compare import head_to_head_table, paired, read_records

HERE = Path(__file__).resolve().parent
RUNS = {"base": HERE.parent / "compare" / "base",
        "GRPO, seed 0": HERE.parent / "compare" / "grpo",
        "GRPO, seed 1": HERE.parent / "compare-seed1" / "grpo",
        "top-entropy, seed 0": HERE / "seed0" / "top-entropy",
        "top-entropy, seed 1": HERE / "seed1" / "top-entropy",
        "top-entropy, 20 steps, seed 0": HERE / "equal-steps" / "top-entropy"}
HALVES = {"test[:100]": slice(0, 100), "test[100:300]": slice(100, 300)}


def pair(arm: str, against: str, records: dict, part: str = "all 300") -> dict:
    cut = HALVES.get(part, slice(None))
    return {"arm": f"{arm} ({part})", "against": against,
            **paired(records[against][cut], records[arm][cut])}


def main():
    records = {name: read_records(run) for name, run in RUNS.items()}
    pairs = [pair(f"top-entropy, seed {seed}", f"GRPO, seed {seed}", records, part)
             for seed in (0, 1) for part in HALVES]
    equal_steps = "top-entropy, 20 steps, seed 0"
    pairs += [pair(equal_steps, against, records)
              for against in ("GRPO, seed 0", "base", "top-entropy, seed 0")]
    pairs += [pair(equal_steps, "GRPO, seed 0", records, part) for part in HALVES]
    (HERE / "pairs.md").write_text(head_to_head_table(pairs).lstrip())
    print((HERE / "pairs.md").read_text())


if __name__ == "__main__":
    main()
