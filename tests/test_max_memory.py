"""--max-memory: the loss's microbatch rows (and gradient checkpointing) are picked from its
measured peak, so the loss+grad peak that metrics.jsonl logs stays under the budget; a
budget that not even one row fits stops the run at start, in one line."""

import json
from types import SimpleNamespace

import mlx.core as mx
import pytest
from mlx_lm.models import qwen2
from typer.testing import CliRunner

from mlx_tokenrl import memory, trainer
from mlx_tokenrl.config import TrainConfig
from mlx_tokenrl.loss import LossRow, make_loss_and_grad
from mlx_tokenrl.models import add_lora, load_model, lora_config
from mlx_tokenrl.tasks import task_from_config
from tokenrl_cli.main import app

MB = 1e-3  # GB


def above_held(mb: float) -> float:
    """A budget in GB: `mb` over what this test process holds already (other tests' arrays
    count in MLX's peak too)."""
    return mx.get_active_memory() / 1e9 + mb * MB


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir, dense_files):
    """The tiny model, with a dense reward so that every group has a loss."""
    return tiny_model_dir, {"task": "jsonl", "data": str(dense_files / "data.jsonl"),
                            "reward_fn": f"{dense_files / 'reward.py'}:digits"}


def config(model_dir, out, **kw):
    path, task = model_dir
    return TrainConfig(**{**dict(model=str(path), out=str(out), algo="grpo", steps=2,
                                 prompts_per_step=4, group_size=8, max_new_tokens=16,
                                 temperature=1.0, warmup_steps=0, save_every=5, **task), **kw})


@pytest.fixture
def planned(monkeypatch):
    """The rows each step's microbatches were made with."""
    rows = []
    make = trainer.make_microbatches
    monkeypatch.setattr(trainer, "make_microbatches",
                        lambda loss_rows, triples, weights, n: rows.append(n) or
                        make(loss_rows, triples, weights, n))
    return rows


@pytest.fixture
def block_call(monkeypatch):
    """The tiny model's block class; gradient checkpointing (patched into it) is undone
    after the test."""
    monkeypatch.setattr(qwen2.TransformerBlock, "__call__", qwen2.TransformerBlock.__call__)
    return qwen2.TransformerBlock


@pytest.mark.parametrize("updates", [1, 3])
@pytest.mark.parametrize("budget_mb, rows", [(6, {1}), (70, {8, 16})])
def test_loss_peak_stays_under_the_budget(model_dir, tmp_path, planned, block_call,
                                          budget_mb, rows, updates):
    """On the tiny model 6 MB over what was held before fits one row per microbatch, 70 MB
    eight or sixteen (probed at 1.5x the step's lengths, memory.HEADROOM; measured peaks
    vary a little from run to run). Each step's logged loss peak is under the budget; several
    updates per rollout batch reuse the step's microbatches."""
    budget = above_held(budget_mb)
    out = trainer.train(config(model_dir, tmp_path / "run", max_memory=budget,
                               updates_per_rollout=updates))
    peaks = [json.loads(line)["loss_peak_memory_gb"] for line in open(out / "metrics.jsonl")]
    assert len(peaks) == 2 and max(peaks) <= budget
    assert planned[0] == planned[1] and planned[0] in rows
    assert not getattr(block_call.__call__, "checkpointed", False)  # one row fits without


@pytest.mark.parametrize("algo", ["grpo", "t-spmo"])
def test_the_start_up_probe_plans_every_step(model_dir, tmp_path, planned, monkeypatch, algo):
    """With room for every row of a step, the one-row probe of the start-up check (the
    longest prompt, with T-SPMO's replayed prefixes, and --max-new-tokens) is the only one:
    no step probes, and each step's rows are all in one microbatch."""
    probes = []
    probe = memory.probe_peak
    monkeypatch.setattr(memory, "probe_peak",
                        lambda f, shape, rows: probes.append(rows) or probe(f, shape, rows))
    counted = []
    make = trainer.make_microbatches
    monkeypatch.setattr(trainer, "make_microbatches", lambda loss_rows, triples, weights, n:
                        counted.append(memory.step_rows(triples)) or
                        make(loss_rows, triples, weights, n))
    trainer.train(config(model_dir, tmp_path / "run", algo=algo, max_memory=above_held(500)))
    assert probes == [1]
    assert planned == counted and len(planned) == 2


