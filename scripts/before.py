"""A module of this package as it was at an earlier commit, read from git and loaded beside
today's, so a benchmark can run before and after in one process on one machine."""

import subprocess
import types
from pathlib import Path


def module_at(commit: str, path: str):
    """`path` (e.g. "mlx_tokenrl/loss.py") at `commit`, as a module of the package (its
    relative imports are today's modules)."""
    source = subprocess.run(["git", "-C", str(Path(__file__).parent), "show", f"{commit}:{path}"],
                            capture_output=True, text=True, check=True).stdout
    package, name = path.removesuffix(".py").replace("/", ".").rsplit(".", 1)
    module = types.ModuleType(f"{package}.{name}_at_{commit}")
    module.__package__ = package
    exec(compile(source, f"{commit}:{path}", "exec"), module.__dict__)
    return module
