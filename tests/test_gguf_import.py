"""GGUF -> mlx-lm conversion, checked on tiny synthetic llama GGUF files written with gguf-py."""

import json
import os

import numpy as np
import pytest

import mlx_tokenrl  # noqa: F401  (backend setup before mlx.core)

gguf = pytest.importorskip("gguf")
import mlx.core as mx  # noqa: E402
import mlx_lm  # noqa: E402
from gguf import GGMLQuantizationType as Q  # noqa: E402
from mlx_lm.models import llama, qwen2  # noqa: E402

from mlx_tokenrl import gguf_import  # noqa: E402
from mlx_tokenrl.gguf_import import GGUFError, cached_conversion, convert_gguf  # noqa: E402

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS = 64, 256, 2, 4, 2
HEAD_DIM = HIDDEN // HEADS
EPS, ROPE_THETA, CTX = 1e-5, 50000.0, 256
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d", "1 2"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def make_vocab():
    tokens = SPECIALS + bytes_to_unicode()
    for m in MERGES:
        tokens.append(m.replace(" ", ""))
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))
    return tokens, types


def llamacpp_permute(w, n_head):
    """What llama.cpp's convert_hf_to_gguf.py does to q_proj/k_proj rows for llama."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llamacpp_unpermute(w, n_head):
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_weights(vocab_size, tied, seed=0):
    """Random HF-layout llama weights, rounded through float16 so F16 storage is lossless."""
    rng = np.random.default_rng(seed)

    def r(*shape, scale=0.2):
        return (rng.standard_normal(shape) * scale).astype(np.float16).astype(np.float32)

    w = {"model.embed_tokens.weight": r(vocab_size, HIDDEN, scale=1.0),
         "model.norm.weight": 1 + r(HIDDEN, scale=0.1)}
    if not tied:
        w["lm_head.weight"] = r(vocab_size, HIDDEN)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = 1 + r(HIDDEN, scale=0.1)
        w[p + "post_attention_layernorm.weight"] = 1 + r(HIDDEN, scale=0.1)
        w[p + "self_attn.q_proj.weight"] = r(HEADS * HEAD_DIM, HIDDEN)
        w[p + "self_attn.k_proj.weight"] = r(KV_HEADS * HEAD_DIM, HIDDEN)
        w[p + "self_attn.v_proj.weight"] = r(KV_HEADS * HEAD_DIM, HIDDEN)
        w[p + "self_attn.o_proj.weight"] = r(HIDDEN, HEADS * HEAD_DIM)
        w[p + "mlp.gate_proj.weight"] = r(FFN, HIDDEN)
        w[p + "mlp.up_proj.weight"] = r(FFN, HIDDEN)
        w[p + "mlp.down_proj.weight"] = r(HIDDEN, FFN)
    return w


def gguf_name(hf):
    table = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
             "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    if hf.startswith("model.layers."):
        _, _, i, rest = hf.split(".", 3)
        mod, kind = rest.rsplit(".", 1)
        return f"blk.{i}.{table[mod]}.{kind}"
    mod, kind = hf.rsplit(".", 1)
    return f"{table[mod]}.{kind}"


def write_gguf(path, weights, qtypes=None, arch="llama", pre="smollm", raw_extra=None):
    """Write HF-layout `weights` the way llama.cpp does (q/k permuted); qtypes: hf name -> type."""
    tokens, types = make_vocab()
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_context_length(CTX)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(EPS)
    w.add_rope_freq_base(ROPE_THETA)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    for name, value in weights.items():
        if arch == "llama" and name.endswith("self_attn.q_proj.weight"):
            value = llamacpp_permute(value, HEADS)
        elif arch == "llama" and name.endswith("self_attn.k_proj.weight"):
            value = llamacpp_permute(value, KV_HEADS)
        qt = (qtypes or {}).get(name, Q.F32)
        if qt == Q.F32:
            w.add_tensor(gguf_name(name), value.astype(np.float32))
        elif qt == Q.F16:
            w.add_tensor(gguf_name(name), value.astype(np.float16))
        else:
            w.add_tensor(gguf_name(name), gguf.quants.quantize(value, qt), raw_dtype=qt)
    for name, (raw, qt) in (raw_extra or {}).items():
        w.add_tensor(name, raw, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def reference_logits(hf, tokens, tied, module=llama):
    args = module.ModelArgs(
        model_type=module.__name__.rsplit(".", 1)[-1], hidden_size=HIDDEN, num_hidden_layers=LAYERS, intermediate_size=FFN,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, rms_norm_eps=EPS,
        vocab_size=hf["model.embed_tokens.weight"].shape[0], rope_theta=ROPE_THETA,
        max_position_embeddings=CTX, tie_word_embeddings=tied,
    )
    model = module.Model(args)
    model.load_weights([(k, mx.array(v)) for k, v in hf.items()], strict=True)
    return np.array(model(mx.array([tokens]))[0])


def gguf_reference(path):
    """Dense HF-named float32 weights from gguf-py's own numpy dequantization."""
    out = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        arr = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        out[t.name] = arr.reshape(tuple(int(d) for d in reversed(t.shape.tolist())))
    return out


