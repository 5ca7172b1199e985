"""Peer benchmark: one whole GRPO step (rollout + loss + update) of our trainer beside
mlx-lm-lora's `train_grpo`, on the same model, prompts and settings, in one process.

Each side runs its own public entry point: ours `trainer.prepare_run` + `trainer.run_step`
(what `tokenrl-mlx train` runs each step), the peer `train_grpo(..., iters=1)` on a dataset
of the same B prompts. Runs alternate (ours, peer, ours, peer, ...) after one untimed
warm-up step per side (compilation, first allocations); medians of `--repeats` are reported.

mlx-lm-lora may pull other mlx / mlx-lm versions, so it lives in a venv of its own:

    python3 -m venv /work/peer-venv
    /work/peer-venv/bin/pip install -e . mlx-lm-lora==5.10.2 "mlx[cpu]==0.32.4" mlx-lm==0.32.2
    /work/peer-venv/bin/python scripts/bench_peer.py --out results/bench_peer.json

(on a Mac `mlx==0.32.4`; a real model: `--model /work/models/smollm2-135m-instruct`).

How the settings map (and what cannot be made equal) is written into the markdown.
"""

import argparse
import contextlib
import gc
import io
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields, replace
from importlib import metadata
from pathlib import Path
from unittest.mock import patch

import mlx_tokenrl  # noqa: F401  (OpenBLAS before mlx: both sides get the same BLAS)
import mlx.core as mx

try:
    from mlx_lm_lora.trainer import grpo_trainer as peer
    from mlx_lm_lora.utils import from_pretrained
except ImportError:
    sys.exit(f"bench_peer: mlx-lm-lora is not installed for {sys.executable}; run from its own "
             f"venv (see this script's docstring)")

import mlx.optimizers as optim
from mlx.utils import tree_flatten
from mlx_lm.tuner.callbacks import TrainingCallback
from rich.console import Console

from mlx_tokenrl import trainer
from mlx_tokenrl.config import ConfigError, TrainConfig
from mlx_tokenrl.rollout import encode_prompts
from mlx_tokenrl.tasks import Example, load_task
from mlx_tokenrl.toy import SHAPE_135M, build_toy_model

from bench_step import coin_reward, questions_of_length
from tables import markdown_table, print_table

SHAPES = {"135m": SHAPE_135M, "tiny": {}}  # {}: toy.TINY, for quick checks


def fail(message: str):
    print(f"bench_peer: {message}", file=sys.stderr)
    sys.exit(2)


@dataclass
class Run:
    """One measured step of one side."""
    side: str
    step_s: float  # the whole step: rollout, rewards, loss+grad, update
    rollout_s: float  # sampling and rewards (ours: and selection)
    update_s: float  # the rest: loss+grad over microbatches, clip, optimizer update
    peak_gb: float  # the side's own weights + optimizer state + the step's peak above them
    completions: int
    generated_tokens: int
    loss_tokens: int


def resident_bytes(model, optimizer) -> int:
    """What a side keeps between steps: its weights, LoRA and optimizer state."""
    arrays = tree_flatten(model.parameters()) + tree_flatten(optimizer.state)
    return sum(v.nbytes for _, v in arrays if isinstance(v, mx.array))


def fresh_baseline() -> int:
    """Active bytes before a run, which hold both sides' models: a run's peak is measured
    above this and its own resident bytes added, as if it ran alone."""
    gc.collect()
    mx.clear_cache()  # as our train() does before every step
    mx.reset_peak_memory()
    return mx.get_active_memory()


# ---- ours ---------------------------------------------------------------------------------

@dataclass
class Ours:
    cfg: TrainConfig
    world: object
    task: object
    model: object
    tokenizer: object
    optimizer: object
    loss_and_grad: object


def setup_ours(cfg: TrainConfig, args) -> Ours:
    world, task, model, tokenizer, optimizer, _, cfg = trainer.prepare_run(cfg, resume=False)
    if not args.stop_at_eos:  # every completion runs the whole budget: equal work both sides
        tokenizer.eos_token_ids = set()
    # The step's prompts are exactly these B (every step permutes them), the reward a fixed
    # coin per completion text: groups carry signal with a random model too.
    task = replace(task, train=examples_for(args, tokenizer, task), reward=coin_reward)
    return Ours(cfg, world, task, model, tokenizer, optimizer,
                trainer.make_loss_and_grad(model, cfg.beta, cfg.compile))


