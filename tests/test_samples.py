"""samples.jsonl: a step's prompts, completions, rewards and the tokens its loss selected."""

import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from mlx_tokenrl import trainer
from mlx_tokenrl.config import TrainConfig
from mlx_tokenrl.algorithms import t_spmo
from mlx_tokenrl.algorithms.base import GroupRecord
from mlx_tokenrl.trainer import train


def dense_config(model_dir, dense_files, out, **kw):
    base = dict(model=str(model_dir), out=str(out), task="jsonl",
                data=str(dense_files / "data.jsonl"),
                reward_fn=f"{dense_files / 'reward.py'}:digits",
                prompts_per_step=4, group_size=8, max_new_tokens=8, temperature=1.0, lr=3e-3,
                warmup_steps=0, save_every=5, samples_every=1)
    return TrainConfig(**{**base, **kw})


def digits(text):  # conftest's dense reward, by hand
    return sum(ch.isdigit() for ch in text) / max(len(text), 1)


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


def groups_of(records):
    """{(step, group): its records in row order}."""
    out = {}
    for record in records:
        out.setdefault((record["step"], record["group"]), []).append(record)
    return {key: sorted(rows, key=lambda r: r["row"]) for key, rows in out.items()}


def test_tspmo_samples_show_the_steps_completions_rewards_and_selection(
        tiny_model_dir, dense_files, tmp_path):
    cfg = dense_config(tiny_model_dir, dense_files, tmp_path / "run", algo="t-spmo", steps=2,
                       samples_count=4)  # every prompt of the step
    run = train(cfg)
    records = read_jsonl(run / "samples.jsonl")
    metrics = read_jsonl(run / "metrics.jsonl")
    questions = {json.loads(line)["prompt"] for line in open(dense_files / "data.jsonl")}
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    groups = groups_of(records)
    assert sorted(groups) == [(step, g) for step in (1, 2) for g in range(4)]
    selected = 0
    for (step, _), rows in groups.items():
        assert [r["row"] for r in rows] == list(range(8))
        assert len({r["prompt"] for r in rows}) == 1 and rows[0]["prompt"] in questions
        assert all(r["reward"] == pytest.approx(digits(r["completion"])) for r in rows)
        tokens, rewards = [r["tokens"] for r in rows], [r["reward"] for r in rows]
        # By hand: the selection of this group from its logged completions. Fewer pairs than
        # --tspmo-max-pairs, so no random subset is drawn and any rng gives the same pairs.
        pairs = list(t_spmo.select(GroupRecord([], tokens, rewards), cfg,
                                   np.random.default_rng(0)))
        assert len(pairs) < cfg.tspmo_max_pairs
        for row, record in enumerate(rows):
            expected = sorted((pos, adv) for r, pos, adv in pairs if r == row)
            logged = [(s["position"], s["advantage"]) for s in record["selected"]]
            assert [p for p, _ in logged] == [p for p, _ in expected], (step, row)
            assert [a for _, a in logged] == pytest.approx([a for _, a in expected])
            assert [s["token"] for s in record["selected"]] == [
                tokenizer.decode([record["tokens"][p]]) for p, _ in expected]
            selected += len(expected)
    assert selected > 0
    for m in metrics:  # these are the step's own rollouts (all of its completions)
        step_rewards = [r["reward"] for r in records if r["step"] == m["step"]]
        assert np.mean(step_rewards) == pytest.approx(m["reward_mean"])


def crash_after(step, monkeypatch):
    """A kill right after `step` finished: no checkpoint past the last regular one."""
    real_save = trainer.save_checkpoint

    def save_until(run_dir, done, *args):
        if done < step:
            real_save(run_dir, done, *args)

    def stop(metrics):
        if metrics["step"] == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "save_checkpoint", save_until)
    return stop


def test_resume_redoes_samples_after_the_checkpoint_without_duplicates(
        tiny_model_dir, dense_files, tmp_path, monkeypatch):
    straight = train(dense_config(tiny_model_dir, dense_files, tmp_path / "a", algo="grpo",
                                  steps=4, save_every=2, samples_every=2, samples_count=2))
    cfg = dense_config(tiny_model_dir, dense_files, tmp_path / "b", algo="grpo", steps=4,
                       save_every=2, samples_every=2, samples_count=2)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "samples.jsonl").write_text('{"step": 1, "prompt": "an older run"}\n')
    with monkeypatch.context() as patch:
        with pytest.raises(KeyboardInterrupt):
            train(cfg, on_step=crash_after(3, patch))
    assert (tmp_path / "b" / "checkpoints" / "step-000002").is_dir()
    assert not (tmp_path / "b" / "checkpoints" / "step-000003").exists()
    # Samples are due on steps 1, 2 and 4: step 3's crash left none to trim, so add a line
    # as a kill in the middle of step 4's sampling would have.
    with open(tmp_path / "b" / "samples.jsonl", "a") as f:
        f.write('{"step": 4, "prompt": "cut short"}\n{"step": 4, "pro')
    train(cfg, resume=True)
    resumed = read_jsonl(tmp_path / "b" / "samples.jsonl")
    reference = read_jsonl(straight / "samples.jsonl")
    assert [r["step"] for r in resumed] == [1] * 16 + [2] * 16 + [4] * 16
    assert resumed == reference
    # GRPO selects every token of a completion, with its group advantage (by hand).
    for rows in groups_of(resumed).values():
        rewards = np.array([r["reward"] for r in rows])
        advantages = (rewards - rewards.mean()) / (rewards.std() + 1e-4)
        for record, advantage in zip(rows, advantages):
            chosen = [] if np.ptp(rewards) == 0 else list(range(len(record["tokens"])))
            assert [s["position"] for s in record["selected"]] == chosen
            assert [s["advantage"] for s in record["selected"]] == pytest.approx(
                [advantage] * len(chosen))


def test_samples_every_0_writes_none(tiny_model_dir, dense_files, tmp_path):
    run = train(dense_config(tiny_model_dir, dense_files, tmp_path / "run", algo="grpo", steps=1,
                             samples_every=0))
    assert not (run / "samples.jsonl").exists()
