import json

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map
import numpy as np
import pytest
from typer.testing import CliRunner

from mlx_tokenrl import trainer
from mlx_tokenrl.config import ConfigError, TrainConfig
from mlx_tokenrl.trainer import train
from tokenrl_cli.main import app

@pytest.fixture(scope="module")
def dense_task(dense_files):
    return {"task": "jsonl", "data": str(dense_files / "data.jsonl"),
            "reward_fn": f"{dense_files / 'reward.py'}:digits"}


def config(model_dir, dense_task, out, **kw):
    base = dict(model=str(model_dir), out=str(out), prompts_per_step=4, group_size=8,
                max_new_tokens=16, temperature=1.0, lr=3e-3, warmup_steps=0, sgrpo_alpha=4,
                sgrpo_k=8, save_every=5, **dense_task)
    return TrainConfig(**{**base, **kw})


def rewards(run_dir):
    return [json.loads(line)["reward_mean"] for line in open(run_dir / "metrics.jsonl")]


# T-SPMO's signal is sparser (only branch points: here mostly the first token; this dense
# reward never reaches 1, so nothing is replayed), so it gets a larger step size and more
# steps to show the same rise: at 40 steps it rose on 1 of seeds 0-3 (with either sampler),
# at 60 on all four (last 5 steps 0.52-0.92, from 0.01-0.02).
@pytest.mark.parametrize("algo, steps, lr", [("grpo", 30, 3e-3), ("s-grpo", 30, 3e-3),
                                             ("t-spmo", 60, 1e-2)])
def test_each_algorithm_learns_a_dense_reward(tiny_model_dir, dense_task, tmp_path, algo, steps, lr):
    run = train(config(tiny_model_dir, dense_task, tmp_path / algo, algo=algo, steps=steps, lr=lr))
    curve = rewards(run)
    assert len(curve) == steps
    first, last = np.mean(curve[:5]), np.mean(curve[-5:])
    assert last > first + 0.2, (algo, curve)


def adapters(run_dir):
    return mx.load(str(run_dir / "adapters.safetensors"))


def test_resume_continues_exactly(tiny_model_dir, dense_task, tmp_path):
    straight = train(config(tiny_model_dir, dense_task, tmp_path / "a", steps=6, save_every=3,
                            algo="t-spmo"))
    interrupted = config(tiny_model_dir, dense_task, tmp_path / "b", steps=6, save_every=5,
                         algo="t-spmo")

    def ctrl_c_at_step_3(metrics):
        if metrics["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(interrupted, on_step=ctrl_c_at_step_3)
    assert (tmp_path / "b" / "checkpoints" / "step-000003").is_dir()  # Ctrl-C saved
    train(interrupted, resume=True)
    a, b = adapters(straight), adapters(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.array(a[k]), np.array(b[k]))
    assert rewards(straight) == rewards(tmp_path / "b")
    assert any(float(mx.abs(v).max()) > 0 for k, v in a.items() if k.endswith("lora_b"))


def test_a_failure_late_in_a_step_does_not_checkpoint_its_update(tiny_model_dir, dense_task,
                                                                  tmp_path, monkeypatch):
    """A Ctrl-C (or a dead peer) in the step's last collective must leave the previous step's
    state in the checkpoint: resuming then equals a straight run."""
    straight = train(config(tiny_model_dir, dense_task, tmp_path / "a", steps=3, algo="grpo"))
    real = trainer.reward_means

    def ctrl_c_in_step_2(world, sums, samples, step):
        if step == 1:
            raise KeyboardInterrupt
        return real(world, sums, samples, step)

    monkeypatch.setattr(trainer, "reward_means", ctrl_c_in_step_2)
    broken = config(tiny_model_dir, dense_task, tmp_path / "b", steps=3, algo="grpo")
    with pytest.raises(KeyboardInterrupt):
        train(broken)
    assert (tmp_path / "b" / "checkpoints" / "latest").read_text() == "step-000001"
    monkeypatch.setattr(trainer, "reward_means", real)
    train(broken, resume=True)
    a, b = adapters(straight), adapters(tmp_path / "b")
    for k in a:
        np.testing.assert_array_equal(np.array(a[k]), np.array(b[k]))


def test_a_new_run_refuses_a_directory_with_checkpoints(tiny_model_dir, dense_task, tmp_path):
    cfg = config(tiny_model_dir, dense_task, tmp_path / "run", steps=1, algo="grpo")
    train(cfg)
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match="--resume"):
        train(cfg)
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == before


