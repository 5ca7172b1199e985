"""`compare`: base model vs each algorithm, same model, seed, data order and step count.

Every arm trains into `<out>/<arm>/` with the trainer (so an unfinished arm resumes from
its checkpoint), then all arms are scored greedily on the same held-out examples: the first
`final_eval_limit` (by default as many as the in-training evaluations use).
A finished arm leaves `<out>/<arm>/final_eval.json` and is skipped on `--resume`.

An arm is an algorithm, optionally with settings of its own (`s-grpo:lr=4e-5:sgrpo-k=48`),
so the same command, table and plot serve a small hyperparameter sweep.
"""

import json
import typing
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from .checkpoint import atomic_write_bytes, latest_checkpoint
from .compare_plot import ArmCurves, BaseReference, save_figure
from .config import (ALGOS, HOW_NOT_WHAT, ConfigError, TrainConfig, at_least, changed_settings,
                     coerce, config_from_dict, read_json_object)
from .evaluate import evaluate, sign_test_p, write_eval
from .models import check_lora_fits, load_model
from .tasks import task_from_config
from .trainer import no_phase, train

# What makes arms comparable: the same task, model, data order and rollout or time budget.
SHARED = {"task", "model", "data", "digits", "reward_fn", "seed", "steps", "time_budget",
          "prompts_per_step", "group_size", "max_new_tokens", "eval_every", "eval_limit",
          "save_every", "out", "quantize", "dtype", "lora_keys", "reward_weights", "hf_dataset",
          "hf_config", "question_field", "answer_field", "train_split", "test_split",
          "system_prompt", "instruction", "adapter_path"}


def parse_arm(spec: str) -> tuple[str, dict]:
    """'s-grpo' or 's-grpo:lr=4e-5:sgrpo-k=48' -> (arm name, TrainConfig overrides)."""
    algo, *settings = spec.strip().split(":")
    if algo not in ALGOS:
        raise ConfigError(f"--algos: unknown algorithm {algo!r} in {spec!r}; use {', '.join(ALGOS)}, "
                          "optionally with settings, e.g. s-grpo:lr=4e-5:sgrpo-k=48")
    kinds = typing.get_type_hints(TrainConfig)
    overrides = {"algo": algo}
    for setting in settings:
        key, sep, value = setting.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in kinds or key == "algo":
            raise ConfigError(f"--algos: {setting!r} in {spec!r} is not a setting (use name=value)")
        if key in SHARED:
            raise ConfigError(f"--algos: {key.replace('_', '-')} is shared by every arm; "
                              "set it once for the whole compare")
        try:
            overrides[key] = coerce(key, value, kinds[key])
        except ConfigError as exc:
            raise ConfigError(f"--algos: {setting!r} in {spec!r}: {exc}") from None
    return spec.strip(), overrides


def arm_configs(cfg: TrainConfig, specs) -> list[tuple[str, TrainConfig]]:
    """Each arm's full config, validated before any model work; arm directories are named
    after the spec (':' -> '_')."""
    arms = [parse_arm(spec) for spec in specs]
    names = [name for name, _ in arms]
    if not arms or len(set(names)) < len(names):
        raise ConfigError("--algos: name each arm once (comma-separated)")
    out = Path(cfg.out)
    configs = [(name, replace(cfg, **overrides, out=str(out / name.replace(":", "_"))))
               for name, overrides in arms]
    for _, arm_cfg in configs:
        arm_cfg.validate()
    return configs


def read_jsonl(path: Path) -> list:
    """One dict per line; none for a file not written (yet): an arm before its first step, or
    an evaluation without per-example records."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_metrics(run_dir: Path) -> list:
    return read_jsonl(run_dir / "metrics.jsonl")


def read_records(run_dir: Path) -> list:
    """The per-example records of a run's final evaluation."""
    return read_jsonl(run_dir / "eval" / "examples.jsonl")


def write_whole(path: Path, text: str):
    """Replace `path` in one step: a crash mid-write must not leave part of a file that
    --resume reads (a final_eval.json marks its arm finished), and arms of one compare may run
    as separate processes at once, which all write compare_config.json."""
    atomic_write_bytes(path, text.encode())


