"""Bad input to any command: one `error:` line on stderr, a non-zero exit, no traceback, and
nothing written, before any training (the few checks that need the model load it first)."""

import json
import os

import pytest
from typer.testing import CliRunner

from tokenrl_cli.main import app

# Files each case may refer to, made in an empty working directory before the command runs.
INPUTS = {
    "broken.yaml": "steps: [1, 2\n",
    "wrong_type.yaml": "task: multiply\nsteps: abc\n",
    "list.yaml": "- task\n- multiply\n",
    "unknown_key.yaml": "task: multiply\nlearning_rate: 1e-5\n",
    "nan.yaml": "task: multiply\nlr: .nan\n",
    "not_a_model.gguf": "this is text, not a GGUF file\n",
    "taken": "an existing file, not a directory\n",
    "nan_answer.json": '[{"Body": "Tom has 3 apples.", "Question": "How many?", "Answer": NaN}]',
    "empty_adapter/notes.txt": "an adapter directory without adapter_config.json\n",
    "models/README": "a local models folder (the quick start converts into models/)\n",
}

# A run that is tiny when a check it expects is missing (the case's own flags come later and
# win): the test then fails in seconds, not after a default-length run of minutes.
TINY_RUN = ["--steps", "1", "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "4"]
TRAIN = ["train", "multiply", "--digits", "1x1", *TINY_RUN, "--model", "MODEL", "--out", "out"]
EVAL = ["eval", "multiply", "--digits", "1x1", "--limit", "2", "--max-new-tokens", "4", "--model",
        "MODEL", "--out", "out"]
COMPARE = ["compare", "multiply", "--digits", "1x1", *TINY_RUN, "--eval-limit", "2",
           "--final-eval-limit", "2", "--model", "MODEL", "--out", "out"]
GENERATE = ["generate", "--prompt", "hi", "--model", "MODEL"]
CHAT = ["chat", "--model", "MODEL"]
FUSE = ["fuse", "--model", "MODEL", "--adapter", "ADAPTER"]
CONVERT = ["convert-gguf", "not_a_model.gguf", "--out", "out"]

def needs_model(args, message):
    """A case that can only be told once the model is loaded."""
    return args, message, True


CASES = [
    # the cases of issue 13
    (EVAL + ["--limit", "0"], "--limit must be at least 1, not 0"),
    (EVAL + ["--limit", "-3"], "--limit must be at least 1, not -3"),
    (TRAIN + ["--lr", "0"], "--lr must be greater than 0"),
    (TRAIN + ["--lr", "-1e-5"], "--lr must be greater than 0"),
    (TRAIN + ["--temperature", "0"], "--temperature must be greater than 0"),
    (GENERATE + ["--temperature", "-1"], "--temperature must be at least 0"),
    (TRAIN + ["--lora-rank", "0"], "--lora-rank must be at least 1"),
    (TRAIN + ["--tspmo-max-pairs", "-2"], "--tspmo-max-pairs must be at least 1"),
    (TRAIN + ["--top-p", "1.5"], "--top-p must be at most 1, not 1.5"),
    (TRAIN + ["--sgrpo-p", "1.2"], "--sgrpo-p must be at most 1, not 1.2"),
    needs_model(TRAIN + ["--lora-keys", "self_attn.q_proj,self_attn.nope"],
     "--lora-keys self_attn.nope matches no layer of the model; it has mlp.down_proj,"),
    (["train", "--config", "broken.yaml"], "broken.yaml, line 2: not valid YAML"),
    (["train", "--config", "wrong_type.yaml", "--model", "MODEL", "--out", "out"],
     "--steps: expected an integer, not 'abc'"),
    (TRAIN + ["--dtype", "fp8"], "--dtype must be one of auto, float32, float16, bfloat16"),
    (CONVERT, "not_a_model.gguf is not a GGUF file"),
    (TRAIN[:-1] + ["taken"], "--out taken is an existing file, not a directory"),
    # config files
    (["train", "--config", "list.yaml"], "list.yaml: expected a mapping of option: value"),
    (["train", "--config", "unknown_key.yaml"], "unknown config keys: learning_rate"),
    (["train", "--config", "nan.yaml"], "--lr: expected a finite number, not nan"),
    (["train", "--config", "missing.yaml"], "config file not found: missing.yaml"),
    (["train"], "name a task"),
    # every other training setting out of range
    (TRAIN + ["--steps", "0"], "--steps must be at least 1"),
    (TRAIN + ["--prompts-per-step", "0"], "--prompts-per-step must be at least 1"),
    (TRAIN + ["--group-size", "1"], "--group-size must be at least 2"),
    (TRAIN + ["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (TRAIN + ["--top-p", "0"], "--top-p must be greater than 0"),
    (TRAIN + ["--seed", "-1"], "--seed must be at least 0"),
    (TRAIN + ["--lr", "nan"], "--lr: expected a finite number, not nan"),
    (TRAIN + ["--warmup-steps", "-1"], "--warmup-steps must be at least 0"),
    (TRAIN + ["--weight-decay", "-0.1"], "--weight-decay must be at least 0"),
    (TRAIN + ["--grad-clip", "-1"], "--grad-clip must be at least 0"),
    (TRAIN + ["--beta", "-0.1"], "--beta must be at least 0"),
    (TRAIN + ["--format-reward", "-1"], "--format-reward must be at least 0"),
    (TRAIN + ["--algo", "ppo"], "--algo must be one of grpo, s-grpo, t-spmo, top-entropy, not 'ppo'"),
    (TRAIN + ["--loss-norm", "mean"], "--loss-norm must be one of sequence, token"),
    (TRAIN + ["--scale-rewards", "std"], "--scale-rewards must be one of group, none"),
    (TRAIN + ["--lora-scale", "0"], "--lora-scale must be greater than 0"),
    (TRAIN + ["--lora-layers", "0"], "--lora-layers must be -1 (all) or at least 1"),
    needs_model(TRAIN + ["--lora-layers", "3"], "--lora-layers 3: the model has 2 transformer blocks"),
    (TRAIN + ["--lora-keys", ","], "--lora-keys names no module"),
    (TRAIN + ["--quantize", "7"], "--quantize must be one of 2, 3, 4, 5, 6, 8, not 7"),
    (TRAIN + ["--sgrpo-alpha", "-1"], "--sgrpo-alpha must be at least 0"),
    (TRAIN + ["--sgrpo-k", "0"], "--sgrpo-k must be at least 1"),
    (TRAIN + ["--sgrpo-alpha", "30"], "--sgrpo-alpha must not exceed --sgrpo-k"),
    (TRAIN + ["--algo", "s-grpo", "--sgrpo-alpha", "0", "--sgrpo-p", "0"], "no token in the S-GRPO"),
    (TRAIN + ["--sgrpo-p", "-0.5"], "--sgrpo-p must be at least 0"),
    (TRAIN + ["--updates-per-rollout", "0"], "--updates-per-rollout must be at least 1, not 0"),
    (TRAIN + ["--clip-epsilon", "-0.1"], "--clip-epsilon must be at least 0, not -0.1"),
    (TRAIN + ["--clip-epsilon", "0.3", "--clip-epsilon-high", "0.2"],
     "--clip-epsilon-high must be at least 0.3, not 0.2"),
    (TRAIN + ["--entropy-quantile", "0"], "--entropy-quantile must be greater than 0, not 0.0"),
    (TRAIN + ["--entropy-quantile", "1.2"], "--entropy-quantile must be at most 1, not 1.2"),
    (TRAIN + ["--tspmo-replay", "-1"], "--tspmo-replay must be at least 0"),
    (TRAIN + ["--microbatch-rows", "0"], "--microbatch-rows must be at least 1"),
    (TRAIN + ["--eval-every", "-1"], "--eval-every must be at least 0"),
    (TRAIN + ["--eval-limit", "0"], "--eval-limit must be at least 1"),
    (TRAIN + ["--save-every", "0"], "--save-every must be at least 1"),
    (TRAIN + ["--reward-fn", "nowhere.py:score"], "cannot import reward function"),
    (["train", "gsm9k", "--model", "MODEL", "--out", "out"],  # (jsonl, custom's old name, unlisted)
     "unknown task 'gsm9k'; known tasks: svamp, gsm8k, multiply, custom"),
    (["train", "--resume", "out"], "--resume out: no config.json there"),
    # a malformed command line: click's errors, as one line too
    (TRAIN + ["--steps", "abc"], "Invalid value for '--steps'"),
    (TRAIN + ["--no-such-flag"], "No such option: --no-such-flag"),
    (["fuse", "--out", "out"], "Missing option '--adapter-path' / '--adapter'"),
    # compare
    (COMPARE + ["--algos", "grpo,ppo"], "--algos: unknown algorithm 'ppo'"),
    (COMPARE + ["--algos", "s-grpo:lr=abc"], "--lr: expected a finite number, not 'abc'"),
    (COMPARE + ["--algos", "s-grpo:sgrpo-p=2"], "--sgrpo-p must be at most 1"),
    (COMPARE + ["--group-size", "1"], "--group-size must be at least 2"),
    needs_model(COMPARE + ["--lora-keys", "attn.q"], "--lora-keys attn.q matches no layer"),
    (COMPARE[:-1] + ["taken"], "--out taken is an existing file"),
    # eval
    (EVAL + ["--batch-size", "0"], "--batch-size must be at least 1"),
    (EVAL + ["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (EVAL + ["--seed", "-1"], "--seed must be at least 0"),
    (EVAL + ["--dtype", "half"], "--dtype must be one of auto, float32, float16, bfloat16"),
    (EVAL + ["--split", "dev"], "unknown split 'dev'"),
    (EVAL + ["--adapter", "no-adapter"], "--adapter-path no-adapter: the directory does not exist"),
    (EVAL[:-1] + ["taken"], "--out taken is an existing file"),
    # generate, chat
    # both spellings on every command that takes it (mlx-lm's generate says --max-tokens)
    (GENERATE + ["--max-tokens", "0"], "--max-new-tokens must be at least 1"),
    (GENERATE + ["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (TRAIN + ["--max-tokens", "0"], "--max-new-tokens must be at least 1"),
    (EVAL + ["--max-tokens", "0"], "--max-new-tokens must be at least 1"),
    (COMPARE + ["--max-tokens", "0"], "--max-new-tokens must be at least 1"),
    (GENERATE + ["--seed", "-1"], "--seed must be at least 0"),
    (GENERATE + ["--top-p", "0"], "--top-p must be greater than 0"),
    (GENERATE + ["--raw", "--system", "be brief"], "--system-prompt does not apply with --raw"),
    (GENERATE + ["--raw", "--instruction", "be brief"], "--instruction does not apply with --raw"),
    (GENERATE + ["--adapter-path", "no-adapter"], "--adapter-path no-adapter: the directory does not exist"),
    # bad data: one line naming the file and record, never a traceback from the reward
    (["train", "svamp", "--data", "nan_answer.json", *TINY_RUN, "--model", "MODEL", "--out", "out"],
     "nan_answer.json, record 0 (0-based): field 'Answer' holds nan, not a finite number"),
    (["eval", "svamp", "--data", "nan_answer.json", "--model", "MODEL", "--out", "out"],
     "nan_answer.json, record 0 (0-based): field 'Answer' holds nan"),
    # numbers past what MLX's 32-bit shapes, positions and seeds hold
    (TRAIN + ["--seed", str(10 ** 20)], "--seed must be at most 2147483647"),
    (TRAIN + ["--max-new-tokens", str(2 ** 63 - 1)], "--max-new-tokens must be at most 2147483647"),
    (TRAIN + ["--group-size", str(2 ** 63 - 1)], "--group-size must be at most 2147483647"),
    (TRAIN + ["--warmup-steps", str(10 ** 20)], "--warmup-steps must be at most 2147483647"),
    (TRAIN + ["--max-memory", "1e300"], "--max-memory must be at most 1000000"),
    (EVAL + ["--max-new-tokens", str(10 ** 20)], "--max-new-tokens must be at most 2147483647"),
    (GENERATE + ["--max-tokens", str(10 ** 20)], "--max-new-tokens must be at most 2147483647"),
    (TRAIN + ["--reward-weights", "1,0.5"], "--reward-weights needs --reward-fn"),
    (TRAIN + ["--reward-fn", "m.py:a", "--reward-fn", "m.py:b", "--reward-weights", "1"],
     "--reward-weights has 1 weight(s) for 2 --reward-fn function(s)"),
    (TRAIN + ["--reward-weights", "1,x"], "--reward-weights: expected a finite number, not 'x'"),
    (TRAIN + ["--question-field", "q"], "--question-field: only task custom reads it, not 'multiply'"),
    (TRAIN + ["--adapter-path", "no-adapter"], "--adapter-path no-adapter: the directory does not exist"),
    (["train", "custom", "--model", "MODEL", "--out", "out"], "task 'custom' needs data"),
    (["train", "custom", "--data", "taken", "--hf-dataset", "a/b", "--model", "MODEL", "--out", "out"],
     "pass --data or --hf-dataset, not both"),
    (EVAL + ["--test-split", "dev"], "--test-split: only task custom reads it"),
    (CHAT + ["--top-p", "0"], "--top-p must be greater than 0"),
    (CHAT + ["--top-p", "1.01"], "--top-p must be at most 1"),
    (CHAT + ["--temperature", "-0.5"], "--temperature must be at least 0"),
    (CHAT + ["--max-tokens", "0"], "--max-new-tokens must be at least 1"),
    (CHAT + ["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (CHAT + ["--adapter", "no-adapter"], "--adapter-path no-adapter: the directory does not exist"),
    # fuse, convert-gguf
    (FUSE + ["--out", "taken"], "--out taken is an existing file"),
    (["fuse", "--model", "MODEL", "--adapter", "no-adapter", "--out", "out"],
     "--adapter-path no-adapter: the directory does not exist"),
    (["fuse", "--model", "MODEL", "--adapter", "empty_adapter", "--out", "out"],
     "adapter empty_adapter: missing adapter_config.json"),
    (EVAL + ["--adapter", "taken"], "--adapter-path taken is a file, not a directory"),
    (["eval", "custom", "--data", "nowhere.jsonl", "--model", "MODEL", "--adapter", "no-adapter"],
     "--adapter-path no-adapter: the directory does not exist"),  # before any data is read
    # a mistyped local model path is a missing path, not a hub failure (the hub is offline)
    (TRAIN[:-4] + ["--model", "models/does-not-exist", "--out", "out"],
     "model 'models/does-not-exist': the path does not exist"),
    (EVAL[:-4] + ["--model", "./nope", "--out", "out"], "model './nope': the path does not exist"),
    (GENERATE[:3] + ["--model", "some/where/else"], "model 'some/where/else': the path does not exist"),
    (CONVERT + ["--dtype", "int4"], "--dtype must be one of float32, float16, bfloat16"),
    (["convert-gguf", "missing.gguf", "--out", "out"], "GGUF file not found: missing.gguf"),
    (CONVERT[:-1] + ["taken"], "--out taken is an existing file"),
]


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    """A real adapter for the tiny model (fuse needs one to get as far as --out)."""
    from mlx_tokenrl.models import add_lora, load_model, lora_config, save_adapter_config
    from mlx_tokenrl.checkpoint import adapter_weights
    import mlx.core as mx

    out = tmp_path_factory.mktemp("adapter")
    net, _ = load_model(str(tiny_model_dir))
    config = lora_config(rank=2)
    add_lora(net, config)
    mx.save_safetensors(str(out / "adapters.safetensors"), adapter_weights(net))
    save_adapter_config(out, config, str(tiny_model_dir))
    return out


def snapshot(root):
    return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(root) for f in files}


CASES = [case if len(case) == 3 else (*case, False) for case in CASES]


@pytest.mark.parametrize("args, message, model_needed", CASES,
                         ids=[" ".join(a[:1] + a[-2:]) for a, _, _ in CASES])
def test_bad_input_is_one_line_and_writes_nothing(args, message, model_needed, tiny_model_dir,
                                                  adapter_dir, tmp_path, monkeypatch):
    import mlx_lm

    from mlx_tokenrl import models

    loads, real_load = [], mlx_lm.load
    monkeypatch.setattr(models.mlx_lm, "load", lambda *a, **kw: loads.append(a) or real_load(*a, **kw))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name, text in INPUTS.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    before = snapshot(tmp_path)
    args = [{"MODEL": str(tiny_model_dir), "ADAPTER": str(adapter_dir)}.get(a, a) for a in args]
    result = CliRunner().invoke(app, args)
    assert result.exit_code not in (0, 70), result.output
    errors = result.stderr.splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: "), result.stderr
    assert message in errors[0]
    assert "Traceback" not in result.output
    assert snapshot(tmp_path) == before  # nothing written, and the existing file untouched
    assert bool(loads) == model_needed  # no model work for what the input alone tells


def test_an_internal_error_keeps_its_traceback(tiny_model_dir, tmp_path, monkeypatch):
    """A ValueError from inside a step (as MLX raises shape errors) is a bug, not bad input:
    its traceback and exit code 70. The steps finished before it are checkpointed."""
    from mlx_tokenrl import trainer

    real = trainer.run_step

    def broken_third_step(*args, **kwargs):
        if args[-1] == 2:  # the 0-based step index
            raise ValueError("[reshape] Cannot reshape array of size 6 into shape (4).")
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "run_step", broken_third_step)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "multiply", "--digits", "1x1", "--model",
                                      str(tiny_model_dir), "--steps", "5", "--group-size", "2",
                                      "--prompts-per-step", "1", "--max-new-tokens", "4",
                                      "--out", str(out)])
    assert result.exit_code == 70
    assert "Traceback" in result.stderr and "broken_third_step" in result.stderr
    assert "ValueError: [reshape] Cannot reshape" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: internal error")
    assert (out / "checkpoints" / "latest").read_text() == "step-000002"
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1, 2]


@pytest.mark.parametrize("command", [["compare", "--algos", "grpo"], ["eval"]])
def test_internal_errors_of_compare_and_eval_keep_their_traceback(command, tiny_model_dir,
                                                                    tmp_path, monkeypatch):
    from mlx_tokenrl import evaluate

    def broken(*args, **kwargs):
        raise ValueError("[matmul] Last dimension of first input with shape (1,3) must match")

    monkeypatch.setattr(evaluate, "rollout", broken)
    tiny = TINY_RUN + ["--final-eval-limit", "2"] if command[0] == "compare" else ["--limit", "2"]
    result = CliRunner().invoke(app, [command[0], "multiply", *command[1:], *tiny, "--model",
                                      str(tiny_model_dir), "--out", str(tmp_path / "out")])
    assert result.exit_code == 70
    assert "Traceback" in result.stderr and "ValueError: [matmul]" in result.stderr
