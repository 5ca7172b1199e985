"""What one training step takes: the process's resident peak (the OS's count, `wait4`'s
ru_maxrss of the child that ran it) beside what the run reported (metrics.jsonl), and the
time to the end of the first step, with the loss's rows planned (default --max-memory) or
fixed (--microbatch-rows), by the code of two commits (--after, --before; each checked out in a
temporary git worktree).

Each run is `tokenrl-mlx train ... --steps 1` in a child process of its own, the cases one
after the other (never two at once: the peaks are the point):
- quickstart: the README quick start's first step on SmolLM2-135M-Instruct (multiply 2x1,
  T-SPMO, 4x8, 96 new tokens);
- svamp-0.5b: one SVAMP step of 2x4x128 with `train svamp`'s other defaults (T-SPMO) on
  Qwen2.5-Coder-0.5B-Instruct.
The start-up check `check_selected_logprobs` is skipped in every child (--skip-logprob-check),
since on some CPUs it refuses SmolLM2 by float rounding; the rest of the run is as the CLI's.

    python scripts/bench_memory.py --smollm2 /work/models/smollm2-135m \
        --qwen /work/models/qwen2.5-coder-0.5b --out results/bench-memory
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlx_tokenrl.memory import maxrss_bytes

ROOT = Path(__file__).resolve().parent.parent
PLANNER_BEFORE = "4f33539"  # the last commit whose planner probed up to 32 rows
QUICKSTART = ["multiply", "--digits", "2x1", "--algo", "t-spmo", "--prompts-per-step", "4",
              "--group-size", "8", "--max-new-tokens", "96", "--lr", "2e-5"]
SVAMP = ["svamp", "--prompts-per-step", "2", "--group-size", "4", "--max-new-tokens", "128"]
FIXED_ROWS = "8"


PROBES = "memory probes: "


def child(argv):
    """Run the CLI in this process, with the logprob check skipped if asked; the time spent
    in the planner's probes (memory.probe_peak) is printed last."""
    if argv[0] == "--skip-logprob-check":
        argv = argv[1:]
        from mlx_tokenrl import trainer
        trainer.check_selected_logprobs = lambda model: None
    from mlx_tokenrl import memory
    probes = {"calls": 0, "s": 0.0}
    probe = memory.probe_peak

    def timed(*args):
        start = time.perf_counter()
        try:
            return probe(*args)
        finally:
            probes["calls"] += 1
            probes["s"] += time.perf_counter() - start

    memory.probe_peak = timed
    from tokenrl_cli.main import app
    try:
        app(argv, standalone_mode=True)
    finally:
        print(PROBES + json.dumps(probes), flush=True)


def code_dir(commit: str, scratch: Path) -> Path:
    """A directory whose `mlx_tokenrl` and `tokenrl_cli` are the code at `commit` (checked
    out in a git worktree, so edits made meanwhile change nothing), to put first on
    PYTHONPATH."""
    tree = scratch / f"tree-{commit}"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), commit],
                   check=True, capture_output=True)
    path = scratch / f"path-{commit}"
    path.mkdir()
    (path / "mlx_tokenrl").symlink_to(tree / "mlx_tokenrl")
    (path / "tokenrl_cli").symlink_to(tree / "cli")
    return path


def run_one(code: Path, args: list, out: Path, log: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--skip-logprob-check",
           "train", *args, "--steps", "1", "--out", str(out)]
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, cwd=out.parent, stdout=f,
                                stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    maxrss = maxrss_bytes(usage.ru_maxrss)
    if os.waitstatus_to_exitcode(status) != 0:
        return {"error": log.read_text()[-2000:], "wall_s": wall, "resident_gb": maxrss / 1e9}
    step = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    probes = json.loads(log.read_text().split(PROBES)[-1].splitlines()[0])
    return {"wall_s": wall, "resident_gb": maxrss / 1e9, "probe_calls": probes["calls"],
            "probe_s": probes["s"],
            "step_s": step["step_s"], "rollout_s": step["rollout_s"], "loss_s": step["loss_s"],
            "reported_peak_gb": step["peak_memory_gb"],
            "reported_resident_gb": step.get("resident_peak_gb"),
            "loss_peak_gb": step["loss_peak_memory_gb"]}


