"""fuse / chat / generate on a tiny random model with a non-zero LoRA adapter."""

import json
import shutil
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


def test_fuse_merges_a_float32_base_in_float32_on_a_gpu_too(dirs, tmp_path, monkeypatch):
    from mlx_tokenrl import dtypes

    on_cpu = mx.load(str(fuse_adapter(dirs["base"], dirs["adapter"], tmp_path / "cpu")
                         / "model.safetensors"))
    monkeypatch.setattr(dtypes, "default_device_is_gpu", lambda: True)  # auto: bfloat16 there
    on_gpu = mx.load(str(fuse_adapter(dirs["base"], dirs["adapter"], tmp_path / "gpu")
                         / "model.safetensors"))
    assert on_gpu.keys() == on_cpu.keys()
    for name, weight in on_cpu.items():
        assert on_gpu[name].dtype == mx.float32 and mx.array_equal(on_gpu[name], weight), name


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
    assert result.exit_code == 1
    assert f"--adapter-path {tmp_path / 'nope'}: the directory does not exist" in result.stderr


@pytest.mark.parametrize("gpu", [False, True])
def test_slow_cpu_precisions_warn_once(dirs, gpu, monkeypatch, capsys):
    """Half precision and quantized matmuls are 16-37x slower than float32 on MLX's CPU
    backend: asking for them there warns once per process, on Metal never."""
    from mlx_tokenrl import backend, messages

    monkeypatch.setattr(backend, "default_device_is_gpu", lambda: gpu)
    messages.warn_once.cache_clear()
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


# ---------------------------------------------------------------- --adapter-path: start a run, spellings


def lora_weights(net):
    return {k: v for k, v in tree_flatten(net.trainable_parameters())}


def mlx_lm_style_adapter(dirs, root, **lora):
    """The adapter of `dirs`, with the adapter_config.json mlx-lm's lora command writes (its
    training settings, num_layers counted out, no keys)."""
    adapter = root / "sft"
    adapter.mkdir()
    weights = mx.load(str(Path(dirs["adapter"]) / "adapters.safetensors"))
    keys = lora.get("keys")  # an adapter trained on some modules only has their weights
    mx.save_safetensors(str(adapter / "adapters.safetensors"),
                        {k: v for k, v in weights.items() if not keys or any(f".{m}." in k for m in keys)})
    config = {"model": dirs["base"], "fine_tune_type": "lora", "num_layers": 2, "iters": 100,
              "lora_parameters": {"rank": 4, "dropout": 0.0, "scale": 20.0, **lora}}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    return adapter


def test_train_starts_from_an_existing_adapter(dirs, tmp_path):
    from mlx_tokenrl.config import TrainConfig
    from mlx_tokenrl.trainer import prepare_run

    adapter = mlx_lm_style_adapter(dirs, tmp_path)
    cfg = TrainConfig(task="multiply", digits="1x1", model=dirs["base"], lora_rank=4,
                      adapter_path=str(adapter), out=str(tmp_path / "run"))
    _, _, model, _, _, _, _ = prepare_run(cfg, resume=False)
    expected = mx.load(str(adapter / "adapters.safetensors"))
    got = lora_weights(model)
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert mx.array_equal(got[name], value), name
    assert any(float(mx.abs(v).max()) > 0 for k, v in got.items() if k.endswith("lora_b"))
    # The run records where it started; its first step then moves on from there.
    result = run("train", "--resume", tmp_path / "run", "--steps", 1)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "config.json").read_text())["adapter_path"] == str(adapter)


@pytest.mark.parametrize("flags, lora, message", [
    (["--lora-rank", 8], {}, "was trained with --lora-rank 4, this run has --lora-rank 8: pass the adapter's"),
    (["--lora-rank", 4, "--lora-scale", 10, "--lora-layers", 1], {},
     "was trained with --lora-scale 20.0 --lora-layers 2, this run has --lora-scale 10.0 --lora-layers 1"),
    (["--lora-rank", 4, "--lora-keys", "self_attn.q_proj"], {},
     "adapts other modules than this run (e.g. model.layers.0.mlp.down_proj.lora_a); pass its "
     "--lora-keys (the default: all linear layers)"),
    (["--lora-rank", 4], {"keys": ["self_attn.q_proj"]},
     "adapts other modules than this run (e.g. model.layers.0.mlp.down_proj.lora_a); pass its "
     "--lora-keys (self_attn.q_proj)"),
])
def test_an_adapter_that_does_not_match_the_run_is_one_line(dirs, tmp_path, flags, lora, message):
    adapter = mlx_lm_style_adapter(dirs, tmp_path, **lora)
    out = tmp_path / "run"
    result = run("train", "multiply", "--digits", "1x1", "--model", dirs["base"], "--steps", 1,
                 "--adapter-path", adapter, *flags, "--out", out)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --adapter-path {adapter}"), lines
    assert message in lines[0]
    assert not out.exists()


