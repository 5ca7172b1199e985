"""Is the Linux fast path taken? GFLOP/s of a 1024x1024 fp32 matmul with and without it.

Each measurement runs in a fresh process (a BLAS cannot be unloaded once MLX has bound it):
once with `TOKENRL_NO_OPENBLAS=1` (MLX's bundled reference BLAS) and once as usual.

    python scripts/bench_blas.py --out results/bench_blas.json
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from rich.console import Console

from tables import print_table

MEASURE = """
import json, time
import mlx_tokenrl
import mlx.core as mx
n = 1024
a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
mx.eval(a @ b)
reps, start = 0, time.perf_counter()
while time.perf_counter() - start < 2.0:
    mx.eval(a @ b)
    reps += 1
seconds = time.perf_counter() - start
print(json.dumps({"gflops": 2 * n ** 3 * reps / seconds / 1e9,
                  "openblas": mlx_tokenrl.backend.openblas_path}))
"""


def measure(disable: bool) -> dict:
    env = dict(os.environ)
    env.pop("TOKENRL_NO_OPENBLAS", None)
    if disable:
        env["TOKENRL_NO_OPENBLAS"] = "1"
    out = subprocess.run([sys.executable, "-c", MEASURE], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/bench_blas.json")
    args = parser.parse_args()
    rows = {"reference BLAS (TOKENRL_NO_OPENBLAS=1)": measure(True), "mlx_tokenrl default": measure(False)}
    print_table(Console(), "1024x1024 fp32 matmul on the MLX CPU backend",
                ["setup", "BLAS loaded", "GFLOP/s"],
                [[name, r["openblas"] or "bundled reference", f"{r['gflops']:.1f}"]
                 for name, r in rows.items()], left=("setup", "BLAS loaded"))
    speedup = rows["mlx_tokenrl default"]["gflops"] / rows["reference BLAS (TOKENRL_NO_OPENBLAS=1)"]["gflops"]
    Console().print(f"fast path speed-up: {speedup:.0f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "speedup": speedup}, indent=2))


if __name__ == "__main__":
    main()