def main():
    if sys.argv[1:2] == ["--child"]:
        return child(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smollm2", help="SmolLM2-135M-Instruct (mlx-lm dir)")
    parser.add_argument("--qwen", help="Qwen2.5-Coder-0.5B-Instruct (mlx-lm dir)")
    parser.add_argument("--before", default=PLANNER_BEFORE)
    parser.add_argument("--after", default="HEAD")
    parser.add_argument("--out", default="results/bench-memory")
    parser.add_argument("--only", nargs="+", help="these runs (CASE-ROWS-CODE) and no others")
    parser.add_argument("--table", action="store_true",
                        help="print the table of --out's JSON and write its markdown; run nothing")
    args = parser.parse_args()
    out = Path(args.out)
    if args.table:
        results = json.loads((out / "bench_memory.json").read_text())["results"]
        (out / "bench_memory.md").write_text("\n".join(print_summary(results)) + "\n")
        return
    args.after, args.before = (subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", commit], check=True, capture_output=True,
        text=True).stdout.strip() for commit in (args.after, args.before))
    out.mkdir(parents=True, exist_ok=True)
    cases = [(name, [*task, "--model", model]) for name, task, model in
             (("quickstart", QUICKSTART, args.smollm2), ("svamp-0.5b", SVAMP, args.qwen)) if model]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        codes = {"after": code_dir(args.after, scratch), "before": code_dir(args.before, scratch)}
        try:
            for case, case_args in cases:
                for rows, extra in (("planner", []), ("fixed", ["--microbatch-rows", FIXED_ROWS])):
                    for code in ("after", "before"):
                        name = f"{case}-{rows}-{code}"
                        if args.only and name not in args.only:
                            continue
                        result = run_one(codes[code], case_args + extra, scratch / name,
                                         out / f"{name}.log")
                        results.append({"case": case, "rows": rows, "code": code, **result})
                        print(json.dumps(results[-1]), flush=True)
                        write(out, args, results)
        finally:
            for commit in (args.after, args.before):
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                                str(scratch / f"tree-{commit}")], capture_output=True)
    (out / "bench_memory.md").write_text("\n".join(print_summary(results)) + "\n")


def write(out: Path, args, results):
    (out / "bench_memory.json").write_text(json.dumps(
        {"after": args.after, "before": args.before, "fixed_rows": int(FIXED_ROWS), "results": results}, indent=2))
    (out / "command.sh").write_text(
        "# from the repository root; the machine: 2 shared CPU cores, 23 GB, no swap\n"
        + shlex.join(["python", "scripts/bench_memory.py", *sys.argv[1:]]) + "\n")


def print_summary(results):
    from rich.console import Console
    from tables import markdown_table, print_table
    header = ["case", "rows", "code", "resident GB", "reported peak GB", "loss peak GB",
              "resident / loss peak", "probes", "probe s", "wall s", "step s", "loss s"]
    rows = []
    for r in results:
        probes = [str(r["probe_calls"]), f"{r['probe_s']:.0f}"] if "probe_s" in r else ["", ""]
        if "error" in r:
            rows.append([r["case"], r["rows"], r["code"], f"{r['resident_gb']:.2f}", "stopped",
                         "", "", *probes, f"{r['wall_s']:.0f}", "", ""])
            continue
        rows.append([r["case"], r["rows"], r["code"], f"{r['resident_gb']:.2f}",
                     f"{r['reported_peak_gb']:.2f}", f"{r['loss_peak_gb']:.2f}",
                     f"{r['resident_gb'] / r['loss_peak_gb']:.2f}x", *probes,
                     f"{r['wall_s']:.0f}", f"{r['step_s']:.0f}", f"{r['loss_s']:.0f}"])
    print_table(Console(), "one training step: memory and time", header, rows,
                left=("case", "rows", "code"))
    return markdown_table(header, rows, left=("case", "rows", "code"))


if __name__ == "__main__":
    main()
