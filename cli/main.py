"""Entry point: `tokenrl-mlx COMMAND`."""

import typer

from mlx_tokenrl import backend  # noqa: F401  (fast BLAS before any mlx import)

from . import compare, convert, train, use

app = typer.Typer(
    name="tokenrl-mlx",
    help="Token-efficient RL (GRPO, S-GRPO, T-SPMO) for LLM reasoning on MLX.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

app.command("train")(train.train)
app.command("eval")(train.evaluate)
app.command("compare")(compare.compare)
app.command("convert-gguf")(convert.convert_gguf)
app.command("fuse")(use.fuse)
app.command("chat")(use.chat)
app.command("generate")(use.generate)