def cli_train(*args):
    return CliRunner().invoke(app, ["train", *map(str, args)])


def weights_eval(model, *args, **kwargs):
    """An evaluation that reads the adapter (its weights' sum): two of them agree exactly
    when they evaluated the same weights."""
    total = sum(float(mx.sum(v)) for _, v in tree_flatten(model.trainable_parameters()))
    return {"accuracy": total, "format_rate": 1.0}


def evaluations(run_dir):
    return [(m["step"], m.get("eval_accuracy"), m.get("eval_format_rate"))
            for m in map(json.loads, open(run_dir / "metrics.jsonl"))]


@pytest.mark.parametrize("steps", [4, 2])  # the stopped evaluation: mid-run, the last step's
def test_a_resume_runs_the_evaluation_a_stop_cut_short(tiny_model_dir, dense_task, tmp_path,
                                                       monkeypatch, steps):
    """Ctrl-C in step 2's evaluation saves step 2 without it; `train --resume` evaluates
    step 2's adapter first (also when no step is left), as the uninterrupted run did."""
    settings = dict(steps=steps, eval_every=2, eval_limit=1, save_every=5, algo="grpo")
    monkeypatch.setattr(trainer, "run_eval", weights_eval)
    straight = train(config(tiny_model_dir, dense_task, tmp_path / "a", **settings))

    def ctrl_c_once(*args, **kwargs):
        monkeypatch.setattr(trainer, "run_eval", weights_eval)
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "run_eval", ctrl_c_once)
    stopped = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        train(config(tiny_model_dir, dense_task, stopped, **settings))
    assert evaluations(stopped) == [(1, None, None), (2, None, None)]
    result = cli_train("--resume", stopped)
    assert result.exit_code == 0, result.output
    assert evaluations(stopped) == evaluations(straight)
    assert all(accuracy is not None for step, accuracy, _ in evaluations(straight) if step % 2 == 0)
    assert any(line.startswith("step 2: ") and " acc " in line for line in result.output.splitlines())
    # evaluated, the finished run is left as it is
    files = snapshot(stopped)
    result = cli_train("--resume", stopped)
    assert f"already at step {steps} of {steps}" in result.output
    assert snapshot(stopped) == files


def test_training_on_one_file_for_both_splits_warns_and_eval_of_a_file_does_not(
        tiny_model_dir, dense_task, tmp_path):
    from mlx_tokenrl.messages import warn_once

    warn_once.cache_clear()  # once per process: earlier tests trained on this file too
    data = ["custom", "--data", dense_task["data"], "--reward-fn", dense_task["reward_fn"],
            "--model", tiny_model_dir]
    result = cli_train(*data, "--steps", 1, "--prompts-per-step", 2, "--group-size", 2,
                       "--max-new-tokens", 2, "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    warning = "one file serves as both train and test split"
    assert warning in " ".join(result.stderr.split())
    result = CliRunner().invoke(app, ["eval", *map(str, data), "--limit", 1, "--max-new-tokens",
                                      1, "--out", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    assert warning not in " ".join(result.stderr.split())


def test_ctrl_c_in_the_first_step_does_not_promise_a_checkpoint(tiny_model_dir, dense_task,
                                                                 tmp_path, monkeypatch):
    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "run_step", ctrl_c)
    result = cli_train(dense_task["task"], "--data", dense_task["data"], "--reward-fn",
                       dense_task["reward_fn"], "--model", tiny_model_dir, "--steps", 3,
                       "--prompts-per-step", 2, "--group-size", 4, "--max-new-tokens", 8,
                       "--out", tmp_path / "run")
    assert result.exit_code == 130
    assert "no checkpoint to continue from" in result.output
    assert "saved" not in result.output and "--resume" not in result.output


def ctrl_c_in_step(monkeypatch, step: int):
    """Ctrl-C in the 1-based `step` (run_step is given the 0-based index last); returns the
    real run_step, to put back."""
    real = trainer.run_step

    def interrupted(*args, **kwargs):
        if args[-1] == step - 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "run_step", interrupted)
    return real


def test_resume_keeps_an_extended_step_count(tiny_model_dir, dense_task, tmp_path, monkeypatch):
    """Extend a finished run with --steps, Ctrl-C, then the printed resume command (no
    --steps) trains up to the extended count (it used to show 4/3 and train nothing)."""
    out = tmp_path / "run"
    task = [dense_task["task"], "--data", dense_task["data"], "--reward-fn", dense_task["reward_fn"]]
    result = cli_train(*task, "--model", tiny_model_dir, "--steps", 3, "--prompts-per-step", 2,
                       "--group-size", 4, "--max-new-tokens", 8, "--save-every", 1, "--out", out)
    assert result.exit_code == 0, result.output
    real = ctrl_c_in_step(monkeypatch, 5)
    result = cli_train("--resume", out, "--steps", 6)
    assert result.exit_code == 130 and f"tokenrl-mlx train --resume {out}" in result.output
    assert "checkpoint of step 4 saved" in result.output
    assert json.loads((out / "config.json").read_text())["steps"] == 6
    assert (out / "checkpoints" / "latest").read_text() == "step-000004"
    monkeypatch.setattr(trainer, "run_step", real)
    result = cli_train("--resume", out)
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    assert (out / "checkpoints" / "latest").read_text() == "step-000006"


def test_resume_of_a_finished_run_changes_nothing(tiny_model_dir, dense_task, tmp_path):
    out = train(config(tiny_model_dir, dense_task, tmp_path / "done", steps=2, save_every=1,
                       algo="grpo"))
    files = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}
    result = cli_train("--resume", out)
    assert result.exit_code == 0, result.output
    assert f"{out}: already at step 2 of 2" in result.stdout
    for args, message in [(["--steps", 1], "--steps 1: the run in"),
                          (["--lr", "1e-3", "--max-memory", 4], "(--lr: run 0.003, given 0.001)"),
                          (["--steps", 0], "--steps must be at least 1")]:
        result = cli_train("--resume", out, *args)
        assert result.exit_code == 1 and len(result.stderr.splitlines()) == 1, result.output
        assert message in result.stderr
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()} == files


