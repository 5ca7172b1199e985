"""Prompt control: --system-prompt and --instruction shape the training prompt, are saved in
the run's config.json, and eval, generate and chat ask the same question with its adapter
(eval also the run's own test problems, and all of them load the adapter's base model)."""

import json
import shutil

import pytest
from typer.testing import CliRunner

from mlx_tokenrl import trainer
from mlx_tokenrl.models import load_model
from mlx_tokenrl.tasks import INSTRUCTION, TaskError, format_prompt, load_task
from tokenrl_cli import use
from tokenrl_cli.main import app

SYSTEM = "You are a careful calculator."
TEMPLATE = "Solve: {question}\nEnd with \\boxed{N}."  # braces other than {question} stay


class ChatTokenizer:
    chat_template = "{{ messages }}"

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=True):
        return "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages) + "<assistant>"


def test_instruction_replaces_the_tasks_and_can_place_the_question():
    tok = ChatTokenizer()
    assert format_prompt(tok, "2+3?", "Be brief.") == "<user>2+3?\nBe brief.</user><assistant>"
    assert format_prompt(tok, "2+3?", TEMPLATE) == \
        "<user>Solve: 2+3?\nEnd with \\boxed{N}.</user><assistant>"
    assert format_prompt(tok, "2+3?", "") == "<user>2+3?</user><assistant>"  # the question alone
    assert format_prompt(tok, "2+3?", "Be brief.", SYSTEM) == \
        f"<system>{SYSTEM}</system><user>2+3?\nBe brief.</user><assistant>"
    assert format_prompt(tok, "2+3?", "Be brief.", "") == "<user>2+3?\nBe brief.</user><assistant>"


def test_plain_layout_puts_the_system_prompt_first():
    assert format_prompt(object(), "2+3?", TEMPLATE, SYSTEM) == \
        f"{SYSTEM}\n\nQuestion: Solve: 2+3?\nEnd with \\boxed{{N}}.\nAnswer:"


def test_load_task_takes_the_prompt_settings():
    task = load_task("multiply", digits="1x1", instruction=TEMPLATE, system_prompt=SYSTEM)
    question = task.test[0].question
    assert task.prompt(ChatTokenizer(), question) == \
        f"<system>{SYSTEM}</system><user>Solve: {question}\nEnd with \\boxed{{N}}.</user><assistant>"
    default = load_task("multiply", digits="1x1")
    assert (default.instruction, default.system_prompt) == (INSTRUCTION, None)


def run(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory):
    """A one-step training run with its own system prompt and instruction."""
    out = tmp_path_factory.mktemp("prompted") / "run"
    result = run("train", "multiply", "--digits", "1x1", "--model", tiny_model_dir, "--steps", 1,
                 "--prompts-per-step", 2, "--group-size", 2, "--max-new-tokens", 4,
                 "--system-prompt", SYSTEM, "--instruction", TEMPLATE, "--out", out)
    assert result.exit_code == 0, result.output
    return out


def test_training_asks_with_the_prompt_and_saves_it(tiny_model_dir, tmp_path, monkeypatch):
    seen = []
    real = trainer.encode_prompts
    monkeypatch.setattr(trainer, "encode_prompts", lambda tok, texts: seen.extend(texts) or real(tok, texts))
    out = tmp_path / "run"
    result = run("train", "multiply", "--digits", "1x1", "--model", tiny_model_dir, "--steps", 1,
                 "--prompts-per-step", 2, "--group-size", 2, "--max-new-tokens", 4,
                 "--system-prompt", SYSTEM, "--instruction", TEMPLATE, "--out", out)
    assert result.exit_code == 0, result.output
    assert len(seen) == 2
    for text in seen:
        assert text.startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nSolve: What is ")
        assert "End with \\boxed{N}.<|im_end|>" in text and INSTRUCTION not in text
    saved = json.loads((out / "config.json").read_text())
    assert (saved["system_prompt"], saved["instruction"]) == (SYSTEM, TEMPLATE)


def eval_prompts(out):
    return [json.loads(line)["prompt"] for line in open(out / "examples.jsonl")]