def test_the_start_up_probe_holds_the_longest_replay_context(model_dir, tmp_path, monkeypatch):
    """A T-SPMO replay row's context is a prompt and a completion prefix: the start-up probe
    (which plans every step) is that much longer with replay, and only with it."""
    shapes = {}
    model, tokenizer = load_model(str(model_dir[0]))
    for algo, replay in (("grpo", 2), ("t-spmo", 0), ("t-spmo", 2)):
        monkeypatch.setattr(memory, "probe_peak",
                            lambda f, shape, rows: shapes.setdefault((algo, replay), shape) and 0)
        cfg = config(model_dir, tmp_path, algo=algo, tspmo_replay=replay, max_new_tokens=64)
        memory.check_run_fits(model, tokenizer, task_from_config(cfg), cfg)
    plain = shapes["grpo", 2]
    assert shapes["t-spmo", 0] == plain and plain.context == 64  # the prompts are short
    assert shapes["t-spmo", 2] == memory.RowShape(plain.context + 64, plain.crop)


def test_checkpointing_is_turned_on_when_one_row_needs_it(model_dir, tmp_path, planned,
                                                           block_call):
    """3 MB: one row needs about 3.6 MB as it is and 2.6 MB with gradient checkpointing."""
    budget = above_held(3)
    out = trainer.train(config(model_dir, tmp_path / "run", max_memory=budget))
    assert getattr(block_call.__call__, "checkpointed", False)
    peaks = [json.loads(line)["loss_peak_memory_gb"] for line in open(out / "metrics.jsonl")]
    assert max(peaks) <= budget and planned == [1, 1]


def test_an_impossible_budget_stops_at_start_in_one_line(tiny_model_dir, tmp_path, block_call):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "multiply", "--digits", "1x1", "--model",
                                      str(tiny_model_dir), "--max-memory", "0.0005",
                                      "--steps", "1", "--prompts-per-step", "1",
                                      "--max-new-tokens", "8", "--out", str(out)])
    assert result.exit_code not in (0, 70), result.output
    errors = result.stderr.splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: --max-memory 0.0005 GB is too small")
    assert "even with gradient checkpointing" in errors[0]
    assert not out.exists()


@pytest.mark.parametrize("args, message", [
    (["--max-memory", "0"], "--max-memory must be greater than 0"),
    (["--max-memory", "2", "--microbatch-rows", "4"], "--max-memory and --microbatch-rows both"),
])
def test_bad_memory_settings_are_one_line(tiny_model_dir, tmp_path, args, message):
    result = CliRunner().invoke(app, ["train", "multiply", "--model", str(tiny_model_dir),
                                      "--steps", "1", "--prompts-per-step", "1", "--group-size",
                                      "2", "--max-new-tokens", "4", "--out",
                                      str(tmp_path / "run"), *args])
    assert result.exit_code not in (0, 70)
    errors = result.stderr.splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: ") and message in errors[0]


def test_explicit_rows_override_the_plan(model_dir, tmp_path, planned, block_call):
    trainer.train(config(model_dir, tmp_path / "run", steps=1, microbatch_rows=3))
    assert planned == [3]


def same_rows(count, context, completion):
    """A step of `count` rows alike (their last token selected): loss rows and triples."""
    rows = [LossRow([1] * context, [2 + i] * completion) for i in range(count)]
    return rows, [(i, completion - 1, 1.0) for i in range(count)]


def test_rows_are_replanned_only_for_longer_rows(tiny_model_dir, monkeypatch):
    model, _ = load_model(str(tiny_model_dir))
    add_lora(model, lora_config(rank=4))
    mx.eval(model.parameters())
    loss_and_grad = make_loss_and_grad(model)
    probed = []
    probe = memory.probe_peak
    monkeypatch.setattr(memory, "probe_peak",
                        lambda f, shape, rows: probed.append(shape) or probe(f, shape, rows))

    def rows_for(context, completion):
        return memory.planned_rows(model, loss_and_grad, *same_rows(16, context, completion),
                                   int(60e6), max_new_tokens=256)

    assert rows_for(30, 40) >= 4
    assert set(probed) == {memory.RowShape(64, 64)}  # 1.5x the step's, rounded up to 64
    assert rows_for(60, 10) >= 4 and len(set(probed)) == 1  # within what was probed
    long_rows = rows_for(100, 100)
    assert memory.RowShape(192, 192) in probed
    assert rows_for(150, 140) == long_rows and len(set(probed)) == 2  # the headroom covers it
    assert 1 <= long_rows <= rows_for(30, 40)