def run_ours(ours: Ours, step: int, resident: int) -> Run:
    groups = []
    baseline = fresh_baseline()
    start = time.perf_counter()
    metrics = trainer.run_step(ours.model, ours.tokenizer, ours.task, ours.cfg, ours.world,
                               ours.optimizer, ours.loss_and_grad, step,
                               on_selected=groups.extend)
    took = time.perf_counter() - start
    # run_step resets the peak between its phases and reports the largest.
    peak = metrics["peak_memory_gb"] * 1e9 - baseline + resident
    return Run("ours", took, metrics["rollout_s"], took - metrics["rollout_s"], peak / 1e9,
               sum(len(g.completions) for g in groups), metrics["generated_tokens"],
               metrics["selected_tokens"])


# ---- mlx-lm-lora --------------------------------------------------------------------------

@dataclass
class Peer:
    model: object
    tokenizer: object
    optimizer: object
    dataset: list
    args: object


def coin_rewards(prompts, completions, answer, types=None):
    """The same coin reward, in mlx-lm-lora's reward-function form."""
    return [coin_reward(text, truth) for text, truth in zip(completions, answer)]


def setup_peer(cfg: TrainConfig, ours: Ours, prompt_ids, out: Path, stop_at_eos: bool) -> Peer:
    with contextlib.redirect_stdout(io.StringIO()):  # from_pretrained prints its progress
        model, tokenizer, _ = from_pretrained(
            cfg.model, lora_config={"rank": cfg.lora_rank, "scale": cfg.lora_scale,
                                    "dropout": 0.0, "num_layers": cfg.lora_layers})
    # Ours casts the base to the compute dtype (float32 on the CPU) before adding LoRA,
    # whose weights stay float32; the peer keeps the checkpoint's dtype. Same here as ours.
    lora = model.trainable_parameters()
    model.set_dtype(next(v.dtype for k, v in tree_flatten(ours.model.parameters())
                         if "lora" not in k))
    model.update(lora)
    mx.eval(model.parameters())
    if not stop_at_eos:
        tokenizer.eos_token_ids = set()
    out.mkdir(parents=True, exist_ok=True)  # train_grpo saves its adapter there at the end
    dataset = [(ids, tokenizer.encode(e.answer), ours.task.prompt(ours.tokenizer, e.question),
                e.answer) for ids, e in zip(prompt_ids, ours.task.train)]
    args = peer.GRPOTrainingArgs(
        batch_size=cfg.prompts_per_step, iters=1, group_size=cfg.group_size,
        max_completion_length=cfg.max_new_tokens, temperature=cfg.temperature,
        top_p=cfg.top_p, top_k=0, min_p=0.0,  # plain temperature sampling, as ours
        beta=0.0,  # no reference model or KL, as ours at --beta 0
        grpo_loss_type="grpo",  # mean over each completion's tokens, then over completions
        steps_per_report=1, steps_per_eval=10**9, steps_per_save=10**9,
        adapter_file=str(out / "adapters.safetensors"))
    # mlx-lm-lora's CLI default optimizer is Adam; ours AdamW at weight decay 0: the same.
    return Peer(model, tokenizer, optim.Adam(learning_rate=cfg.lr), dataset, args)


class PeerClock(TrainingCallback):
    """Times and counts the peer's step through the names train_grpo calls: generation
    starts the step, its rewards end the rollout, the loss report (right after the update's
    mx.eval, before the adapter is saved) ends the step."""

    def __init__(self):
        self.real_generate, self.real_rewards = peer.generate_grpo, peer._rollout_rewards
        self.start = self.rollout_end = self.end = None
        self.rollout_peak = self.loss_peak = 0
        self.completions = self.generated = self.loss_tokens = 0

    def generate(self, *args, **kwargs):
        self.start = time.perf_counter()
        completions, texts, indices = self.real_generate(*args, **kwargs)
        self.rollout_peak = mx.get_peak_memory()
        mx.reset_peak_memory()
        self.completions = len(completions)
        self.generated = sum(c.size for c in completions)
        return completions, texts, indices

    def rewards(self, *args, **kwargs):
        result = self.real_rewards(*args, **kwargs)
        self.rollout_end = time.perf_counter()
        return result

    def on_train_loss_report(self, train_info: dict):
        self.end = time.perf_counter()
        self.loss_peak = mx.get_peak_memory()
        self.loss_tokens = int(train_info["trained_tokens"])


