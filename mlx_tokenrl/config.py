"""Every setting of a training run, in one dataclass: the CLI's options, the YAML config
file's keys and the library's arguments are all generated from it."""

from dataclasses import dataclass, fields

from .models import DEFAULT_MODEL

ALGOS = ("grpo", "s-grpo", "t-spmo")


@dataclass
class TrainConfig:
    # what to train
    task: str = "svamp"
    model: str = DEFAULT_MODEL
    algo: str = "t-spmo"
    data: str | None = None
    digits: str = "3x3"
    reward_fn: str | None = None
    # rollouts
    steps: int = 100
    prompts_per_step: int = 8
    group_size: int = 8
    max_new_tokens: int = 256
    temperature: float = 0.6
    top_p: float = 1.0
    seed: int = 0
    # optimisation
    lr: float = 1e-5
    warmup_steps: int = 5
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    loss_norm: str = "sequence"
    beta: float = 0.0
    scale_rewards: str = "group"
    format_reward: float = 0.0
    # LoRA / model
    lora_rank: int = 8
    lora_scale: float = 20.0
    lora_layers: int = -1
    lora_keys: list[str] | None = None
    quantize: int | None = None
    dtype: str = "auto"
    # algorithm knobs
    # S-GRPO: ~24 tokens within the first ~30 of each completion. The loss's forward pass
    # then stops early (memory and time well under half of GRPO's, scripts/bench_step.py).
    sgrpo_alpha: int = 4
    sgrpo_k: int = 24
    sgrpo_p: float = 0.75
    tspmo_max_pairs: int = 256
    tspmo_replay: int = 2
    # compute
    microbatch_rows: int = 8
    grad_checkpoint: bool = False
    compile: bool = True
    # bookkeeping
    eval_every: int = 0
    eval_limit: int = 100
    save_every: int = 10
    out: str = "runs/latest"

    def validate(self):
        if self.algo not in ALGOS:
            raise ValueError(f"unknown algo {self.algo!r}: use one of {', '.join(ALGOS)}")
        if self.loss_norm not in ("sequence", "token"):
            raise ValueError(f"--loss-norm must be sequence or token, not {self.loss_norm!r}")
        if self.scale_rewards not in ("group", "none"):
            raise ValueError(f"--scale-rewards must be group or none, not {self.scale_rewards!r}")
        for name in ("steps", "prompts_per_step", "group_size", "max_new_tokens", "microbatch_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if self.group_size < 2:
            raise ValueError("--group-size must be at least 2: advantages compare a group")
        if self.sgrpo_alpha > self.sgrpo_k:
            raise ValueError("--sgrpo-alpha must not exceed --sgrpo-k")


def config_from_dict(values: dict) -> TrainConfig:
    """Build a config from a YAML/JSON mapping; keys may use dashes or underscores."""
    known = {f.name for f in fields(TrainConfig)}
    values = {k.replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown config keys: {', '.join(unknown)}")
    return TrainConfig(**values)
