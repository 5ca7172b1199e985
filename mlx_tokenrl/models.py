"""Load models through mlx-lm, cast them to the compute dtype, and attach LoRA."""

import json
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
from mlx.utils import tree_flatten
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear
from mlx_lm.tuner.utils import linear_to_lora_layers

from .dtypes import checkpoint_dtype, resolve_dtype
from . import backend
from .hub import cached_model_path, unreachable_reason
from .config import DEFAULT_MODEL, ConfigError, existing_dir, read_json_object
from .messages import InputError, first_line, warn_once


class ModelLoadError(InputError):
    """One-line, user-facing reason a model or adapter could not be loaded."""


def model_type(net) -> str:
    """config.json's model_type of a loaded mlx-lm model (its module name if it keeps none)."""
    return getattr(net, "model_type", None) or type(net).__module__.rsplit(".", 1)[-1]


# Measured per decode step of a 0.5B model at 32 rows on MLX's CPU backend: float32 0.37 s,
# bfloat16 6.1 s, float16 8.6 s, 8- and 4-bit quantized 13.8-13.9 s. MLX has fast CPU
# kernels for float32 matmuls only.
CPU_SLOWDOWN = {"bfloat16": 16, "float16": 23, "quantized": 37}


def warn_if_slow_on_cpu(dtype: str, quantize_bits: int | None):
    """One line on stderr (once per process) when MLX runs on the CPU and the user asked for
    a precision that is much slower there than float32."""
    if backend.default_device_is_gpu():
        return
    if dtype in ("bfloat16", "float16"):
        warn_once(f"{dtype} on MLX's CPU backend is ~{CPU_SLOWDOWN[dtype]}x slower than float32 "
                  f"here; use --dtype float32 (auto)")
    if quantize_bits:
        warn_once(f"--quantize {quantize_bits} on MLX's CPU backend is "
                  f"~{CPU_SLOWDOWN['quantized']}x slower than float32 here; leave --quantize out")


def _looks_like_path(name: str) -> bool:
    """A local path, not a hub id ("org/name"): it exists, is written as a path (./, /, ~,
    .gguf, more than one /), or points into a local folder (models/typo, models/ existing)."""
    path = Path(name).expanduser()
    return (name.startswith((".", "/", "~")) or name.endswith(".gguf") or name.count("/") > 1
            or path.exists() or (path.parent != Path(".") and path.parent.is_dir()))


def resolve_model_path(model: str) -> str:
    """A local dir stays as is, a .gguf file is converted once to a cache dir, else a hub id."""
    if model.endswith(".gguf"):
        from .gguf_import import cached_conversion

        if not Path(model).expanduser().is_file():
            raise ModelLoadError(f"GGUF file not found: {model}")
        return str(cached_conversion(Path(model).expanduser()))
    if _looks_like_path(model):
        path = Path(model).expanduser()
        if not path.exists():
            raise ModelLoadError(f"model {model!r}: the path does not exist")
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"model {model!r}: no such mlx-lm model directory (expected {path / 'config.json'})")
        return str(path)
    return hub_model_path(model)


def hub_model_path(repo: str) -> str:
    """`repo` itself when the hub answers (mlx-lm downloads or updates it), else its copy in
    the local cache; one line at once rather than huggingface_hub's retries if neither."""
    reason = unreachable_reason()
    if reason is None:
        return repo
    cached = cached_model_path(repo)
    if cached is None:
        raise ModelLoadError(f"could not load model {repo!r} ({reason}; not in the local cache); "
                             f"pass a local mlx-lm directory or a .gguf file with --model")
    return cached


