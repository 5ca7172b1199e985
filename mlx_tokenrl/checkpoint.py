"""Crash-safe checkpoints: a kill at any moment leaves the last complete one loadable.

Layout of a run directory:
    adapters.safetensors, adapter_config.json   the latest adapter, in mlx-lm's format
    checkpoints/step-000010/                    adapter + optimizer state + state.json
    checkpoints/latest                          name of the newest complete checkpoint
Each checkpoint is written into a temporary directory and renamed into place, and only
then is `latest` replaced (itself atomically), so readers never see a partial one. A
checkpoint leaves its final name the same way: renamed aside to a hidden name, then deleted,
so a `step-*` directory is always complete. A kill between two of those renames can leave
`latest` naming the previous checkpoint (still complete: it is loaded) or, while a step is
re-saved, a directory just moved aside (its old copy is loaded). With several ranks only
rank 0 saves (and loads: the others receive its state).
"""

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

KEEP = 2  # complete checkpoints kept on disk
FILES = ("adapters.safetensors", "optimizer.safetensors", "state.json")
PAUSE_ENV = "TOKENRL_CHECKPOINT_PAUSE"


def _fault_drill_pause():
    """Fault injection for scripts/fault_drill.py: with TOKENRL_CHECKPOINT_PAUSE=seconds,
    every phase of a save lasts that long, so a kill -9 can land inside each of them."""
    seconds = os.environ.get(PAUSE_ENV)
    if seconds:
        time.sleep(float(seconds))


def adapter_weights(model) -> dict:
    return dict(tree_flatten(model.trainable_parameters()))


def atomic_write_bytes(path: Path, data: bytes):
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a failed write leaves neither the file nor its temporary copy
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save_safetensors(path: Path, arrays: dict):
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".safetensors")
    os.close(fd)
    mx.save_safetensors(tmp, arrays)
    os.replace(tmp, path)


def save_checkpoint(run_dir, step: int, model, optimizer, state: dict):
    run_dir = Path(run_dir)
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}."))
    weights = adapter_weights(model)
    mx.save_safetensors(str(tmp / "adapters.safetensors"), weights)
    _fault_drill_pause()
    mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
    _fault_drill_pause()
    (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=2))
    _fault_drill_pause()
    final = root / name
    if final.exists():  # re-saving the same step (e.g. Ctrl-C right after a save)
        _move_aside(final)
    os.replace(tmp, final)
    _fault_drill_pause()
    atomic_write_bytes(root / "latest", name.encode())
    _fault_drill_pause()
    atomic_save_safetensors(run_dir / "adapters.safetensors", weights)
    _prune(root, keep=name)
    return final


def _move_aside(path: Path) -> Path:
    """Rename a checkpoint to a hidden name in one step (onto a fresh empty directory), so
    that deleting it, which a kill or a second Ctrl-C can interrupt, never shows a
    half-deleted checkpoint under its final name. `_prune` deletes it."""
    aside = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old."))
    os.replace(path, aside)
    return aside


def _prune(root: Path, keep: str):
    complete = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in complete[:-KEEP]:
        if old.name != keep:
            _move_aside(old)
    for stale in root.glob(".step-*"):  # moved aside, or temp dirs left by a kill mid-write
        shutil.rmtree(stale, ignore_errors=True)


def is_complete(path: Path) -> bool:
    return all((path / name).is_file() for name in FILES)


def latest_checkpoint(run_dir) -> Path | None:
    """The checkpoint `latest` names (or, if a kill came while that step was being re-saved,
    its old copy moved aside); else the newest complete `step-*` directory; None when there
    is none."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest"
    name = pointer.read_text().strip() if pointer.is_file() else ""
    if name:
        for path in [root / name, *sorted(root.glob(f".{name}.old.*"))]:
            if is_complete(path):
                return path
    complete = sorted((p for p in root.glob("step-*") if p.is_dir() and is_complete(p)),
                      reverse=True)
    return complete[0] if complete else None


def load_checkpoint(path: Path, model, optimizer) -> dict:
    """Restore adapter weights and optimizer state; returns the saved state dict."""
    model.load_weights(list(mx.load(str(path / "adapters.safetensors")).items()), strict=False)
    optimizer.state = tree_unflatten(list(mx.load(str(path / "optimizer.safetensors")).items()))
    mx.eval(model.parameters(), optimizer.state)
    return json.loads((path / "state.json").read_text())