class LinearCost:
    """A fake probe_peak: `held` + `fixed` + `per_row` bytes a row; records what it probed."""

    def __init__(self, monkeypatch, held=1000, fixed=0, per_row=100):
        self.held, self.fixed, self.per_row, self.probes = held, fixed, per_row, []
        monkeypatch.setattr(memory, "probe_peak", self)
        monkeypatch.setattr(memory.mx, "get_active_memory", lambda: held)

    def __call__(self, loss_and_grad, shape, rows):
        self.probes.append(rows)
        return self.held + self.fixed + self.per_row * rows


@pytest.mark.parametrize("fixed, room, rows", [
    (0, 200, 2), (0, 399, 2), (0, 400, 4), (0, 799, 4), (0, 800, 8), (0, 10_000, 32),
    # fixed costs: 150 and 250 for one and two rows, so 125 a row (errs high: 100 is right)
    (50, 499, 2), (50, 500, 4), (50, 1000, 8)])
def test_rows_come_from_probes_of_one_and_two_rows(monkeypatch, fixed, room, rows):
    """Rows from the line fitted on one and two rows (hand-computed: `room` over what is held
    fits `room / per_row` rows, per_row 100 or 125), a power of two, without probing more
    rows."""
    cost = LinearCost(monkeypatch, fixed=fixed)
    step = same_rows(64, 10, 10)
    assert memory.planned_rows(SimpleNamespace(), None, *step, cost.held + room,
                               max_new_tokens=64) == rows
    assert cost.probes == [1, 2]


def test_never_more_rows_than_the_step_has(monkeypatch):
    """A T-SPMO-like step of three rows, with room for 32: one microbatch of three rows."""
    cost = LinearCost(monkeypatch)
    model = SimpleNamespace()  # keeps the plans
    assert memory.planned_rows(model, None, *same_rows(3, 10, 10), 10**9,
                               max_new_tokens=64) == 3
    # The plan is kept for longer steps of these lengths; a row selected twice is one row.
    rows, triples = same_rows(40, 10, 10)
    assert memory.planned_rows(model, None, rows, triples, 10**9, max_new_tokens=64) == 32
    assert memory.planned_rows(model, None, rows, triples[:5] + [(0, 3, 1.0)], 10**9,
                               max_new_tokens=64) == 5
    assert cost.probes == [1, 2]


def test_two_rows_are_probed_only_when_they_surely_fit(monkeypatch):
    """One row took 150 over what was held: two are not probed unless 300 fit (a probe is
    the process's memory too, and --max-memory bounds it)."""
    cost = LinearCost(monkeypatch, fixed=50)
    assert memory.planned_rows(SimpleNamespace(), None, *same_rows(8, 10, 10), cost.held + 299,
                               max_new_tokens=64) == 1
    assert cost.probes == [1]


def test_a_plan_is_probed_once_even_when_the_headroom_does_not_fit(monkeypatch):
    """A step near the longest rows a run can hold: the crop's headroom stops at
    --max-new-tokens, and when one row with headroom is over the budget, the step's own
    lengths are probed, so later steps of that length reuse the plan (a refused plan would be
    probed again at every step, ~100 s each on the 0.5B)."""
    held = 1000
    probes = []

    def cost(loss_and_grad, shape, rows):  # grows with every dimension
        probes.append((shape, rows))
        return held + rows * shape.context * shape.crop // 64

    monkeypatch.setattr(memory, "probe_peak", cost)
    monkeypatch.setattr(memory.mx, "get_active_memory", lambda: held)
    budget = held + 128 * 128 // 64  # one row of 128 x 128 fits, one of 192 x 128 does not
    rows, model = [LossRow([1] * 100, [2] * 128)], SimpleNamespace()  # keeps the plans
    for _ in range(3):
        assert memory.planned_rows(model, None, rows, [(0, 127, 1.0)], budget,
                                   max_new_tokens=128) == 1
    shapes = {shape for shape, _ in probes}
    assert shapes == {memory.RowShape(192, 128), memory.RowShape(128, 128)}
    assert len(probes) == 2  # one row each, once
    probes.clear()  # short rows whose headroom stays in their bucket, over the budget
    short = [LossRow([1] * 30, [2] * 20)]
    memory.planned_rows(SimpleNamespace(), None, short, [(0, 19, 1.0)], held, max_new_tokens=128)
    assert probes == [(memory.RowShape(64, 64), 1)]


