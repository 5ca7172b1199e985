"""Tiny, locally built models for tests and benchmarks (no hub access needed).

`build_toy_model` writes an mlx-lm model directory: a random Qwen2 model plus a real
byte-level BPE tokenizer trained here with `tokenizers`, a ChatML chat template and an
EOS token, so `mlx_lm.load` treats it like any downloaded checkpoint.
"""

import importlib
import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=128)
# Qwen2-shaped stand-in with SmolLM2-135M's dimensions (~135M parameters).
SHAPE_135M = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                  num_key_value_heads=3, intermediate_size=1536, vocab_size=49152)
# Qwen2.5-(Coder-)0.5B-Instruct's dimensions: 151k vocabulary, tied embeddings (~494M).
SHAPE_QWEN_0_5B = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, intermediate_size=4864, vocab_size=151936)


def _corpus():
    words = ("think step by step then give the final answer as a single number after "
             "what is times plus minus has had how many apples more less each total "
             "the a of and to in is was he she they there are were left gave bought")
    lines = [words]
    for a in range(0, 1000, 7):
        lines.append(f"{a} * {a % 97} = {a * (a % 97)} #### {a + 13}")
    return lines


def build_tokenizer(path: Path, extra_vocab: int = 0):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    if extra_vocab > tok.get_vocab_size():
        # Fill up to the model's vocabulary so every sampled id decodes.
        tok.add_tokens([f"<x{i}>" for i in range(extra_vocab - tok.get_vocab_size())])
    tok.save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": 4096,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return tok.get_vocab_size()


def build_toy_model(path, seed: int = 0, **overrides) -> Path:
    """Write a random Qwen2 model + tokenizer to `path`; returns the path."""
    from mlx_lm.models import qwen2

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    shape = {**TINY, **overrides}
    vocab = build_tokenizer(path, extra_vocab=shape.get("vocab_size", 0))
    shape.setdefault("vocab_size", vocab)
    config = {
        "model_type": "qwen2",
        "architectures": ["Qwen2ForCausalLM"],
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "eos_token_id": SPECIAL_TOKENS.index("<|im_end|>"),
        **shape,
    }
    mx.random.seed(seed)
    model = qwen2.Model(qwen2.ModelArgs.from_dict(config))
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (path / "config.json").write_text(json.dumps(config, indent=1))
    return path


def tiny_family_model(model_type: str, seed: int = 0, **config):
    """A tiny random in-memory model of any mlx-lm family (no tokenizer, nothing written):
    TINY's shape plus `config`, the family's own fields (soft-capping, logit scale, ...)."""
    module = importlib.import_module(f"mlx_lm.models.{model_type}")
    args = {"model_type": model_type, "vocab_size": 320, "rms_norm_eps": 1e-6, "head_dim": 16,
            **TINY, **config}
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(args))
    mx.eval(model.parameters())
    return model
