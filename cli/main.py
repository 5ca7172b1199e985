"""Entry point: `tokenrl-mlx COMMAND`."""

import typer

from mlx_tokenrl import backend  # noqa: F401  (fast BLAS before any mlx import)

from . import compare, convert, train, use
from .common import Command, Group

app = typer.Typer(
    name="tokenrl-mlx",
    help="Token-efficient RL (GRPO, S-GRPO, T-SPMO) for LLM reasoning on MLX.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    cls=Group,
)

app.command("train", cls=Command)(train.train)
app.command("eval", cls=Command)(train.evaluate)
app.command("compare", cls=Command)(compare.compare)
app.command("convert-gguf", cls=Command)(convert.convert_gguf)
app.command("fuse", cls=Command)(use.fuse)
app.command("chat", cls=Command)(use.chat)
app.command("generate", cls=Command)(use.generate)
