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
while it waits for peers there). Ranks sharing a machine split its cores for OpenBLAS.
"""

import atexit
import hashlib
import json
import os
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

EXIT_PEER_LOST = 75  # EX_TEMPFAIL: the run can be continued with --resume
STEP_SLACK = 3.0
LAUNCH_ENV = ("MLX_HOSTFILE", "MLX_RANK", "OMPI_COMM_WORLD_SIZE", "MLX_JACCL_COORDINATOR",
              "MLX_WORLD_SIZE")


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


def launched_rank() -> int | None:
    """This process's rank when started by a launcher (mlx.launch, mpirun), else None.

    Read from the environment, so it is known before the ring is formed (the CLI uses it
    to show live progress on rank 0 only)."""
    for name in ("MLX_RANK", "OMPI_COMM_WORLD_RANK"):
        value = os.environ.get(name)
        if value is not None and value.strip().lstrip("-").isdigit():
            return int(value)
    return None


def _ring_hosts() -> int | None:
    """Number of ranks in the ring hostfile mlx.launch wrote, or None without one."""
    path = os.environ.get("MLX_HOSTFILE")
    if not path:
        return None
    try:
        text = open(path).read().strip()
    except OSError:
        return None
    if not text:
        return 1  # `mlx.launch -n 1` writes an empty hostfile
    try:
        hosts = json.loads(text)
    except ValueError:
        return None  # let MLX report the parse error
    return len(hosts) if isinstance(hosts, list) else None


def _local_ranks(rank: int | None) -> int:
    """How many ranks of the ring hostfile share this rank's IP (mlx.launch -n 2: two)."""
    path = os.environ.get("MLX_HOSTFILE")
    try:
        hosts = json.loads(open(path).read()) if path else None
        ips = [entry[0].rsplit(":", 1)[0] for entry in hosts]
        return ips.count(ips[rank])
    except (OSError, ValueError, TypeError, IndexError, AttributeError):
        return 1


