"""Every setting of a training run, in one dataclass: the CLI's options, the YAML config
file's keys and the library's arguments are all generated from it."""

import json
import math
import types
import typing
from dataclasses import dataclass, field, fields, make_dataclass
from pathlib import Path

from .algorithms import ALGORITHMS, options as algorithm_options
from .messages import InputError

DEFAULT_MODEL = "Qwen/Qwen2-1.5B-Instruct"
ALGOS = tuple(ALGORITHMS)
FLOAT_DTYPES = ("float32", "float16", "bfloat16")  # dtypes.DTYPES: their MLX dtypes
DTYPE_CHOICES = ("auto", *FLOAT_DTYPES)
QUANTIZE_BITS = (2, 3, 4, 5, 6, 8)  # what mx.quantize supports

# Settings whose default depends on the task: GENERAL_DEFAULTS unless TASK_DEFAULTS names the
# task, where we measured that the general one does harm. TrainConfig fills them in.
GENERAL_DEFAULTS = {"lr": 1e-5, "max_new_tokens": 256}
TASK_DEFAULTS = {
    # Measured on Qwen2.5-Coder-0.5B-Instruct, the closest we have run to the default model
    # (Qwen2-1.5B-Instruct), T-SPMO 4x8, in results/svamp-qwen2.5-0.5b/:
    "svamp": {
        # lr 1e-5 broke the answer format within 5-7 steps (held-out format rate 95% -> 43%,
        # accuracy 49% -> 32% at step 5: calibration/t-spmo_lr=1e-5/STATUS); 5e-6 kept it
        # (97% at step 5, 95% at step 10: calibration/STATUS, the rate the compare used).
        "lr": 5e-6,
        # 256 new tokens cut 13.7% of the base's greedy answers short, 300 cut 5.3%
        # (base/truncation.json); a cut answer rarely scores.
        "max_new_tokens": 300,
    },
}


def task_default(task: str, name: str):
    """The default of setting `name` (a GENERAL_DEFAULTS key) for `task`."""
    return TASK_DEFAULTS.get(task.strip().lower(), {}).get(name, GENERAL_DEFAULTS[name])


def stated_default(name: str) -> str:
    """How help states a per-task default: "1e-05; svamp: 5e-06"."""
    tasks = [f"{task}: {values[name]}" for task, values in TASK_DEFAULTS.items() if name in values]
    return "; ".join([str(GENERAL_DEFAULTS[name]), *tasks])


class ConfigError(InputError, ValueError):
    """A setting the user gave is invalid (a flag, a config file value, an arm's setting):
    the CLI reports it as one line. A ValueError, so callers that catch those still do."""


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def coerce(name: str, value, kind):
    """`value` as a setting of annotated type `kind`, or ConfigError naming the setting.

    Text is parsed (YAML reads `1e-5` without a dot as a string, compare's arm settings are
    text, --lora-keys is comma-separated); nothing else is converted but int -> float."""
    options = typing.get_args(kind) if isinstance(kind, types.UnionType) else (kind,)
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"{flag(name)}: no value given")
    base = next(k for k in options if k is not type(None))
    text = value.strip() if isinstance(value, str) else None
    if base is bool:
        if isinstance(value, bool):
            return value
        if text is not None and text.lower() in ("true", "false", "1", "0"):
            return text.lower() in ("true", "1")
        raise ConfigError(f"{flag(name)}: expected true or false, not {value!r}")
    if base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        try:
            return int(text)
        except (TypeError, ValueError):
            raise ConfigError(f"{flag(name)}: expected an integer, not {value!r}") from None
    if base is float:
        try:
            number = float(text if text is not None else value)
        except (TypeError, ValueError):
            number = None
        if isinstance(value, bool) or number is None or not math.isfinite(number):
            raise ConfigError(f"{flag(name)}: expected a finite number, not {value!r}")
        return number
    if base == list[str]:
        items = text.split(",") if text is not None else value
        if isinstance(items, list) and all(isinstance(item, str) for item in items):
            return [item.strip() for item in items if item.strip()]
        raise ConfigError(f"{flag(name)}: expected comma-separated names, not {value!r}")
    if base == list[float]:
        items = text.split(",") if text is not None else value
        if isinstance(items, list):
            return [coerce(name, item, float) for item in items]
        raise ConfigError(f"{flag(name)}: expected comma-separated numbers, not {value!r}")
    if isinstance(value, str):
        return value
    raise ConfigError(f"{flag(name)}: expected text, not {value!r}")


