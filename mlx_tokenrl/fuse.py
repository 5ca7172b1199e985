"""Merge a LoRA adapter into its base model and save a standalone mlx-lm model directory."""

from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_unflatten
from mlx_lm.utils import dequantize_model, hf_repo_to_path, load_config, save, upload_to_hub

from .dtypes import checkpoint_dtype
from .models import load_model, resolve_model_path


def _model_dir(path: str) -> Path:
    # A hub id was downloaded by load_model, so its snapshot is in the local cache.
    return Path(path) if Path(path).exists() else hf_repo_to_path(path)


def fuse_adapter(model: str, adapter_path, out_dir, dequantize: bool = False) -> Path:
    """Load base + adapter, fold every LoRA layer into its linear, save to `out_dir`."""
    source = resolve_model_path(model)
    # A float32 base (a convert-gguf output) is merged in float32: `auto` computes it in
    # bfloat16 on Metal, and the rounded weights would be stored back as float32.
    config = load_config(Path(source)) if Path(source).is_dir() else None
    stored = checkpoint_dtype(config) if config is not None else None
    float32 = stored is not None and stored == mx.float32
    net, tokenizer = load_model(model, adapter_path=adapter_path,
                                dtype="float32" if float32 else "auto")
    if config is None:  # a hub id: load_model has downloaded it
        config = load_config(_model_dir(source))

    fused = [(name, m.fuse(dequantize=dequantize)) for name, m in net.named_modules()
             if hasattr(m, "fuse")]
    net.update_modules(tree_unflatten(fused))
    if dequantize:
        net = dequantize_model(net)
        config.pop("quantization", None)
        config.pop("quantization_config", None)

    # load_model computes in float32 on CPU; store in the checkpoint's dtype so the
    # fused model is no bigger than its base.
    stored = checkpoint_dtype(config)
    if stored is not None:
        net.set_dtype(stored)

    out_dir = Path(out_dir)
    save(out_dir, source, net, tokenizer, config, donate_model=False)
    return out_dir


def upload(out_dir, repo: str):
    """Push a fused model directory to the Hugging Face Hub (needs `hf auth login`)."""
    upload_to_hub(str(out_dir), repo)