def evaluate_arm(cfg: TrainConfig, adapter, eval_limit: int, out: Path, on_progress=None,
                 lora_arms=()) -> dict:
    """Score a model (with `adapter`) and write its evaluation into `out`. `lora_arms`: arm
    configs whose LoRA settings are checked against the model before anything is written."""
    task = task_from_config(cfg)  # the run's prompt too: trained and scored on the same question
    model, tokenizer = load_model(cfg.model, adapter_path=adapter, dtype=cfg.dtype,
                                  quantize_bits=cfg.quantize)
    for arm_cfg in lora_arms:
        check_lora_fits(model, arm_cfg.lora_layers, arm_cfg.lora_keys)
    examples = task.test[:eval_limit]
    if on_progress:
        on_progress(0, len(examples))  # the first batch takes a while
    summary, records = evaluate(model, tokenizer, task, examples,
                                max_new_tokens=cfg.max_new_tokens, on_progress=on_progress)
    write_eval(out / "eval", summary, records)
    write_whole(out / "final_eval.json", json.dumps(summary, indent=2))
    return summary


def paired(reference: list, arm: list) -> dict | None:
    """How an arm's answers moved from the reference's, from both's per-example records of the
    same examples: how many of the reference's wrong answers it fixed, how many right ones it
    broke, and the exact paired test's p-value. None unless both scored the same questions
    (another --final-eval-limit, or a run without per-example records)."""
    if not reference or [r["question"] for r in reference] != [r["question"] for r in arm]:
        return None
    fixed = sum(a["correct"] and not r["correct"] for r, a in zip(reference, arm))
    broke = sum(r["correct"] and not a["correct"] for r, a in zip(reference, arm))
    return {"fixed": fixed, "broke": broke, "p": sign_test_p(fixed, broke)}


def head_to_head(records: dict) -> list:
    """Every later arm against every earlier one (name -> per-example records, in the
    compare's order): does a selective arm differ from full GRPO, beyond the noise? Pairs
    without records of the same examples are left out."""
    names = list(records)
    return [{"arm": arm, "against": against, **result}
            for i, against in enumerate(names) for arm in names[i + 1:]
            if (result := paired(records[against], records[arm])) is not None]


def every_step_has(metrics: list, key: str) -> bool:
    return bool(metrics) and all(key in m for m in metrics)


def arm_row(name: str, summary: dict, metrics: list, base_accuracy: float | None,
            vs_base: dict | None = None) -> dict:
    """One arm's table row: its final evaluation, how it moved from the base's answers
    (`paired`), and what its training steps cost. A number an older run did not log is left
    out (the tables show n/a)."""
    row = {"arm": name, "accuracy": summary["accuracy"], "ci95": summary["ci95"],
           "n": summary["n"], "format_rate": summary["format_rate"],
           "delta_vs_base": None if base_accuracy is None else summary["accuracy"] - base_accuracy,
           "steps": len(metrics)}
    if vs_base is not None:
        row.update(fixed_vs_base=vs_base["fixed"], broke_vs_base=vs_base["broke"],
                   paired_p_vs_base=vs_base["p"])
    for key in ("truncation_rate", "mean_tokens"):
        if key in summary:
            row[key] = summary[key]
    if metrics:
        row.update(
            selected_tokens_per_step=float(np.mean([m["selected_tokens"] for m in metrics])),
            generated_tokens_per_step=float(np.mean([m["generated_tokens"] for m in metrics])),
            # Medians: one step stalled by something else on the machine should not
            # decide an arm's cost.
            step_seconds=float(np.median([m["step_s"] for m in metrics])),
            loss_seconds=float(np.median([m["loss_s"] for m in metrics])),
            # The training budget: steps only, in-training evaluations not counted.
            train_seconds=float(sum(m["step_s"] for m in metrics)),
            peak_memory_gb=float(max(m["peak_memory_gb"] for m in metrics)),
            signal_fraction=float(np.mean([m["signal_fraction"] for m in metrics])))
    if every_step_has(metrics, "updates"):  # (runs before --updates-per-rollout lack them)
        row["updates_per_step"] = float(np.mean([m["updates"] for m in metrics]))
        several = [m["clip_fraction"] for m in metrics if m["updates"] > 1]
        if several:  # the mean over those steps of updates 2..N's share of clipped tokens
            row["clip_fraction"] = float(np.mean(several))
    if every_step_has(metrics, "loss_peak_memory_gb"):
        row["loss_peak_memory_gb"] = float(max(m["loss_peak_memory_gb"] for m in metrics))
    # Runs older than the solve metrics lack them, and a run resumed across that change has
    # them only for its later steps: averaged over fewer steps than "groups with signal", they
    # would not be comparable to it, so they are shown only when every step has them.
    if every_step_has(metrics, "solve_rate"):
        row.update(solve_rate=float(np.mean([m["solve_rate"] for m in metrics])),
                   solved_signal_fraction=float(np.mean([m["solved_signal_fraction"]
                                                         for m in metrics])))
    return row


