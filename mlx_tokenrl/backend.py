"""Pick the fast compute path before MLX is first imported.

MLX's Linux CPU wheel links a reference BLAS that runs fp32 matmul ~50x slower than
OpenBLAS. Loading OpenBLAS into the global symbol namespace *before* `mlx.core` is
imported makes MLX's BLAS calls resolve to it. On macOS MLX uses Accelerate/Metal and
nothing here applies.
"""

import ctypes
import ctypes.util
import os
import sys
import warnings

OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
)
DISABLE_ENV = "TOKENRL_NO_OPENBLAS"

openblas_path = None  # set when the fast path was taken


def find_openblas():
    for path in OPENBLAS_CANDIDATES:
        if os.path.exists(path):
            return path
    return ctypes.util.find_library("openblas")


def load_openblas():
    """Load OpenBLAS globally on Linux; return its path, or None when not taken."""
    global openblas_path
    if not sys.platform.startswith("linux") or os.environ.get(DISABLE_ENV):
        return None
    if openblas_path is not None:
        return openblas_path
    if "mlx.core" in sys.modules:
        warnings.warn("mlx.core was imported before mlx_tokenrl: OpenBLAS fast path not taken")
        return None
    path = find_openblas()
    if path is None:
        warnings.warn(
            "OpenBLAS not found: MLX will use its slow reference BLAS on this CPU. "
            "Install it with: apt-get install -y libopenblas0-pthread"
        )
        return None
    ctypes.CDLL(path, mode=os.RTLD_GLOBAL)
    openblas_path = path
    return path


load_openblas()


def default_device_is_gpu():
    import mlx.core as mx  # here, not above: the CLI's help and argument errors load no MLX

    return mx.default_device() == mx.gpu