def _share_cores(local_ranks: int):
    """Ranks on one machine split its cores. OpenBLAS (the Linux CPU fast path) otherwise
    starts one spinning thread per core in every rank, and co-located ranks run 2-3x slower.
    An OPENBLAS_NUM_THREADS set by the user wins."""
    from . import backend

    if local_ranks < 2 or not backend.openblas_path or os.environ.get("OPENBLAS_NUM_THREADS"):
        return
    import ctypes

    try:
        ctypes.CDLL(backend.openblas_path).openblas_set_num_threads(
            ctypes.c_int(max(1, (os.cpu_count() or 1) // local_ranks)))
    except (OSError, AttributeError):
        pass


def _backend() -> str:
    if os.environ.get("MLX_IBV_DEVICES"):
        return "jaccl"
    if os.environ.get("MLX_HOSTFILE"):
        return "ring"
    if os.environ.get("OMPI_COMM_WORLD_SIZE"):
        return "mpi"
    if os.environ.get("NCCL_HOST_IP"):
        return "nccl"
    return "any"


def is_launched() -> bool:
    """Started by a multi-process launcher with more than one rank."""
    if not any(os.environ.get(name) for name in LAUNCH_ENV):
        return False
    hosts = _ring_hosts()
    return hosts is None or hosts > 1


# ---- one clear line, then exit ---------------------------------------------------------

_stderr_fd = 2  # the real stderr (after the ring-noise filter replaced fd 2)
_identity = ""
_resume_hint = ""


def fail(message: str, code: int = EXIT_PEER_LOST):
    """Print one line on the real stderr and end the process at once (no cleanup: another
    thread may be stuck inside a collective that will never return)."""
    line = f"error: {_identity}{message}{_resume_hint}\n"
    try:
        sys.stdout.flush()
    except Exception:  # noqa: BLE001  (we are leaving anyway)
        pass
    try:
        os.write(_stderr_fd, line.encode())
    except OSError:
        pass
    os._exit(code)


def _filter_ring_noise():
    """Drop MLX ring's per-socket log lines ("[ring] Socket 5 was closed by the peer", ten
    of them per lost peer) from stderr, so a failure ends with our one line. Everything else
    is passed through. MLX_RING_VERBOSE=1 or TOKENRL_RING_LOG=1 keeps them."""
    global _stderr_fd
    if os.environ.get("MLX_RING_VERBOSE") or os.environ.get("TOKENRL_RING_LOG"):
        return
    real = os.dup(2)
    read_end, write_end = os.pipe()
    sys.stderr.flush()
    os.dup2(write_end, 2)
    os.close(write_end)
    _stderr_fd = real

    def pump():
        pending = b""
        while True:
            try:
                chunk = os.read(read_end, 65536)
            except OSError:
                break
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            kept = b"".join(line + b"\n" for line in lines if not line.startswith(b"[ring]"))
            if kept:
                os.write(real, kept)
        if pending and not pending.startswith(b"[ring]"):
            os.write(real, pending)

    thread = threading.Thread(target=pump, name="stderr-filter", daemon=True)
    thread.start()

    def drain():
        try:
            sys.stderr.flush()
        except Exception:  # noqa: BLE001
            pass
        os.dup2(real, 2)  # closes the pipe's last write end: the pump sees EOF
        thread.join(timeout=2.0)

    atexit.register(drain)


class Watchdog:
    """Ends the process with one line when a guarded region outlives its deadline."""

    def __init__(self):
        self._deadline = None
        self._what = ""
        self._timeout = 0.0
        self._thread = None

    @contextmanager
    def guard(self, what: str, timeout: float):
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="collective-watchdog",
                                            daemon=True)
            self._thread.start()
        self._what, self._timeout = what, timeout
        self._deadline = time.monotonic() + timeout
        try:
            yield
        finally:
            self._deadline = None

    def _watch(self):
        while True:
            time.sleep(0.1)
            deadline = self._deadline
            if deadline is not None and time.monotonic() > deadline:
                fail(f"no answer from the other ranks for {self._timeout:.0f} s during "
                     f"{self._what}: a rank died, hangs or lost the network; stopping")


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
            manifest = [[k, list(v.shape), str(v.dtype).split(".")[-1]] for k, v in arrays.items()]
        manifest = self.broadcast_json(manifest, what, timeout)
        values = [arrays[k] if self.is_main else mx.zeros(shape, dtype=_dtype(dtype))
                  for k, shape, dtype in manifest]
        summed = self.sum_flat(values, what, timeout)
        return {k: v for (k, _, _), v in zip(manifest, summed)}

    def digests(self, data: bytes, what: str, timeout: float | None = None) -> list:
        """Every rank's sha256 of `data` (to check that ranks agree)."""
        return self.gather_bytes(hashlib.sha256(data).digest(), what, timeout)


def _dtype(name: str):
    return getattr(mx, name, None) or getattr(mx, name + "_")


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
    global _identity, _resume_hint
    if not is_launched():
        return World(None)
    rank = launched_rank()
    hosts = _ring_hosts()
    _identity = f"rank {rank} of {hosts}: " if rank is not None and hosts else ""
    _resume_hint = f" (continue later with: tokenrl-mlx train --resume {resume_hint})" \
        if resume_hint else ""
    _filter_ring_noise()
    _share_cores(_local_ranks(rank))
    signal.signal(signal.SIGTERM, lambda *_: fail(
        "stopped (SIGTERM): mlx.launch ends every rank once one of them has exited",
        code=128 + signal.SIGTERM))
    backend = _backend()
    seconds = connect_timeout()
    hint = ("check that every host in the hostfile is reachable on those IPs and ports and "
            "runs the same command")
    # mx.distributed.init holds the GIL while it waits in accept()/connect(), so no Python
    # thread can watch it: a small helper process does, and kills this one when it is late.
    guard = _process_watchdog(seconds, f"error: {_identity}could not form the {backend} group "
                                       f"({_hostfile_summary()}) within {seconds:.0f} s: a host "
                                       f"is unreachable or a rank did not start; {hint}\n")
    try:
        group = mx.distributed.init(strict=True, backend=backend)
    except RuntimeError as exc:
        _resume_hint = ""
        fail(f"could not form the {backend} group ({_hostfile_summary()}): {exc}; {hint}",
             code=1)
    finally:
        guard.stdin.close()  # tells the helper to leave quietly
        guard.wait()
    world = World(group)
    _identity = f"rank {world.rank()} of {world.size()}: "
    return world


_WATCHDOG_CODE = """
import os, select, signal, sys
parent, seconds, message = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
ready, _, _ = select.select([sys.stdin], [], [], seconds)
if not ready:
    os.write(2, message.encode())
    os.kill(parent, signal.SIGKILL)
"""


def _process_watchdog(seconds: float, message: str):
    """A helper process that prints `message` and kills us unless its stdin closes first."""
    import subprocess

    return subprocess.Popen([sys.executable, "-S", "-I", "-c", _WATCHDOG_CODE,
                             str(os.getpid()), str(seconds), message],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=_stderr_fd, close_fds=True)


def _hostfile_summary() -> str:
    path = os.environ.get("MLX_HOSTFILE")
    if not path:
        return _backend()
    try:
        hosts = json.loads(open(path).read())
        return "ring " + ", ".join(h[0] if isinstance(h, list) and h else str(h) for h in hosts)
    except (OSError, ValueError):
        return f"hostfile {path}"


def free_ports(count=2):
    """A base port with `count` consecutive free loopback ports, for `mlx.launch
    --starting-port` (rank r listens on base + r) in tests, the drill and benchmarks."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + count > 65535:
            continue
        try:
            socks = []
            for p in range(base, base + count):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free ports")


def child_pids(pid: int) -> list:
    """Child pids of `pid`, read from /proc (no procps needed)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def launched_rank_pids(launcher, ranks: int, timeout: float = 30.0) -> dict:
    """{rank: pid} of the processes that `mlx.launch` (the Popen `launcher`) started, told
    apart by MLX_RANK in their environment; {} when not all `ranks` show up within `timeout`
    or the launcher exits first. For drills and tests that stop one rank."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and launcher.poll() is None:
        found = {}
        for pid in child_pids(launcher.pid):
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            for item in environ:
                if item.startswith(b"MLX_RANK="):
                    found[int(item[9:])] = pid
        if len(found) == ranks:
            return found
        time.sleep(0.02)
    return {}