def run_peer(side: Peer, resident: int) -> Run:
    clock = PeerClock()
    baseline = fresh_baseline()
    # Its progress bar and report would bury our table.
    with patch.object(peer, "generate_grpo", clock.generate), \
            patch.object(peer, "_rollout_rewards", clock.rewards), \
            contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        peer.train_grpo(side.model, None, side.tokenizer, side.optimizer, side.dataset,
                        reward_funcs=[coin_rewards], args=side.args, training_callback=clock,
                        end_answer_token="")  # no stop string besides EOS, as ours
    step = clock.end - clock.start
    rollout = clock.rollout_end - clock.start
    peak = max(clock.rollout_peak, clock.loss_peak) - baseline + resident
    return Run("mlx-lm-lora", step, rollout, step - rollout, peak / 1e9, clock.completions,
               clock.generated, clock.loss_tokens)


# ---- the comparison -----------------------------------------------------------------------

def warm_up(ours: Ours, theirs: Peer) -> int:
    """One untimed step per side (compilation, first allocations), checking that both adapt
    the same weights and that each step really updated them. Returns the LoRA size."""
    models = {"ours": ours.model, "mlx-lm-lora": theirs.model}
    before = {side: dict(tree_flatten(m.trainable_parameters())) for side, m in models.items()}
    shapes = [{k: v.shape for k, v in weights.items()} for weights in before.values()]
    assert shapes[0] == shapes[1], "the two sides adapt different weights"
    run_ours(ours, 0, 0)
    run_peer(theirs, 0)
    for side, model in models.items():
        after = dict(tree_flatten(model.trainable_parameters()))
        assert any(not mx.array_equal(after[k], v) for k, v in before[side].items()), \
            f"{side}'s warm-up step left its LoRA weights as they were"
    return sum(v.size for v in before["ours"].values())


def check_equal_work(ours: Run, theirs: Run, args):
    """Both sides sampled B x G completions; without EOS every one ran the whole budget."""
    expected = args.prompts_per_step * args.group_size
    assert ours.completions == theirs.completions == expected, (ours, theirs)
    if not args.stop_at_eos:
        tokens = expected * args.max_new_tokens
        assert ours.generated_tokens == theirs.generated_tokens == tokens, (ours, theirs)


def median_run(runs: list) -> Run:
    numbers = {f.name: statistics.median(getattr(r, f.name) for r in runs)
               for f in fields(Run) if f.name != "side"}
    return Run(runs[0].side, **numbers)


def ratios(ours: Run, theirs: Run) -> dict:
    return {"step_time_peer_over_ours": theirs.step_s / ours.step_s,
            "rollout_time_peer_over_ours": theirs.rollout_s / ours.rollout_s,
            "update_time_peer_over_ours": theirs.update_s / ours.update_s,
            "peak_ours_over_peer": ours.peak_gb / theirs.peak_gb}


