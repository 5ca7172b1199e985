"""mlx-tokenrl: token-efficient RL for LLM reasoning on MLX."""

from . import backend  # noqa: F401  (loads OpenBLAS before anything imports mlx.core)

__version__ = "0.1.0"
