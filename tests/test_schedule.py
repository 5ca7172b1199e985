"""The learning-rate schedule: step 1 learns, the cosine ends at its floor."""

import json
import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_tokenrl import trainer
from mlx_tokenrl.config import TrainConfig


def test_warmup_starts_above_zero_and_cosine_ends_at_the_floor():
    peak, floor = 1e-3, 1e-4
    lr = trainer.warmup_cosine(peak, steps=10, warmup=2, floor=floor)
    rates = [float(lr(i)) for i in range(10)]
    # hand values: warmup peak * (i + 1) / 2, then cos over the 8 remaining steps
    assert rates[0] == pytest.approx(5e-4) and rates[1] == pytest.approx(peak)
    for i in range(2, 10):
        expected = floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * (i - 1) / 8))
        assert rates[i] == pytest.approx(expected, rel=1e-5)
    assert rates[-1] == pytest.approx(floor, rel=1e-5)
    assert all(a >= b for a, b in zip(rates[1:], rates[2:]))


def test_without_warmup_the_first_step_is_just_under_the_peak():
    lr = trainer.warmup_cosine(1.0, steps=4, warmup=0, floor=0.1)
    assert [float(lr(i)) for i in range(4)] == pytest.approx(
        [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(1, 5)], rel=1e-5)


def test_the_update_uses_the_rate_of_its_training_step(lora_model):
    """A step without signal applies no update; the schedule must still move on."""
    cfg = TrainConfig(lr=1e-3, steps=10, warmup_steps=2)
    optimizer = trainer.make_optimizer(cfg)
    grads = trainer.zero_grads(lora_model)
    trainer.apply_update(lora_model, optimizer, grads, cfg.grad_clip, step=6)
    assert float(optimizer.learning_rate) == pytest.approx(float(trainer.lr_schedule(cfg)(6)))


def test_short_runs_warn_that_warmup_never_finishes(capsys):
    trainer.make_optimizer(TrainConfig(steps=3, warmup_steps=5))
    assert "warning: --steps 3 < --warmup-steps 5" in capsys.readouterr().err


def test_the_first_step_changes_the_adapter(tiny_model_dir, dense_files, tmp_path):
    cfg = TrainConfig(model=str(tiny_model_dir), out=str(tmp_path / "run"), task="jsonl",
                      data=str(dense_files / "data.jsonl"),
                      reward_fn=f"{dense_files / 'reward.py'}:digits", algo="grpo", steps=1,
                      warmup_steps=5, prompts_per_step=4, group_size=8, max_new_tokens=16,
                      temperature=1.0, lr=1e-3)
    trainer.train(cfg)
    metrics = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert metrics["lr"] == pytest.approx(1e-3 / 5)
    assert not metrics["skipped"] and metrics["selected_tokens"] > 0
    adapter = mx.load(str(tmp_path / "run" / "adapters.safetensors"))
    lora_b = [v for k, v in adapter.items() if k.endswith("lora_b")]
    assert lora_b and max(float(np.abs(np.array(v)).max()) for v in lora_b) > 0
