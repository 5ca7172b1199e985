"""Data-parallel training over `mx.distributed`, with processes started by `mlx.launch`.

The trainer calls the few collectives it needs through a `World`: host-side sums and
gathers of small counters, one flat all-reduce of the LoRA gradients, and broadcasts from
rank 0 (initial adapter, resumed checkpoint, resumed config). With a single process every
one of them is the identity and nothing is sent.

Failure handling. MLX's collectives have no timeout: a rank whose peer is frozen, or whose
peer's machine vanished without closing its sockets, would wait forever. So every
collective runs under a deadline watched by a thread; when it passes, the rank prints one
line and exits (code `EXIT_PEER_LOST`). When a peer process dies (kill -9, crash), its
sockets close and MLX reports the lost connection at once: the rank prints the same kind of
line. The deadlines (seconds, environment variables):

    TOKENRL_CONNECT_TIMEOUT  60   forming the ring at start (unreachable host, rank missing)
    TOKENRL_START_TIMEOUT   900   ranks waiting for each other to load the model
    TOKENRL_PEER_TIMEOUT    120   any collective during training; the deadline used is
                                  max(this, 3 x the longest step or eval seen so far)

A rank therefore stops at most one step of its own work plus that deadline after a peer
stops answering, and at once (at its next collective) when the peer's process died.
Forming the group is watched by a helper process instead of a thread (MLX holds the GIL
while it waits for peers there): `watchdog.py`. What the launcher set up (rank, hostfile,
backend, cores shared by the ranks of one machine): `launch.py`.
"""

import hashlib
import json
import os
import signal
import time

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from .dtypes import dtype_name, named_dtype
from .launch import backend_name, is_launched, launched_rank, read_hostfile, share_cores
from .watchdog import Watchdog, error_line, fail, filter_ring_noise, process_watchdog

STEP_SLACK = 3.0