def test_eval_with_the_runs_adapter_asks_its_question(run_dir, tiny_model_dir, tmp_path):
    eval_args = ["eval", "multiply", "--digits", "1x1", "--model", tiny_model_dir, "--limit", 2,
                 "--max-new-tokens", 2]
    result = run(*eval_args, "--adapter-path", run_dir, "--out", tmp_path / "same")
    assert result.exit_code == 0, result.output
    net, tokenizer = load_model(str(tiny_model_dir))
    task = load_task("multiply", digits="1x1")
    expected = [format_prompt(tokenizer, ex.question, TEMPLATE, SYSTEM) for ex in task.test[:2]]
    assert eval_prompts(tmp_path / "same") == expected
    summary = json.loads((tmp_path / "same" / "summary.json").read_text())
    assert (summary["system_prompt"], summary["instruction"]) == (SYSTEM, TEMPLATE)
    # Given flags win; '' takes the system prompt away. --adapter is the older spelling.
    result = run(*eval_args, "--adapter", run_dir, "--instruction", "Be brief.",
                 "--system-prompt", "", "--out", tmp_path / "flags")
    assert result.exit_code == 0, result.output
    assert eval_prompts(tmp_path / "flags") == [format_prompt(tokenizer, ex.question, "Be brief.")
                                                for ex in task.test[:2]]
    # Without an adapter: the task's own instruction, no system prompt.
    result = run(*eval_args, "--out", tmp_path / "base")
    assert eval_prompts(tmp_path / "base") == [format_prompt(tokenizer, ex.question)
                                               for ex in task.test[:2]]


def run_copy(run_dir, where, **changes):
    """A copy of the one-step run whose config.json says it was trained with `changes`."""
    shutil.copytree(run_dir, where)
    config = json.loads((where / "config.json").read_text())
    (where / "config.json").write_text(json.dumps({**config, **changes}))
    return where


def eval_questions(out):
    return [json.loads(line)["question"] for line in open(out / "examples.jsonl")]


def test_eval_of_a_runs_adapter_scores_the_runs_own_test_problems(run_dir, tiny_model_dir,
                                                                   tmp_path):
    """Multiply draws its test problems from the seed: another seed's overlap the run's
    training problems. And without --model, the model is the one the adapter was trained on."""
    copy = run_copy(run_dir, tmp_path / "run", seed=3, digits="2x1")
    result = run("eval", "multiply", "--adapter-path", copy, "--limit", 4, "--max-new-tokens", 2,
                 "--out", tmp_path / "own")
    assert result.exit_code == 0, result.output
    assert f"model: {tiny_model_dir} (the adapter's base model" in result.stderr
    runs_test = [ex.question for ex in load_task("multiply", digits="2x1", seed=3).test[:4]]
    assert eval_questions(tmp_path / "own") == runs_test
    assert runs_test != [ex.question for ex in load_task("multiply", digits="2x1").test[:4]]
    # Flags given win over the run's.
    result = run("eval", "multiply", "--adapter-path", copy, "--limit", 4, "--max-new-tokens", 2,
                 "--seed", 0, "--digits", "1x1", "--model", tiny_model_dir, "--out", tmp_path / "given")
    assert result.exit_code == 0, result.output
    assert "adapter's base model" not in result.stderr
    assert eval_questions(tmp_path / "given") == [ex.question for ex in load_task(
        "multiply", digits="1x1").test[:4]]


def test_eval_scores_a_qlora_adapter_on_the_quantized_base_it_trained_on(run_dir, tmp_path,
                                                                        monkeypatch):
    from mlx_tokenrl import models

    real, seen = models.load_model, []

    def load_model(*args, quantize_bits=None, **kwargs):  # the tiny model's widths cannot be
        seen.append(quantize_bits)                         # quantized in groups of 64
        return real(*args, **kwargs)

    monkeypatch.setattr(models, "load_model", load_model)
    copy = run_copy(run_dir, tmp_path / "run", quantize=4)
    args = ["eval", "multiply", "--adapter-path", copy, "--limit", 1, "--max-new-tokens", 1]
    assert run(*args, "--out", tmp_path / "run's").exit_code == 0
    assert run(*args, "--quantize", 8, "--out", tmp_path / "given").exit_code == 0
    assert run(*args, "--quantize", 0, "--out", tmp_path / "off").exit_code == 0
    assert seen == [4, 8, None]
    assert json.loads((tmp_path / "run's" / "summary.json").read_text())["quantize"] == 4
    result = run(*args, "--quantize", 7)
    assert result.exit_code == 1 and "--quantize must be one of" in result.stderr
    # generate and chat run the adapter as it trained, too.
    assert run("generate", "--adapter-path", copy, "--prompt", "hi", "--max-tokens", 1).exit_code == 0
    assert run("chat", "--adapter-path", copy, "--max-tokens", 1).exit_code == 0
    assert seen == [4, 8, None, 4, 4]