def load_model(model: str = DEFAULT_MODEL, adapter_path=None, dtype: str = "auto",
               quantize_bits: int | None = None):
    """Return (model, tokenizer) ready for compute: cast, optionally quantized, adapter applied."""
    if adapter_path is not None:  # a wrong adapter path fails before the model loads
        check_adapter_files(adapter_path)
    warn_if_slow_on_cpu(dtype, quantize_bits)
    path = resolve_model_path(model)
    try:
        net, tokenizer, config = mlx_lm.load(path, return_config=True)
    except ModelLoadError:
        raise
    except Exception as exc:  # hub unreachable, missing repo, bad config: one clear line
        advice = ("" if _looks_like_path(model) else
                  "; pass a local mlx-lm directory or a .gguf file with --model")
        raise ModelLoadError(f"could not load model {model!r} ({first_line(exc)}){advice}") from None
    net.set_dtype(resolve_dtype(dtype, checkpoint_dtype(config)))
    if quantize_bits:
        nn.quantize(net, group_size=64, bits=quantize_bits)
    if adapter_path is not None:
        load_adapter(net, adapter_path, model)
    mx.eval(net.parameters())
    return net, tokenizer


def adapter_model(model: str | None, adapter_path) -> str:
    """`model` if given, else the model the adapter was trained on as its adapter_config.json
    names it (ours: base_model; mlx-lm's lora: model), else the default. Said on stderr when
    it comes from the adapter, since a relative path there is read from the current directory."""
    if adapter_path is not None:  # a wrong adapter path fails before any model is chosen
        check_adapter_files(adapter_path)
    if model is not None:
        return model
    config = Path(adapter_path) / "adapter_config.json" if adapter_path is not None else None
    if config is None or not config.is_file():
        return DEFAULT_MODEL
    saved = read_json_object(config, "an adapter config")
    base = saved.get("base_model") or saved.get("model")
    if not base:
        return DEFAULT_MODEL
    print(f"model: {base} (the adapter's base model; --model picks another)", file=sys.stderr,
          flush=True)
    return base


def check_adapter_files(adapter_path):
    existing_dir("adapter_path", adapter_path)
    for name in ("adapter_config.json", "adapters.safetensors"):
        if not (Path(adapter_path) / name).is_file():
            raise ModelLoadError(f"adapter {adapter_path}: missing {name}")


def load_adapter(net, adapter_path, model_name="model"):
    from mlx_lm.tuner.utils import load_adapters

    adapter_path = Path(adapter_path)
    check_adapter_files(adapter_path)
    try:
        load_adapters(net, str(adapter_path))
    except ValueError as exc:
        first = str(exc).splitlines()[1].strip() if "\n" in str(exc) else str(exc)
        raise ModelLoadError(
            f"adapter {adapter_path} does not fit model {model_name!r}: {first}") from None
    net.eval()
    return net


def lora_config(rank: int = 8, scale: float = 20.0, num_layers: int = -1,
                keys: list[str] | None = None, dropout: float = 0.0) -> dict:
    """The adapter_config.json content mlx-lm expects (`mlx_lm.load(adapter_path=...)`)."""
    params = {"rank": rank, "scale": scale, "dropout": dropout}
    if keys:
        params["keys"] = list(keys)
    return {"fine_tune_type": "lora", "num_layers": num_layers, "lora_parameters": params}


# The module types mlx-lm's linear_to_lora_layers adapts by default; it keeps this list
# inside the function, so `lora_targets` repeats it to tell which --lora-keys exist.
LORA_TYPES = (nn.Linear, nn.QuantizedLinear, nn.Embedding, nn.QuantizedEmbedding,
              SwitchLinear, QuantizedSwitchLinear)


def lora_targets(net) -> list[str]:
    """The names --lora-keys can take: modules of a transformer block (self_attn.q_proj),
    then modules outside the blocks (lm_head)."""
    def adaptable(module):
        return hasattr(module, "to_lora") or isinstance(module, LORA_TYPES)

    in_blocks = {name for layer in net.layers for name, m in layer.named_modules() if adaptable(m)}
    block_modules = {id(m) for layer in net.layers for _, m in layer.named_modules()}
    outside = {name for name, m in net.named_modules()
               if adaptable(m) and id(m) not in block_modules}
    return sorted(in_blocks) + sorted(outside)