def check_same_settings(what: str, before: dict, now: dict):
    """--resume continues a compare only with the settings it started with: an arm trained
    half with one --lr and half with another, or scored beside arms of other settings, is no
    comparison. `before`, `now`: settings by name."""
    changes = changed_settings(before, now, [name for name in now if name not in HOW_NOT_WHAT])
    if changes:
        raise ConfigError(f"--resume: {what} was run with other settings ({'; '.join(changes)}); "
                          f"use its settings again or choose another --out")


def check_same_arm(name: str, arm_cfg: TrainConfig):
    saved = Path(arm_cfg.out) / "config.json"
    if saved.exists():
        before = config_from_dict(read_json_object(saved, "a run's config.json"))
        check_same_settings(f"arm {name}", asdict(before), asdict(arm_cfg))


def check_same_compare(out: Path, cfg: TrainConfig, final_limit: int):
    """The shared settings, and the final evaluations' number of examples: a base and arms
    scored on different examples have no paired counts. An older compare_config.json, without
    final_eval_limit, is checked for the settings alone."""
    saved = out / "compare_config.json"
    if saved.exists():
        values = read_json_object(saved, "a compare's settings")
        if not isinstance(values.get("config"), dict):
            raise ConfigError(f"{saved}: not a compare's settings (no config)")
        before = {**asdict(config_from_dict(values["config"])),
                  "final_eval_limit": values.get("final_eval_limit", final_limit)}
        check_same_settings("this compare", before,
                            {**asdict(cfg), "final_eval_limit": final_limit})


def check_not_started(out: Path, arms):
    """Without --resume, refuse an --out that holds a compare (even a part of one), before the
    base evaluation: a fresh start would redo the base's minutes of work, overwrite its record
    and only then fail on the first arm's checkpoints."""
    arm_dirs = [Path(arm_cfg.out) for _, arm_cfg in arms]
    if ((out / "compare_config.json").exists() or (out / "base" / "final_eval.json").exists()
            or any((arm_dir / "final_eval.json").exists()
                   or latest_checkpoint(arm_dir) is not None for arm_dir in arm_dirs)):
        raise ConfigError(f"--out {out} already holds a compare: continue it with the same "
                          "command plus --resume, or choose another --out")


@dataclass
class Comparison:
    """What a compare wrote: the table rows (base first), the arms' `head_to_head` pairs and
    the plot (None without matplotlib: a compare.png there is an earlier run's)."""
    rows: list
    pairs: list
    plot: Path | None


def run_compare(cfg: TrainConfig, arm_specs, resume: bool = False,
                final_eval_limit: int | None = None, on_arm=None, on_step=None,
                on_phase=no_phase, on_eval=None):
    """Run (or continue) every arm into cfg.out; returns what it wrote (a `Comparison`).

    In-training evaluations (every cfg.eval_every steps) use the first cfg.eval_limit
    held-out examples; the base model and every trained arm are scored on the first
    `final_eval_limit` (default: cfg.eval_limit). Callbacks: on_arm(name, arm config or
    None for base, finished already), on_step(train metrics), on_phase(what the current
    step is doing, as trainer.train), on_eval(examples done, total) of the final evaluations."""
    out = Path(cfg.out)
    final_limit = cfg.eval_limit if final_eval_limit is None else final_eval_limit
    at_least("final_eval_limit", final_limit, 1)
    arms = arm_configs(cfg, arm_specs)
    if resume:  # before any work: every arm, started or finished, must match its settings
        check_same_compare(out, cfg, final_limit)
        for name, arm_cfg in arms:
            check_same_arm(name, arm_cfg)
    else:
        check_not_started(out, arms)
    rows = []
    base_dir = out / "base"
    done = base_dir / "final_eval.json"
    finished = resume and done.exists()
    if on_arm:
        on_arm("base", None, finished)
    # The base evaluation loads the task and the model first: bad data, model or LoRA keys
    # stop the compare before anything is written.
    base = (json.loads(done.read_text()) if finished
            else evaluate_arm(cfg, cfg.adapter_path, final_limit, base_dir, on_eval,
                              lora_arms=[arm_cfg for _, arm_cfg in arms]))
    settings = {"config": cfg.__dict__, "final_eval_limit": final_limit}
    write_whole(out / "compare_config.json", json.dumps(
        {**settings, "algos": [name for name, _ in arms]}, indent=2))
    rows.append(arm_row("base", base, [], None))
    base_records, records = read_records(base_dir), {}
    for name, arm_cfg in arms:
        arm_dir = Path(arm_cfg.out)
        done = arm_dir / "final_eval.json"
        finished = resume and done.exists()
        if on_arm:
            on_arm(name, arm_cfg, finished)
        if not finished:
            started = resume and latest_checkpoint(arm_dir) is not None
            train(arm_cfg, resume=started, on_step=on_step, on_phase=on_phase)
            evaluate_arm(arm_cfg, arm_dir, final_limit, arm_dir, on_eval)
        summary = json.loads(done.read_text())
        records[name] = read_records(arm_dir)
        rows.append(arm_row(name, summary, read_metrics(arm_dir), base["accuracy"],
                            paired(base_records, records[name])))
    pairs = head_to_head(records)
    write_whole(out / "compare.json", json.dumps({**settings, "rows": rows,
                                                  "head_to_head": pairs}, indent=2))
    write_whole(out / "compare.md", markdown_table(rows) + head_to_head_table(pairs))
    # The base line is drawn on the examples the curves were scored on.
    plotted = plot(out, [(name, Path(arm_cfg.out)) for name, arm_cfg in arms],
                   cfg.eval_limit if cfg.eval_every else final_limit)
    return Comparison(rows, pairs, plotted)


