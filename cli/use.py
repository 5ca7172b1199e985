"""fuse / chat / generate: use what `train` produced."""

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from mlx_tokenrl.config import DEFAULT_MODEL, above, at_least, at_most, output_dir
from mlx_tokenrl.messages import first_line

from .common import MAX_NEW_TOKENS, UserError, err_console, reported_errors

ModelOpt = Annotated[Optional[str], typer.Option(
    help=f"Base model: hub id, local mlx-lm directory, fused directory or .gguf file (default: "
         f"the adapter's base model, else {DEFAULT_MODEL}).", show_default=False)]
# mlx-lm spells it --adapter-path; --adapter is the older name here.
AdapterOpt = Annotated[Optional[Path], typer.Option(
    "--adapter-path", "--adapter",
    help="LoRA adapter directory (adapters.safetensors + adapter_config.json). A train run's "
         "directory also brings its --system-prompt and --instruction.")]
SystemOpt = Annotated[Optional[str], typer.Option(
    "--system-prompt", "--system",
    help="System message put before the conversation (default: the adapter's run's; '' for none).")]
InstructionOpt = Annotated[Optional[str], typer.Option(
    help="Instruction after each prompt, as training put it after each question ({question} "
         "places the prompt; default: the adapter's run's, else none; '' for none).")]


def fuse(
    adapter: Annotated[Path, typer.Option(
        "--adapter-path", "--adapter", help="LoRA adapter directory to merge into the model.")],
    out: Annotated[Path, typer.Option(help="Directory to write the fused mlx-lm model to.")],
    model: ModelOpt = None,
    dequantize: Annotated[bool, typer.Option(
        "--dequantize", help="Write full-precision weights even if the base model is quantized.")] = False,
    upload: Annotated[Optional[str], typer.Option(
        help="Also push the fused model to this Hugging Face repo (user/name).")] = None,
):
    """Merge a LoRA adapter into its base model: a standalone mlx-lm model directory."""
    with reported_errors():
        output_dir("out", out)
        from mlx_tokenrl import fuse as fusing  # (seconds: MLX, mlx-lm)
        from mlx_tokenrl.models import adapter_model

        model = adapter_model(model, adapter)
        if Path(model).expanduser().resolve() == out.expanduser().resolve():
            raise UserError("--out must differ from --model: the base model would be overwritten")
        out_dir = fusing.fuse_adapter(model, adapter, out, dequantize=dequantize)
        err_console.print(f"fused model saved to {out_dir}", highlight=False, soft_wrap=True)
        if upload:
            try:
                fusing.upload(out_dir, upload)
            except Exception as exc:  # auth, network, bad repo id: the fused model is still on disk
                raise UserError(f"upload of {out_dir} to {upload} failed: {first_line(exc)}") from None


def check_sampling(temperature: float, max_new_tokens: int, top_p: float = 1.0, seed: int = 0):
    at_least("temperature", temperature, 0)
    above("top_p", top_p, 0)
    at_most("top_p", top_p, 1)
    at_least("max_new_tokens", max_new_tokens, 1)
    at_least("seed", seed, 0)


def _load(model, adapter, run):
    """The model with the adapter; `run`: the adapter's training run (tasks.saved_run), whose
    --quantize a QLoRA adapter needs, as eval uses it."""
    from mlx_tokenrl.models import load_model

    return load_model(model, adapter_path=adapter, quantize_bits=(run or {}).get("quantize"))


def _prompt_settings(run, instruction, system):
    """Flags over the adapter's training run's prompt over none (training's own helper)."""
    from mlx_tokenrl.tasks import adapter_prompt

    return adapter_prompt(run, instruction, system, default_instruction="")


def _sampler(temperature: float, top_p: float = 1.0):
    from mlx_lm.sample_utils import make_sampler

    return make_sampler(temp=temperature, top_p=top_p)


def _stream(net, tokenizer, prompt, max_tokens, sampler) -> str:
    """Print the reply as it is generated; return its full text."""
    from mlx_lm import stream_generate

    pieces = []
    try:
        for response in stream_generate(net, tokenizer, prompt, max_tokens=max_tokens,
                                        sampler=sampler):
            print(response.text, end="", flush=True)
            pieces.append(response.text)
    except KeyboardInterrupt:  # Ctrl-C stops this reply, not the session
        pass
    print(flush=True)
    return "".join(pieces)


