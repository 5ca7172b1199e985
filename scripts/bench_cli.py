"""How fast the CLI answers: time of `tokenrl-mlx --help`, `tokenrl-mlx train --help` and an
argument error, at an earlier commit and now, in fresh processes.

Each tree (the commit's `cli/` and `mlx_tokenrl/`, read with `git archive`, and the working
tree) is put first on PYTHONPATH, so both run with this venv's packages. The runs alternate
between the trees, round after round, so that load from other processes falls on both alike.
The table gives each one's median wall time and median CPU time (user + system of the
process): on a busy machine the wall time waits for the CPU, the CPU time is about what a
quiet machine's wall time would be.

    python scripts/bench_cli.py --before 4f33539 --repeats 9 --out results/bench-cli
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from rich.console import Console

from tables import markdown_table, print_table

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = {"tokenrl-mlx --help": ["--help"], "tokenrl-mlx train --help": ["train", "--help"],
            "tokenrl-mlx train multiply --lr -1": ["train", "multiply", "--lr", "-1"]}
# The console script's own code (pyproject.toml: tokenrl-mlx = "tokenrl_cli.main:app").
ENTRY = "import sys; from tokenrl_cli.main import app; sys.exit(app(prog_name='tokenrl-mlx'))"


def packages_at(commit: str, into: Path) -> Path:
    """A directory importing `tokenrl_cli` and `mlx_tokenrl` as they were at `commit`."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", commit, "cli",
                              "mlx_tokenrl"], capture_output=True, check=True).stdout
    with tempfile.TemporaryFile() as f:
        f.write(archive)
        f.seek(0)
        with tarfile.open(fileobj=f) as tar:
            tar.extractall(into / "tree", filter="data")
    return linked(into / "tree", into / "path")


def linked(tree: Path, into: Path) -> Path:
    """`into`, holding the package names pointing at `tree`'s directories (cli/ is installed
    as tokenrl_cli)."""
    into.mkdir(parents=True)
    (into / "tokenrl_cli").symlink_to(tree / "cli")
    (into / "mlx_tokenrl").symlink_to(tree / "mlx_tokenrl")
    return into


def cpu_of_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(path: Path, args: list[str]) -> dict:
    """Wall and CPU seconds of one run of the CLI with `args`."""
    env = {**os.environ, "PYTHONPATH": str(path), "COLUMNS": "100"}
    cpu, start = cpu_of_children(), time.perf_counter()
    subprocess.run([sys.executable, "-c", ENTRY, *args], env=env, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, cwd=path)
    return {"wall": time.perf_counter() - start, "cpu": cpu_of_children() - cpu}


def imported_from(path: Path) -> str:
    """Where the tree's tokenrl_cli is imported from: the check that PYTHONPATH wins over
    the venv's editable install."""
    return subprocess.run([sys.executable, "-c", "import tokenrl_cli; print(tokenrl_cli.__file__)"],
                          env={**os.environ, "PYTHONPATH": str(path)}, capture_output=True,
                          text=True, check=True, cwd=path).stdout.strip()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="the commit to compare with")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", type=Path, default=Path("results/bench-cli"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        trees = {f"before ({args.before})": packages_at(args.before, Path(tmp) / "before"),
                 "now": linked(ROOT, Path(tmp) / "now")}
        for name, path in trees.items():
            where = imported_from(path)
            if not where.startswith(str(path)):
                sys.exit(f"{name}: tokenrl_cli came from {where}, not {path}")
        times = {(tree, command): [] for tree in trees for command in COMMANDS}
        for _ in range(args.repeats):
            for command, argv in COMMANDS.items():
                for tree, path in trees.items():
                    times[tree, command].append(timed(path, argv))
    load = os.getloadavg()
    before, now = trees
    medians = {(tree, command, kind): statistics.median(t[kind] for t in times[tree, command])
               for tree, command in times for kind in ("wall", "cpu")}
    header = ["command", "before wall s", "before CPU s", "now wall s", "now CPU s",
              "speed-up (wall)"]
    rows = [[command, *(f"{medians[tree, command, kind]:.2f}" for tree in trees
                        for kind in ("wall", "cpu")),
             f"{medians[before, command, 'wall'] / medians[now, command, 'wall']:.1f}x"]
            for command in COMMANDS]
    title = (f"CLI answer time, median of {args.repeats} runs (fresh processes; machine "
             f"shared, load average {load[0]:.1f} at the end)")
    print_table(Console(width=120), title, header, rows, left=("command",))
    args.out.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    (args.out / "bench_cli.json").write_text(json.dumps({
        "before": args.before, "now": commit, "repeats": args.repeats,
        "python": platform.python_version(), "machine": platform.machine(),
        "cpus": os.cpu_count(), "load_average_at_end": load,
        "note": "shared machine: other processes ran alongside; the runs alternate between "
                "before and now so both see the same load",
        "runs": {command: {tree: times[tree, command] for tree in trees} for command in COMMANDS},
        "median": {command: {tree: {kind: medians[tree, command, kind] for kind in ("wall", "cpu")}
                             for tree in trees} for command in COMMANDS}}, indent=2))
    (args.out / "bench_cli.md").write_text("\n".join([f"**{title}**", ""]
                                                     + markdown_table(header, rows, left=("command",)))
                                           + "\n")
    command = " ".join(["python", "scripts/bench_cli.py", "--before", args.before, "--repeats",
                        str(args.repeats), "--out", str(args.out)])
    (args.out / "command.sh").write_text(f"#!/bin/sh\n# from the repository root, in its venv\n{command}\n")


if __name__ == "__main__":
    main()