def test_eval_takes_the_runs_data_only_for_the_task_it_trained_on(run_dir, tmp_path):
    data = tmp_path / "sums.jsonl"
    data.write_text("".join(json.dumps({"q": f"What is {i} plus 1?", "a": str(i + 1)}) + "\n"
                            for i in range(3)))
    copy = run_copy(run_dir, tmp_path / "run", task="custom", data=str(data), question_field="q",
                    answer_field="a")
    args = ["--adapter-path", copy, "--max-new-tokens", 2]
    result = run("eval", "custom", *args, "--out", tmp_path / "custom")
    assert result.exit_code == 0, result.output
    assert eval_questions(tmp_path / "custom") == [f"What is {i} plus 1?" for i in range(3)]
    assert json.loads((tmp_path / "custom" / "summary.json").read_text())["task_settings"][
        "data"] == str(data)
    # custom's older name is the same task.
    old_name = run_copy(run_dir, tmp_path / "old", task="jsonl", data=str(data),
                        question_field="q", answer_field="a")
    result = run("eval", "custom", "--adapter-path", old_name, "--max-new-tokens", 2,
                 "--out", tmp_path / "old-name")
    assert result.exit_code == 0, result.output
    # Another source given replaces all of the run's: its hub dataset, fields and splits.
    hub_run = run_copy(run_dir, tmp_path / "hub", task="custom", hf_dataset="someone/sums",
                       question_field="problem", test_split="validation")
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"prompt": "What is 1 plus 1?", "answer": "2"}) + "\n")
    result = run("eval", "custom", *args, "--data", plain, "--out", tmp_path / "plain")
    assert result.exit_code == 0, result.output
    result = run("eval", "custom", "--adapter-path", hub_run, "--max-new-tokens", 2, "--data",
                 plain, "--out", tmp_path / "plain-hub")
    assert result.exit_code == 0, result.output
    assert eval_questions(tmp_path / "plain-hub") == ["What is 1 plus 1?"]
    # The run's files as it saved them: relative to where it ran.
    moved = run_copy(run_dir, tmp_path / "moved", task="custom", data="elsewhere/sums.jsonl")
    result = run("eval", "custom", "--adapter-path", moved)
    assert result.exit_code == 1
    assert "the adapter's run used --data elsewhere/sums.jsonl, which is not found from" in \
        " ".join(result.stderr.split())
    # On another task the run's data and fields would be wrong (multiply refuses the fields).
    result = run("eval", "multiply", *args, "--digits", "1x1", "--limit", 2, "--out", tmp_path / "m")
    assert result.exit_code == 0, result.output
    assert eval_questions(tmp_path / "m") == [ex.question for ex in load_task(
        "multiply", digits="1x1").test[:2]]


@pytest.fixture
def streamed(monkeypatch):
    """The prompts generate streams from (as text)."""
    seen = []
    monkeypatch.setattr(use, "_stream", lambda net, tokenizer, prompt, *rest: seen.append(
        tokenizer.decode(prompt) if isinstance(prompt, list) else prompt))
    return seen


