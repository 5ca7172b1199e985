"""One dtype-name map: names chosen by users, read from config.json, sent between ranks."""

import json

import mlx.core as mx
import pytest

from mlx_tokenrl.checkpoint import adapter_weights
from mlx_tokenrl.dtypes import checkpoint_dtype, dtype_name, named_dtype, resolve_dtype
from mlx_tokenrl.fuse import fuse_adapter
from mlx_tokenrl.models import add_lora, load_model, lora_config, save_adapter_config
from mlx_tokenrl.toy import build_toy_model


@pytest.mark.parametrize("config, stored", [
    ({"torch_dtype": "bfloat16"}, mx.bfloat16),
    ({"dtype": "float16"}, mx.float16),  # the key newer transformers write
    ({"torch_dtype": "float32", "dtype": "bfloat16"}, mx.float32),
    ({"torch_dtype": "auto"}, None),
    ({}, None),
])
def test_a_checkpoint_dtype_is_read_from_either_key(config, stored):
    assert checkpoint_dtype(config) == stored


def test_every_mlx_dtype_name_reads_back():
    """Adapter and optimizer-state manifests name dtypes by these strings (World.broadcast_arrays)."""
    names = {mx.bool_: "bool", mx.uint8: "uint8", mx.uint32: "uint32", mx.uint64: "uint64",
             mx.int32: "int32", mx.float16: "float16", mx.bfloat16: "bfloat16",
             mx.float32: "float32"}
    for dtype, name in names.items():
        assert dtype_name(dtype) == name and named_dtype(name) == dtype
    assert named_dtype("array") is None and named_dtype("") is None


def test_compute_dtype_choice():
    assert resolve_dtype("auto", mx.bfloat16) == mx.float32  # the CPU backend
    assert resolve_dtype("bfloat16") == mx.bfloat16 and resolve_dtype("float16") == mx.float16
    with pytest.raises(ValueError, match="unknown dtype 'half': use auto, float32, float16, "
                                         "bfloat16"):
        resolve_dtype("half")


def test_auto_computes_in_half_precision_on_a_gpu(monkeypatch):
    from mlx_tokenrl import dtypes

    monkeypatch.setattr(dtypes, "default_device_is_gpu", lambda: True)
    assert resolve_dtype("auto", mx.float16) == mx.float16
    for stored in (mx.bfloat16, mx.float32, None):
        assert resolve_dtype("auto", stored) == mx.bfloat16, stored
    assert resolve_dtype("float32", mx.bfloat16) == mx.float32


def test_fuse_stores_the_checkpoint_dtype_named_by_the_new_key(tmp_path):
    """Computed in float32 on CPU, the fused model is saved back in the base's dtype."""
    base = build_toy_model(tmp_path / "base")
    config = json.loads((base / "config.json").read_text())
    config["dtype"] = "bfloat16"
    del config["torch_dtype"]
    (base / "config.json").write_text(json.dumps(config))
    net, _ = load_model(str(base))
    lora = lora_config(rank=2)
    add_lora(net, lora)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    mx.save_safetensors(str(adapter / "adapters.safetensors"), adapter_weights(net))
    save_adapter_config(adapter, lora, str(base))
    out = fuse_adapter(str(base), adapter, tmp_path / "fused")
    weights = mx.load(str(next(out.glob("model*.safetensors"))))
    assert {v.dtype for v in weights.values()} == {mx.bfloat16}
