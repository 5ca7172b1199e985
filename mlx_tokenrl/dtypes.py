"""Dtype names: the float dtypes a user can pick, a checkpoint's stored dtype, the compute
dtype, and names for any MLX dtype (for manifests sent between ranks)."""

import mlx.core as mx

from .backend import default_device_is_gpu
from .config import FLOAT_DTYPES

DTYPES = {name: getattr(mx, name) for name in FLOAT_DTYPES}


def dtype_name(dtype: mx.Dtype) -> str:
    """"bfloat16" for mx.bfloat16, "bool" for mx.bool_ (config.json's spelling)."""
    return str(dtype).split(".")[-1]


def named_dtype(name: str) -> mx.Dtype | None:
    """The MLX dtype `dtype_name` calls `name`, or None."""
    value = getattr(mx, name, None) or getattr(mx, name + "_", None)
    return value if isinstance(value, mx.Dtype) else None


def checkpoint_dtype(config: dict) -> mx.Dtype | None:
    """The dtype a model's config.json says its weights are stored in (`torch_dtype`, or
    `dtype` as newer transformers write it), or None."""
    return named_dtype(str(config.get("torch_dtype") or config.get("dtype") or ""))


def resolve_dtype(name, checkpoint=None):
    """`auto`: float32 on CPU (half-precision matmul is slow there); on a GPU the checkpoint's
    half precision, and bfloat16 for a float32 checkpoint (a GGUF conversion, some small
    models), which would double the memory and the time of every step there."""
    if name == "auto":
        if not default_device_is_gpu():
            return mx.float32
        half = checkpoint is not None and checkpoint in (mx.float16, mx.bfloat16)  # (== refuses None)
        return checkpoint if half else mx.bfloat16
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}: use auto, {', '.join(DTYPES)}") from None