@dataclass
class RunSettings:
    """Every setting but the algorithms' own options (TrainConfig adds those)."""
    # what to train
    task: str = "svamp"
    model: str = DEFAULT_MODEL
    algo: str = "t-spmo"
    data: str | None = None
    digits: str = "3x3"
    # several reward functions: the weighted sum is the reward, the first decides "solved"
    reward_fn: list[str] | None = None
    reward_weights: list[float] | None = None
    # task custom: any Hugging Face dataset (or --data file), the fields and splits to read
    hf_dataset: str | None = None
    hf_config: str | None = None
    question_field: str | None = None
    answer_field: str | None = None
    train_split: str = "train"
    test_split: str = "test"
    # the prompt (None: the task's instruction, no system message); eval reads them back
    system_prompt: str | None = None
    instruction: str | None = None
    # rollouts
    steps: int = 100
    time_budget: float | None = None  # seconds of training; stops the run early (budget.py)
    prompts_per_step: int = 8
    group_size: int = 8
    max_new_tokens: int | None = None  # None: the task's default (task_default)
    temperature: float = 0.6
    top_p: float = 1.0
    seed: int = 0
    # optimisation
    lr: float | None = None  # None: the task's default (task_default)
    warmup_steps: int = 5
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    loss_norm: str = "sequence"
    beta: float = 0.0
    # PPO's clipped ratio over several updates from one rollout batch (loss.policy_loss)
    updates_per_rollout: int = 1
    clip_epsilon: float = 0.2
    clip_epsilon_high: float | None = None  # None: clip_epsilon (symmetric)
    scale_rewards: str = "group"
    mask_truncated: bool = False
    format_reward: float = 0.0
    # LoRA / model
    lora_rank: int = 8
    lora_scale: float = 20.0
    lora_layers: int = -1
    lora_keys: list[str] | None = None
    quantize: int | None = None
    dtype: str = "auto"
    adapter_path: str | None = None  # start from this adapter's weights (SFT or an earlier run)
    # compute: the loss's microbatch rows are planned to keep its peak under max_memory (GB;
    # None: a share of the machine's, memory.py) unless microbatch_rows is given
    max_memory: float | None = None
    microbatch_rows: int | None = None
    grad_checkpoint: bool = False
    compile: bool = True
    # bookkeeping
    eval_every: int = 0
    eval_limit: int = 100
    save_every: int = 10
    out: str = "runs/latest"
    # tracking (tracking.py, samples.py)
    report_to: list[str] | None = None
    project_name: str = "mlx-tokenrl"
    samples_every: int = 10
    samples_count: int = 2

    def __post_init__(self):
        """Every field holds its annotated type (text parsed), else ConfigError; the settings
        left None whose default depends on the task get the task's."""
        kinds = typing.get_type_hints(type(self))
        for f in fields(self):
            setattr(self, f.name, coerce(f.name, getattr(self, f.name), kinds[f.name]))
        for name in GENERAL_DEFAULTS:
            if getattr(self, name) is None:
                setattr(self, name, task_default(self.task, name))

    def validate(self):
        """Every value in its range, else ConfigError: before any model work."""
        for name in ("task", "model", "digits", "out", "project_name", "train_split", "test_split"):
            require(bool(getattr(self, name).strip()), f"{flag(name)} must not be empty")
        one_of("algo", self.algo, ALGOS)
        one_of("loss_norm", self.loss_norm, ("sequence", "token", "constant"))
        one_of("scale_rewards", self.scale_rewards, ("group", "none"))
        one_of("dtype", self.dtype, DTYPE_CHOICES)
        if self.quantize is not None:
            one_of("quantize", self.quantize, QUANTIZE_BITS)
        for name in ("steps", "prompts_per_step", "max_new_tokens", "lora_rank",
                     "updates_per_rollout", "eval_limit", "save_every", "samples_count"):
            at_least(name, getattr(self, name), 1)
        if self.microbatch_rows is not None:
            at_least("microbatch_rows", self.microbatch_rows, 1)
            require(self.max_memory is None, "--max-memory and --microbatch-rows both given: "
                                             "--microbatch-rows fixes the rows, give one")
        if self.time_budget is not None:
            above("time_budget", self.time_budget, 0)
            require(math.isfinite(self.time_budget), "--time-budget must be a number of "
                                                     "seconds, not infinite")
        if self.max_memory is not None:
            above("max_memory", self.max_memory, 0)
            at_most("max_memory", self.max_memory, MAX_MEMORY_GB)
        for f in fields(self):  # the counts at_least does not check: --group-size, --lora-layers
            value = getattr(self, f.name)
            if isinstance(value, int) and not isinstance(value, bool):
                at_most(f.name, value, INT_MAX)
        for name in ("seed", "warmup_steps", "weight_decay", "grad_clip", "beta", "format_reward",
                     "clip_epsilon", "eval_every", "samples_every"):
            at_least(name, getattr(self, name), 0)
        if self.clip_epsilon_high is not None:
            at_least("clip_epsilon_high", self.clip_epsilon_high, self.clip_epsilon)
        # Sampling at temperature 0 is greedy: every completion of a group would be the same.
        for name in ("temperature", "top_p", "lr", "lora_scale"):
            above(name, getattr(self, name), 0)
        at_most("top_p", self.top_p, 1)
        require(self.group_size >= 2, f"--group-size must be at least 2 (advantages compare a "
                                      f"group), not {self.group_size}")
        require(self.lora_layers == -1 or self.lora_layers >= 1,
                f"--lora-layers must be -1 (all) or at least 1, not {self.lora_layers}")
        require(self.lora_keys is None or len(self.lora_keys) > 0, "--lora-keys names no module")
        for _, option in algorithm_options():  # ranges declared with each option
            value = getattr(self, option.name)
            if option.at_least is not None:
                at_least(option.name, value, option.at_least)
            if option.above is not None:
                above(option.name, value, option.above)
            if option.at_most is not None:
                at_most(option.name, value, option.at_most)
        for algorithm in ALGORITHMS.values():
            problem = algorithm.check(self)
            require(problem is None, problem)
        output_dir("out", self.out)
        trackers_installed(self.report_to or [])


    @property
    def clip_high(self) -> float:
        """The upper clip: --clip-epsilon-high, else --clip-epsilon."""
        return self.clip_epsilon if self.clip_epsilon_high is None else self.clip_epsilon_high


