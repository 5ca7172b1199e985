"""fuse / chat / generate on a tiny random model with a non-zero LoRA adapter."""

import json
import subprocess
import sys
from pathlib import Path

import mlx_tokenrl  # noqa: F401  (before mlx.core)
import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm import stream_generate
from typer.testing import CliRunner

from mlx_tokenrl.fuse import fuse_adapter
from mlx_tokenrl.models import add_lora, load_model, lora_config, save_adapter_config
from mlx_tokenrl.toy import build_toy_model
from tokenrl_cli import use
from tokenrl_cli.main import app

PROMPTS = ["what is 7 times 3", "how many apples are left"]
runner = CliRunner()


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("use")
    base = build_toy_model(root / "base")
    other = build_toy_model(root / "other", hidden_size=32, intermediate_size=64)
    net, _ = load_model(str(base))
    config = lora_config(rank=4, scale=20)
    add_lora(net, config)
    mx.random.seed(1)
    for _, layer in net.named_modules():
        if hasattr(layer, "lora_b"):  # mlx-lm starts lora_b at zero: make the adapter do something
            layer.lora_b = 0.1 * mx.random.normal(layer.lora_b.shape)
    adapter = root / "adapter"
    adapter.mkdir()
    mx.save_safetensors(str(adapter / "adapters.safetensors"),
                        dict(tree_flatten(net.trainable_parameters())))
    save_adapter_config(adapter, config, str(base))
    return dict(root=root, base=str(base), other=str(other), adapter=str(adapter))


def greedy_tokens(model, adapter=None, max_tokens=12):
    net, tokenizer = load_model(model, adapter_path=adapter)
    out = []
    for prompt in PROMPTS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                            add_generation_prompt=True)
        out.append([r.token for r in stream_generate(net, tokenizer, ids, max_tokens=max_tokens)])
    return out


def run(*args, **kwargs):
    result = runner.invoke(app, [str(a) for a in args], **kwargs)
    assert "Traceback" not in result.output
    return result


def test_fused_model_matches_base_plus_adapter(dirs):
    out = fuse_adapter(dirs["base"], dirs["adapter"], dirs["root"] / "fused-lib")
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    with_adapter = greedy_tokens(dirs["base"], dirs["adapter"])
    assert greedy_tokens(str(out)) == with_adapter
    assert greedy_tokens(dirs["base"]) != with_adapter  # the adapter matters, so the test can fail


def test_fuse_cli_then_generate_on_fused_dir(dirs):
    out = dirs["root"] / "fused-cli"
    result = run("fuse", "--model", dirs["base"], "--adapter", dirs["adapter"], "--out", out)
    assert result.exit_code == 0, result.output
    assert not any("lora" in k for k in json.loads((out / "model.safetensors.index.json")
                                                   .read_text())["weight_map"])
    prompt = ["generate", "--prompt", PROMPTS[0], "--max-tokens", 12]
    fused = run(*prompt, "--model", out)
    adapted = run(*prompt, "--model", dirs["base"], "--adapter", dirs["adapter"])
    assert fused.exit_code == adapted.exit_code == 0
    assert fused.stdout == adapted.stdout


def test_fuse_upload_uses_hub_stand_in(dirs, monkeypatch):
    import huggingface_hub

    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kw):
            calls.append(("create", repo_id))

        def upload_large_folder(self, folder_path, repo_id, **kw):
            calls.append(("upload", str(folder_path), repo_id))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    out = dirs["root"] / "fused-up"
    result = run("fuse", "--model", dirs["base"], "--adapter", dirs["adapter"], "--out", out,
                 "--upload", "me/tiny-fused")
    assert result.exit_code == 0, result.output
    assert calls == [("create", "me/tiny-fused"), ("upload", str(out), "me/tiny-fused")]
    assert "me/tiny-fused" in (out / "README.md").read_text()


def test_fuse_upload_failure_is_one_line(dirs, monkeypatch):
    import huggingface_hub

    class NoAuthApi:
        def create_repo(self, repo_id, **kw):
            raise OSError("Invalid user token.\nmore detail")

    monkeypatch.setattr(huggingface_hub, "HfApi", NoAuthApi)
    out = dirs["root"] / "fused-noauth"
    result = run("fuse", "--model", dirs["base"], "--adapter", dirs["adapter"], "--out", out,
                 "--upload", "me/x")
    assert result.exit_code == 1
    assert "upload of" in result.stderr and "Invalid user token." in result.stderr
    assert "more detail" not in result.stderr
    assert (out / "config.json").is_file()