PROMPT = [1, 60, 75, 72, 79, 79, 82, 2, 5, 40, 100, 200, 261, 265]

QUANT_TYPES = {  # a mix as in real Q4_x files
    "model.embed_tokens.weight": Q.Q8_0,
    "lm_head.weight": Q.F16,
    **{f"model.layers.{i}.self_attn.{m}.weight": q
       for i in range(LAYERS)
       for m, q in (("q_proj", Q.Q4_0), ("k_proj", Q.Q4_1), ("v_proj", Q.Q8_0), ("o_proj", Q.Q4_1))},
    **{f"model.layers.{i}.mlp.{m}.weight": q
       for i in range(LAYERS)
       for m, q in (("gate_proj", Q.Q4_1), ("up_proj", Q.Q4_0), ("down_proj", Q.F16))},
}


@pytest.fixture(scope="module")
def vocab_size():
    return len(make_vocab()[0])


@pytest.fixture(scope="module")
def quant_case(tmp_path_factory, vocab_size):
    d = tmp_path_factory.mktemp("quant")
    hf = hf_weights(vocab_size, tied=False, seed=1)
    path = write_gguf(d / "tiny-q.gguf", hf, QUANT_TYPES)
    return path, convert_gguf(path, d / "out")


def assert_lossless(out, hf, tied, module=llama):
    """The converted weights are exactly `hf`, and mlx-lm's logits match the reference.
    Returns the loaded tokenizer."""
    got = mx.load(str(out / "model.safetensors"))
    assert set(got) == set(hf)
    for k, v in hf.items():
        np.testing.assert_array_equal(np.array(got[k]), v, err_msg=k)
    model, tok = mlx_lm.load(str(out))
    logits = np.array(model(mx.array([PROMPT]))[0])
    np.testing.assert_allclose(logits, reference_logits(hf, PROMPT, tied, module), atol=1e-4, rtol=0)
    return tok


@pytest.mark.parametrize("tied", [True, False])
def test_lossless_gguf_recovers_hf_weights_and_logits(tmp_path, vocab_size, tied):
    hf = hf_weights(vocab_size, tied=tied)
    f16 = {k: Q.F16 for k in hf if "mlp" in k or "o_proj" in k}  # mixed F32 / F16
    out = convert_gguf(write_gguf(tmp_path / "tiny.gguf", hf, f16), tmp_path / "out")

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["tie_word_embeddings"] is tied
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]) == (HIDDEN, LAYERS, FFN)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (HEADS, KV_HEADS)
    assert cfg["rms_norm_eps"] == EPS and cfg["rope_theta"] == ROPE_THETA
    assert cfg["vocab_size"] == vocab_size and cfg["max_position_embeddings"] == CTX
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["torch_dtype"]) == (1, 2, "float32")

    assert_lossless(out, hf, tied)