def versions() -> dict:
    out = {}
    for name in ("mlx", "mlx-cpu", "mlx-metal", "mlx-lm", "mlx-lm-lora", "mlx-tokenrl"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    commit = subprocess.run(["git", "-C", str(Path(__file__).parent), "rev-parse", "--short",
                             "HEAD"], capture_output=True, text=True).stdout.strip()
    out["mlx-tokenrl commit"] = commit or None
    return out


def mapping(args, microbatch_rows: int) -> list:
    """How each setting reaches each side (and what could not be made equal), for the
    markdown and the JSON."""
    B, G = args.prompts_per_step, args.group_size
    return [
        f"prompts: the same {B} prompt token ids on both sides (our task's chat prompt); "
        f"{G} completions each, {args.max_new_tokens} new tokens "
        f"(`max_completion_length`), temperature {args.temperature}, no top-p/top-k/min-p "
        f"(peer: top_p 1, top_k 0, min_p 0, no `</answer>` stop string)",
        "EOS: " + ("both stop at the tokenizer's EOS ids, so completion lengths differ by "
                   "sampling" if args.stop_at_eos else
                   "removed from both tokenizers' stop sets, so every completion runs the "
                   "whole budget and both sides generate the same tokens (asserted)"),
        f"LoRA: mlx-lm's linear_to_lora_layers on both, rank {args.lora_rank}, scale "
        f"{args.lora_scale}, dropout 0, layers {args.lora_layers} (-1: all), default keys; "
        f"base weights in ours' compute dtype, LoRA in float32, on both",
        f"loss: GRPO, beta 0 (peer: `ref_model=None`, no reference pass), token-level ratio "
        f"(on-policy, one update per rollout), mean per completion then over completions "
        f"(peer `grpo_loss_type=grpo`, ours `--loss-norm sequence`); reward: a fixed coin "
        f"per completion text on both",
        f"update: lr {args.lr}; ours AdamW (weight decay 0), its cosine schedule without "
        f"warmup and grad clip 1.0, peer Adam (its CLI default) without clipping",
        f"memory: the peer's loss microbatch is B={B} completions (hard-coded in train_grpo, "
        f"each a full prompt+completion row); ours `--microbatch-rows {microbatch_rows}` "
        f"(rows of one group share the prompt through a KV cache)"
        + (" - equal rows per microbatch" if microbatch_rows == B else
           " - NOT the peer's row count: chosen to compare at a given peak"),
        f"rollout concurrency (not equal, each side's design): the peer decodes at most "
        f"B={B} sequences at a time (`completion_batch_size=batch_size`), after one prefill of "
        f"each prompt shared by its group; ours decodes all {B * G} rows together",
        "peak memory: both models stay loaded in one process, so a run's peak is measured "
        "above the memory resident before it, plus the side's own weights, LoRA and "
        "optimizer state (what a process running that side alone would peak at)",
        "the peer's step window: from generate_grpo's start to its loss report (after the "
        "update's mx.eval), leaving out train_grpo's set-up and its final adapter save",
    ]


SIDE_HEADER = ("side", "step s", "rollout s", "loss+grad+update s", "peak GB", "completions",
               "generated tokens", "loss tokens")


def side_rows(ours: Run, theirs: Run) -> list:
    return [[r.side, f"{r.step_s:.2f}", f"{r.rollout_s:.2f}", f"{r.update_s:.2f}",
             f"{r.peak_gb:.3f}", f"{r.completions:.0f}", f"{r.generated_tokens:.0f}",
             f"{r.loss_tokens:.0f}"] for r in (ours, theirs)]


def ratio_rows(ratio: dict) -> list:
    return [["time peer/ours", f"{ratio['step_time_peer_over_ours']:.2f}x",
             f"{ratio['rollout_time_peer_over_ours']:.2f}x",
             f"{ratio['update_time_peer_over_ours']:.2f}x", "", "", "", ""],
            ["peak ours/peer", "", "", "", f"{ratio['peak_ours_over_peer']:.2f}x", "", "", ""]]


def write_markdown(path: Path, command: str, described: str, report: dict):
    ours, theirs = (Run(**report["median"][side]) for side in ("ours", "mlx-lm-lora"))
    ratio = report["ratios"]
    lines = [
        "# One GRPO step: ours vs mlx-lm-lora", "",
        f"`{command}`", "",
        f"{described}; median of {report['args']['repeats']} alternating runs per side after "
        f"one warm-up step each. Versions: "
        + ", ".join(f"{k} {v}" for k, v in report["versions"].items()) + ".", "",
        *markdown_table(SIDE_HEADER, side_rows(ours, theirs), left=("side",))]
    lines += ["", f"Time peer/ours: whole step **{ratio['step_time_peer_over_ours']:.2f}x**, "
                  f"rollout {ratio['rollout_time_peer_over_ours']:.2f}x, loss+grad+update "
                  f"{ratio['update_time_peer_over_ours']:.2f}x. Peak memory ours/peer: "
                  f"**{ratio['peak_ours_over_peer']:.2f}x**.", "", "How the sides were set up:", ""]
    lines += [f"- {line}" for line in report["mapping"]]
    path.write_text("\n".join(lines) + "\n")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="an mlx-lm model directory; default: a random model "
                        "of --shape built here (prompts: SVAMP questions for a real model, "
                        "100-150-token word salad for a random one)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="135m",
                        help="the random model's shape without --model (tiny: quick checks)")
    parser.add_argument("--prompts-per-step", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--lora-scale", type=float, default=20.0)
    parser.add_argument("--lora-layers", type=int, default=-1)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--microbatch-rows", type=int, help="ours' loss microbatch rows "
                        "(default: --prompts-per-step, the peer's fixed loss microbatch)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per side")
    parser.add_argument("--stop-at-eos", action="store_true", help="stop completions at EOS "
                        "(default: every completion runs --max-new-tokens on both sides)")
    parser.add_argument("--out", default="results/bench_peer.json")
    args = parser.parse_args()
    if args.repeats < 1:
        fail(f"--repeats must be at least 1, not {args.repeats}")
    if args.model and not (Path(args.model) / "config.json").is_file():
        fail(f"--model {args.model}: no mlx-lm model directory (no config.json)")
    if not args.out.endswith(".json"):
        fail(f"--out {args.out} must end in .json (the markdown goes beside it)")
    return args