# Each algorithm's options (algorithms/) are fields of their own, after the run's settings.
TrainConfig = make_dataclass(
    "TrainConfig", [(option.name, option.kind, field(default=option.default))
                    for _, option in algorithm_options()],
    bases=(RunSettings,))
TrainConfig.__module__ = __name__
TrainConfig.__doc__ = """Every setting of a training run, in one dataclass: the CLI's options,
the YAML config file's keys and the library's arguments are all generated from it."""


# ---- range checks, shared with the CLI's own options ------------------------------------
# Written as `not (value >= bound)` so that NaN fails them too.

def require(ok: bool, message: str):
    if not ok:
        raise ConfigError(message)


# Counts, lengths and seeds go into MLX's 32-bit shapes, positions and seeds: a larger one
# (a typo, an extra digit) would end in an overflow's traceback.
INT_MAX = 2**31 - 1
MAX_MEMORY_GB = 1e6  # a petabyte; --max-memory 1e300 overflows its count of bytes


def at_least(name: str, value, minimum):
    """value >= minimum; an integer also at most INT_MAX."""
    require(value >= minimum, f"{flag(name)} must be at least {minimum}, not {value}")
    if isinstance(value, int) and not isinstance(value, bool):
        at_most(name, value, INT_MAX)


def above(name: str, value, bound):
    require(value > bound, f"{flag(name)} must be greater than {bound}, not {value}")


def at_most(name: str, value, maximum):
    require(value <= maximum, f"{flag(name)} must be at most {maximum}, not {value}")


def one_of(name: str, value, allowed):
    require(value in allowed, f"{flag(name)} must be one of {', '.join(map(str, allowed))}, "
                              f"not {value!r}")


def output_dir(name: str, path):
    """An output directory may exist, but must not be a file."""
    require(not Path(path).exists() or Path(path).is_dir(),
            f"{flag(name)} {path} is an existing file, not a directory")


def existing_dir(name: str, path):
    """An input directory must exist: say so, rather than which file is missing in it."""
    require(Path(path).is_dir(), f"{flag(name)} {path}: the directory does not exist" if not
            Path(path).exists() else f"{flag(name)} {path} is a file, not a directory")


def trackers_installed(names):
    """Each --report-to name is one of mlx-lm's trackers and its package imports. mlx-lm's
    callbacks check the package only when the run starts, after the model has loaded."""
    if not names:  # mlx-lm takes seconds to import: not for a run that tracks nothing
        return
    from mlx_lm.tuner import callbacks  # imports the trackers that are installed

    for name in names:
        one_of("report_to", name, tuple(callbacks.SUPPORT_CALLBACK))
        # mlx-lm keeps each tracker's module under its own name, None when the import failed.
        require(getattr(callbacks, name) is not None,
                f"--report-to {name}: the {name} package is not installed (pip install {name})")


def read_json_object(path, what: str) -> dict:
    """A JSON object from a file a run or adapter left (config.json, adapter_config.json): one
    line naming the file if it is damaged, rather than a traceback from deep inside a command."""
    try:
        values = json.loads(Path(path).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not {what} ({exc})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: not {what} (not a mapping)")
    return values


# Settings that change how a step is computed or recorded, not what is learned: a resumed run
# or compare may change them (e.g. a smaller --max-memory on another Mac, or when two arms
# share a machine).
HOW_NOT_WHAT = {"out", "max_memory", "microbatch_rows", "grad_checkpoint", "compile",
                "save_every", "report_to", "project_name", "samples_every", "samples_count"}


def changed_settings(run: dict, given: dict, names) -> list[str]:
    """'--lr: run 1e-05, given 0.001' for each of `names` whose given value is not the
    run's: what a resume refuses."""
    def shown(value):
        return ",".join(map(str, value)) if isinstance(value, list) else str(value)

    return [f"{'TASK' if name == 'task' else flag(name)}: run {shown(run[name])}, given "
            f"{shown(given[name])}" for name in names if run[name] != given[name]]


def config_from_dict(values: dict) -> TrainConfig:
    """Build a config from a YAML/JSON mapping; keys may use dashes or underscores."""
    known = {f.name for f in fields(TrainConfig)}
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown config keys: {', '.join(unknown)}")
    return TrainConfig(**values)
