import json

import mlx_tokenrl  # noqa: F401  (OpenBLAS before mlx, as in the CLI)
import pytest

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
