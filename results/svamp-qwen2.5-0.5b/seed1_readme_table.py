"""Write the seed-1 block of README's SVAMP results from the finished runs (issue 14)."""
import json
import statistics
from pathlib import Path

from mlx_tokenrl.compare import paired, read_records

R, S = Path("/work/runs/svamp-qwen-compare"), Path("/work/runs/svamp-qwen-compare-seed1")
README = Path("/work/main/README.md")


def arm(root, name):
    final = json.loads((root / name / "final_eval.json").read_text())
    rows = [json.loads(l) for l in (root / name / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return dict(final=final, rows=rows, records=read_records(root / name))


base = read_records(R / "base")
seed0 = {n: arm(R, n) for n in ("grpo", "t-spmo")}
seed1 = {n: arm(S, n) for n in ("grpo", "t-spmo")}
base_acc = json.loads((R / "base" / "final_eval.json").read_text())["accuracy"]


def pct(x):
    return f"{x * 100:.1f}%"


lines = ["| arm | seed 0 | seed 1 (95% CI) | vs base, seed 1 | fixed / broke vs base, seed 1 (p) | "
         "test[:100] at steps 5/10/15/20, seed 1 | tokens in loss / step | median step s | "
         "training s | loss+grad peak GB | mean of the two seeds |",
         "|---|---:|---|---:|---|---|---:|---:|---:|---:|---:|"]
for name, a in seed1.items():
    f, rows = a["final"], a["rows"]
    low, high = f["ci95"]
    p = paired(base, a["records"])
    curve = " / ".join(f"{r['eval_accuracy'] * 100:.0f}" for r in rows if "eval_accuracy" in r)
    mean = (seed0[name]["final"]["accuracy"] + f["accuracy"]) / 2
    lines.append(
        f"| {name} | {pct(seed0[name]['final']['accuracy'])} | {pct(f['accuracy'])} "
        f"({low * 100:.1f}-{high * 100:.1f}%) | {(f['accuracy'] - base_acc) * 100:+.1f} pts | "
        f"{p['fixed']} / {p['broke']} ({p['p']:.2g}) | {curve}% | "
        f"{statistics.mean(r['selected_tokens'] for r in rows):,.0f} | "
        f"{statistics.median(r['step_s'] for r in rows):.1f} | "
        f"{sum(r['step_s'] for r in rows):,.0f} | "
        f"{max(r['loss_peak_memory_gb'] for r in rows):.2f} | {pct(mean)} |")
g0g1 = paired(seed0["grpo"]["records"], seed1["grpo"]["records"])
t0t1 = paired(seed0["t-spmo"]["records"], seed1["t-spmo"]["records"])
tg1 = paired(seed1["grpo"]["records"], seed1["t-spmo"]["records"])
print("\n".join(lines))
print("grpo s0 vs s1", g0g1, "t-spmo s0 vs s1", t0t1, "t-spmo vs grpo s1", tg1)
for n in seed1:
    recs = seed1[n]["records"]
    print(n, "test[100:]", statistics.mean(r["correct"] for r in recs[100:]),
          "tokens", statistics.mean(r["tokens"] for r in recs),
          "format", seed1[n]["final"]["format_rate"], "trunc", seed1[n]["final"]["truncation_rate"],
          "signal", statistics.mean(r["signal_fraction"] for r in seed1[n]["rows"]),
          "generated", statistics.mean(r["generated_tokens"] for r in seed1[n]["rows"]))
Path("/work/runs/seed1_table.md").write_text("\n".join(lines) + "\n")