def snapshot(run_dir):
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in run_dir.rglob("*") if p.is_file()}


def test_the_same_command_plus_resume_continues_the_run(tiny_model_dir, dense_task, tmp_path,
                                                        monkeypatch):
    """As TRL and mlx-lm users do: the command that started the run, plus --resume. Settings
    given again with the run's values (flags and --config file alike) are accepted; a change
    to what is learned is refused naming each setting with both values; how steps run
    (--max-memory) may change."""
    out = tmp_path / "run"
    (tmp_path / "run.yaml").write_text("prompts_per_step: 2\ngroup-size: 4\nlr: 1e-5\n")
    (tmp_path / "changed.yaml").write_text("prompts_per_step: 2\ngroup-size: 4\nlr: 1e-3\n")
    command = [dense_task["task"], "--data", dense_task["data"], "--reward-fn",
               dense_task["reward_fn"], "--model", tiny_model_dir, "--algo", "grpo", "--steps", 3,
               "--lora-keys", "self_attn.q_proj,self_attn.v_proj", "--max-new-tokens", 8,
               "--save-every", 1, "--config", tmp_path / "run.yaml", "--out", out]
    real = ctrl_c_in_step(monkeypatch, 2)
    assert cli_train(*command).exit_code == 130
    monkeypatch.setattr(trainer, "run_step", real)
    before = snapshot(out)
    for change, message in [
            (["--lr", "1e-3"], "(--lr: run 1e-05, given 0.001)"),
            (["--config", tmp_path / "changed.yaml"], "(--lr: run 1e-05, given 0.001)"),
            (["--algo", "t-spmo", "--lora-keys", "self_attn.q_proj"],
             "(--algo: run grpo, given t-spmo; --lora-keys: run self_attn.q_proj,self_attn.v_proj, "
             "given self_attn.q_proj)"),
            (["--out", tmp_path / "elsewhere"], f"(--out: run {out}, given {tmp_path / 'elsewhere'})")]:
        result = cli_train(*command, *change, "--resume", out)
        assert result.exit_code == 1 and len(result.stderr.splitlines()) == 1, result.output
        assert message in result.stderr
    assert snapshot(out) == before
    result = cli_train(*command, "--max-memory", 4, "--resume", out / ".." / "run")  # (its --out)
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1, 2, 3]
    assert json.loads((out / "config.json").read_text())["max_memory"] == 4


