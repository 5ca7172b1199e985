import json

import mlx_tokenrl  # noqa: F401  (OpenBLAS before mlx, as in the CLI)
import mlx.core as mx
import pytest

from mlx_tokenrl.models import add_lora, load_model, lora_config
from mlx_tokenrl.toy import build_toy_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Qwen2 model + real tokenizer, written once per test session."""
    return build_toy_model(tmp_path_factory.mktemp("tiny") / "model")


DENSE_REWARD = '''
def digits(text, answer):
    """Dense reward: the share of characters that are digits."""
    return sum(ch.isdigit() for ch in text) / max(len(text), 1)
'''


@pytest.fixture(scope="session")
def dense_files(tmp_path_factory):
    """A jsonl task (data.jsonl) and a dense reward (reward.py:digits) a tiny model can learn."""
    root = tmp_path_factory.mktemp("dense")
    (root / "reward.py").write_text(DENSE_REWARD)
    with open(root / "data.jsonl", "w") as f:
        for i in range(40):
            f.write(json.dumps({"prompt": f"what is {i} times {i % 7}?", "answer": "1"}) + "\n")
    return root


@pytest.fixture(scope="module")
def lora_model(tiny_model_dir):
    model, _ = load_model(str(tiny_model_dir))
    add_lora(model, lora_config(rank=4, scale=10.0))
    # Non-zero LoRA B so the adapter changes the policy and its gradients are generic.
    mx.random.seed(3)
    for _, m in model.named_modules():
        if hasattr(m, "lora_b"):
            m.lora_b = mx.random.normal(m.lora_b.shape) * 0.01
    mx.eval(model.parameters())
    return model