def test_qwen2_is_not_permuted_and_keeps_biases(tmp_path, vocab_size):
    hf = hf_weights(vocab_size, tied=True, seed=4)
    rng = np.random.default_rng(5)
    for i in range(LAYERS):
        for m, n in (("q_proj", HEADS), ("k_proj", KV_HEADS), ("v_proj", KV_HEADS)):
            hf[f"model.layers.{i}.self_attn.{m}.bias"] = rng.standard_normal(n * HEAD_DIM).astype(np.float32)
    out = convert_gguf(write_gguf(tmp_path / "q.gguf", hf, arch="qwen2", pre="qwen2"), tmp_path / "out")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "qwen2" and cfg["rope_theta"] == ROPE_THETA
    tok = assert_lossless(out, hf, True, qwen2)
    tokens, _ = make_vocab()
    assert [tokens[i] for i in tok.encode("hello world 123")] == ["hello", "Ġworld", "Ġ", "1", "2", "3"]


def test_quantized_gguf_matches_gguf_py_dequantization(quant_case):
    path, out = quant_case
    ref = gguf_reference(path)
    got = mx.load(str(out / "model.safetensors"))
    assert len(got) == len(ref)
    for hf_name, v in got.items():
        v = np.array(v)
        if hf_name.endswith("q_proj.weight"):  # back into llama.cpp's row order
            v = llamacpp_permute(v, HEADS)
        elif hf_name.endswith("k_proj.weight"):
            v = llamacpp_permute(v, KV_HEADS)
        np.testing.assert_allclose(v, ref[gguf_name(hf_name)], atol=1e-4, rtol=0, err_msg=hf_name)

    # logits equal a reference llama built from the numpy dequantization, un-permuted
    hf = {}
    for hf_name in got:
        w = ref[gguf_name(hf_name)]
        if hf_name.endswith("q_proj.weight"):
            w = llamacpp_unpermute(w, HEADS)
        elif hf_name.endswith("k_proj.weight"):
            w = llamacpp_unpermute(w, KV_HEADS)
        hf[hf_name] = w
    model, _ = mlx_lm.load(str(out))
    logits = np.array(model(mx.array([PROMPT]))[0])
    np.testing.assert_allclose(logits, reference_logits(hf, PROMPT, tied=False), atol=1e-4, rtol=0)


def test_tokenizer_and_chat_template(quant_case):
    _, out = quant_case
    _, tok = mlx_lm.load(str(out))
    tokens, _ = make_vocab()
    ids = tok.encode("hello world 123")
    # BPE merges applied; smollm pre-tokenizer splits digits one by one (merge "1 2" unused)
    assert [tokens[i] for i in ids] == ["hello", "Ġworld", "Ġ", "1", "2", "3"]
    assert tok.decode(ids) == "hello world 123"
    assert tok.encode("<|im_start|>user")[0] == 1  # control tokens are atomic
    assert tok.eos_token == "<|im_end|>" and 2 in tok.eos_token_ids
    assert tok.chat_template == CHAT_TEMPLATE
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}],
                                     add_generation_prompt=True, tokenize=False)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == CHAT_TEMPLATE and cfg["bos_token"] == "<|im_start|>"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_output_dtype(quant_case, tmp_path, dtype):
    path, out32 = quant_case
    out = convert_gguf(path, tmp_path / dtype, dtype=dtype)
    got = mx.load(str(out / "model.safetensors"))
    ref = mx.load(str(out32 / "model.safetensors"))
    assert {v.dtype for v in got.values()} == {getattr(mx, dtype)}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == dtype
    k = "model.layers.0.self_attn.q_proj.weight"
    np.testing.assert_array_equal(np.array(got[k].astype(mx.float32)),
                                  np.array(ref[k].astype(getattr(mx, dtype)).astype(mx.float32)))


