import mlx_tokenrl  # noqa: F401  (OpenBLAS before mlx, as in the CLI)
import pytest

from mlx_tokenrl.toy import build_toy_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Qwen2 model + real tokenizer, written once per test session."""
    return build_toy_model(tmp_path_factory.mktemp("tiny") / "model")
