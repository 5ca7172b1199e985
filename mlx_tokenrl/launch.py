"""What the launcher (mlx.launch, mpirun) told this process: its rank, the ring hostfile,
which MLX backend to form, and how many ranks share this machine's cores.

All of it is read from the environment and the hostfile, so it is known before the group
is formed (the CLI uses the rank to show live progress on rank 0 only).
"""

import ctypes
import json
import os
from dataclasses import dataclass
from pathlib import Path

from . import backend

LAUNCH_ENV = ("MLX_HOSTFILE", "MLX_RANK", "OMPI_COMM_WORLD_SIZE", "MLX_JACCL_COORDINATOR",
              "MLX_WORLD_SIZE")


@dataclass(frozen=True)
class Hostfile:
    """The ring hostfile mlx.launch wrote (MLX_HOSTFILE): one entry per rank, each a list
    of "ip:port" strings."""
    path: str
    hosts: list | None  # None: unreadable or not a JSON list (MLX reports that itself)

    @property
    def ranks(self) -> int | None:
        if self.hosts is None:
            return None
        return max(len(self.hosts), 1)  # `mlx.launch -n 1` writes an empty hostfile

    def local_ranks(self, rank: int | None) -> int:
        """How many ranks share `rank`'s IP (mlx.launch -n 2: two)."""
        try:
            ips = [entry[0].rsplit(":", 1)[0] for entry in self.hosts]
            return ips.count(ips[rank])
        except (TypeError, IndexError, AttributeError):
            return 1

    def summary(self) -> str:
        """The hosts, for error messages."""
        if self.hosts is None:
            return f"hostfile {self.path}"
        return "ring " + ", ".join(h[0] if isinstance(h, list) and h else str(h)
                                   for h in self.hosts)


def read_hostfile() -> Hostfile | None:
    """The hostfile named by MLX_HOSTFILE, parsed once; None without one."""
    path = os.environ.get("MLX_HOSTFILE")
    if not path:
        return None
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return Hostfile(path, None)
    try:
        hosts = json.loads(text) if text else []
    except ValueError:
        return Hostfile(path, None)
    return Hostfile(path, hosts if isinstance(hosts, list) else None)


def launched_rank() -> int | None:
    """This process's rank when started by a launcher, else None."""
    for name in ("MLX_RANK", "OMPI_COMM_WORLD_RANK"):
        value = os.environ.get(name)
        if value is not None and value.strip().lstrip("-").isdigit():
            return int(value)
    return None


def is_launched(hostfile: Hostfile | None) -> bool:
    """Started by a multi-process launcher with more than one rank."""
    if not any(os.environ.get(name) for name in LAUNCH_ENV):
        return False
    ranks = hostfile.ranks if hostfile is not None else None
    return ranks is None or ranks > 1


def backend_name() -> str:
    """The `mx.distributed.init` backend the launcher set up."""
    if os.environ.get("MLX_IBV_DEVICES"):
        return "jaccl"
    if os.environ.get("MLX_HOSTFILE"):
        return "ring"
    if os.environ.get("OMPI_COMM_WORLD_SIZE"):
        return "mpi"
    if os.environ.get("NCCL_HOST_IP"):
        return "nccl"
    return "any"


def share_cores(local_ranks: int):
    """Ranks on one machine split its cores. OpenBLAS (the Linux CPU fast path) otherwise
    starts one spinning thread per core in every rank, and co-located ranks run 2-3x slower.
    An OPENBLAS_NUM_THREADS set by the user wins."""
    if local_ranks < 2 or not backend.openblas_path or os.environ.get("OPENBLAS_NUM_THREADS"):
        return
    try:
        ctypes.CDLL(backend.openblas_path).openblas_set_num_threads(
            ctypes.c_int(max(1, (os.cpu_count() or 1) // local_ranks)))
    except (OSError, AttributeError):
        pass
