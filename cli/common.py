"""What the commands share: one-line user errors instead of tracebacks, and the options,
config resolution and progress display of `train` and `compare`.

Those two commands' options are generated from `TrainConfig`'s fields, so the CLI, the YAML
config file and the library share one list of settings (precedence: CLI > --config file >
defaults).
"""

import contextlib
import inspect
import traceback
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Annotated, Optional

import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Column
from rich.text import Text

from mlx_tokenrl.algorithms import ALGORITHMS, options as algorithm_options
from mlx_tokenrl.config import (GENERAL_DEFAULTS, TrainConfig, config_from_dict, flag,
                                stated_default)
from mlx_tokenrl.messages import InputError, first_line

console = Console()
err_console = Console(stderr=True)

EXIT_USER_ERROR = 1  # (a malformed command line exits with click's 2)
EXIT_INTERNAL_ERROR = 70  # EX_SOFTWARE (sysexits.h): a bug, reported with its traceback


class UserError(InputError):
    """Bad input from the user, found by the CLI itself."""


def print_error(message: str):
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


@contextlib.contextmanager
def reported_errors():
    """A user error becomes one line and exit code 1; a failing --reward-fn function too, after
    its traceback. Anything else is a bug (MLX, for one, raises shape errors as ValueError):
    its traceback, one line saying so, exit code 70."""
    from mlx_tokenrl.rewards import RewardFunctionError

    try:
        yield
    except InputError as exc:
        print_error(str(exc))
        raise typer.Exit(EXIT_USER_ERROR)
    except RewardFunctionError as exc:  # the user's code: its traceback helps them fix it
        if exc.__cause__ is not None:
            traceback.print_exception(exc.__cause__)
        print_error(f"{exc} (a problem in your reward function, not in tokenrl-mlx)")
        raise typer.Exit(EXIT_USER_ERROR)
    except (typer.Exit, typer.Abort):
        raise
    except Exception:
        traceback.print_exc()
        print_error("internal error (the traceback above is a bug in tokenrl-mlx, not a "
                    "problem with your input)")
        raise typer.Exit(EXIT_INTERNAL_ERROR)


def reflowed(text: str) -> str:
    """Each paragraph of a docstring on one line, for rich to wrap at the terminal's width
    (click's \\b starts a paragraph kept as written)."""
    paragraphs = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join(p if p.startswith("\b") else " ".join(p.split()) for p in paragraphs)


def with_default(text: str, default) -> str:
    """An option's help with its default, written one way in every command's help."""
    return f"{text} (default: {default})"


def valueless(option):
    """A flag takes no value: its help shows no '<bool>' beside it."""
    if option is not None and option.is_flag:
        option.metavar = ""
    return option


def help_option(option):
    """--help, shown as a flag, and False when not given: Typer leaves it None, which it then
    converts through pydantic, ~0.4 s of imports for `tokenrl-mlx COMMAND --help`."""
    if option is not None:
        option.default = False
    return valueless(option)


class Group(typer.core.TyperGroup):
    def get_help_option(self, ctx):
        return help_option(super().get_help_option(ctx))


class Command(typer.core.TyperCommand):
    """Reports a malformed command line (an unknown option, 'abc' for a number, a missing
    required option) as one `error:` line like every other user error, not click's box;
    lists itself in `tokenrl-mlx --help` by its help's first paragraph; writes defaults as
    the options from TrainConfig do, after the help, not as Typer's `[default: X]` line."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Typer's help keeps a docstring's line breaks, mid-sentence; `tokenrl-mlx --help`
        # lists commands with their whole help.
        if self.help:
            self.help = reflowed(self.help)
            self.short_help = self.short_help or self.help.split("\n\n")[0]
        for param in self.params:
            if isinstance(param, typer.core.TyperOption):
                valueless(param)
                switch = param.is_flag and not param.secondary_opts  # off unless given
                if param.show_default is True and param.default is not None and not switch:
                    param.help, param.show_default = with_default(param.help, param.default), False

    def get_help_option(self, ctx):
        return help_option(super().get_help_option(ctx))

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except typer.TyperException as exc:  # click's UsageError family (exit code 2)
            print_error(f"{exc.format_message()} (see: tokenrl-mlx {info_name} --help)")
            raise typer.Exit(exc.exit_code) from None


# ---- train and compare: options from TrainConfig, config resolution, progress ------------

HELP = {
    "model": ("Model", "Hugging Face repo id, local mlx-lm directory or .gguf file."),
    "algo": ("Algorithm", ", ".join(f"{a.name} ({a.summary})" for a in ALGORITHMS.values()) + "."),
    "data": ("Task", "Local data file or directory instead of the Hugging Face dataset."),
    "digits": ("Task", "multiply: operand digits, e.g. 3x3."),
    "reward_fn": ("Task", "Reward function 'module:function' or 'file.py:function'; repeat it for several (the first decides what counts as solved)."),
    "reward_weights": ("Task", "Comma-separated weights of the --reward-fn functions; the reward is the weighted sum (default: 1 each)."),
    "hf_dataset": ("Task", "custom: a Hugging Face dataset (repo id) instead of --data."),
    "hf_config": ("Task", "custom: the dataset's configuration (subset), e.g. main."),
    "question_field": ("Task", "custom: the record field holding the question (default: prompt)."),
    "answer_field": ("Task", "custom: the field holding the answer: a number, a '#### N' solution or text (default: answer)."),
    "train_split": ("Task", "custom: the training split's name (a file NAME.jsonl/.json/.parquet in a --data directory)."),
    "test_split": ("Task", "custom: the held-out split's name."),
    "system_prompt": ("Prompt", "System message before each question (eval, generate and chat reuse the run's)."),
    "instruction": ("Prompt", "Replaces the task's instruction after the question; a {question} in it places the question; '' for none."),
    "steps": ("Rollouts", "Steps to run: each samples one rollout batch and applies --updates-per-rollout updates from it."),
    "time_budget": ("Rollouts", "Seconds of training (the steps' times; evaluations not counted): the run stops after the first step that reaches them, or at --steps. The learning-rate schedule is planned after warmup for the steps the budget is estimated to buy."),
    "prompts_per_step": ("Rollouts", "Prompts per step (B)."),
    "group_size": ("Rollouts", "Completions per prompt (G)."),
    "max_new_tokens": ("Rollouts", "Longest completion."),
    "temperature": ("Rollouts", "Sampling temperature."),
    "top_p": ("Rollouts", "Nucleus sampling; 1 disables it."),
    "seed": ("Rollouts", "Seed for data order, sampling and token selection."),
    "lr": ("Optimisation", "Peak AdamW learning rate (warmup, then cosine to lr/10)."),
    "warmup_steps": ("Optimisation", "Linear warmup steps."),
    "weight_decay": ("Optimisation", "AdamW weight decay."),
    "grad_clip": ("Optimisation", "Clip the global gradient norm; 0 disables."),
    "loss_norm": ("Optimisation", "sequence: mean over completions of per-completion means (paper; T-SPMO: over groups of per-group means of their pairs); token: mean over all selected tokens; constant: sum over selected tokens / (completions x --max-new-tokens) (Dr. GRPO)."),
    "beta": ("Optimisation", "KL penalty to the base model (LoRA off, so also without a starting --adapter-path), k3 on selected tokens."),
    "updates_per_rollout": ("Optimisation", "Policy updates per rollout batch (TRL's num_iterations); each after the first weighs tokens by PPO's clipped ratio to the policy before the first."),
    "clip_epsilon": ("Optimisation", "PPO clip: the ratio new/old policy is kept within [1 - eps, 1 + eps-high] where it would move the loss further."),
    "clip_epsilon_high": ("Optimisation", "Upper clip (DAPO's clip-higher when larger; default: --clip-epsilon)."),
    "scale_rewards": ("Optimisation", "group: divide advantages by the group's std; none: only centre them."),
    "mask_truncated": ("Optimisation", "Completions that hit --max-new-tokens with no final answer ('#### N' or \\boxed{N}) add nothing to the loss; their rewards still count in their group's advantages (DAPO's overlong filtering)."),
    "format_reward": ("Task", "Extra training reward for answering as '#### N' or '\\boxed{N}' (accuracy is unchanged)."),
    "lora_rank": ("LoRA", "LoRA rank."),
    "lora_scale": ("LoRA", "LoRA scale (mlx-lm's 'scale')."),
    "lora_layers": ("LoRA", "Number of last transformer blocks with LoRA; -1 for all."),
    "lora_keys": ("LoRA", "Comma-separated module paths to adapt, e.g. self_attn.q_proj,self_attn.v_proj."),
    "quantize": ("Model", "Quantize the base model to this many bits on load (QLoRA)."),
    "dtype": ("Model", "auto (float32 on CPU; on Metal the checkpoint's half precision, bfloat16 for a float32 one), float32, bfloat16, float16."),
    "adapter_path": ("LoRA", "Start from this mlx-lm adapter (SFT or an earlier run); its rank, scale, layers and keys must match."),
    "max_memory": ("Compute", "Loss+grad memory budget in GB, weights included: sets the loss's microbatch rows (default: 75% of RAM, on Metal of its working set)."),
    "microbatch_rows": ("Compute", "Rows per loss microbatch, fixed (instead of --max-memory's choice)."),
    "grad_checkpoint": ("Compute", "Recompute activations in the backward pass (long completions)."),
    "compile": ("Compute", "mx.compile the loss+grad step."),
    "eval_every": ("Bookkeeping", "Held-out greedy accuracy every N steps; 0 disables."),
    "eval_limit": ("Bookkeeping", "Held-out examples per evaluation."),
    "save_every": ("Bookkeeping", "Checkpoint every N steps."),
    "out": ("Bookkeeping", "Run directory: adapters, checkpoints, config, metrics.jsonl."),
    "report_to": ("Tracking", "Log config, metrics and samples to wandb, swanlab or both (comma-separated)."),
    "project_name": ("Tracking", "The tracker's project for --report-to."),
    "samples_every": ("Tracking", "Write prompts, completions, rewards and selected tokens to samples.jsonl on step 1 and every N steps; 0 disables."),
    "samples_count": ("Tracking", "Prompts per sample (each with its whole group of completions)."),
    # each algorithm's own options, as it declares them (algorithms/)
    **{option.name: (algorithm.panel, option.help) for algorithm, option in algorithm_options()},
}
# Every command takes both spellings: ours (as TrainConfig's field) and mlx-lm generate's.
MAX_NEW_TOKENS = ("--max-new-tokens", "--max-tokens")
CLI_TYPES = {"lora_keys": str, "quantize": int, "data": str, "reward_fn": list[str],
             "reward_weights": str, "max_memory": float, "microbatch_rows": int, "lr": float,
             "max_new_tokens": int, "clip_epsilon_high": float, "time_budget": float}


def option_parameter(name, annotation, default=None):
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY,
                             annotation=annotation, default=default)


def config_parameters(extra, skip=(), defaults=None):
    """The task argument, one option per TrainConfig field except `skip`, --config, then
    `extra`. `defaults`: the command's own defaults where they differ from TrainConfig's
    (shown in the help; `new_config` applies them below the config file's values)."""
    defaults = defaults or {}
    params = [inspect.Parameter("task", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Annotated[
        Optional[str], typer.Argument(help="svamp, gsm8k, multiply or custom.", show_default=False)],
        default=None)]
    for f in fields(TrainConfig):
        if f.name == "task" or f.name in skip:
            continue
        panel, text = HELP[f.name]
        default = defaults.get(f.name, f.default if f.default is not MISSING else None)
        if f.name in GENERAL_DEFAULTS:  # the task decides
            default = stated_default(f.name)
        kind = CLI_TYPES.get(f.name, type(default) if default is not None else str)
        name = flag(f.name)
        decls = ([f"{name}/--no-{name[2:]}"] if kind is bool else
                 list(MAX_NEW_TOKENS) if f.name == "max_new_tokens" else [name])
        # The option's own default stays None, so that a value from --config is not overridden.
        option = typer.Option(*decls, help=text if default is None else with_default(text, default),
                              rich_help_panel=panel,
                              show_default=False)
        params.append(option_parameter(f.name, Annotated[Optional[kind], option]))
    params.append(option_parameter("config", Annotated[Optional[Path], typer.Option(
        help="YAML file with the same keys as the flags.", rich_help_panel="Bookkeeping")]))
    return params + extra


def read_config_file(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text())
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or first_line(exc)
        raise UserError(f"{path}{where}: not valid YAML ({problem})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UserError(f"{path}: expected a mapping of option: value")
    return values


def given_values(cli_values: dict, config_file: Path | None) -> dict:
    """The settings a command gives: its flags over its --config file's, no defaults."""
    values = {}
    if config_file is not None:
        values.update({str(k).replace("-", "_"): v
                       for k, v in read_config_file(config_file).items()})
    values.update({k: v for k, v in cli_values.items() if v is not None})
    return values


def resolve_config(cli_values: dict, config_file: Path | None, defaults=None) -> TrainConfig:
    """CLI values over the config file's over the command's `defaults` over TrainConfig's,
    validated."""
    from mlx_tokenrl.tasks import check_task_name

    cfg = config_from_dict({**(defaults or {}), **given_values(cli_values, config_file)})
    cfg.validate()
    check_task_name(cfg.task)  # here, not seconds later when the trainer has loaded
    return cfg


def new_config(kwargs, defaults=None) -> TrainConfig:
    config_file = kwargs.pop("config")
    if kwargs.get("task") is None and config_file is None:
        raise UserError("name a task (svamp, gsm8k, multiply, custom) or pass --config")
    return resolve_config(kwargs, config_file, defaults)


# ---- the live display of train and compare ----------------------------------------------

SEPARATOR = " | "


def live_display() -> bool:
    """A terminal that redraws gets the live bars; a file, a pipe or a dumb terminal gets
    one plain line per step instead."""
    return console.is_terminal and not console.is_dumb_terminal


def step_fields(m: dict) -> list[Text]:
    """A step's numbers, as its bar and a log line show them."""
    fields = [f"reward {m['reward_mean']:.3f}", f"solved {m['solve_rate']:.0%}",
              f"signal {m['signal_fraction']:.0%}",
              f"sel {m['selected_tokens']}", f"{m['generated_tokens'] / m['step_s']:.0f} tok/s",
              f"{m['step_s']:.1f} s/step", f"{m['peak_memory_gb']:.2f} GB"]
    if "resident_peak_gb" in m:  # the OS's count beside MLX's (trainer.peaks_gb)
        fields.append(f"rss {m['resident_peak_gb']:.2f} GB")
    if m.get("updates", 1) > 1:  # several clipped updates per rollout batch
        fields[4:4] = [f"{m['updates']} updates",
                       f"ratio {m['ratio_min']:.2f}-{m['ratio_max']:.2f}",
                       f"clip {m['clip_fraction']:.0%}", f"kl {m['approx_kl']:.1e}"]
    if "eval_accuracy" in m:
        fields.insert(1, f"acc {m['eval_accuracy']:.1%}")
    texts = [Text(field) for field in fields]
    if m["skipped"]:
        texts.append(Text("update skipped", style="yellow"))
    return texts


def packed_lines(fields: list[Text], width: int, indent: str = "  ") -> list[Text]:
    """`fields` joined by SEPARATOR into lines of at most `width` cells, broken only between
    fields: a number is never split from its unit."""
    lines = []
    for field in fields:
        if lines and lines[-1].cell_len + len(SEPARATOR) + field.cell_len <= width:
            lines[-1].append(SEPARATOR).append_text(field)
        else:
            lines.append(Text(indent).append_text(field))
    return lines


@dataclass
class StepFields:
    """The last step's numbers under a bar, packed into the console's width."""
    fields: list  # of Text

    def __rich_console__(self, console, options):
        for line in packed_lines(self.fields, options.max_width):
            line.no_wrap, line.overflow = True, "ellipsis"  # a console narrower than one field
            yield line


class StepProgress(Progress):
    """Each bar's row (name, bar, steps, time left, what the step is doing now) with the last
    step's numbers under it (task field `numbers`)."""

    def get_renderables(self):
        for task in self.tasks:
            yield self.make_tasks_table([task])
            if task.fields.get("numbers"):
                yield StepFields(task.fields["numbers"])


def step_progress(name_width: int, most: int) -> StepProgress:
    """Bars named in a column `name_width` wide, counting up to at most `most`, so that the
    bars of compare's arms line up. Every task needs the fields `phase` (text) and `numbers`
    (step_fields or None). The bar takes what the other columns leave of the width; at 80
    columns the name stays whole (rich shrinks columns that may wrap first)."""
    return StepProgress(
        TextColumn("{task.description}", style="bold", markup=False,
                   table_column=Column(min_width=name_width, no_wrap=True)),
        BarColumn(bar_width=None),
        MofNCompleteColumn(table_column=Column(justify="right", min_width=2 * len(str(most)) + 1,
                                               no_wrap=True)),
        TimeRemainingColumn(), TextColumn("{task.fields[phase]}", markup=False),
        console=console, disable=not live_display())  # (a file would get a last frame)


def report_step(progress, bar, metrics, label: str | None = None):
    """A finished step: its numbers under the bar, or (no live display) one plain line that
    is never wrapped, so a log file can be grepped line by line."""
    fields = step_fields(metrics)
    # --time-budget: the bar counts to the planned steps once they are known (the budget,
    # not the plan, ends the run: it may take a step or two more)
    planned = metrics.get("planned_steps")
    progress.update(bar, total=None if planned is None else max(planned, metrics["step"]),
                    completed=metrics["step"], numbers=fields, phase="")
    if not live_display():
        line = Text(f"{label + ' ' if label else ''}step {metrics['step']}: ")
        console.print(line.append_text(Text(SEPARATOR).join(fields)), soft_wrap=True,
                      highlight=False)
