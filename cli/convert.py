"""`convert-gguf`: a llama/qwen2 GGUF file into an mlx-lm model directory."""

from pathlib import Path
from typing import Annotated

import typer

from mlx_tokenrl.config import FLOAT_DTYPES, one_of, output_dir

from .common import UserError, console, reported_errors


def convert_gguf(
    gguf_file: Annotated[Path, typer.Argument(help="The .gguf file (llama or qwen2 architecture).")],
    out: Annotated[Path, typer.Option(help="Output mlx-lm model directory.")],
    dtype: Annotated[str, typer.Option(help="float32 (CPU), float16 or bfloat16.")] = "float32",
):
    """Convert a GGUF model (F32/F16/BF16/Q8_0/Q4_0/Q4_1/K-quants) to an mlx-lm directory."""
    with reported_errors():
        one_of("dtype", dtype, FLOAT_DTYPES)
        output_dir("out", out)
        if not gguf_file.is_file():
            raise UserError(f"GGUF file not found: {gguf_file}")
        from mlx_tokenrl.gguf_import import convert_gguf as convert  # (MLX: not for a bad option)

        convert(gguf_file, out, dtype=dtype)
        console.print(f"wrote {out} (use --model {out})", soft_wrap=True)
