"""Fault drill: kill -9 training runs at random moments, resume them, check nothing broke.

On the tiny random model with a dense reward, `--runs` times: start `tokenrl-mlx train`
(one process, or two ranks with `mlx.launch -n 2 --backend ring` on 127.0.0.1), kill -9 it
at a random moment (two runs in five: while a checkpoint is being written, each save
slowed by TOKENRL_CHECKPOINT_PAUSE so the kill can land between any two of its writes),
then `--resume` it with the same or the other number of ranks. Checks per run: the killed
run's other rank stopped by itself, the last checkpoint loads, the resume started and
finished, metrics.jsonl holds steps 1..N exactly once, the last checkpoint is step N, and
the adapter is finite. For information it also reports how far the final adapter is from
an uninterrupted one-process run of the same config.

    python scripts/fault_drill.py --out results/fault_drill.json
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx_tokenrl  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
import numpy as np
from rich.console import Console

from mlx_tokenrl.checkpoint import latest_checkpoint
from mlx_tokenrl.toy import build_toy_model

from loopback import BIN, alive, launch_command, launch_env, launched_rank_pids
from tables import markdown_table, print_table

ALGOS = ("grpo", "s-grpo", "t-spmo")
REWARD = "def digits(text, answer):\n    return sum(c.isdigit() for c in text) / max(len(text), 1)\n"
PAUSE = 0.2  # seconds per checkpoint phase in checkpoint-kill runs (5 phases per save)
HANG = 60.0  # a killed run whose other rank is still alive after this long is a hang


def launch_failed(log: Path) -> str | None:
    """mlx.launch exits 0 even when a rank failed: read its warnings and our error lines."""
    for line in log.read_text(errors="replace").splitlines():
        if "exited with code" in line or line.startswith("error:") or "Traceback" in line:
            return line.replace("\x1b[33m", "").replace("\x1b[0m", "").strip()
    return None


def start(args, ranks, log: Path, **extra):
    cmd = ["tokenrl-mlx", *args]
    if ranks > 1:
        cmd = launch_command(ranks, cmd)
    else:
        cmd[0] = str(BIN / "tokenrl-mlx")
    out = open(log, "a")
    out.write(f"$ {' '.join(cmd)}\n")
    out.flush()
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                            env=launch_env(**extra))


def checkpoint_phase(run: Path):
    """Where inside a save the kill landed, read back from the files it left."""
    root = run / "checkpoints"
    if not root.is_dir():
        return "before the first save"
    temps = sorted(root.glob(".step-*"))
    if temps:
        have = sorted(p.name.split(".")[0] for p in temps[-1].iterdir())
        return f"writing files ({', '.join(have) or 'none yet'})"
    steps = sorted(p.name for p in root.glob("step-*"))
    latest = (root / "latest").read_text().strip() if (root / "latest").is_file() else ""
    if steps and steps[-1] != latest:
        return "renamed, pointer not yet updated"
    top = run / "adapters.safetensors"
    if steps and top.is_file():
        a, b = mx.load(str(top)), mx.load(str(root / steps[-1] / "adapters.safetensors"))
        if any(not np.array_equal(np.array(a[k]), np.array(b[k])) for k in b):
            return "pointer updated, adapter copy pending"
    return "between saves"


def check_checkpoint(run: Path):
    """(step or None, error): load the last complete checkpoint's files."""
    ckpt = latest_checkpoint(run)
    if ckpt is None:
        return None, None
    try:
        state = json.loads((ckpt / "state.json").read_text())
        for name in ("adapters.safetensors", "optimizer.safetensors"):
            arrays = mx.load(str(ckpt / name))
            mx.eval(list(arrays.values()))
        return int(state["step"]), None
    except Exception as exc:  # noqa: BLE001  (the drill reports any failure)
        return None, f"{type(exc).__name__}: {exc}"


def finite_adapter(path: Path):
    if not path.is_file():
        return False
    return all(bool(mx.isfinite(v).all()) for v in mx.load(str(path)).values())


def train_args(model, data: Path, out: Path, algo: str, steps: int):
    return ["train", "jsonl", "--data", str(data / "data.jsonl"),
            "--reward-fn", f"{data / 'reward.py'}:digits", "--model", str(model),
            "--out", str(out), "--steps", str(steps), "--prompts-per-step", "4",
            "--group-size", "8", "--max-new-tokens", "16", "--temperature", "1.0",
            "--lr", "3e-3", "--warmup-steps", "0", "--save-every", "2", "--algo", algo,
            "--sgrpo-k", "8"]