def test_a_dora_adapter_or_another_models_is_refused(dirs, tmp_path):
    from mlx_tokenrl.config import ConfigError
    from mlx_tokenrl.models import init_from_adapter

    adapter = mlx_lm_style_adapter(dirs, tmp_path)
    net, _ = load_model(dirs["other"])
    add_lora(net, lora_config(rank=4, scale=20))
    with pytest.raises(ConfigError, match=r"does not fit this model: model\.layers\.0\.self_attn"
                                          r"\.q_proj\.lora_a has shape \(64, 4\), the model's \(32, 4\)"):
        init_from_adapter(net, adapter, lora_config(rank=4, scale=20))
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "fine_tune_type": "dora"}))
    with pytest.raises(ConfigError, match="is a dora adapter; a run starts only from a LoRA adapter"):
        init_from_adapter(net, adapter, lora_config(rank=4, scale=20))


def test_every_command_reads_adapter_path_and_adapter(dirs, tmp_path):
    prompt = ["generate", "--prompt", PROMPTS[0], "--max-tokens", 8, "--model", dirs["base"]]
    new, old = run(*prompt, "--adapter-path", dirs["adapter"]), run(*prompt, "--adapter", dirs["adapter"])
    assert new.exit_code == old.exit_code == 0 and new.stdout == old.stdout
    assert new.stdout != run(*prompt).stdout
    result = run("fuse", "--model", dirs["base"], "--adapter-path", dirs["adapter"],
                 "--out", tmp_path / "fused")
    assert result.exit_code == 0, result.output
    assert run("generate", "--prompt", PROMPTS[0], "--max-tokens", 8,
               "--model", tmp_path / "fused").stdout == new.stdout
    chat = run("chat", "--model", dirs["base"], "--adapter-path", dirs["other"], "--max-tokens", 2)
    assert chat.exit_code == 1 and "missing adapter_config.json" in chat.stderr


def test_without_model_every_command_loads_the_adapters_base_model(dirs, tmp_path):
    prompt = ["generate", "--prompt", PROMPTS[0], "--max-tokens", 8]
    given = run(*prompt, "--model", dirs["base"], "--adapter-path", dirs["adapter"])
    taken = run(*prompt, "--adapter-path", dirs["adapter"])
    assert taken.exit_code == given.exit_code == 0, taken.output
    assert taken.stdout == given.stdout
    assert f"model: {dirs['base']} (the adapter's base model" in taken.stderr
    # mlx-lm's lora writes the model it trained on under "model".
    sft = mlx_lm_style_adapter(dirs, tmp_path)
    result = run(*prompt, "--adapter-path", sft)
    assert result.exit_code == 0 and f"model: {dirs['base']} (" in result.stderr, result.output
    chat = run("chat", "--adapter-path", dirs["adapter"], "--max-tokens", 8, input="/exit\n")
    assert chat.exit_code == 0 and f"model: {dirs['base']} (" in chat.stderr, chat.output
    result = run("fuse", "--adapter-path", dirs["adapter"], "--out", tmp_path / "fused")
    assert result.exit_code == 0, result.output
    assert run("generate", "--prompt", PROMPTS[0], "--max-tokens", 8,
               "--model", tmp_path / "fused").stdout == given.stdout


def test_an_unreadable_adapter_config_is_one_line(dirs, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(dirs["adapter"], adapter)
    (adapter / "adapter_config.json").write_text("{not json")
    result = run("generate", "--prompt", PROMPTS[0], "--adapter-path", adapter)
    assert result.exit_code == 1 and "adapter_config.json: not an adapter config" in result.stderr


def test_generate_samples_with_the_top_p_given(dirs, monkeypatch):
    seen = []
    real = use._sampler
    monkeypatch.setattr(use, "_sampler", lambda *args: seen.append(args) or real(*args))
    result = run("generate", "--model", dirs["base"], "--prompt", PROMPTS[0], "--max-tokens", 2,
                 "--temperature", 0.7, "--top-p", 0.5)
    assert result.exit_code == 0, result.output
    assert seen == [(0.7, 0.5)]


def test_a_local_model_that_mlx_lm_cannot_load_is_one_line_without_hub_advice(tmp_path):
    model = tmp_path / "odd"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "no_such_family"}))
    result = run("generate", "--prompt", "hi", "--model", model)
    assert result.exit_code == 1
    line = " ".join(result.stderr.split())
    assert line.startswith(f"error: could not load model '{model}' (No safetensors found")
    assert "--model" not in line  # the user passed a local directory already


def test_the_adapter_names_a_local_base_model_by_its_absolute_path(dirs, tmp_path, monkeypatch):
    monkeypatch.chdir(Path(dirs["base"]).parent)
    save_adapter_config(tmp_path, lora_config(), Path(dirs["base"]).name)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["base_model"] == \
        str(Path(dirs["base"]).resolve())
    save_adapter_config(tmp_path, lora_config(), "Qwen/Qwen2-0.5B-Instruct")  # a hub id as is
    assert json.loads((tmp_path / "adapter_config.json").read_text())["base_model"] == \
        "Qwen/Qwen2-0.5B-Instruct"