def check_lora_fits(net, num_layers: int, keys: list[str] | None):
    """ConfigError unless the model has `num_layers` blocks and every key names a module:
    mlx-lm would silently adapt nothing for a key that matches no module."""
    if num_layers > len(net.layers):
        raise ConfigError(f"--lora-layers {num_layers}: the model has {len(net.layers)} "
                          f"transformer blocks")
    targets = lora_targets(net)
    unknown = [k for k in keys or () if k not in targets]
    if unknown:
        raise ConfigError(f"--lora-keys {','.join(unknown)} matches no layer of the model; "
                          f"it has {','.join(targets)}")


def add_lora(net, config: dict):
    """Freeze the base and insert LoRA layers as mlx-lm's own trainer does."""
    check_lora_fits(net, config["num_layers"], config["lora_parameters"].get("keys"))
    net.freeze()
    num_layers = config["num_layers"]
    if num_layers < 0:
        num_layers = len(net.layers)
    linear_to_lora_layers(net, num_layers, config["lora_parameters"])
    return net


def lora_flags(net, config: dict) -> dict:
    """What an adapter config asks of a model, as train's flags name it."""
    params = config.get("lora_parameters", {})
    layers = config.get("num_layers", -1)
    return {"--lora-rank": params.get("rank"), "--lora-scale": params.get("scale"),
            "--lora-layers": len(net.layers) if layers < 0 else layers}


def init_from_adapter(net, adapter_path, config: dict):
    """Start the LoRA layers that `config` put into `net` (add_lora) from an existing adapter:
    one from mlx-lm's lora command (SFT, say) or an earlier run. It must have this run's rank,
    scale, layers and keys: otherwise it would start from another policy, or not fit at all.
    mlx-lm's load_adapters would build the LoRA layers from the adapter's own config instead
    of checking them against the run's."""
    adapter_path = Path(adapter_path)
    check_adapter_files(adapter_path)
    where = f"--adapter-path {adapter_path}"
    saved = read_json_object(adapter_path / "adapter_config.json", "an adapter config")
    kind = saved.get("fine_tune_type", "lora")
    if kind != "lora":
        raise ConfigError(f"{where} is a {kind} adapter; a run starts only from a LoRA adapter")
    ours, theirs = lora_flags(net, config), lora_flags(net, saved)
    differ = [name for name in ours if ours[name] != theirs[name]]
    if differ:
        raise ConfigError(f"{where} was trained with {' '.join(f'{n} {theirs[n]}' for n in differ)}, "
                          f"this run has {' '.join(f'{n} {ours[n]}' for n in differ)}: pass the "
                          f"adapter's")
    params = dict(tree_flatten(net.trainable_parameters()))
    weights = mx.load(str(adapter_path / "adapters.safetensors"))
    if params.keys() != weights.keys():
        keys = saved.get("lora_parameters", {}).get("keys")
        first = sorted(params.keys() ^ weights.keys())[0]
        raise ConfigError(f"{where} adapts other modules than this run (e.g. {first}); pass its "
                          f"--lora-keys ({','.join(keys) if keys else 'the default: all linear layers'})")
    wrong = [k for k in params if params[k].shape != weights[k].shape]
    if wrong:
        raise ConfigError(f"{where} does not fit this model: {wrong[0]} has shape "
                          f"{tuple(weights[wrong[0]].shape)}, the model's {tuple(params[wrong[0]].shape)}")
    net.load_weights([(k, w.astype(params[k].dtype)) for k, w in weights.items()], strict=False)
    mx.eval(net.parameters())


def save_adapter_config(out_dir, config: dict, base_model: str):
    # eval, chat, generate and fuse load this model by default, from any directory.
    local = Path(base_model).expanduser()
    data = {**config, "base_model": str(local.resolve()) if local.exists() else base_model}
    Path(out_dir, "adapter_config.json").write_text(json.dumps(data, indent=2))
