"""Keeping ranks in agreement: same config, same base model and data, identical adapters.

Checked at start (a host with another YAML, model file or dataset stops every rank with one
line) and at every checkpoint (bitwise adapter comparison, re-synced from rank 0 if needed).
"""

import hashlib
import json
from dataclasses import asdict

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from .checkpoint import adapter_weights
from .config import ConfigError
from .distributed import World


def model_fingerprint(model) -> bytes:
    """Cheap identity of the base weights (not the adapter): names, shapes and the first
    values of each."""
    h = hashlib.sha256()
    adapter = set(adapter_weights(model))
    for name, value in tree_flatten(model.parameters()):
        if name in adapter:
            continue
        h.update(f"{name}{value.shape}{value.dtype}".encode())
        h.update(np.array(value.reshape(-1)[:64].astype(mx.float32)).tobytes())
    return h.digest()


def task_fingerprint(task) -> bytes:
    h = hashlib.sha256()
    for split in (task.train, task.test):
        h.update(str(len(split)).encode())
        for ex in split:
            h.update(f"{ex.question}\x00{ex.answer}\x01".encode())
    return h.digest()


def check_configs_agree(cfg, world: World):
    """Every rank must run the same configuration (a different YAML or version on a host)."""
    mine = json.dumps(asdict(cfg), sort_keys=True).encode()
    digests = world.digests(mine, "the configuration check")
    if len(set(digests)) == 1:
        return
    configs = [json.loads(c) for c in world.gather_bytes(mine, "the configuration check")]
    differ = []
    for key in sorted(configs[0]):
        values = [c.get(key) for c in configs]
        if any(v != values[0] for v in values):
            differ.append(f"{key} (" + ", ".join(f"rank {r}: {v!r}" for r, v in enumerate(values)) + ")")
    raise ConfigError("the ranks were started with different configurations: " + "; ".join(differ))


def check_inputs_agree(model, task, world: World, timeout: float):
    """After loading (the start barrier): same base weights and same data on every rank."""
    ours = model_fingerprint(model) + task_fingerprint(task)
    digests = world.digests(ours, "the start barrier (ranks loading the model)", timeout)
    bad = [r for r, d in enumerate(digests) if d != digests[0]]
    if bad:
        raise ConfigError(f"rank(s) {', '.join(map(str, bad))} loaded a different base model or "
                         f"dataset than rank 0: every host needs the same model and data files")


def broadcast_training_state(model, optimizer, world: World, with_optimizer: bool):
    """Give every rank rank 0's adapter (and optimizer state): identical from the start."""
    weights = world.broadcast_arrays(adapter_weights(model) if world.is_main else None,
                                     "the adapter broadcast")
    model.load_weights(list(weights.items()), strict=False)
    if with_optimizer:
        state = dict(tree_flatten(optimizer.state)) if world.is_main else None
        optimizer.state = tree_unflatten(list(world.broadcast_arrays(
            state, "the optimizer-state broadcast").items()))
    mx.eval(model.parameters(), optimizer.state)


def adapter_digest(model) -> bytes:
    h = hashlib.sha256()
    for name, value in sorted(adapter_weights(model).items()):
        h.update(name.encode())
        h.update(np.array(value).tobytes())
    return h.digest()


def ensure_ranks_agree(model, optimizer, world: World) -> bool:
    """Bitwise comparison of the adapters; re-sync from rank 0 if they ever drifted."""
    if world.size() == 1:
        return True
    digests = world.digests(adapter_digest(model), "the adapter check")
    if len(set(digests)) == 1:
        return True
    broadcast_training_state(model, optimizer, world, with_optimizer=True)
    return False