def train_config(args, model: str, out: str) -> TrainConfig:
    """Our side's settings; a bad value stops here in one line, before any model work."""
    try:
        cfg = TrainConfig(model=model, algo="grpo", steps=args.repeats + 1, out=out,
                          prompts_per_step=args.prompts_per_step, group_size=args.group_size,
                          max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          lora_rank=args.lora_rank, lora_scale=args.lora_scale,
                          lora_layers=args.lora_layers, lr=args.lr, beta=0.0, warmup_steps=0,
                          microbatch_rows=(args.prompts_per_step if args.microbatch_rows is None
                                           else args.microbatch_rows))
        cfg.validate()
    except ConfigError as exc:
        fail(str(exc))
    return cfg


def examples_for(args, tokenizer, task) -> list:
    if args.model:
        questions = [e.question for e in load_task("svamp").train[:args.prompts_per_step]]
    else:
        questions = questions_of_length(tokenizer, task, args.prompts_per_step, 100, 150)
    return [Example(q, "0") for q in questions]


def main():
    args = parse_args()
    command = "python scripts/bench_peer.py " + shlex.join(sys.argv[1:])
    console = Console(width=max(Console().width, 120))  # the table's columns, unsqueezed
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cfg = train_config(args, args.model or str(tmp / "model"), str(tmp / "ours"))
        if not args.model:
            build_toy_model(tmp / "model", **SHAPES[args.shape])
        described = (f"{Path(args.model).name} on SVAMP's first {args.prompts_per_step} "
                     f"training questions" if args.model else
                     f"a random {args.shape}-shaped Qwen2 model, 100-150-token prompts")
        described += (f", B={args.prompts_per_step} prompts x G={args.group_size}, "
                      f"{args.max_new_tokens} new tokens, LoRA rank {args.lora_rank}")
        mx.random.seed(0)
        ours = setup_ours(cfg, args)
        prompt_ids = encode_prompts(ours.tokenizer, [ours.task.prompt(ours.tokenizer, e.question)
                                                     for e in ours.task.train])
        theirs = setup_peer(ours.cfg, ours, prompt_ids, tmp / "peer", args.stop_at_eos)

        console.print(f"warm-up: {described}")
        lora_parameters = warm_up(ours, theirs)
        resident = {"ours": resident_bytes(ours.model, ours.optimizer),
                    "mlx-lm-lora": resident_bytes(theirs.model, theirs.optimizer)}
        runs = {"ours": [], "mlx-lm-lora": []}
        for repeat in range(args.repeats):
            mine = run_ours(ours, repeat + 1, resident["ours"])
            other = run_peer(theirs, resident["mlx-lm-lora"])
            check_equal_work(mine, other, args)
            runs["ours"].append(mine)
            runs["mlx-lm-lora"].append(other)
            console.print(f"repeat {repeat + 1}/{args.repeats}: ours {mine.step_s:.2f} s, "
                          f"mlx-lm-lora {other.step_s:.2f} s")

    median = {side: median_run(r) for side, r in runs.items()}
    ratio = ratios(median["ours"], median["mlx-lm-lora"])
    if median["ours"].loss_tokens != median["mlx-lm-lora"].loss_tokens:
        console.print("note: the sides' loss tokens differ: ours leaves out groups whose "
                      "rewards are all equal (no signal), the peer scores them at advantage 0")
    print_table(console, f"One GRPO step: {described} (median of {args.repeats})", SIDE_HEADER,
                side_rows(median["ours"], median["mlx-lm-lora"]) + ratio_rows(ratio),
                left=("side",))
    report = {"command": command, "args": vars(args), "versions": versions(),
              "lora_parameters": lora_parameters,
              "resident_gb": {k: v / 1e9 for k, v in resident.items()},
              "mapping": mapping(args, ours.cfg.microbatch_rows),
              "median": {side: asdict(r) for side, r in median.items()}, "ratios": ratio,
              "runs": {side: [asdict(r) for r in rs] for side, rs in runs.items()}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    write_markdown(out.with_suffix(".md"), command, described, report)
    console.print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
