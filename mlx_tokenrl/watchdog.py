"""Stopping a rank with one clear line when its peers are lost.

`fail` prints the line and ends the process. Two watchdogs call it when a deadline passes:
a thread for collectives during training, and a helper process while the group is being
formed (MLX holds the GIL while it waits for peers there, so no thread could run). The
stderr filter drops MLX ring's per-socket log lines so that our line is the last one.
"""

import atexit
import os
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

EXIT_PEER_LOST = 75  # EX_TEMPFAIL: the run can be continued with --resume


@dataclass
class ErrorLine:
    """What every error line of this rank starts and ends with, and where it goes."""
    stderr_fd: int = 2  # the real stderr (after the ring-noise filter replaced fd 2)
    identity: str = ""  # "rank 0 of 2: "
    resume_hint: str = ""  # " (continue later with: tokenrl-mlx train --resume DIR)"


error_line = ErrorLine()


def fail(message: str, code: int = EXIT_PEER_LOST):
    """Print one line on the real stderr and end the process at once (no cleanup: another
    thread may be stuck inside a collective that will never return)."""
    line = f"error: {error_line.identity}{message}{error_line.resume_hint}\n"
    try:
        sys.stdout.flush()
    except Exception:  # noqa: BLE001  (we are leaving anyway)
        pass
    try:
        os.write(error_line.stderr_fd, line.encode())
    except OSError:
        pass
    os._exit(code)


def filter_ring_noise():
    """Drop MLX ring's per-socket log lines ("[ring] Socket 5 was closed by the peer", ten
    of them per lost peer) from stderr, so a failure ends with our one line. Everything else
    is passed through. MLX_RING_VERBOSE=1 or TOKENRL_RING_LOG=1 keeps them."""
    if os.environ.get("MLX_RING_VERBOSE") or os.environ.get("TOKENRL_RING_LOG"):
        return
    real = os.dup(2)
    read_end, write_end = os.pipe()
    sys.stderr.flush()
    os.dup2(write_end, 2)
    os.close(write_end)
    error_line.stderr_fd = real

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


_WATCHDOG_CODE = """
import os, select, signal, sys
parent, seconds, message = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
ready, _, _ = select.select([sys.stdin], [], [], seconds)
if not ready:
    os.write(2, message.encode())
    os.kill(parent, signal.SIGKILL)
"""


@contextmanager
def process_watchdog(seconds: float, message: str):
    """While inside: a helper process prints the error line `message` and kills us after
    `seconds`. On leaving, its stdin closes and it exits quietly."""
    line = f"error: {error_line.identity}{message}\n"
    guard = subprocess.Popen([sys.executable, "-S", "-I", "-c", _WATCHDOG_CODE,
                              str(os.getpid()), str(seconds), line],
                             stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                             stderr=error_line.stderr_fd, close_fds=True)
    try:
        yield
    finally:
        guard.stdin.close()
        guard.wait()