def test_resume_may_change_how_steps_run(tiny_model_dir, dense_task, tmp_path):
    """On another Mac a run may need another memory budget; what is learned stays."""
    out = train(config(tiny_model_dir, dense_task, tmp_path / "run", steps=1, save_every=1,
                       algo="grpo", max_memory=8.0))
    result = cli_train("--resume", out, "--steps", 2, "--microbatch-rows", 1, "--no-compile")
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "config.json").read_text())
    assert (saved["steps"], saved["microbatch_rows"], saved["max_memory"], saved["compile"]) == \
        (2, 1, None, False)
    assert saved["lr"] == 3e-3 and len((out / "metrics.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("poison", ["gradients", "loss"])
def test_non_finite_updates_never_reach_the_adapter(tiny_model_dir, dense_task, tmp_path,
                                                    monkeypatch, poison):
    real = trainer.update_grads

    def poisoned(*args):
        loss, grads, ratios = real(*args)
        if poison == "loss":  # finite gradients, but the step's loss says something broke
            return trainer.UpdateGrads(loss * float("nan"), grads, ratios)
        return trainer.UpdateGrads(loss, tree_map(lambda g: g * float("nan"), grads), ratios)

    monkeypatch.setattr(trainer, "update_grads", poisoned)
    run = train(config(tiny_model_dir, dense_task, tmp_path / "nan", steps=3, save_every=3,
                       algo="grpo"))
    metrics = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert all(m["skipped"] for m in metrics if m["selected_tokens"] > 0)
    assert any(m["selected_tokens"] > 0 for m in metrics)
    for k, v in adapters(run).items():
        assert bool(mx.isfinite(v).all())
        if k.endswith("lora_b"):
            assert float(mx.abs(v).max()) == 0.0  # untouched since initialisation


def test_cli_train_then_eval(tiny_model_dir, tmp_path):
    runner = CliRunner()
    out = tmp_path / "run"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("task: multiply\ndigits: 1x1\nsteps: 2\ngroup-size: 4\nprompts_per_step: 2\n"
                   "max_new_tokens: 8\n")
    result = runner.invoke(app, ["train", "--config", str(cfg), "--model", str(tiny_model_dir),
                                 "--out", str(out), "--steps", "3", "--algo", "s-grpo"])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "config.json").read_text())
    assert saved["steps"] == 3 and saved["group_size"] == 4 and saved["algo"] == "s-grpo"
    assert (out / "adapters.safetensors").is_file() and (out / "adapter_config.json").is_file()
    result = runner.invoke(app, ["eval", "multiply", "--digits", "1x1", "--model", str(tiny_model_dir),
                                 "--adapter", str(out), "--limit", "5", "--max-new-tokens", "8"])
    assert result.exit_code == 0, result.output
    assert "accuracy" in result.output and "format rate" in result.output
    summary = json.loads((out / "eval-multiply-test" / "summary.json").read_text())
    assert summary["n"] == 5
    lines = (out / "eval-multiply-test" / "examples.jsonl").read_text().splitlines()
    assert set(json.loads(lines[0])) >= {"prompt", "completion", "extracted", "answer", "correct"}