def drill_one(i, spec, model, data, work: Path, steps: int, durations: dict, rng):
    run = work / f"run{i:02d}"
    log = work / f"run{i:02d}.log"
    algo, ranks, resume_ranks, mode = spec["algo"], spec["ranks"], spec["resume_ranks"], spec["mode"]
    row = {"run": i + 1, "algo": algo, "ranks": ranks, "resume_ranks": resume_ranks,
           "mode": mode, "failures": []}
    extra = {"TOKENRL_CHECKPOINT_PAUSE": PAUSE} if mode == "checkpoint" else {}
    t_launch = time.monotonic()
    proc = start(train_args(model, data, run, algo, steps), ranks, log, **extra)
    pids = {0: proc.pid} if ranks == 1 else launched_rank_pids(proc, ranks)
    if not pids:
        row["failures"].append("run did not start")
        proc.kill()
        return row
    # Arm only once the run directory exists (before that there is nothing to resume).
    while not (run / "config.json").is_file() and proc.poll() is None:
        time.sleep(0.01)
    victim_rank = 0
    if mode == "checkpoint":
        save = int(rng.integers(1, steps // 2))  # the save of step 2*save
        target = run / "checkpoints"
        while proc.poll() is None:
            if target.is_dir() and any(p.name.startswith(f".step-{2 * save:06d}")
                                       for p in target.iterdir()):
                break
            time.sleep(0.003)
        time.sleep(float(rng.uniform(0, 5.5 * PAUSE)))
    else:
        victim_rank = int(rng.integers(0, ranks))
        time.sleep(float(rng.uniform(0, 0.9 * durations[ranks])))
    if proc.poll() is not None:
        row["failures"].append("run ended before the kill")
        return row
    killed_at = time.monotonic()
    os.kill(pids[victim_rank], signal.SIGKILL)
    row["killed_rank"] = victim_rank
    row["killed_after_s"] = round(killed_at - t_launch, 2)
    # The other rank must stop by itself (mlx.launch ends it; or its watchdog does).
    others = [pid for r, pid in pids.items() if r != victim_rank]
    while any(alive(p) for p in others) and time.monotonic() - killed_at < HANG:
        time.sleep(0.01)
    if others:
        row["others_stopped_s"] = round(time.monotonic() - killed_at, 2)
    if any(alive(p) for p in others):
        row["failures"].append("other rank hung")
        for p in others:
            os.kill(p, signal.SIGKILL)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        row["failures"].append("launcher hung")
    row["phase"] = checkpoint_phase(run)
    done_before = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()
                   if l.strip().startswith("{") and l.strip().endswith("}")] \
        if (run / "metrics.jsonl").exists() else []
    row["steps_done_at_kill"] = len(done_before)
    ckpt_step, error = check_checkpoint(run)
    row["checkpoint_step"] = ckpt_step or 0
    if error:
        row["failures"].append(f"checkpoint failed to load: {error}")
    kept = [l for l in (run / "metrics.jsonl").read_text().splitlines()
            if l.strip()][:row["checkpoint_step"]] if (run / "metrics.jsonl").exists() else []

    # Resume (same or other number of ranks) and run to the end.
    resume_log = work / f"run{i:02d}-resume.log"
    resume = start(["train", "--resume", str(run)], resume_ranks, resume_log)
    try:
        code = resume.wait(timeout=600)
    except subprocess.TimeoutExpired:
        resume.kill()
        code = "timeout"
    problem = launch_failed(resume_log)
    row["resume_exit"] = code
    row["resume_started"] = (run / "metrics.jsonl").exists() and code == 0 and problem is None
    if code != 0 or problem:
        row["failures"].append(f"resume failed: {problem or f'exit code {code}'}")
    lines = [l for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()] \
        if (run / "metrics.jsonl").exists() else []
    got = [json.loads(l)["step"] for l in lines]
    row["final_steps"] = len(got)
    if got != list(range(1, steps + 1)):
        row["failures"].append(f"metrics steps {got}")
    if lines[:len(kept)] != kept:
        row["failures"].append("metrics before the checkpoint were altered")
    final_step, error = check_checkpoint(run)
    row["final_checkpoint_step"] = final_step
    if error or final_step != steps:
        row["failures"].append(f"final checkpoint {final_step} {error or ''}".strip())
    row["finite"] = finite_adapter(run / "adapters.safetensors")
    if not row["finite"]:
        row["failures"].append("adapter not finite")
    return row


def run_time(proc, run: Path):
    """Seconds from the run directory appearing (training about to start) to the end."""
    while not (run / "config.json").is_file() and proc.poll() is None:
        time.sleep(0.01)
    t0 = time.monotonic()
    proc.wait(timeout=600)
    return time.monotonic() - t0


def max_diff(a: Path, b: Path):
    x, y = mx.load(str(a)), mx.load(str(b))
    return max(float(mx.abs(x[k] - y[k]).max()) for k in x)


def report(args, rows, summary, durations, console):
    """Print the tables; write the JSON and the markdown next to it."""
    header = ["run", "ranks (run → resume)", "algo", "killed", "at step", "where",
              "other rank stopped", "resumed from", "final steps", "finite",
              "max abs diff vs uninterrupted", "result"]
    left = ("ranks (run → resume)", "algo", "killed", "where", "finite", "result")
    cells = [[str(r["run"]), f"{r['ranks']} → {r['resume_ranks']}", r["algo"],
              f"rank {r['killed_rank']} ({r['mode']})" if "killed_rank" in r else "-",
              str(r.get("steps_done_at_kill", "-")), r.get("phase", "-"),
              f"{r['others_stopped_s']:.2f} s" if "others_stopped_s" in r else "-",
              str(r.get("checkpoint_step", "-")), str(r.get("final_steps", "-")),
              "yes" if r.get("finite") else "NO",
              f"{r['max_diff_vs_uninterrupted']:.1e}" if "max_diff_vs_uninterrupted" in r else "-",
              "ok" if not r["failures"] else "; ".join(r["failures"])] for r in rows]
    print_table(console, f"Fault drill: {len(rows)} runs of {args.steps} steps on the tiny model, "
                         f"kill -9 then --resume", header, cells, left)
    print_table(console, "Totals",
                ["kills", "of them 2-rank", "in checkpoint writes", "resumes",
                 "with another rank count", "resumes started", "checkpoint load failures",
                 "wrong final step", "non-finite adapters", "hangs", "failed runs"],
                [[str(summary[k]) for k in (
                    "kills", "kills_two_ranks", "kills_in_checkpoint_writes", "resumes",
                    "resumes_with_other_rank_count", "resumes_started",
                    "checkpoint_load_failures", "wrong_final_step", "non_finite", "hangs",
                    "failures")]])

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    saved_args = {k: v for k, v in vars(args).items() if k != "report_only"}
    out.write_text(json.dumps({"args": saved_args, "mlx": mx.__version__,
                               "reference_durations_s": durations, "summary": summary,
                               "runs": rows}, indent=2, default=str))
    text = ["# Fault drill\n",
            f"`python scripts/fault_drill.py --out {args.out}` (MLX {mx.__version__}): "
            f"{summary['runs']} training runs of {args.steps} steps on the tiny random model "
            f"(B=4, G=8, 16 new tokens, checkpoint every 2 steps), each killed with `kill -9` at "
            f"a random moment ({summary['kills_in_checkpoint_writes']} of them inside a checkpoint "
            f"write, each save slowed to {5 * PAUSE:.1f} s by TOKENRL_CHECKPOINT_PAUSE), then "
            f"continued with `tokenrl-mlx train --resume` ({summary['kills_two_ranks']} runs on 2 "
            f"ranks under `mlx.launch --backend ring`; {summary['resumes_with_other_rank_count']} "
            f"resumes with the other number of ranks).\n",
            f"**Kills {summary['kills']}, resumes {summary['resumes']} (started "
            f"{summary['resumes_started']}), failures {summary['failures']}**: checkpoint load "
            f"failures {summary['checkpoint_load_failures']}, wrong final step "
            f"{summary['wrong_final_step']}, non-finite adapters {summary['non_finite']}, hangs "
            f"{summary['hangs']}. When one rank of a 2-rank run was killed, the other stopped "
            f"{summary['max_other_rank_stop_s']} s later at most (mlx.launch ends the remaining "
            f"ranks as soon as one exits; without it, a survivor stops at its next collective, "
            f"on finding the connection closed).\n",
            "The last column compares the final adapter with an uninterrupted one-process run "
            "of the same config. It is reported, not checked. Runs killed and resumed in one "
            "process reproduce that run bit for bit. Runs that had 2 ranks for some steps sum "
            "their gradients in a different order, and the deliberately high learning rate "
            "(3e-3 on a random model) amplifies that float rounding over the 12 steps.\n",
            *markdown_table(header, cells, left), ""]
    out.with_suffix(".md").write_text("\n".join(text))
    console.print(f"wrote {out} and {out.with_suffix('.md')}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--two-rank-runs", type=int, default=7)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", help="keep the run directories and logs here")
    parser.add_argument("--out", default="results/fault_drill.json")
    parser.add_argument("--report-only", action="store_true",
                        help="only re-print and re-write the report from an existing --out JSON")
    args = parser.parse_args()
    console = Console(width=180)
    if args.report_only:
        saved = json.loads(Path(args.out).read_text())
        args.steps = saved["args"]["steps"]
        report(args, saved["runs"], saved["summary"],
               {int(k): v for k, v in saved["reference_durations_s"].items()}, console)
        return 1 if saved["summary"]["failures"] else 0
    rng = np.random.default_rng(args.seed)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="fault-drill-"))
    work.mkdir(parents=True, exist_ok=True)
    model = build_toy_model(work / "model")
    (work / "reward.py").write_text(REWARD)
    with open(work / "data.jsonl", "w") as f:
        for i in range(40):
            f.write(json.dumps({"prompt": f"what is {i} times {i % 7}?", "answer": "1"}) + "\n")

    # Uninterrupted references (one process per algorithm; one 2-rank run for timing).
    durations, refs = {}, {}
    for algo, ranks in [*((a, 1) for a in ALGOS), ("grpo", 2)]:
        name = f"ref{ranks}-{algo}"
        proc = start(train_args(model, work, work / name, algo, args.steps), ranks,
                     work / f"{name}.log")
        seconds = run_time(proc, work / name)
        assert proc.returncode == 0 and not launch_failed(work / f"{name}.log"), \
            f"reference run failed: see {work}/{name}.log"
        durations[ranks] = min(durations.get(ranks, seconds), seconds)
        if ranks == 1:
            refs[algo] = work / name / "adapters.safetensors"
    console.print(f"reference durations: 1 rank {durations[1]:.1f} s, 2 ranks {durations[2]:.1f} s; "
                  f"2-rank vs 1-rank adapter max |diff| "
                  f"{max_diff(work / 'ref2-grpo' / 'adapters.safetensors', refs['grpo']):.2e}")

    two = set(np.linspace(1, args.runs - 1, args.two_rank_runs).round().astype(int).tolist())
    specs = []
    for i in range(args.runs):
        ranks = 2 if i in two else 1
        other = 1 if ranks == 2 else 2
        specs.append({"algo": ALGOS[(i + i // 3) % 3], "ranks": ranks,
                      "resume_ranks": other if (i // 2) % 2 else ranks,
                      "mode": "checkpoint" if i % 5 in (1, 3) else "random"})

    rows = []
    for i, spec in enumerate(specs):
        for attempt in range(3):
            row = drill_one(i, spec, model, work, work, args.steps, durations, rng)
            if "run ended before the kill" not in row["failures"]:
                break
            row = None
            import shutil
            shutil.rmtree(work / f"run{i:02d}", ignore_errors=True)
        if row is None:
            row = {"run": i + 1, **spec, "failures": ["never killed (run too short)"]}
        if row.get("finite"):
            row["max_diff_vs_uninterrupted"] = max_diff(
                work / f"run{i:02d}" / "adapters.safetensors", refs[spec["algo"]])
        rows.append(row)
        status = "[green]ok[/]" if not row["failures"] else f"[red]{'; '.join(row['failures'])}[/]"
        console.print(f"run {i + 1:2d}: {spec['ranks']}->{spec['resume_ranks']} ranks "
                      f"{spec['algo']:6s} {spec['mode']:10s} kill at step "
                      f"{row.get('steps_done_at_kill', '?')} ({row.get('phase', '?')}), resumed "
                      f"from {row.get('checkpoint_step', '?')}: {status}")

    summary = {
        "runs": len(rows),
        "kills": sum("killed_rank" in r for r in rows),
        "kills_two_ranks": sum("killed_rank" in r and r["ranks"] == 2 for r in rows),
        "kills_in_checkpoint_writes": sum(r.get("mode") == "checkpoint" and "killed_rank" in r
                                          for r in rows),
        "resumes": sum("resume_exit" in r for r in rows),
        "resumes_with_other_rank_count": sum(r["ranks"] != r["resume_ranks"] and "resume_exit" in r
                                             for r in rows),
        "resumes_started": sum(bool(r.get("resume_started")) for r in rows),
        "checkpoint_load_failures": sum(any(f.startswith("checkpoint failed") for f in r["failures"])
                                        for r in rows),
        "wrong_final_step": sum(r.get("final_checkpoint_step") != args.steps
                                or r.get("final_steps") != args.steps for r in rows),
        "non_finite": sum(not r.get("finite", False) for r in rows),
        "hangs": sum(any("hung" in f for f in r["failures"]) for r in rows),
        "failures": sum(bool(r["failures"]) for r in rows),
        "max_other_rank_stop_s": max([r["others_stopped_s"] for r in rows if "others_stopped_s" in r],
                                     default=None),
        "max_diff_vs_uninterrupted": max([r["max_diff_vs_uninterrupted"] for r in rows
                                          if "max_diff_vs_uninterrupted" in r], default=None),
    }

    report(args, rows, summary, durations, console)
    return 1 if summary["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
