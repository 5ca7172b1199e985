"""What every command shares: one-line user errors instead of tracebacks."""

import contextlib

import typer
from rich.console import Console

console = Console()
err_console = Console(stderr=True)


class UserError(Exception):
    """Bad input from the user: reported as one line, exit code 1."""


def user_error_types():
    from mlx_tokenrl.models import ModelLoadError

    types = [UserError, ModelLoadError, FileNotFoundError]
    with contextlib.suppress(ImportError):
        from mlx_tokenrl.tasks import TaskError

        types.append(TaskError)
    with contextlib.suppress(ImportError):
        from mlx_tokenrl.gguf_import import GGUFError

        types.append(GGUFError)
    return tuple(types)


@contextlib.contextmanager
def user_errors():
    try:
        yield
    except user_error_types() as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
