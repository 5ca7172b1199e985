"""Convert a llama.cpp GGUF checkpoint into an mlx-lm model directory.

    from mlx_tokenrl.gguf_import import convert_gguf, cached_conversion
    out = convert_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "models/smollm2")  # -> Path
    out = cached_conversion("SmolLM2-135M-Instruct.Q4_1.gguf")  # converts once, then reuses
    model, tokenizer = mlx_lm.load(str(out))

The output directory holds config.json, model.safetensors (dense weights in the requested
dtype) and a byte-level BPE tokenizer (tokenizer.json + tokenizer_config.json with the GGUF's
chat template), built with the `tokenizers` library so neither torch nor transformers' GGUF
loader is needed.

Supported:
  * architectures: llama, qwen2
  * tensor types: F32, F16, Q8_0, Q4_0, Q4_1 (read by `mx.load`; quantized blocks are
    dequantized with float32 scales/biases, which reproduces llama.cpp's values exactly), plus
    BF16, Q5_0/Q5_1, K-quants and IQ types through gguf-py's numpy dequantizer
    (`gguf.quants.dequantize`) for files or tensors that `mx.load` cannot read losslessly.
  * tokenizer: tokenizer.ggml.model == "gpt2" (byte-level BPE) with the llama.cpp
    pre-tokenizers listed in `_PRE_TOKENIZER_REGEXES`.

llama.cpp's HF->GGUF converter permutes the rows of q_proj/k_proj per head for the llama
architecture (it uses interleaved RoPE, mlx-lm uses rotate-half); this is undone here. qwen2
uses NEOX-style RoPE in llama.cpp and is stored unpermuted.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from .dtypes import DTYPES
from .messages import InputError

__all__ = ["GGUFError", "convert_gguf", "cached_conversion", "default_cache_dir"]

# Bump when the converter's output changes so stale cache entries are not reused.
CONVERTER_VERSION = 1

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
_PERMUTED_ARCHITECTURES = ("llama",)  # archs whose q/k rows llama.cpp permutes
_MX_LOSSLESS_TYPES = ("F32", "F16", "Q4_0", "Q4_1", "Q8_0")  # mx.load reads these exactly
_GROUP_SIZE = 32  # block size of Q4_0 / Q4_1 / Q8_0


# GGUF tensor-name pieces -> mlx-lm (HF) names.
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

# Pre-tokenizer regexes, as used by llama.cpp (llama-vocab.cpp), keyed by tokenizer.ggml.pre.
# Each regex splits every piece produced by the previous one ("isolated" splitting).
_GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_QWEN2_RE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_RE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZER_REGEXES = {
    # digits one by one, then GPT-2 byte-level splitting
    **{k: [r"\p{N}", _GPT2_RE] for k in (
        "smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")},
    **{k: [_GPT2_RE] for k in ("gpt-2", "mpt", "olmo", "jais", "trillion")},
    **{k: [_QWEN2_RE] for k in ("qwen2", "stablelm2", "hunyuan")},
    **{k: [_LLAMA3_RE] for k in ("llama-bpe", "llama3", "dbrx", "smaug-bpe")},
    "default": [r"[\p{P}\$\+<=>\^~\|]+", _GPT2_RE, r"\p{N}+", r"[0-9][0-9][0-9]"],
}
_IGNORE_MERGES_PRE = ("llama-bpe", "llama3", "dbrx", "smaug-bpe")
_NFC_PRE = ("qwen2",)  # HF Qwen2 tokenizers NFC-normalize

# llama.cpp token types
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4


GGUF_MAGIC = b"GGUF"  # the first four bytes of every GGUF file


class GGUFError(InputError, ValueError):
    """The GGUF file uses something this converter does not support."""


# --------------------------------------------------------------------------- reading


def _plain(value):
    """mx.load metadata value -> plain Python (str / int / float / bool / list)."""
    if isinstance(value, mx.array):
        return value.item() if value.ndim == 0 else value.tolist()
    return value


def _f32(x: float) -> float:
    """Shortest decimal of a float32 value (9.999999747e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


def _open_reader(path: Path):
    """gguf-py reader (memory-mapped): tensor types, and the fallback metadata/data source."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise GGUFError("reading GGUF files needs the gguf package: "
                        "pip install 'mlx-tokenrl[gguf]'") from None

    return GGUFReader(str(path))


def _numpy_dequantize(reader, names) -> dict[str, mx.array]:
    """Dequantize the named tensors with gguf-py (float32, HF row-major layout)."""
    from gguf import quants

    out = {}
    for t in reader.tensors:
        if t.name not in names:
            continue
        try:
            arr = quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise GGUFError(
                f"unsupported GGUF tensor type {t.tensor_type.name} (tensor {t.name}); "
                "supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, K-quants, IQ types"
            ) from None
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        out[t.name] = mx.array(np.ascontiguousarray(arr, dtype=np.float32).reshape(shape))
    return out


def _dequantize_mx(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Turn mx.load's (weight, scales, biases) triples into dense float32 arrays."""
    dense = {}
    for key, value in weights.items():
        if key.endswith((".scales", ".biases")):
            continue
        base = key.rsplit(".", 1)[0]
        if f"{base}.scales" in weights:
            scales = weights[f"{base}.scales"].astype(mx.float32)
            biases = weights[f"{base}.biases"].astype(mx.float32)
            bits = value.shape[-1] * 32 // (scales.shape[-1] * _GROUP_SIZE)
            if bits not in (4, 8):
                raise GGUFError(f"cannot infer the bit width of quantized tensor {key}")
            value = mx.dequantize(value, scales, biases, group_size=_GROUP_SIZE, bits=bits)
        dense[key] = value.astype(mx.float32)
    return dense


def _read_gguf(path: Path) -> tuple[dict[str, mx.array], dict]:
    """Return (dense float32 tensors keyed by GGUF name, plain-Python metadata)."""
    reader = _open_reader(path)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    try:
        weights, meta = mx.load(str(path), return_metadata=True)
        meta = {k: _plain(v) for k, v in meta.items()}
    except Exception:  # e.g. Q5_0/Q5_1: mx.load refuses the whole file
        weights = None
        meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}

    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(
            f"unsupported GGUF architecture {arch!r}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )

    if weights is None:
        return _numpy_dequantize(reader, set(types)), meta
    # mx.load turns BF16 and K-quants into float16 (lossy): take those from gguf-py instead.
    others = {n for n, t in types.items() if t not in _MX_LOSSLESS_TYPES}
    dense = _dequantize_mx({k: v for k, v in weights.items() if k not in others})
    dense.update(_numpy_dequantize(reader, others))
    return dense, meta


# --------------------------------------------------------------------------- weights


def _unpermute_rows(w: mx.array, n_head: int) -> mx.array:
    """Undo llama.cpp's per-head row interleave (reshape(n, 2, d/2) -> swap), rows = axis 0."""
    rest = w.shape[1:]
    per_head = w.shape[0] // n_head
    return w.reshape(n_head, per_head // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def _hf_name(gguf_name: str) -> str:
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if m:
        layer, part, kind = m.groups()
        if part in _BLOCK_NAMES:
            return f"model.layers.{layer}.{_BLOCK_NAMES[part]}.{kind}"
    else:
        m = re.fullmatch(r"(\w+)\.(weight|bias)", gguf_name)
        if m and m.group(1) in _GLOBAL_NAMES:
            return f"{_GLOBAL_NAMES[m.group(1)]}.{m.group(2)}"
    raise GGUFError(f"unsupported GGUF tensor {gguf_name!r} (no mlx-lm counterpart)")


def _convert_weights(dense, arch, n_head, n_kv_head):
    out = {}
    for name, w in dense.items():
        if name == "rope_freqs.weight":
            raise GGUFError(
                "unsupported GGUF tensor 'rope_freqs.weight' (llama3-style RoPE frequency "
                "scaling)"
            )
        hf = _hf_name(name)
        if arch in _PERMUTED_ARCHITECTURES:
            if ".self_attn.q_proj." in hf:
                w = _unpermute_rows(w, n_head)
            elif ".self_attn.k_proj." in hf:
                w = _unpermute_rows(w, n_kv_head)
        out[hf] = w
    return out


# --------------------------------------------------------------------------- config


def _build_config(meta, weights, arch, dtype):
    def get(key, default=None, required=True):
        full = f"{arch}.{key}"
        if full in meta:
            return meta[full]
        if required and default is None:
            raise GGUFError(f"GGUF metadata key {full!r} missing")
        return default

    hidden = int(get("embedding_length"))
    n_head = int(get("attention.head_count"))
    n_kv = int(get("attention.head_count_kv", n_head))
    head_dim = int(get("attention.key_length", hidden // n_head))
    rope_dim = int(get("rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise GGUFError(
            f"unsupported partial RoPE (rope.dimension_count={rope_dim}, head_dim={head_dim})"
        )
    if int(get("attention.value_length", head_dim)) != head_dim:
        raise GGUFError("unsupported GGUF: attention.value_length differs from key_length")
    embed = weights["model.embed_tokens.weight"]
    tied = "lm_head.weight" not in weights

    config = {
        "architectures": ["LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"],
        "model_type": arch,
        "hidden_size": hidden,
        "num_hidden_layers": int(get("block_count")),
        "intermediate_size": int(get("feed_forward_length")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "rms_norm_eps": _f32(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(get("rope.freq_base", 10000.0)),
        "vocab_size": int(embed.shape[0]),
        "max_position_embeddings": int(get("context_length", 2048)),
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
        "torch_dtype": dtype,
    }
    if head_dim != hidden // n_head:
        if arch != "llama":
            raise GGUFError(f"unsupported head_dim {head_dim} for architecture {arch!r}")
        config["head_dim"] = head_dim
    if arch == "llama":
        config["attention_bias"] = "model.layers.0.self_attn.q_proj.bias" in weights
        config["mlp_bias"] = "model.layers.0.mlp.up_proj.bias" in weights

    scaling = get("rope.scaling.type", "none", required=False)
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise GGUFError(f"unsupported RoPE scaling type {scaling!r}")
        config["rope_scaling"] = {"type": "linear", "factor": _f32(get("rope.scaling.factor"))}

    bos = meta.get("tokenizer.ggml.bos_token_id")
    eos_ids = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        tid = meta.get(f"tokenizer.ggml.{key}")
        if tid is not None and int(tid) not in eos_ids:
            eos_ids.append(int(tid))
    if bos is not None:
        config["bos_token_id"] = int(bos)
    if eos_ids:
        config["eos_token_id"] = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    return config


# --------------------------------------------------------------------------- tokenizer


def _build_tokenizer(meta, model_max_length: int):
    """Return (tokenizers.Tokenizer, tokenizer_config dict) from the GGUF vocabulary."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
    from tokenizers import pre_tokenizers, processors

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFError(
            f"unsupported GGUF tokenizer model {kind!r} (only byte-level BPE 'gpt2' is supported)"
        )
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZER_REGEXES:
        raise GGUFError(f"unsupported GGUF pre-tokenizer {pre!r}")

    tokens = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    vocab = {tok: i for i, tok in enumerate(tokens)}

    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, ignore_merges=pre in _IGNORE_MERGES_PRE)
    )
    if pre in _NFC_PRE:
        tok.normalizer = normalizers.NFC()
    regexes = list(_PRE_TOKENIZER_REGEXES[pre])
    byte_level_regex = regexes[-1] == _GPT2_RE  # ByteLevel's built-in regex is GPT-2's
    if byte_level_regex:
        regexes.pop()
    steps = [
        pre_tokenizers.Digits(individual_digits=True) if rx == r"\p{N}"
        else pre_tokenizers.Split(Regex(rx), behavior="isolated")
        for rx in regexes
    ]
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=byte_level_regex))
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps) if len(steps) > 1 else steps[0]
    tok.decoder = decoders.ByteLevel()

    special = [
        AddedToken(t, special=(ty == _TOKEN_CONTROL), normalized=False)
        for t, ty in zip(tokens, types)
        if ty in (_TOKEN_CONTROL, _TOKEN_USER_DEFINED)
    ]
    if special:
        tok.add_tokens(special)

    def token(key):
        tid = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(tid)] if tid is not None and 0 <= int(tid) < len(tokens) else None

    bos, eos = token("bos"), token("eos")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        a = " ".join(([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else []))
        b = " ".join(([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else []))
        specials = [(t, vocab[t]) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
        tok.post_processor = processors.TemplateProcessing(
            single=a, pair=f"{a} {b}", special_tokens=list(dict.fromkeys(specials))
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)

    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
    }
    for key, gguf_key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        if (t := token(gguf_key)) is not None:
            tok_config[f"{key}_token"] = t
    template = meta.get("tokenizer.chat_template")
    if template:
        tok_config["chat_template"] = template
    return tok, tok_config


# --------------------------------------------------------------------------- public API


def convert_gguf(gguf_path, out_dir, dtype: str = "float32") -> Path:
    """Convert a llama/qwen2 GGUF file into an mlx-lm model directory; returns out_dir.

    Writes config.json, model.safetensors (dense, `dtype` in float32/float16/bfloat16),
    tokenizer.json and tokenizer_config.json. Raises GGUFError for unsupported
    architectures, tensor types or tokenizers.
    """
    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if not gguf_path.is_file():
        raise FileNotFoundError(gguf_path)
    with open(gguf_path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise GGUFError(f"{gguf_path} is not a GGUF file (it does not start with 'GGUF')")

    dense, meta = _read_gguf(gguf_path)
    arch = meta["general.architecture"]
    n_head = int(meta[f"{arch}.attention.head_count"])
    n_kv = int(meta.get(f"{arch}.attention.head_count_kv", n_head))
    weights = _convert_weights(dense, arch, n_head, n_kv)
    if "model.embed_tokens.weight" not in weights:
        raise GGUFError("GGUF has no token_embd.weight tensor")
    config = _build_config(meta, weights, arch, dtype)

    tokenizer, tok_config = _build_tokenizer(meta, config["max_position_embeddings"])

    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    with open(out_dir / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(tok_config, f, indent=2, ensure_ascii=False)
    target = DTYPES[dtype]
    weights = {k: v.astype(target) for k, v in weights.items()}
    mx.save_safetensors(str(out_dir / "model.safetensors"), weights, metadata={"format": "mlx"})
    with open(out_dir / "config.json", "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    return out_dir


def default_cache_dir() -> Path:
    root = os.environ.get("MLX_TOKENRL_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "mlx-tokenrl"
    return base / "gguf"


def _cache_key(path: Path, dtype: str) -> str:
    st = path.stat()
    raw = f"{st.st_size}:{st.st_mtime_ns}:{dtype}:v{CONVERTER_VERSION}"
    return hashlib.sha256(raw.encode()).hexdigest()[:12]


def _is_complete(d: Path) -> bool:
    return (d / "config.json").is_file() and (d / "model.safetensors").is_file()


def cached_conversion(gguf_path, dtype: str = "float32", cache_dir=None) -> Path:
    """Convert `gguf_path` once into `<cache>/gguf/<stem>-<hash>` and reuse it afterwards.

    The key hashes the file's size and mtime (plus dtype and converter version). The
    conversion runs in a temporary sibling directory that is renamed into place, so an
    interrupted run never leaves a half-written entry. Cache root: `cache_dir`, else
    $MLX_TOKENRL_CACHE/gguf, else ~/.cache/mlx-tokenrl/gguf.
    """
    gguf_path = Path(gguf_path).expanduser().resolve()
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / f"{gguf_path.stem}-{_cache_key(gguf_path, dtype)}"
    if _is_complete(final):
        return final

    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(root)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=root))
    try:
        convert_gguf(gguf_path, tmp, dtype=dtype)
        try:
            os.rename(tmp, final)
        except OSError:
            if not _is_complete(final):  # not a concurrent winner: replace the broken entry
                shutil.rmtree(final, ignore_errors=True)
                os.rename(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _remove_stale_tmp(root: Path, max_age_s: float = 24 * 3600) -> None:
    """Delete temp dirs left behind by killed conversions (older than a day)."""
    now = time.time()
    for p in root.glob(".*.tmp"):
        try:
            if p.is_dir() and now - p.stat().st_mtime > max_age_s:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass
