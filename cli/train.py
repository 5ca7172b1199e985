"""`train` and `eval`."""

import contextlib
import inspect
import json
import re
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from mlx_tokenrl.config import (DEFAULT_MODEL, DTYPE_CHOICES, HOW_NOT_WHAT, QUANTIZE_BITS,
                                TrainConfig, at_least, changed_settings, config_from_dict,
                                one_of, output_dir, read_json_object, stated_default,
                                task_default)
from mlx_tokenrl.launch import launched_rank

from .common import (HELP, MAX_NEW_TOKENS, UserError, config_parameters, console, given_values,
                     new_config, option_parameter, report_step, reported_errors, step_progress)


# What a resume may change: how long the run is, and how its steps are computed or recorded
# (--max-memory on another Mac), never what is learned. The trainer saves the result into
# config.json, so a later plain --resume keeps it.
RESUME_MAY_CHANGE = {"steps", "time_budget"} | (HOW_NOT_WHAT - {"out"})


def resumed_config(run_dir: Path, given: dict) -> TrainConfig:
    """The run's saved config, continued by the command that started it plus --resume:
    `given` (given_values) may repeat any of the run's settings, and change the
    RESUME_MAY_CHANGE ones; any other change is refused, each named with both values."""
    saved = run_dir / "config.json"
    if not saved.is_file() and (launched_rank() or 0) > 0:
        # Another host of a multi-host run: rank 0 sends its saved config and checkpoint.
        return config_from_dict({"out": str(run_dir)})
    if not saved.is_file():
        raise UserError(f"--resume {run_dir}: no config.json there (not a run directory)")
    values = {**read_json_object(saved, "a run's config.json"), "out": str(run_dir)}
    run = config_from_dict(values)
    if "out" in given and Path(given["out"]).resolve() == run_dir.resolve():
        given = {k: v for k, v in given.items() if k != "out"}  # the run's, spelled another way
    if {"max_memory", "microbatch_rows"} & given.keys():  # either one replaces the other
        values.update(max_memory=None, microbatch_rows=None)
    cfg = config_from_dict({**values, **given})
    changes = changed_settings(asdict(run), asdict(cfg), [k for k in given
                                                         if k not in RESUME_MAY_CHANGE])
    if changes:
        raise UserError(f"--resume {run_dir}: the run was started with other settings "
                        f"({'; '.join(changes)}); only --steps, --time-budget and how "
                        f"steps run (e.g. --max-memory) may change")
    cfg.validate()
    return cfg


def finished_steps(run_dir: Path) -> int:
    """Steps in the run's last complete checkpoint (0 if none)."""
    from mlx_tokenrl.checkpoint import latest_checkpoint

    checkpoint = latest_checkpoint(run_dir)
    return json.loads((checkpoint / "state.json").read_text())["step"] if checkpoint else 0


def train(**kwargs):
    """Train a LoRA adapter with GRPO, S-GRPO or T-SPMO."""
    resume = kwargs.pop("resume")
    with reported_errors():
        if resume is not None:
            config_file = kwargs.pop("config")
            cfg = resumed_config(resume, given_values(kwargs, config_file))
            done = finished_steps(resume)
            if done > cfg.steps:
                raise UserError(f"--steps {cfg.steps}: the run in {resume} has already "
                                f"finished {done} steps")
            from mlx_tokenrl import step_log
            from mlx_tokenrl.budget import spent

            # A run with nothing left to do is left as it is (its files untouched), unless a
            # stop cut short its last evaluation, which the resume runs.
            metrics = step_log.read(Path(resume) / "metrics.jsonl", done)
            if not step_log.evaluation_missed(metrics, done, cfg.eval_every):
                if done == cfg.steps:
                    console.print(f"{resume}: already at step {done} of {cfg.steps} (extend "
                                  f"it with --resume {resume} --steps N)", soft_wrap=True)
                    return
                if spent(cfg, [m["step_s"] for m in metrics]):
                    console.print(f"{resume}: its --time-budget {cfg.time_budget:g} s was "
                                  f"spent after {done} steps (extend it with --resume {resume} "
                                  f"--time-budget N)", soft_wrap=True)
                    return
        else:
            cfg = new_config(kwargs)
        from mlx_tokenrl.trainer import train as run_training  # (seconds: not for a bad option)

        main = (launched_rank() or 0) == 0  # with several ranks, rank 0 alone reports
        name = f"{cfg.algo} on {cfg.task}"
        progress = step_progress(len(name), cfg.steps)
        with contextlib.ExitStack() as shown:
            def on_start(start):  # the bar appears once the task and model have loaded
                if main:
                    shown.enter_context(progress)
                    progress.add_task(name, total=cfg.steps, completed=start, phase="starting",
                                      numbers=None)

            try:
                run_training(cfg, resume=resume is not None, on_start=on_start,
                             on_step=lambda m: report_step(progress, progress.task_ids[0], m),
                             on_phase=lambda phase: progress.update(progress.task_ids[0],
                                                                    phase=phase))
            except KeyboardInterrupt:
                shown.close()
                done = finished_steps(Path(cfg.out)) if main else 0
                if main and done:
                    console.print(f"interrupted: checkpoint of step {done} saved; continue with "
                                  f"tokenrl-mlx train --resume {cfg.out}", soft_wrap=True)
                elif main:  # the trainer keeps finished steps only
                    console.print("interrupted before a step finished: no checkpoint to "
                                  "continue from; run the same command again", soft_wrap=True)
                raise typer.Exit(130)
        if main:
            done = finished_steps(Path(cfg.out))
            if cfg.time_budget is not None and done < cfg.steps:
                console.print(f"--time-budget {cfg.time_budget:g} s reached after {done} steps",
                              soft_wrap=True)
            console.print(f"adapter written to {cfg.out} (use --adapter-path {cfg.out})", soft_wrap=True)


train.__signature__ = inspect.Signature(config_parameters([option_parameter(
    "resume", Annotated[Optional[Path], typer.Option(
        help="Continue the run in this directory from its last checkpoint: the command that "
             "started it plus --resume RUN, or --resume RUN alone (its saved settings). Settings "
             "given again must keep the run's values, but --steps or --time-budget may extend "
             "it and how steps run may change, e.g. --max-memory.",
        rich_help_panel="Bookkeeping")])]))


def help_of(name: str, default=None):
    """A TrainConfig setting's help text, for eval's option of the same name. With `default`:
    a setting eval takes from the adapter's run when not given (else `default`)."""
    if default is None:
        return typer.Option(help=HELP[name][1])
    text = re.sub(r" \(default: [^)]*\)", "", HELP[name][1]).rstrip(".")
    return typer.Option(help=f"{text} (default: the adapter's run's, else {default}).",
                        show_default=False)


def evaluate(
    task: Annotated[str, typer.Argument(help="svamp, gsm8k, multiply or custom.")],
    model: Annotated[Optional[str], typer.Option(
        help=f"Hugging Face repo id, local mlx-lm directory or .gguf file (default: the "
             f"adapter's base model, else {DEFAULT_MODEL}).", show_default=False)] = None,
    adapter: Annotated[Optional[Path], typer.Option(
        "--adapter-path", "--adapter", help="mlx-lm adapter directory. A train --out also "
        "brings its run's prompt and, for the task it trained on, its data, --digits, --seed "
        "and verifier, unless given here.")] = None,
    split: Annotated[str, typer.Option(help="train or test.")] = "test",
    limit: Annotated[Optional[int], typer.Option(help="Evaluate only the first N examples.")] = None,
    data: Annotated[Optional[str], help_of("data", "the task's dataset")] = None,
    digits: Annotated[Optional[str], help_of("digits", TrainConfig.digits)] = None,
    reward_fn: Annotated[Optional[str], typer.Option(
        help="Custom verifier 'module:function' (the correctness reward; default: the adapter's "
             "run's, else the task's).")] = None,
    system_prompt: Annotated[Optional[str], help_of("system_prompt")] = None,
    instruction: Annotated[Optional[str], help_of("instruction")] = None,
    hf_dataset: Annotated[Optional[str], help_of("hf_dataset", "none")] = None,
    hf_config: Annotated[Optional[str], help_of("hf_config", "none")] = None,
    question_field: Annotated[Optional[str], help_of("question_field", "prompt")] = None,
    answer_field: Annotated[Optional[str], help_of("answer_field", "answer")] = None,
    train_split: Annotated[Optional[str], help_of("train_split", TrainConfig.train_split)] = None,
    test_split: Annotated[Optional[str], help_of("test_split", TrainConfig.test_split)] = None,
    seed: Annotated[Optional[int], typer.Option(
        help="Seed of generated tasks (multiply; default: the adapter's run's, else 0).",
        show_default=False)] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(
        *MAX_NEW_TOKENS, help=f"Longest completion (default: {stated_default('max_new_tokens')}).",
        show_default=False)] = None,
    batch_size: Annotated[int, typer.Option(help="Prompts decoded together.")] = 32,
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16, float16.")] = "auto",
    quantize: Annotated[Optional[int], typer.Option(
        help="Quantize the base model to this many bits on load; 0: not at all (default: the "
             "adapter's run's --quantize, else not at all).", show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option(help="Where to write examples.jsonl and summary.json (default: ADAPTER/eval-TASK-SPLIT or runs/eval-TASK-SPLIT).")] = None,
):
    """Greedy held-out accuracy (and the rate of '#### N' / '\\boxed{N}' answers) of a model, with or without adapter."""
    from mlx_tokenrl.tasks import adapter_prompt, adapter_task_settings, load_task, saved_run

    with reported_errors():
        if limit is not None:
            at_least("limit", limit, 1)
        if seed is not None:
            at_least("seed", seed, 0)
        if max_new_tokens is None:
            max_new_tokens = task_default(task, "max_new_tokens")
        at_least("max_new_tokens", max_new_tokens, 1)
        at_least("batch_size", batch_size, 1)
        one_of("dtype", dtype, DTYPE_CHOICES)
        if quantize is not None:
            one_of("quantize", quantize, (0, *QUANTIZE_BITS))
        out = out or (Path(adapter) if adapter else Path("runs")) / f"eval-{task}-{split}"
        output_dir("out", out)
        run = saved_run(adapter)
        prompt = adapter_prompt(run, instruction, system_prompt)
        settings = adapter_task_settings(run, task, dict(
            data=data, digits=digits, seed=seed, reward_fn=reward_fn, hf_dataset=hf_dataset,
            hf_config=hf_config, question_field=question_field, answer_field=answer_field,
            train_split=train_split, test_split=test_split))
        loaded = load_task(task, instruction=prompt.instruction,
                           system_prompt=prompt.system_prompt, **settings)
        examples = loaded.split(split)[:limit]
        if not examples:
            raise UserError(f"{task} {split} split has no examples")
        from mlx_tokenrl.evaluate import evaluate as run_eval, write_eval  # (seconds: MLX, mlx-lm)
        from mlx_tokenrl.models import adapter_model, load_model

        model = adapter_model(model, adapter)
        if quantize is None and run is not None:  # a QLoRA adapter is scored as it trained
            quantize = run.get("quantize")
        quantize = quantize or None  # 0: unquantized, e.g. on a CPU, where quantized is slow
        net, tokenizer = load_model(model, adapter_path=adapter, dtype=dtype,
                                    quantize_bits=quantize)
        progress = Progress(TextColumn("[bold]eval {task.description}"), BarColumn(),
                            MofNCompleteColumn(), TimeRemainingColumn(), console=console)
        bar = progress.add_task(f"{task}/{split}", total=len(examples))
        with progress:
            summary, records = run_eval(net, tokenizer, loaded, examples, max_new_tokens, batch_size,
                                        on_progress=lambda done, _: progress.update(bar, completed=done))
        summary.update(task=task, split=split, model=model, adapter=str(adapter) if adapter else None,
                       quantize=quantize, task_settings=settings,
                       instruction=loaded.instruction, system_prompt=loaded.system_prompt)
        low, high = summary["ci95"]
        console.print(f"accuracy {summary['accuracy']:.1%} ({summary['correct']}/{summary['n']}, "
                      f"95% CI {low:.1%}-{high:.1%}) | format rate {summary['format_rate']:.1%} | "
                      f"truncated {summary['truncation_rate']:.1%} at {max_new_tokens} tokens",
                      soft_wrap=True)  # one line in a log file too, not wrapped at 80 columns
        write_eval(out, summary, records)
        console.print(f"wrote {out}/examples.jsonl and summary.json", soft_wrap=True)
        return summary