def test_generate_prints_only_the_completion_deterministically(dirs):
    net, tokenizer = load_model(dirs["base"], adapter_path=dirs["adapter"])
    ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[1]}],
                                        add_generation_prompt=True)
    expected = "".join(r.text for r in stream_generate(net, tokenizer, ids, max_tokens=12))
    args = ["generate", "--model", dirs["base"], "--adapter", dirs["adapter"],
            "--prompt", PROMPTS[1], "--max-tokens", 12]
    first, second = run(*args), run(*args)
    assert first.exit_code == 0, first.output
    assert first.stdout == expected + "\n"
    assert second.stdout == first.stdout
    raw = run(*args, "--raw")
    assert raw.exit_code == 0 and raw.stdout != first.stdout  # no chat template around the prompt


def reply_count(stdout):
    """Replies in piped chat output. Each starts a line with "> "; counting "> " anywhere would
    also count the toy model's gibberish (it once wrote "<|im_start|> then"), and greedy
    decoding keeps that gibberish the same from run to run."""
    return sum(line.startswith("> ") for line in stdout.splitlines())


def test_chat_keeps_history_and_resets(dirs, monkeypatch):
    seen = []
    real = use._chat_prompt
    monkeypatch.setattr(use, "_chat_prompt", lambda tok, msgs: seen.append(list(msgs)) or real(tok, msgs))
    result = run("chat", "--model", dirs["base"], "--system", "be brief", "--max-tokens", 6,
                 "--temperature", 0, input="hi\nand then\n/reset\nhello\n")  # ends with EOF
    assert result.exit_code == 0, result.output
    system = {"role": "system", "content": "be brief"}
    assert [[m["content"] for m in msgs if m["role"] != "assistant"] for msgs in seen] == [
        ["be brief", "hi"], ["be brief", "hi", "and then"], ["be brief", "hello"]]
    assert seen[1][2]["role"] == "assistant" and seen[2][0] == system
    assert reply_count(result.stdout) == 3 and ">>>" not in result.stdout
    assert "conversation reset" in result.stderr


def test_chat_piped_subprocess_exits_on_command(dirs):
    exe = Path(sys.executable).with_name("tokenrl-mlx")
    proc = subprocess.run([str(exe), "chat", "--model", dirs["base"], "--adapter", dirs["adapter"],
                           "--max-tokens", "6", "--temperature", "0"],
                          input="hi\n/reset\nhello\n/exit\nnever\n", capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert reply_count(proc.stdout) == 2
    assert "Traceback" not in proc.stderr


def test_adapter_for_another_model_is_one_clear_line(dirs):
    for cmd in (["generate", "--prompt", "hi"], ["chat"]):
        result = run(*cmd, "--model", dirs["other"], "--adapter", dirs["adapter"])
        assert result.exit_code == 1
        line = result.stderr.strip()
        assert "\n" not in line and "does not fit" in line
        assert dirs["adapter"] in line and dirs["other"] in line


def test_missing_adapter_files_are_reported(dirs, tmp_path):
    result = run("generate", "--model", dirs["base"], "--adapter", tmp_path, "--prompt", "hi")
    assert result.exit_code == 1
    assert "missing adapter_config.json" in result.stderr
    result = run("fuse", "--model", dirs["base"], "--adapter", tmp_path / "nope",
                 "--out", tmp_path / "out")
    assert result.exit_code == 1 and "adapter" in result.stderr and "missing" in result.stderr


@pytest.mark.parametrize("gpu", [False, True])
def test_slow_cpu_precisions_warn_once(dirs, gpu, monkeypatch, capsys):
    """Half precision and quantized matmuls are 16-37x slower than float32 on MLX's CPU
    backend: asking for them there warns once per process, on Metal never."""
    from mlx_tokenrl import backend, models

    monkeypatch.setattr(backend, "default_device_is_gpu", lambda: gpu)
    models.warn_once.cache_clear()
    result = run("eval", "multiply", "--digits", "1x1", "--model", dirs["base"], "--limit", 1,
                 "--max-new-tokens", 2, "--dtype", "bfloat16", "--out", dirs["root"] / "eval-bf16")
    assert result.exit_code == 0, result.output
    for _ in range(2):
        load_model(dirs["base"], dtype="float16", quantize_bits=8)
        load_model(dirs["base"], dtype="float32")
    warnings = [line for line in result.stderr.splitlines() + capsys.readouterr().err.splitlines()
                if line.startswith("warning:")]
    expected = ["warning: bfloat16 on MLX's CPU backend is ~16x slower than float32 here; use "
                "--dtype float32 (auto)",
                "warning: float16 on MLX's CPU backend is ~23x slower than float32 here; use "
                "--dtype float32 (auto)",
                "warning: --quantize 8 on MLX's CPU backend is ~37x slower than float32 here; "
                "leave --quantize out"]
    assert warnings == ([] if gpu else expected)