def cell(row: dict, key: str, spec: str) -> str:
    """A number of the row as text; n/a where an older run did not log it."""
    return format(row[key], spec) if key in row else "n/a"


def clipped_cell(row: dict) -> str:
    """'-' for an arm whose steps took one update each: nothing could be clipped."""
    if "clip_fraction" not in row and "updates_per_step" in row:
        return "-"
    return cell(row, "clip_fraction", ".1%")


def paired_cell(row: dict) -> str:
    """'52/27 (p=0.0066)': base answers the arm fixed / broke; blank for the base itself."""
    if row["delta_vs_base"] is None:
        return ""
    if "fixed_vs_base" not in row:
        return "n/a"
    return f"{row['fixed_vs_base']}/{row['broke_vs_base']} (p={row['paired_p_vs_base']:.2g})"


def head_to_head_table(pairs) -> str:
    if not pairs:
        return ""
    lines = ["", "Arm against arm, on the same examples:", "",
             "| arm | against | fixed | broke | paired p |", "|---|---|---|---|---|"]
    lines += [f"| {p['arm']} | {p['against']} | {p['fixed']} | {p['broke']} | {p['p']:.2g} |"
              for p in pairs]
    return "\n".join(lines) + "\n"


def markdown_table(rows) -> str:
    lines = ["| arm | held-out accuracy (95% CI) | vs base | fixed/broke vs base (paired p) | "
             "format rate | truncated | answer tokens (mean) | "
             "train steps | train s (total) | median step s | median loss+grad s | "
             "tokens in loss / step | tokens generated / step | updates / step | clipped | "
             "train solve rate | groups with signal | of which on correctness | "
             "loss+grad peak GB | peak GB |",
             "|---" * 20 + "|"]
    for r in rows:
        low, high = r["ci95"]
        delta = "" if r["delta_vs_base"] is None else f"{r['delta_vs_base'] * 100:+.1f} pts"
        cells = [r["arm"], f"{r['accuracy']:.1%} ({low:.1%}-{high:.1%}, n={r['n']})", delta,
                 paired_cell(r), f"{r['format_rate']:.0%}", cell(r, "truncation_rate", ".0%"),
                 cell(r, "mean_tokens", ".0f"), str(r["steps"])]
        if "step_seconds" in r:
            cells += [f"{r['train_seconds']:.1f}", f"{r['step_seconds']:.1f}",
                      f"{r['loss_seconds']:.1f}", f"{r['selected_tokens_per_step']:.0f}",
                      f"{r['generated_tokens_per_step']:.0f}", cell(r, "updates_per_step", ".2f"),
                      clipped_cell(r), cell(r, "solve_rate", ".1%"),
                      f"{r['signal_fraction']:.0%}", cell(r, "solved_signal_fraction", ".0%"),
                      cell(r, "loss_peak_memory_gb", ".2f"), f"{r['peak_memory_gb']:.2f}"]
        else:
            cells += [""] * 12
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def base_reference(base_dir: Path, eval_limit: int) -> BaseReference:
    """The base model's final evaluation, and its accuracy on the first `eval_limit` of those
    examples (the ones the in-training evaluations score) from its per-example records."""
    final = json.loads((base_dir / "final_eval.json").read_text())
    correct = [r["correct"] for r in read_records(base_dir)[:eval_limit]]
    return BaseReference(accuracy=float(np.mean(correct)), n=len(correct),
                         final_accuracy=final["accuracy"], final_n=final["n"])


def plot(out: Path, arms, eval_limit: int):
    """compare.png for (name, run dir) arms; None without matplotlib."""
    curves = []
    for name, arm_dir in arms:
        final = json.loads((arm_dir / "final_eval.json").read_text())
        curves.append(ArmCurves(name, read_metrics(arm_dir), final["accuracy"], final["n"]))
    return save_figure(out / "compare.png", base_reference(out / "base", eval_limit), curves)