def test_kquant_and_q5_via_gguf_py(tmp_path, vocab_size):
    """Q5_0 makes mx.load refuse the file; Q6_K is read lossily by mx.load: both go via gguf-py."""
    hf = hf_weights(vocab_size, tied=True, seed=2)
    hf.pop("model.layers.1.mlp.down_proj.weight")
    rng = np.random.default_rng(3)
    block, size = gguf.GGML_QUANT_SIZES[Q.Q6_K]
    raw = rng.integers(0, 256, size=(HIDDEN, FFN // block, size), dtype=np.uint8)
    raw[..., -2:] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)  # sane fp16 d
    raw = raw.reshape(HIDDEN, -1)
    q6k = {"blk.1.ffn_down.weight": (raw, Q.Q6_K)}
    for name, qtypes in (("k.gguf", {}), ("k5.gguf", {"model.layers.0.mlp.up_proj.weight": Q.Q5_0})):
        path = write_gguf(tmp_path / name, hf, qtypes, raw_extra=q6k)
        out = convert_gguf(path, tmp_path / (name + ".out"))
        ref = gguf_reference(path)
        got = mx.load(str(out / "model.safetensors"))
        for hf_name in ("model.layers.1.mlp.down_proj.weight", "model.layers.0.mlp.up_proj.weight",
                        "model.layers.0.mlp.gate_proj.weight"):
            np.testing.assert_allclose(np.array(got[hf_name]), ref[gguf_name(hf_name)],
                                       atol=1e-6, rtol=0, err_msg=f"{name}:{hf_name}")
        mlx_lm.load(str(out))


def test_unsupported_architecture(tmp_path, vocab_size):
    hf = hf_weights(vocab_size, tied=True)
    path = write_gguf(tmp_path / "f.gguf", hf, arch="falcon")
    with pytest.raises(GGUFError, match="falcon"):
        convert_gguf(path, tmp_path / "out")
    assert issubclass(GGUFError, ValueError)


def test_unsupported_tensor_type(tmp_path, vocab_size):
    hf = hf_weights(vocab_size, tied=True)
    hf.pop("model.layers.0.mlp.up_proj.weight")
    block, size = gguf.GGML_QUANT_SIZES[Q.Q8_1]
    raw = np.zeros((FFN, HIDDEN // block * size), dtype=np.uint8)
    path = write_gguf(tmp_path / "q81.gguf", hf, raw_extra={"blk.0.ffn_up.weight": (raw, Q.Q8_1)})
    with pytest.raises(GGUFError, match="Q8_1"):
        convert_gguf(path, tmp_path / "out")


def test_unsupported_pre_tokenizer(tmp_path, vocab_size):
    path = write_gguf(tmp_path / "p.gguf", hf_weights(vocab_size, tied=True), pre="made-up-pre")
    with pytest.raises(GGUFError, match="made-up-pre"):
        convert_gguf(path, tmp_path / "out")


def test_metadata_same_from_mx_load_and_gguf_reader(quant_case):
    path, _ = quant_case
    _, meta = mx.load(str(path), return_metadata=True)
    from_mx = {k: gguf_import._plain(v) for k, v in meta.items()}
    reader = gguf.GGUFReader(str(path))
    from_reader = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert from_mx.keys() == from_reader.keys()
    for k in from_mx:
        a, b = from_mx[k], from_reader[k]
        if isinstance(a, float):
            assert a == pytest.approx(b, rel=1e-6), k
        else:
            assert a == b, k


def test_cached_conversion_reuses_and_is_atomic(quant_case, tmp_path, monkeypatch):
    path, _ = quant_case
    src = tmp_path / "model.gguf"
    src.write_bytes(path.read_bytes())
    cache = tmp_path / "cache"

    first = cached_conversion(src, cache_dir=cache)
    assert first.parent == cache and first.name.startswith("model-")
    model, _ = mlx_lm.load(str(first))
    stamp = (first / "model.safetensors").stat().st_mtime_ns

    def boom(*a, **k):
        raise AssertionError("cache entry should have been reused")

    monkeypatch.setattr(gguf_import, "convert_gguf", boom)
    assert cached_conversion(src, cache_dir=cache) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp

    # a changed file gets a new key; a crash mid-conversion leaves neither entry nor temp dir
    os.utime(src, ns=(stamp + 10**9, stamp + 10**9))

    def crash(gguf_path, out_dir, dtype="float32"):
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("killed")

    monkeypatch.setattr(gguf_import, "convert_gguf", crash)
    with pytest.raises(RuntimeError, match="killed"):
        cached_conversion(src, cache_dir=cache)
    assert sorted(p.name for p in cache.iterdir()) == [first.name]

    monkeypatch.undo()
    second = cached_conversion(src, cache_dir=cache)
    assert second != first and sorted(p.name for p in cache.iterdir()) == sorted([first.name, second.name])