def test_cli_rejects_bad_input_in_one_line(tiny_model_dir, tmp_path, monkeypatch):
    runner = CliRunner()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a hub id that cannot be fetched
    result = runner.invoke(app, ["eval", "multiply", "--model", "nobody/no-such-model"])
    assert result.exit_code == 1 and "could not load model 'nobody/no-such-model'" in result.output
    assert "local mlx-lm directory" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["train", "multiply", "--model", str(tmp_path / "nope"),
                                 "--out", str(tmp_path / "r")])
    assert result.exit_code == 1 and "the path does not exist" in result.output
    result = runner.invoke(app, ["train", "multiply", "--model", str(tmp_path),
                                 "--out", str(tmp_path / "r")])  # a directory, not a model's
    assert result.exit_code == 1 and "no such mlx-lm model directory" in result.output
    assert "Traceback" not in result.output
    result = runner.invoke(app, ["train", "multiply", "--algo", "ppo", "--model", str(tiny_model_dir),
                                 "--steps", "1", "--group-size", "2", "--max-new-tokens", "4",
                                 "--out", str(tmp_path / "r")])
    assert result.exit_code == 1 and "--algo must be one of" in result.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "answer": "1"}\n{not json\n')
    result = runner.invoke(app, ["eval", "jsonl", "--data", str(bad), "--model", str(tiny_model_dir)])
    assert result.exit_code == 1 and "line 2" in result.output


def test_adapter_loads_in_mlx_lm_and_options_run(tiny_model_dir, dense_task, tmp_path):
    """QLoRA, gradient checkpointing, token norm, KL and no-compile all train and save an
    adapter that mlx-lm itself loads."""
    import mlx_lm

    run = train(config(tiny_model_dir, dense_task, tmp_path / "opts", steps=2, algo="grpo",
                       quantize=8, grad_checkpoint=True, loss_norm="token", beta=0.1,
                       compile=False, lora_layers=1, lora_keys=["self_attn.q_proj"]))
    model, _ = mlx_lm.load(str(tiny_model_dir), adapter_path=str(run))
    names = [k for k, _ in tree_flatten(model.parameters())
             if "lora_a" in k]
    assert names == ["model.layers.1.self_attn.q_proj.lora_a"]
    metrics = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert len(metrics) == 2 and all(np.isfinite(m["loss"]) for m in metrics)


@pytest.mark.parametrize("algo, step_phases", [("grpo", ["rollout", "loss"]),
                                               ("t-spmo", ["rollout", "replay", "loss"])])
def test_live_display_hears_each_phase_of_a_step(tiny_model_dir, tmp_path, algo, step_phases):
    """on_phase names what a long step is doing, before the step's metrics arrive; the
    in-training evaluation counts its examples (from 0: the first batch takes a while)."""
    events = []
    cfg = TrainConfig(task="multiply", digits="1x1", model=str(tiny_model_dir), algo=algo,
                      steps=2, prompts_per_step=2, group_size=4, max_new_tokens=8,
                      eval_every=2, eval_limit=3, warmup_steps=0, out=str(tmp_path / algo))
    train(cfg, on_phase=events.append, on_step=lambda m: events.append(m["step"]))
    assert events == [*step_phases, 1, *step_phases, "eval 0/3", "eval 3/3", 2]


def test_format_reward_is_training_only(tiny_model_dir, dense_task, tmp_path, monkeypatch):
    seen = []
    real = trainer.rollout_and_select

    def spy(model, tokenizer, task, *args, **kw):
        seen.append(task.reward("#### 3", "1"))  # dense reward 1/6, plus the bonus
        return real(model, tokenizer, task, *args, **kw)

    monkeypatch.setattr(trainer, "rollout_and_select", spy)
    train(config(tiny_model_dir, dense_task, tmp_path / "fmt", steps=1, format_reward=0.25))
    assert seen == [pytest.approx(1 / 6 + 0.25)]


PARITY_REWARDS = '''
def right_either_way(text, answer):
    return 1.0 + 0.1 * (len(text) % 2)  # always solved; the bonus alone differs

def bonus_only(text, answer):
    return 0.1 * (len(text) % 2)  # never solved

def right_when_odd(text, answer):
    return float(len(text) % 2)
'''


@pytest.mark.parametrize("reward, solved", [("right_either_way", "all"), ("bonus_only", "none"),
                                            ("right_when_odd", "some")])
def test_solve_metrics_separate_correctness_from_bonus_signal(tiny_model_dir, dense_task, tmp_path,
                                                              reward, solved):
    (tmp_path / "parity.py").write_text(PARITY_REWARDS)
    cfg = config(tiny_model_dir, {**dense_task, "reward_fn": f"{tmp_path / 'parity.py'}:{reward}"},
                 tmp_path / "run", algo="grpo", steps=2)
    steps = [json.loads(line) for line in open(train(cfg) / "metrics.jsonl")]
    assert all(m["signal_fraction"] > 0 for m in steps)
    for m in steps:
        if solved == "all":
            assert (m["solve_rate"], m["solved_signal_fraction"]) == (1.0, 0.0)
        elif solved == "none":
            assert (m["solve_rate"], m["solved_signal_fraction"]) == (0.0, 0.0)
        else:
            assert 0 < m["solve_rate"] < 1
            assert m["solved_signal_fraction"] == m["signal_fraction"]


@pytest.mark.parametrize("command", [["train", "--resume"], ["eval", "multiply", "--adapter-path"]])
@pytest.mark.parametrize("damage", ["{half written", "[1, 2]"])
def test_a_damaged_run_config_is_one_line(tmp_path, command, damage):
    (tmp_path / "config.json").write_text(damage)
    result = CliRunner().invoke(app, [*command, str(tmp_path)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"{tmp_path / 'config.json'}: not a run's config.json" in result.stderr
