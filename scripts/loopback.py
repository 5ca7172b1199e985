"""Several ranks on this machine with `mlx.launch --backend ring` on 127.0.0.1: the pieces
the distributed tests, the fault drill and the distributed benchmark share.

Scripts import it as a sibling (`python scripts/x.py` puts scripts/ on sys.path); pytest
finds it through `pythonpath` in pyproject.toml.
"""

import os
import socket
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent  # mlx.launch and tokenrl-mlx of this environment


def launch_env(**extra) -> dict:
    """This environment with BIN first on PATH (mlx.launch starts `tokenrl-mlx` by name),
    plus `extra` variables."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def launch_command(ranks: int, command: list, port: int | None = None) -> list:
    """`mlx.launch -n ranks --backend ring` running `command`, ranks listening from `port`
    on (free ones when None)."""
    port = free_ports(ranks) if port is None else port
    return [str(BIN / "mlx.launch"), "-n", str(ranks), "--backend", "ring",
            "--starting-port", str(port), *command]


def free_ports(count=2):
    """A base port with `count` consecutive free loopback ports, for `mlx.launch
    --starting-port` (rank r listens on base + r)."""
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


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (read from /proc)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except (OSError, IndexError):
        return False


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