def test_generate_uses_the_runs_prompt_unless_told(run_dir, tiny_model_dir, streamed):
    _, tokenizer = load_model(str(tiny_model_dir))
    base = ["generate", "--model", tiny_model_dir, "--prompt", "What is 2 times 3?"]
    for args in (["--adapter-path", run_dir], ["--adapter-path", run_dir, "--instruction", "",
                                               "--system", "Hi."], [], ["--raw"]):
        assert run(*base, *args).exit_code == 0
    assert streamed == [
        format_prompt(tokenizer, "What is 2 times 3?", TEMPLATE, SYSTEM),
        format_prompt(tokenizer, "What is 2 times 3?", "", "Hi."),
        format_prompt(tokenizer, "What is 2 times 3?", ""),  # no run: the prompt as it is
        "What is 2 times 3?"]


def test_a_run_that_kept_the_tasks_instruction_passes_it_on(run_dir, tiny_model_dir, tmp_path,
                                                            streamed):
    default_run = tmp_path / "default"
    shutil.copytree(run_dir, default_run)
    saved = json.loads((default_run / "config.json").read_text())
    (default_run / "config.json").write_text(json.dumps({**saved, "instruction": None,
                                                         "system_prompt": None}))
    assert run("generate", "--model", tiny_model_dir, "--adapter-path", default_run,
               "--prompt", "What is 2 times 3?").exit_code == 0
    _, tokenizer = load_model(str(tiny_model_dir))
    assert streamed == [format_prompt(tokenizer, "What is 2 times 3?", INSTRUCTION)]


def test_chat_applies_the_runs_prompt_to_every_turn(run_dir, tiny_model_dir, monkeypatch):
    seen = []
    monkeypatch.setattr(use, "_chat_prompt", lambda tok, msgs: seen.append(list(msgs)) or [1])
    monkeypatch.setattr(use, "_stream", lambda *args: "ok")
    result = CliRunner().invoke(app, ["chat", "--model", str(tiny_model_dir), "--adapter-path",
                                      str(run_dir)], input="2 times 3\n4 times 5\n")
    assert result.exit_code == 0, result.output
    assert seen[-1] == [{"role": "system", "content": SYSTEM},
                        {"role": "user", "content": "Solve: 2 times 3\nEnd with \\boxed{N}."},
                        {"role": "assistant", "content": "ok"},
                        {"role": "user", "content": "Solve: 4 times 5\nEnd with \\boxed{N}."}]


def test_a_template_that_refuses_a_system_prompt_is_one_line(tiny_model_dir, tmp_path):
    model = tmp_path / "no-system"
    shutil.copytree(tiny_model_dir, model)
    config_path = model / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = ("{% if messages[0]['role'] == 'system' %}"
                               "{{ raise_exception('System role not supported') }}{% endif %}"
                               + config["chat_template"])
    config_path.write_text(json.dumps(config))
    out = tmp_path / "run"
    result = run("train", "multiply", "--digits", "1x1", "--model", model, "--steps", 1,
                 "--system-prompt", SYSTEM, "--out", out)
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        "error: --system-prompt: the model's chat template refuses a system message "
        "(TemplateError: System role not supported)"]
    assert not out.exists()
    with pytest.raises(TaskError):
        format_prompt(load_model(str(model))[1], "q", system_prompt=SYSTEM)
    for command in (["chat"], ["generate", "--prompt", "hi"]):
        result = run(*command, "--model", model, "--system", SYSTEM, "--max-tokens", 2)
        assert result.exit_code == 1, command
        assert result.stderr.strip().startswith("error: --system-prompt: the model's chat "
                                                "template refuses"), command


def test_compare_scores_every_arm_with_the_runs_prompt(tiny_model_dir, tmp_path):
    out = tmp_path / "cmp"
    result = run("compare", "multiply", "--digits", "1x1", "--model", tiny_model_dir,
                 "--algos", "grpo", "--steps", 1, "--prompts-per-step", 2, "--group-size", 2,
                 "--max-new-tokens", 2, "--eval-limit", 2, "--system-prompt", SYSTEM,
                 "--instruction", TEMPLATE, "--out", out)
    assert result.exit_code == 0, result.output
    _, tokenizer = load_model(str(tiny_model_dir))
    task = load_task("multiply", digits="1x1")
    expected = [format_prompt(tokenizer, ex.question, TEMPLATE, SYSTEM) for ex in task.test[:2]]
    for arm in ("base", "grpo"):
        assert eval_prompts(out / arm / "eval") == expected, arm
