"""Crash safety of checkpoints, as properties.

A save cut short at any point (an exception such as a second Ctrl-C, simulated at every
file-system operation in turn, or a real SIGKILL) must leave the previous or the new
checkpoint loadable, with step, adapter and optimizer state of one and the same version,
and never a partially written file under a final name.

Run as a script (`python tests/test_checkpoint.py RUN_DIR`) this file is the saver the
SIGKILL test kills: it saves checkpoints in a loop, resuming from the last one.
"""

import builtins
import contextlib
import io
import itertools
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import mlx_tokenrl  # noqa: F401  (OpenBLAS before mlx, as in the CLI)
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from mlx_tokenrl.checkpoint import (atomic_write_bytes, latest_checkpoint, load_checkpoint,
                                    save_checkpoint)

CHECKPOINT_FILES = ["adapters.safetensors", "optimizer.safetensors", "state.json"]


class LowRank(nn.Module):
    """A frozen base weight and trainable low-rank factors, named like mlx-lm's LoRA."""

    def __init__(self, dims=128, rank=32):
        super().__init__()
        self.weight = mx.zeros((dims, dims))
        self.lora_a = mx.zeros((dims, rank))
        self.lora_b = mx.zeros((rank, dims))
        self.freeze(keys=["weight"])


class AdapterNet(nn.Module):
    def __init__(self, layers=3):
        super().__init__()
        self.layers = [LowRank() for _ in range(layers)]


def fresh_state():
    return AdapterNet(), optim.AdamW(learning_rate=1e-2)


def flat_arrays(tree) -> dict:
    return {k: np.array(v) for k, v in tree_flatten(tree)}


def same_arrays(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# ---- versions of a training state --------------------------------------------------------

@dataclass
class Version:
    """One training state, and so what a checkpoint of it must hold."""
    label: str
    step: int
    adapter: dict  # trainable parameter name -> np.ndarray
    optimizer: dict  # flattened optimizer state -> np.ndarray

    @property
    def name(self) -> str:
        return f"step-{self.step:06d}"


# "v2-rerun" is step 2 again with other contents: a resumed or restarted run re-saving it.
VERSION_STEPS = [("v1", 1), ("v2", 2), ("v3", 3), ("v2-rerun", 2)]


@pytest.fixture(scope="module")
def versions():
    """Successive AdamW updates of one model, each captured as a version."""
    model, optimizer = fresh_state()
    mx.random.seed(0)
    found = {}
    for label, step in VERSION_STEPS:
        grads = tree_map(lambda p: mx.random.normal(p.shape), model.trainable_parameters())
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state)
        found[label] = Version(label, step, flat_arrays(model.trainable_parameters()),
                               flat_arrays(optimizer.state))
    return found


def state_of(version: Version):
    """A model and optimizer holding `version`, as the training run had them."""
    model, optimizer = fresh_state()
    model.update(tree_unflatten([(k, mx.array(v)) for k, v in version.adapter.items()]))
    optimizer.state = tree_unflatten([(k, mx.array(v)) for k, v in version.optimizer.items()])
    return model, optimizer


def save_version(run: Path, version: Version):
    model, optimizer = state_of(version)
    return save_checkpoint(run, version.step, model, optimizer, {"version": version.label})


def loaded_version(path: Path, versions: dict) -> Version:
    """Load a checkpoint into a fresh model and optimizer and return the version it holds,
    checking that its step, adapter and optimizer state all belong to that version."""
    model, optimizer = fresh_state()
    state = load_checkpoint(path, model, optimizer)
    version = versions[state["version"]]
    assert state["step"] == version.step, path
    assert same_arrays(flat_arrays(model.trainable_parameters()), version.adapter), path
    assert same_arrays(flat_arrays(optimizer.state), version.optimizer), path
    return version


def check_after_crash(run: Path, versions: dict, before: Version | None, new: Version):
    """What a save cut short may leave: everything under a final name whole, and the
    checkpoint a resume would load is the previous or the new one."""
    root = run / "checkpoints"
    allowed = [v for v in (before, new) if v is not None]
    for ckpt in sorted(root.glob("step-*")):
        assert sorted(p.name for p in ckpt.iterdir()) == CHECKPOINT_FILES, ckpt
        assert loaded_version(ckpt, versions).name == ckpt.name
    pointer = root / "latest"
    if pointer.exists():
        name = pointer.read_text()
        assert name in [v.name for v in allowed], f"latest holds {name!r}"
        if before is None or name != before.name:  # moved only onto a checkpoint in place
            assert (root / name).is_dir(), f"latest moved to {name} before it was complete"
    top = run / "adapters.safetensors"
    if top.exists():
        adapter = flat_arrays(mx.load(str(top)))
        assert any(same_arrays(adapter, v.adapter) for v in allowed), \
            "the run's adapters.safetensors is neither version"
    found = latest_checkpoint(run)
    if before is None and found is None:
        return
    assert found is not None, "no checkpoint left to resume from"
    assert loaded_version(found, versions) in allowed, found