def _chat_prompt(tokenizer, messages):
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def chat(
    model: ModelOpt = None,
    adapter: AdapterOpt = None,
    system: SystemOpt = None,
    instruction: InstructionOpt = None,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (0 = greedy).")] = 0.7,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling threshold (1 = off).")] = 1.0,
    max_new_tokens: Annotated[int, typer.Option(*MAX_NEW_TOKENS, help="Most tokens per reply.")] = 512,
):
    """Multi-turn chat in the terminal. /reset starts over, /exit or Ctrl-D quits."""
    from mlx_tokenrl.tasks import format_prompt, saved_run, user_message

    with reported_errors():
        check_sampling(temperature, max_new_tokens, top_p=top_p)
        run = saved_run(adapter)
        prompt = _prompt_settings(run, instruction, system)
        from mlx_tokenrl.models import adapter_model  # (seconds: MLX, mlx-lm)

        model = adapter_model(model, adapter)
        net, tokenizer = _load(model, adapter, run)
        if not tokenizer.has_chat_template:
            raise UserError(f"model {model!r} has no chat template; use `generate --raw`")
        if prompt.system_prompt:  # a template that refuses it fails now, not at the first reply
            format_prompt(tokenizer, "", "", prompt.system_prompt)
        tty = sys.stdin.isatty()
        if tty:
            err_console.print("[dim]/reset starts over, /exit or Ctrl-D quits[/]", highlight=False)
        start = [{"role": "system", "content": prompt.system_prompt}] if prompt.system_prompt else []
        messages = list(start)
        sampler = _sampler(temperature, top_p)
        while True:
            try:
                line = input(">>> " if tty else "").strip()
            except (EOFError, KeyboardInterrupt):
                if tty:
                    print()  # leave the shell prompt on a fresh line
                break
            if line == "/exit":
                break
            if line == "/reset":
                messages = list(start)
                err_console.print("[dim]conversation reset[/]", highlight=False)
                continue
            if not line:
                continue
            messages.append({"role": "user", "content": user_message(line, prompt.instruction)})
            if not tty:
                print("> ", end="")  # marks where each reply starts in piped output
            reply = _stream(net, tokenizer, _chat_prompt(tokenizer, messages), max_new_tokens,
                            sampler)
            messages.append({"role": "assistant", "content": reply})


def generate(
    prompt: Annotated[str, typer.Option(help="The prompt; '-' reads it from stdin.")],
    model: ModelOpt = None,
    adapter: AdapterOpt = None,
    system: SystemOpt = None,
    instruction: InstructionOpt = None,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (0 = greedy).")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling threshold (1 = off).")] = 1.0,
    max_new_tokens: Annotated[int, typer.Option(*MAX_NEW_TOKENS, help="Most tokens to generate.")] = 512,
    raw: Annotated[bool, typer.Option("--raw", help="Feed the prompt as is: no chat template, system prompt or instruction.")] = False,
    seed: Annotated[int, typer.Option(help="Random seed for sampling (temperature > 0).")] = 0,
):
    """One-shot completion for scripts: prints only the generated text to stdout. The prompt is
    put as training puts a question: the chat template (or a plain Question/Answer layout),
    the adapter's run's system prompt and instruction."""
    from mlx_tokenrl.tasks import format_prompt, saved_run

    with reported_errors():
        check_sampling(temperature, max_new_tokens, top_p=top_p, seed=seed)
        if raw and system:
            raise UserError("--system-prompt does not apply with --raw: put it in the prompt")
        if raw and instruction:
            raise UserError("--instruction does not apply with --raw: put it in the prompt")
        if prompt == "-":
            prompt = sys.stdin.read()
        run = saved_run(adapter)
        settings = _prompt_settings(run, instruction, system)
        import mlx.core as mx  # (seconds with mlx-lm: not for a bad option)

        from mlx_tokenrl.models import adapter_model
        from mlx_tokenrl.rollout import encode_prompts

        net, tokenizer = _load(adapter_model(model, adapter), adapter, run)
        if not raw:  # token ids exactly as training encodes its prompts
            prompt = encode_prompts(tokenizer, [format_prompt(
                tokenizer, prompt, settings.instruction, settings.system_prompt)])[0]
        mx.random.seed(seed)
        _stream(net, tokenizer, prompt, max_new_tokens, _sampler(temperature, top_p))
