"""What `train` and `compare` show while they run, and the help texts: the live bars at 80
columns, a log file's one line per step, the phase of a long step, --help."""

import io
import os
import re
import subprocess
import sys

import pytest
import typer
from rich.console import Console
from rich.text import Text
from typer.testing import CliRunner

from mlx_tokenrl import compare as compare_lib, trainer
from mlx_tokenrl.compare import Comparison
from mlx_tokenrl.config import TrainConfig
from tokenrl_cli import common
from tokenrl_cli import compare as compare_cli
from tokenrl_cli import train as train_cli
from tokenrl_cli.main import app

STEP = {"step": 3, "reward_mean": 0.125, "solve_rate": 0.12, "signal_fraction": 0.5,
        "selected_tokens": 49, "generated_tokens": 6748, "step_s": 281.2, "peak_memory_gb": 2.01,
        "resident_peak_gb": 2.34, "skipped": False, "eval_accuracy": 0.453}


def test_packed_lines_break_only_between_fields():
    fields = [Text(f) for f in ("reward 0.125", "signal 50%", "281.2 s/step", "2.01 GB")]
    lines = [line.plain for line in common.packed_lines(fields, width=30)]
    # "  reward 0.125 | signal 50%" is 27 cells; adding " | 281.2 s/step" would make 42.
    assert lines == ["  reward 0.125 | signal 50%", "  281.2 s/step | 2.01 GB"]
    assert [line.plain for line in common.packed_lines(fields, width=80)] == [
        "  reward 0.125 | signal 50% | 281.2 s/step | 2.01 GB"]


def rendered(progress, width=80) -> list[str]:
    console = Console(width=width, file=io.StringIO(), color_system=None)
    console.print(progress.get_renderable())
    return console.file.getvalue().splitlines()


@pytest.mark.parametrize("names", [["grpo on multiply"],
                                   ["base", "s-grpo:lr=4e-5:sgrpo-k=48", "t-spmo:tspmo-replay=6"]])
def test_live_display_at_80_columns_keeps_names_and_numbers_whole(names):
    progress = common.step_progress(max(map(len, names)), 300)
    for name in names:
        bar = progress.add_task(name, total=100, phase="final eval 120/300", numbers=None)
        common.report_step(progress, bar, STEP)  # (a file: also prints a line, not checked here)
        progress.update(bar, phase="final eval 120/300")
    lines = rendered(progress)
    assert all(len(line) <= 80 for line in lines)
    wanted = [*names, "final eval 120/300", "reward 0.125", "acc 45.3%", "signal 50%",
              "281.2 s/step", "24 tok/s", "2.01 GB", "rss 2.34 GB"]
    for text in wanted:
        expected = 1 if text in names else len(names)  # a name on its bar, numbers under each
        assert sum(text in line for line in lines) == expected, (text, lines)


def test_a_log_file_gets_exactly_one_line_per_step(tiny_model_dir, tmp_path):
    """stdout redirected to a file: each step one whole line (it is grepped), no live bar,
    nothing else that looks like a step."""
    log = tmp_path / "train.log"
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    with open(log, "w") as f:
        subprocess.run([sys.executable, "-c", "from tokenrl_cli.main import app; app()",
                        "train", "multiply", "--digits", "1x1", "--model", str(tiny_model_dir),
                        "--steps", "3", "--prompts-per-step", "2", "--group-size", "4",
                        "--max-new-tokens", "8", "--eval-every", "2", "--eval-limit", "4",
                        "--warmup-steps", "1", "--out", str(tmp_path / "run")],
                       stdout=f, stderr=subprocess.PIPE, env=env, check=True, timeout=300)
    lines = log.read_text().splitlines()
    pattern = (r"step (\d+): reward \d\.\d{3}( \| acc \d+\.\d%)? \| solved \d+% \| signal \d+% "
               r"\| sel \d+ \| \d+ tok/s \| \d+\.\d s/step \| \d+\.\d\d GB \| rss \d+\.\d\d GB")
    steps = [re.fullmatch(pattern, line) for line in lines]
    assert [m.group(1) for m in steps if m] == ["1", "2", "3"], lines
    assert steps[1].group(2)  # the evaluated step carries its accuracy (and is > 80 columns)
    assert not any(("reward" in line or "s/step" in line) and not m
                   for line, m in zip(lines, steps)), lines


def captured_progress(monkeypatch, module):
    """The StepProgress the command makes, to look at its bars."""
    made = []
    real = module.step_progress
    monkeypatch.setattr(module, "step_progress", lambda *a: made.append(real(*a)) or made[-1])
    return made


