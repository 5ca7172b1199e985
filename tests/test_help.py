"""The CLI's help and argument errors: they answer at once (no MLX, mlx-lm or transformers
is imported for them), and every command's help has one look."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from tokenrl_cli.main import app

COMMANDS = ["train", "eval", "compare", "convert-gguf", "fuse", "chat", "generate"]
HEAVY = ("mlx", "mlx_lm", "transformers")  # mlx_lm alone takes seconds (issue 27)
# Typer converts option values through pydantic (~0.4 s), and the algorithms' selections
# import numpy (~0.1 s; the config reads their registry): fine for a command that runs, not
# for help, whose options are never read.
HELP_ALSO = ("pydantic", "numpy")

# What a user types before any model work: help, a malformed command line, a bad value.
QUICK = [["--help"], *[[command, "--help"] for command in COMMANDS],
         ["train", "multiply", "--no-such-flag"], ["train", "multiply", "--steps", "abc"],
         ["train", "multiply", "--lr", "-1"], ["train", "gsm9k"],
         ["compare", "multiply", "--group-size", "1"], ["eval", "multiply", "--limit", "0"],
         ["chat", "--top-p", "2"], ["fuse", "--adapter", "adapter", "--out", "taken"], ["generate", "--prompt", "hi", "--max-tokens", "0"],
         ["convert-gguf", "model.gguf", "--out", "out", "--dtype", "int4"]]

PROBE = """
import json, sys
from tokenrl_cli.main import app
for args in json.loads(sys.argv[1]):
    try:
        app(args, prog_name="tokenrl-mlx")
    except SystemExit:
        pass
    loaded = sorted({name.split(".")[0] for name in sys.modules} & set(json.loads(sys.argv[2])))
    print(json.dumps(loaded), file=sys.stderr)
"""


def test_help_and_argument_errors_import_no_mlx_mlx_lm_or_transformers(tmp_path):
    """In a fresh interpreter (this one has MLX loaded): after each command line, which of
    the heavy packages are loaded. (The time they take is scripts/bench_cli.py's.)"""
    (tmp_path / "taken").write_text("a file where fuse's --out should go\n")
    result = subprocess.run([sys.executable, "-c", PROBE, json.dumps(QUICK),
                             json.dumps(HEAVY + HELP_ALSO)],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    loaded = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("[")]
    assert len(loaded) == len(QUICK), result.stderr
    too_much = {" ".join(args): [name for name in names if name in HEAVY or args[-1] == "--help"]
                for args, names in zip(QUICK, loaded)}  # (help comes first: nothing loaded yet)
    assert too_much == {" ".join(args): [] for args in QUICK}


def help_of(*args, columns=80) -> str:
    return CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": str(columns)}).output


def option_rows(help_text: str, option: str) -> list[str]:
    """The lines of `option`'s row in a help panel: its own and those under it, up to the
    next option or the panel's end."""
    lines = help_text.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"│\s+{option}\b", line))
    end = next(i for i in range(start + 1, len(lines))
               if re.match(r"│\s+-|╰", lines[i]))
    return lines[start:end]


@pytest.mark.parametrize("command", [[], *[[c] for c in COMMANDS]])
def test_help_shows_no_type_for_flags_and_defaults_one_way(command):
    text = help_of(*command, columns=200)
    assert "<bool>" not in text  # a flag takes no value (it was beside every --help)
    assert "[default:" not in text  # Typer's own form: every default is "(default: X)"


def test_defaults_are_stated_after_the_help_in_every_command():
    for command, option, default in [("chat", "--temperature", "0.7"), ("eval", "--split", "test"),
                                     ("generate", "--max-new-tokens", "512"),
                                     ("train", "--steps", "100"), ("fuse", "--dequantize", None)]:
        row = " ".join(" ".join(option_rows(help_of(command, columns=200), option)).split())
        assert ("(default:" in row) == (default is not None), row  # a plain switch: off unless given
        if default is not None:
            assert f"(default: {default})" in row, row


def test_max_memory_help_fits_a_few_lines_at_80_columns():
    assert len(option_rows(help_of("train"), "--max-memory")) <= 8  # it took 15


@pytest.mark.parametrize("command", ["train", "eval", "compare", "chat", "generate"])
def test_every_command_takes_both_spellings_of_max_new_tokens(command):
    click_command = typer.main.get_command(app).commands[command]
    [param] = [p for p in click_command.params if p.name == "max_new_tokens"]
    assert set(param.opts) == {"--max-new-tokens", "--max-tokens"}


def test_the_quick_starts_models_folder_is_not_tracked():
    root = Path(__file__).parent.parent
    if not (root / ".git").exists():
        pytest.skip("not a git checkout")
    result = subprocess.run(["git", "check-ignore", "-q", "models/smollm2-135m/model.safetensors"],
                            cwd=root)
    assert result.returncode == 0  # ignored
    tracked = subprocess.run(["git", "check-ignore", "-q", "mlx_tokenrl/models.py"], cwd=root)
    assert tracked.returncode == 1  # a module named models is still tracked