# ---- crash injection ---------------------------------------------------------------------

class Crash(BaseException):
    """The process stops here. A BaseException, as KeyboardInterrupt (a second Ctrl-C) is,
    so no `except Exception` in the code under test can swallow it."""


class CrashingFile:
    def __init__(self, file, crash_at):
        self._file, self._crash_at = file, crash_at

    def write(self, data):
        if self._crash_at.due(f"write {len(data)} bytes"):
            self._file.write(data[:len(data) // 2])  # a kill leaves what reached the file
            self._file.flush()
            raise Crash(self._crash_at.where)
        return self._file.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()

    def __getattr__(self, name):
        return getattr(self._file, name)


class CrashAt:
    """Counts every file-system change a piece of code makes (open for writing, each
    write, safetensors save, mkdir, rename, unlink, rmdir) and raises Crash at the k-th;
    k=None only counts. A crash inside a write leaves half of the data on disk."""

    def __init__(self, k: int | None = None):
        self.k, self.count, self.where = k, 0, None

    def due(self, what: str) -> bool:
        self.count += 1
        if self.count == self.k:
            self.where = f"operation {self.count}: {what}"
            return True
        return False

    def _before(self, real):
        def op(*args, **kwargs):
            if self.due(f"{real.__name__}{tuple(str(a) for a in args)}"):
                raise Crash(self.where)
            return real(*args, **kwargs)
        return op

    def _open(self, real):
        def opener(file, mode="r", *args, **kwargs):
            f = real(file, mode, *args, **kwargs)
            if not any(c in mode for c in "wax+"):
                return f
            if self.due(f"open({file}, {mode!r})"):  # created or truncated, nothing written
                f.close()
                raise Crash(self.where)
            return CrashingFile(f, self)
        return opener

    def _save_safetensors(self, real):
        def save(file, arrays, *args, **kwargs):
            real(file, arrays, *args, **kwargs)
            if self.due(f"save_safetensors({file})"):
                path = file if str(file).endswith(".safetensors") else f"{file}.safetensors"
                os.truncate(path, os.path.getsize(path) // 2)
                raise Crash(self.where)
        return save

    @contextlib.contextmanager
    def armed(self):
        with pytest.MonkeyPatch.context() as patch:
            for name in ("replace", "rename", "mkdir", "unlink", "remove", "rmdir"):
                patch.setattr(os, name, self._before(getattr(os, name)))
            patch.setattr(io, "open", self._open(io.open))
            patch.setattr(builtins, "open", self._open(io.open))
            patch.setattr(mx, "save_safetensors", self._save_safetensors(mx.save_safetensors))
            yield self


def copy_run(src: Path, dst: Path) -> Path:
    if src.exists():
        shutil.copytree(src, dst)
    else:
        dst.mkdir()
    return dst


# ---- the properties ----------------------------------------------------------------------

SCENARIOS = {  # versions saved before, the version being saved
    "first save": ([], "v1"),
    "next save, pruning the oldest": (["v1", "v2"], "v3"),
    "re-save of the same step": (["v1", "v2"], "v2-rerun"),
}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_a_save_cut_short_anywhere_leaves_the_previous_or_the_new_checkpoint(
        tmp_path, versions, scenario):
    saved_before, label = SCENARIOS[scenario]
    base = tmp_path / "base"
    for prior in saved_before:
        save_version(base, versions[prior])
    before = versions[saved_before[-1]] if saved_before else None
    new = versions[label]

    counter = CrashAt()
    whole = copy_run(base, tmp_path / "whole")
    with counter.armed():
        save_version(whole, new)
    assert counter.count >= 10  # the injector sees the save's writes
    assert loaded_version(latest_checkpoint(whole), versions) is new
    kept = sorted(p.name for p in (whole / "checkpoints").glob("step-*"))
    assert kept == sorted({versions[v].name for v in saved_before} | {new.name})[-2:]  # KEEP

    for k in range(1, counter.count + 1):
        run = copy_run(base, tmp_path / f"crash-{k}")
        crash = CrashAt(k)
        with pytest.raises(Crash), crash.armed():
            save_version(run, new)
        try:
            check_after_crash(run, versions, before, new)
        except Exception as exc:
            pytest.fail(f"{scenario}, crash at {crash.where}: {type(exc).__name__}: {exc}")
        # The resumed run saves again: that save completes and leaves no temp dirs behind.
        save_version(run, new)
        assert loaded_version(latest_checkpoint(run), versions) is new, crash.where
        assert not list((run / "checkpoints").glob(".step-*")), crash.where


def test_atomic_write_leaves_the_old_or_the_new_content(tmp_path):
    path = tmp_path / "config.json"
    old, new = b'{"steps": 10}' * 50, b'{"steps": 20}' * 50
    counter = CrashAt()
    path.write_bytes(old)
    with counter.armed():
        atomic_write_bytes(path, new)
    assert path.read_bytes() == new
    for k in range(1, counter.count + 1):
        path.write_bytes(old)
        crash = CrashAt(k)
        with pytest.raises(Crash), crash.armed():
            atomic_write_bytes(path, new)
        assert path.read_bytes() in (old, new), crash.where


def test_a_loaded_optimizer_continues_as_the_saved_one(tmp_path, versions):
    """After load, the same gradients give the same update as the optimizer that saved."""
    save_version(tmp_path, versions["v2"])
    model, optimizer = fresh_state()
    load_checkpoint(latest_checkpoint(tmp_path), model, optimizer)
    twin, twin_optimizer = state_of(versions["v2"])
    grads = tree_map(lambda p: mx.full(p.shape, 0.5), model.trainable_parameters())
    optimizer.update(model, grads)
    twin_optimizer.update(twin, grads)
    assert same_arrays(flat_arrays(model.trainable_parameters()),
                       flat_arrays(twin.trainable_parameters()))


# ---- a real kill -------------------------------------------------------------------------

def fill(model, optimizer, value: int):
    """Every adapter and optimizer number set to `value`: a state that names its step."""
    model.update(tree_map(lambda p: mx.full(p.shape, value, p.dtype), model.trainable_parameters()))
    optimizer.state = tree_map(lambda a: mx.full(a.shape, value, a.dtype), optimizer.state)
    mx.eval(model.parameters(), optimizer.state)


def uniform_value(arrays: dict) -> float:
    values = {float(v) for a in arrays.values() for v in np.unique(np.array(a))}
    assert len(values) == 1, f"mixed contents {sorted(values)[:5]}"
    return values.pop()


def saver_loop(run: Path):
    """Save steps 1, 2, ... forever, every third one twice (as Ctrl-C right after a save
    does), resuming from the last checkpoint."""
    model, optimizer = fresh_state()
    optimizer.init(model.trainable_parameters())
    found = latest_checkpoint(run)
    start = load_checkpoint(found, model, optimizer)["step"] if found else 0
    for step in itertools.count(start + 1):
        fill(model, optimizer, step)
        save_checkpoint(run, step, model, optimizer, {})
        if step % 3 == 0:
            save_checkpoint(run, step, model, optimizer, {})
        if step == start + 1:
            print("saved", flush=True)  # one save finished: the parent may kill from now on


def check_killed_run(run: Path) -> int:
    """Every checkpoint on disk holds its own step throughout, `latest` names one that is in
    place (or, mid re-save, moved aside); returns the step a resume starts from."""
    root = run / "checkpoints"
    for ckpt in sorted(root.glob("step-*")):
        assert sorted(p.name for p in ckpt.iterdir()) == CHECKPOINT_FILES, ckpt
        step = int(ckpt.name.removeprefix("step-"))
        assert uniform_value(mx.load(str(ckpt / "adapters.safetensors"))) == step, ckpt
        assert uniform_value(mx.load(str(ckpt / "optimizer.safetensors"))) == step, ckpt
    name = (root / "latest").read_text()
    assert name.startswith("step-") and ((root / name).is_dir()
                                         or list(root.glob(f".{name}.old.*"))), f"latest: {name!r}"
    found = latest_checkpoint(run)
    assert found is not None
    model, optimizer = fresh_state()
    step = load_checkpoint(found, model, optimizer)["step"]
    assert uniform_value(dict(tree_flatten(model.trainable_parameters()))) == step
    assert uniform_value(dict(tree_flatten(optimizer.state))) == step
    top = uniform_value(mx.load(str(run / "adapters.safetensors")))
    assert top in (step, step - 1), (top, step)  # the run's adapter is updated last
    return step


def test_sigkill_during_saves_leaves_a_loadable_checkpoint(tmp_path):
    run = tmp_path / "run"
    rng = np.random.default_rng(0)
    # The saver imports the package of this checkout (Python puts only tests/ on its path).
    checkout = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([checkout, os.environ.get("PYTHONPATH", "")])}
    resumed_from = 0
    for _ in range(6):
        with subprocess.Popen([sys.executable, __file__, str(run)], stdout=subprocess.PIPE,
                              env=env, text=True) as saver:
            try:
                first = saver.stdout.readline()
                time.sleep(float(rng.uniform(0, 0.25)))
            finally:
                saver.kill()  # SIGKILL
        assert first.strip() == "saved"
        step = check_killed_run(run)
        assert step > resumed_from  # a kill never loses a finished save
        resumed_from = step


if __name__ == "__main__":
    saver_loop(Path(sys.argv[1]))