def test_reported_peak_includes_the_probes(model_dir, tmp_path, monkeypatch, block_call):
    """A probe that allocates 64 MB more than the loss: metrics.jsonl's peak_memory_gb (the
    process's, by MLX's count) holds it, though each step's loss peak (its microbatches')
    does not."""
    extra = 64e6
    make = memory.make_loss_and_grad

    def allocating(*args):
        loss_and_grad = make(*args)

        def call(batch):
            mx.eval(mx.zeros(int(extra) // 4))  # freed at once: only a peak counts it
            return loss_and_grad(batch)
        return call

    monkeypatch.setattr(memory, "make_loss_and_grad", allocating)  # the start-up probe's
    memory.reset_peak()
    held = mx.get_active_memory()
    out = trainer.train(config(model_dir, tmp_path / "run", steps=1, max_memory=above_held(200)))
    step = json.loads(open(out / "metrics.jsonl").readline())
    assert step["loss_peak_memory_gb"] < (held + extra) / 1e9 <= step["peak_memory_gb"]
    assert step["resident_peak_gb"] >= step["peak_memory_gb"] * 0.5  # the OS's count too


def test_a_run_reports_its_own_peak_not_an_earlier_runs(model_dir, tmp_path):
    """compare trains its arms in one process: an arm after a heavier one reports its own."""
    mx.eval(mx.zeros(128_000_000))  # 512 MB, freed at once
    memory.reset_peak()
    assert memory.mlx_peak_bytes() >= 512e6
    out = trainer.train(config(model_dir, tmp_path / "run", steps=1))
    assert json.loads(open(out / "metrics.jsonl").readline())["peak_memory_gb"] < 0.5


def test_a_reset_keeps_the_peak_of_the_process():
    memory.start_run_peak()
    big = mx.zeros(16_000_000)  # 64 MB
    mx.eval(big)
    del big
    memory.reset_peak()
    assert mx.get_peak_memory() < 64e6 <= memory.mlx_peak_bytes()


@pytest.mark.parametrize("platform, factor", [("linux", 1024), ("darwin", 1)])
def test_resident_peak_reads_kilobytes_on_linux_and_bytes_on_macos(monkeypatch, platform,
                                                                   factor):
    resource = pytest.importorskip("resource")
    monkeypatch.setattr(resource, "getrusage", lambda who: SimpleNamespace(ru_maxrss=5000))
    assert memory.resident_peak_bytes(platform) == 5000 * factor


def test_resident_peak_holds_what_was_resident():
    """On this machine's own OS: 200 MB written to are resident, so counted (whatever unit
    the OS gives ru_maxrss in, read right)."""
    pytest.importorskip("resource")
    big = mx.ones(50_000_000)  # 200 MB, every page written
    mx.eval(big)
    assert 200e6 <= memory.resident_peak_bytes() < 1000 * memory.machine_memory_bytes()
    del big


def test_default_budget_is_a_share_of_the_machine():
    assert memory.budget_bytes(None) == int(memory.DEFAULT_SHARE * memory.machine_memory_bytes())
    assert memory.budget_bytes(2.5) == 2_500_000_000
    assert memory.machine_memory_bytes() > 1e9


def test_each_phase_starts_with_no_freed_buffers_kept(model_dir, tmp_path, monkeypatch):
    """MLX keeps freed buffers for reuse (on Metal up to its memory limit). Kept across
    phases, the rollout's would sit beside the loss's peak, so every rollout, loss and
    evaluation starts with none kept."""
    kept = {}
    originals = {name: getattr(trainer, name) for name in
                 ("rollout_and_select", "step_microbatches", "run_eval", "evaluate")}

    def watch(name, when):
        def wrapped(*args, **kwargs):
            if when == "before":
                kept.setdefault(name, []).append(mx.get_cache_memory())
            out = originals[name](*args, **kwargs)
            if when == "after":
                kept.setdefault(name, []).append(mx.get_cache_memory())
            return out
        monkeypatch.setattr(trainer, name, wrapped)

    for name in ("rollout_and_select", "step_microbatches", "run_eval"):
        watch(name, "before")
    watch("evaluate", "after")
    trainer.train(config(model_dir, tmp_path / "run", steps=2, eval_every=1, eval_limit=4))
    assert min(kept.pop("evaluate")) > 0  # phases do leave buffers to give back
    assert kept == {"rollout_and_select": [0, 0], "step_microbatches": [0, 0], "run_eval": [0, 0]}