def _env_seconds(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


def connect_timeout() -> float:
    return _env_seconds("TOKENRL_CONNECT_TIMEOUT", 60.0)


def start_timeout() -> float:
    return _env_seconds("TOKENRL_START_TIMEOUT", 900.0)


def peer_timeout() -> float:
    return _env_seconds("TOKENRL_PEER_TIMEOUT", 120.0)


# ---- the world ---------------------------------------------------------------------------

class World:
    """The process group plus deadline-guarded collectives (identity for one process)."""

    def __init__(self, group=None):
        self.group = group
        self._rank = group.rank() if group is not None else 0
        self._size = group.size() if group is not None else 1
        self.watchdog = Watchdog()
        self.slowest = 0.0  # longest step/eval seen, scales the training-time deadline
        self.last_collective = time.monotonic()

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size

    @property
    def is_main(self) -> bool:
        return self._rank == 0

    def note_duration(self, seconds: float):
        self.slowest = max(self.slowest, float(seconds))

    def deadline(self) -> float:
        own_work = time.monotonic() - self.last_collective
        return max(peer_timeout(), STEP_SLACK * max(self.slowest, own_work))

    def _collective(self, what: str, build, timeout: float | None = None):
        """Build and evaluate a collective under the watchdog; a lost peer ends the rank."""
        with self.watchdog.guard(what, self.deadline() if timeout is None else timeout):
            try:
                out = build()
                mx.eval(out)
            except RuntimeError as exc:
                detail = str(exc).replace("[ring] ", "").strip()
                detail = "" if "connection to a peer was lost" in detail else f" ({detail})"
                fail(f"lost the connection to another rank during {what}{detail}; stopping")
        self.last_collective = time.monotonic()
        return out

    # host-side values
    def sum(self, values, what: str = "a sum of counters") -> np.ndarray:
        values = np.asarray(values, dtype=np.float64)
        if self._size == 1:
            return values
        out = self._collective(what, lambda: mx.distributed.all_sum(
            mx.array(values, dtype=mx.float64), group=self.group, stream=mx.cpu))
        return np.array(out, dtype=np.float64)

    def gather(self, values, what: str = "a gather of counters",
               timeout: float | None = None) -> np.ndarray:
        """(size, k) float64: row r holds rank r's values."""
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        if self._size == 1:
            return values[None]
        out = self._collective(what, lambda: mx.distributed.all_gather(
            mx.array(values, dtype=mx.float64), group=self.group, stream=mx.cpu), timeout)
        return np.array(out, dtype=np.float64).reshape(self._size, -1)

    def gather_bytes(self, data: bytes, what: str, timeout: float | None = None) -> list:
        if self._size == 1:
            return [data]
        lengths = self.gather([len(data)], what, timeout)[:, 0].astype(int)
        width = max(int(lengths.max()), 1)
        padded = np.zeros(width, dtype=np.uint8)
        padded[:len(data)] = np.frombuffer(data, dtype=np.uint8)
        out = self._collective(what, lambda: mx.distributed.all_gather(
            mx.array(padded), group=self.group, stream=mx.cpu), timeout)
        rows = np.array(out).reshape(self._size, width)
        return [rows[r, :lengths[r]].tobytes() for r in range(self._size)]

    def broadcast_json(self, value, what: str, timeout: float | None = None):
        """Rank 0's JSON-able value on every rank."""
        if self._size == 1:
            return value
        data = json.dumps(value).encode() if self.is_main else b""
        return json.loads(self.gather_bytes(data, what, timeout)[0])

    # arrays
    def sum_flat(self, arrays: list, what: str, timeout: float | None = None) -> list:
        """All-sum a list of arrays as one buffer per dtype (one ring pass each)."""
        if self._size == 1 or not arrays:
            return list(arrays)
        by_dtype = {}
        for i, a in enumerate(arrays):
            by_dtype.setdefault(a.dtype, []).append(i)
        out = [None] * len(arrays)
        buffers = []
        for idxs in by_dtype.values():
            flat = mx.concatenate([arrays[i].reshape(-1) for i in idxs])
            buffers.append((idxs, mx.distributed.all_sum(flat, group=self.group, stream=mx.cpu)))
        self._collective(what, lambda: [b for _, b in buffers], timeout)
        for idxs, summed in buffers:
            offsets = np.cumsum([arrays[i].size for i in idxs])[:-1].tolist()
            for i, part in zip(idxs, mx.split(summed, offsets)):
                out[i] = part.reshape(arrays[i].shape)
        return out

    def sum_tree(self, tree, what: str = "the gradient all-reduce"):
        """Sum a tree of arrays (the LoRA gradients) over ranks."""
        if self._size == 1:
            return tree
        flat = tree_flatten(tree)
        summed = self.sum_flat([a for _, a in flat], what)
        return tree_unflatten([(k, a) for (k, _), a in zip(flat, summed)])

    def broadcast_arrays(self, arrays: dict | None, what: str,
                         timeout: float | None = None) -> dict:
        """Rank 0's {name: array} on every rank (others pass None or anything)."""
        if self._size == 1:
            return arrays
        manifest = None
        if self.is_main:
            manifest = [[k, list(v.shape), dtype_name(v.dtype)] for k, v in arrays.items()]
        manifest = self.broadcast_json(manifest, what, timeout)
        values = [arrays[k] if self.is_main else mx.zeros(shape, dtype=named_dtype(dtype))
                  for k, shape, dtype in manifest]
        summed = self.sum_flat(values, what, timeout)
        return {k: v for (k, _, _), v in zip(manifest, summed)}

    def digests(self, data: bytes, what: str, timeout: float | None = None) -> list:
        """Every rank's sha256 of `data` (to check that ranks agree)."""
        return self.gather_bytes(hashlib.sha256(data).digest(), what, timeout)


def as_world(world) -> World:
    """Accept a World, an `mx.distributed.Group` or None (a single process)."""
    if isinstance(world, World):
        return world
    if world is None or world.size() == 1:
        return World(None)
    return World(world)


def init_world(resume_hint: str = "") -> World:
    """Form the process group. One process: a trivial World. Under a launcher: connect the
    ring within the connect deadline, or stop with one line saying why."""
    hostfile = read_hostfile()
    if not is_launched(hostfile):
        return World(None)
    rank = launched_rank()
    ranks = hostfile.ranks if hostfile is not None else None
    error_line.identity = f"rank {rank} of {ranks}: " if rank is not None and ranks else ""
    error_line.resume_hint = f" (continue later with: tokenrl-mlx train --resume {resume_hint})" \
        if resume_hint else ""
    filter_ring_noise()
    share_cores(hostfile.local_ranks(rank) if hostfile is not None else 1)
    signal.signal(signal.SIGTERM, lambda *_: fail(
        "stopped (SIGTERM): mlx.launch ends every rank once one of them has exited",
        code=128 + signal.SIGTERM))
    backend = backend_name()
    hosts = hostfile.summary() if hostfile is not None else backend
    seconds = connect_timeout()
    hint = ("check that every host in the hostfile is reachable on those IPs and ports and "
            "runs the same command")
    with process_watchdog(seconds, f"could not form the {backend} group ({hosts}) within "
                                   f"{seconds:.0f} s: a host is unreachable or a rank did not "
                                   f"start; {hint}"):
        try:
            group = mx.distributed.init(strict=True, backend=backend)
        except RuntimeError as exc:
            error_line.resume_hint = ""
            fail(f"could not form the {backend} group ({hosts}): {exc}; {hint}", code=1)
    world = World(group)
    error_line.identity = f"rank {world.rank()} of {world.size()}: "
    return world