def test_train_shows_what_the_step_is_doing(monkeypatch, tmp_path):
    made = captured_progress(monkeypatch, train_cli)
    seen = []

    def fake_training(cfg, resume, on_start, on_step, on_phase):
        on_start(0)
        task = made[0].tasks[0]
        for phase in ("rollout", "replay", "loss", "eval 32/100"):
            on_phase(phase)
            seen.append(task.fields["phase"])
        on_step({**STEP, "step": 1})
        seen.append((task.completed, task.fields["phase"], task.fields["numbers"][0].plain))

    monkeypatch.setattr(trainer, "train", fake_training)  # (the command imports it when it runs)
    result = CliRunner().invoke(app, ["train", "multiply", "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert seen == ["rollout", "replay", "loss", "eval 32/100", (1, "", "reward 0.125")]


def test_compare_shows_each_arm_and_its_evaluations(monkeypatch, tmp_path):
    made = captured_progress(monkeypatch, compare_cli)
    seen = {}

    def fake_compare(cfg, specs, resume, final_eval_limit, on_arm, on_step, on_phase, on_eval):
        def bars():  # (a copy of the list each time)
            return made[0].tasks

        on_arm("base", None, False)
        on_eval(0, 6)
        seen["base"] = (bars()[0].total, bars()[0].fields["phase"])
        on_arm("grpo", TrainConfig(steps=2, out=str(tmp_path / "grpo")), False)
        on_phase("loss")
        seen["training"] = bars()[1].fields["phase"]
        on_step({**STEP, "step": 1})
        on_phase("eval 1/3")
        seen["in-training eval"] = bars()[1].fields["phase"]
        on_eval(4, 6)
        seen["final eval"] = bars()[1].fields["phase"]
        seen["base after"] = (bars()[0].fields["phase"], bars()[0].fields["numbers"])
        row = {"arm": "base", "accuracy": 0.5, "ci95": [0.2, 0.8], "n": 6, "format_rate": 1.0,
               "delta_vs_base": None, "steps": 0}
        return Comparison([row], [], plot=None)

    monkeypatch.setattr(compare_lib, "run_compare", fake_compare)
    result = CliRunner().invoke(app, ["compare", "multiply", "--algos", "grpo",
                                      "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert seen == {"base": (6, "eval"), "training": "loss", "in-training eval": "eval 1/3",
                    "final eval": "final eval 4/6", "base after": ("done", None)}
    assert "grpo step 1: reward 0.125" in result.output


def stated_defaults(command: str) -> dict:
    """{TrainConfig field: the default its option's help states} of a command."""
    click_command = typer.main.get_command(app).commands[command]
    stated = {}
    for param in click_command.params:
        found = re.search(r"\(default: (.*)\)$", param.help or "")
        if param.param_type_name == "option" and param.name in TrainConfig.__dataclass_fields__:
            stated[param.name] = found.group(1) if found else None
    return stated


def default_for(text: str | None, task: str) -> str | None:
    """The default a help text states for `task`: "1e-05; svamp: 5e-06" -> "5e-06" for
    svamp, "1e-05" for the others."""
    if text is None:
        return None
    general, *per_task = text.split("; ")
    return dict(item.split(": ", 1) for item in per_task).get(task, general)


@pytest.mark.parametrize("task", ["multiply", "svamp"])
@pytest.mark.parametrize("command, module, runner", [("train", trainer, "train"),
                                                     ("compare", compare_lib, "run_compare")])
def test_help_states_the_defaults_the_command_runs_with(command, module, runner, task,
                                                        monkeypatch, tmp_path):
    ran = []
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(module, runner,
                        lambda cfg, *a, **kw: ran.append(cfg) or Comparison([], [], None))
    monkeypatch.setattr(compare_cli, "print_tables", lambda rows, pairs: None)
    result = CliRunner().invoke(app, [command, task])
    assert result.exit_code == 0, result.output
    cfg = ran[0]
    stated = stated_defaults(command)
    for name, text in stated.items():
        value = getattr(cfg, name)
        assert default_for(text, task) == (None if value is None else str(value)), name
    if task == "svamp":  # its own defaults (test_task_defaults.py pins them to their source)
        assert (cfg.lr, cfg.max_new_tokens) == (5e-6, 300)


def test_compare_default_out_yields_to_the_config_file(monkeypatch, tmp_path):
    (tmp_path / "run.yaml").write_text("task: multiply\nout: from-the-file\n")
    ran = []
    monkeypatch.setattr(compare_lib, "run_compare",
                        lambda cfg, *a, **kw: ran.append(cfg) or Comparison([], [], None))
    monkeypatch.setattr(compare_cli, "print_tables", lambda rows, pairs: None)
    result = CliRunner().invoke(app, ["compare", "--config", str(tmp_path / "run.yaml")])
    assert result.exit_code == 0, result.output
    assert ran[0].out == "from-the-file"  # (compare's runs/compare is below the file's)


def test_compare_lists_only_the_options_it_uses():
    stated = stated_defaults("compare")
    # --algos names compare's arms; a single --algo would be overridden by each of them.
    assert "algo" not in stated and "algo" in stated_defaults("train")
    assert set(stated) | {"task", "algo"} == set(TrainConfig.__dataclass_fields__)
    help_text = CliRunner().invoke(app, ["compare", "--help"]).output
    assert "--final-eval-limit" in help_text and "runs/compare" in help_text


def test_top_level_help_lists_each_command_on_one_line(monkeypatch):
    """With room, each command's description is one row: the docstrings' own line breaks
    (mid-sentence) are not kept."""
    monkeypatch.setenv("COLUMNS", "250")
    output = CliRunner().invoke(app, ["--help"]).output
    panel = output[output.index("Commands"):output.rindex("╰")].splitlines()[1:]
    rows = [line.strip("│ ").split()[0] for line in panel]
    assert rows == ["train", "eval", "compare", "convert-gguf", "fuse", "chat", "generate"], panel
    compare_row = next(line for line in panel if line.strip("│ ").startswith("compare"))
    assert "compare their held-out accuracy with the base model's" in compare_row
