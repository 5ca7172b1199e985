"""Data-parallel training: the 2-rank update equals the 1-process one, ranks stay
identical, and a dead or frozen rank (or a bad launch) ends the others with one line.

The launched tests run `mlx.launch -n 2 --backend ring` on 127.0.0.1 (loopback only).
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from loopback import BIN, alive, free_ports, launch_command, launch_env, launched_rank_pids
from mlx_tokenrl import trainer
from mlx_tokenrl.config import ALGOS, TrainConfig
from mlx_tokenrl.distributed import World
from mlx_tokenrl.launch import is_launched, read_hostfile
from mlx_tokenrl.loss import make_loss_and_grad
from mlx_tokenrl.rollout import Completion


# ---- the update: 2 ranks == 1 process on the union ------------------------------------




def fixed_rollouts(num_prompts=5, group_size=4, seed=0):
    """Hand-made groups (prompt tokens, G completions with rewards), as a step would have."""
    rng = np.random.default_rng(seed)
    contexts, groups = [], []
    for p in range(num_prompts):
        contexts.append(rng.integers(3, 300, size=int(rng.integers(3, 9))).tolist())
        rewards = rng.choice([0.0, 0.5, 1.0], size=group_size)
        rewards[0], rewards[1] = 0.0, 1.0  # every group carries signal
        groups.append([Completion(p, rng.integers(3, 300, size=int(rng.integers(2, 14))).tolist(),
                                  False, "", float(r)) for r in rewards])
    # T-SPMO needs shared prefixes to branch on: give completions common openings
    for group in groups:
        for c in group[1:]:
            c.tokens[:1] = group[0].tokens[:1]
        for c in group:  # as a rollout records them, for --algo top-entropy
            c.entropies = rng.random(len(c.tokens)).tolist()
    return contexts, groups


def rank_gradients(model, cfg, contexts, groups, world_size):
    """Every rank's (loss, grads) on its shard, with global normalisers, in one process."""
    step = 7
    shards = []
    for rank in range(world_size):
        positions = trainer.shard(list(range(len(groups))), rank, world_size)
        loss = trainer.LossInput()
        trainer.add_groups(cfg, [groups[p] for p in positions], [contexts[p] for p in positions],
                           [trainer.group_rng(cfg, step, p) for p in positions], loss)
        shards.append((loss, sum(len(groups[p]) for p in positions)))
    totals = trainer.StepTotals(completions=sum(s[1] for s in shards), groups=len(groups),
                                selected=sum(len(s[0].selection) for s in shards))
    loss_and_grad = make_loss_and_grad(model, 0.0, compile=False)
    out = []
    for loss, _ in shards:
        if loss.selection:
            result = trainer.loss_and_grads(model, loss_and_grad, cfg, loss, totals)
            out.append((result.loss, result.grads))
    return out


@pytest.mark.parametrize("norm", ["sequence", "token"])
@pytest.mark.parametrize("algo", ALGOS)
def test_two_rank_gradient_equals_one_process_gradient_on_the_union(lora_model, algo, norm):
    cfg = TrainConfig(algo=algo, loss_norm=norm, group_size=4, sgrpo_alpha=2, sgrpo_k=5,
                      sgrpo_p=0.5, tspmo_max_pairs=6)
    contexts, groups = fixed_rollouts()
    (loss1, grads1), = rank_gradients(lora_model, cfg, contexts, groups, 1)
    per_rank = rank_gradients(lora_model, cfg, contexts, groups, 2)  # 3 + 2 prompts: uneven
    assert len(per_rank) == 2
    # what the all-reduce does: sum the ranks' gradients (each already globally normalised)
    summed = dict(tree_flatten(per_rank[0][1]))
    for k, g in tree_flatten(per_rank[1][1]):
        summed[k] = summed[k] + g
    ref = dict(tree_flatten(grads1))
    assert summed.keys() == ref.keys()
    for k in ref:
        np.testing.assert_allclose(np.array(summed[k]), np.array(ref[k]), atol=1e-5, rtol=0)
    assert max(float(mx.abs(g).max()) for g in ref.values()) > 1e-4
    assert abs(sum(float(l) for l, _ in per_rank) - float(loss1)) < 1e-5


# ---- a whole step on a simulated world: the all-reduce and normalisation arithmetic ------

class SimulatedRanks:
    """`size` ranks of one process, each in a thread of its own, taking turns: only the
    holder of the baton runs (MLX work is never concurrent); at a collective a rank leaves its
    value, passes the baton and waits for the others, and every rank reads all the values."""

    def __init__(self, size: int):
        self.size = size
        self.baton = threading.Lock()
        self.arrived = threading.Barrier(size)
        self.values = [None] * size

    def exchange(self, rank: int, value: np.ndarray) -> list:
        self.values[rank] = value
        self.baton.release()
        self.arrived.wait()  # every rank's value is in
        values = list(self.values)
        self.arrived.wait()  # and read by every rank before the next collective writes
        self.baton.acquire()
        return values

    def run(self, work):
        """work(rank) on every rank; their results, rank by rank."""
        results = [None] * self.size
        failures = []

        def rank_thread(rank):
            with self.baton:
                try:
                    results[rank] = work(rank)
                except BaseException as exc:  # noqa: BLE001  (re-raised below)
                    failures.append(exc)
                    self.arrived.abort()

        threads = [threading.Thread(target=rank_thread, args=(r,)) for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if failures:
            raise failures[0]
        return results


class SimulatedGroup:
    """What World needs of an `mx.distributed.Group`."""

    def __init__(self, ranks: SimulatedRanks, rank: int):
        self.ranks, self._rank = ranks, rank

    def rank(self):
        return self._rank

    def size(self):
        return self.ranks.size


def simulated_all_sum(x, group=None, stream=None):
    """The ring's all-reduce as arithmetic: every rank gets the elementwise sum."""
    mine = np.array(x)
    return mx.array(np.sum(group.ranks.exchange(group.rank(), mine), axis=0).astype(mine.dtype))


def simulated_all_gather(x, group=None, stream=None):
    return mx.array(np.concatenate(group.ranks.exchange(group.rank(), np.array(x))))


def scripted_rollout(model, tokenizer, prompts, group_size, params, seeds, **_):
    """Completions fixed by each prompt's seed (as real ones are), rewarded "1" or "0" at
    random: the same on any rank, with no sampling rounding in the way."""
    completions = []
    for prompt, seed in enumerate(seeds):
        rng = np.random.default_rng(seed)
        opening = rng.integers(3, 300, size=2).tolist()  # shared: T-SPMO has prefixes to branch on
        for row in range(group_size):
            tokens = opening + rng.integers(3, 300, size=int(rng.integers(1, 10))).tolist()
            completions.append(Completion(prompt, tokens, False, str(int(row % 2 or rng.random() < 0.3)),
                                          entropies=rng.random(len(tokens)).tolist()))
    return completions


def fresh_policy(tiny_model_dir):
    """The tiny model with a generic adapter (B non-zero), its loss+grad and its weights."""
    from mlx_tokenrl.models import add_lora, load_model, lora_config

    model, tokenizer = load_model(str(tiny_model_dir))
    mx.random.seed(0)
    add_lora(model, lora_config(rank=4, scale=10.0))
    for _, module in model.named_modules():
        if hasattr(module, "lora_b"):
            module.lora_b = mx.random.normal(module.lora_b.shape) * 0.01
    mx.eval(model.parameters())
    before = dict(tree_flatten(model.trainable_parameters()))
    return model, tokenizer, make_loss_and_grad(model, 0.0, compile=False), before


@pytest.mark.parametrize("updates", [1, 3])
@pytest.mark.parametrize("algo", ALGOS)
def test_a_step_on_simulated_ranks_is_the_one_process_step(tiny_model_dir, monkeypatch, algo,
                                                           updates):
    """run_step on 2 and 3 simulated ranks (World's own reduction code; only the transport
    is simulated) against run_step in one process: the same grad_norm, loss and update on
    every rank. Dividing the summed gradient by the number of ranks, normalising by a rank's
    own counts or skipping the all-reduce each move them by a third or more. With several
    updates per rollout batch, the gradients are summed before each one, and the ratios'
    statistics are gathered over the ranks."""
    import mlx.optimizers as optim

    from mlx_tokenrl.tasks import Example, Task

    monkeypatch.setattr(trainer, "rollout", scripted_rollout)
    monkeypatch.setattr(mx.distributed, "all_sum", simulated_all_sum)
    monkeypatch.setattr(mx.distributed, "all_gather", simulated_all_gather)
    cfg = TrainConfig(task="multiply", algo=algo, prompts_per_step=5, group_size=4, grad_clip=0,
                      microbatch_rows=4, compile=False, sgrpo_alpha=2, sgrpo_k=5, sgrpo_p=0.5,
                      tspmo_max_pairs=6, tspmo_replay=0, updates_per_rollout=updates,
                      clip_epsilon=0.05)
    task = Task("sim", [Example(f"what is {i} + 1?", "1") for i in range(8)], [],
                lambda text, answer: float(text == answer))

    def step_on(world):
        """Step 3 with plain SGD (lr 1, no clipping): the update is the summed gradient
        itself, whose scale AdamW's per-coordinate normalisation would hide. (Several updates
        take smaller steps: each one's rounding would otherwise grow through the next ones'
        forwards far from the start.)"""
        model, tokenizer, loss_and_grad, before = fresh_policy(tiny_model_dir)
        sgd = optim.SGD(learning_rate=1.0 if updates == 1 else 0.1)
        metrics = trainer.run_step(model, tokenizer, task, cfg, world, sgd, loss_and_grad, 2)
        moved = {k: np.array(v - before[k]) for k, v in tree_flatten(model.trainable_parameters())}
        return metrics, moved

    ref, ref_moved = step_on(World(None))
    assert ref["selected_tokens"] > 0 and ref["grad_norm"] > 1e-3
    assert ref["updates"] == updates and (updates == 1) == (ref["ratio_max"] == 1.0)
    scale = max(np.abs(m).max() for m in ref_moved.values())
    for size in (2, 3):
        ranks = SimulatedRanks(size)
        # (models are built rank by rank inside the turns: LoRA's init draws from MLX's seed)
        results = ranks.run(lambda rank: step_on(World(SimulatedGroup(ranks, rank))))
        for metrics, moved in results:
            assert metrics["ranks"] == size
            assert metrics["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4)
            assert metrics["loss"] == pytest.approx(ref["loss"], rel=1e-4, abs=1e-6)
            assert metrics["selected_tokens"] == ref["selected_tokens"]
            assert metrics["updates"] == ref["updates"]
            for key in ("ratio_mean", "ratio_min", "ratio_max", "clip_fraction", "approx_kl"):
                assert metrics[key] == pytest.approx(ref[key], rel=1e-3, abs=1e-6), key
            for k, m in moved.items():
                np.testing.assert_allclose(m, ref_moved[k], rtol=0, atol=1e-4 * scale)


def test_uneven_shards_and_a_batch_smaller_than_the_world():
    shards = [trainer.shard(list(range(5)), r, 2) for r in range(2)]
    assert shards == [[0, 2, 4], [1, 3]]
    fake = World(None)
    fake._size = 3
    with pytest.raises(ValueError, match="smaller than the number of ranks"):
        trainer.check_batch_fits(TrainConfig(prompts_per_step=2), fake)
    trainer.check_batch_fits(TrainConfig(prompts_per_step=3), fake)


# ---- launch setup and stopping with one line, without a launcher -----------------------

def test_the_hostfile_gives_ranks_local_ranks_and_a_summary(tmp_path, monkeypatch):
    for name in ("MLX_HOSTFILE", "MLX_RANK", "OMPI_COMM_WORLD_SIZE", "MLX_JACCL_COORDINATOR",
                 "MLX_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert read_hostfile() is None and not is_launched(None)
    hostfile = tmp_path / "hosts.json"
    monkeypatch.setenv("MLX_HOSTFILE", str(hostfile))
    monkeypatch.setenv("MLX_RANK", "1")
    hostfile.write_text(json.dumps([["10.0.0.1:5000"], ["10.0.0.2:5000"], ["10.0.0.2:5001"]]))
    hosts = read_hostfile()
    assert hosts.ranks == 3 and is_launched(hosts)
    assert [hosts.local_ranks(r) for r in range(3)] == [1, 2, 2]
    assert hosts.summary() == "ring 10.0.0.1:5000, 10.0.0.2:5000, 10.0.0.2:5001"
    hostfile.write_text("")  # what `mlx.launch -n 1` writes: one rank, no group to form
    assert read_hostfile().ranks == 1 and not is_launched(read_hostfile())
    hostfile.write_text("{not json")  # launched all the same: MLX reports the parse error
    broken = read_hostfile()
    assert broken.ranks is None and is_launched(broken) and broken.local_ranks(1) == 1
    assert broken.summary() == f"hostfile {hostfile}"


STOPPING = """
import os, sys, time
from mlx_tokenrl.watchdog import Watchdog, error_line, filter_ring_noise, process_watchdog

error_line.identity, error_line.resume_hint = "rank 1 of 2: ", " (continue later)"
filter_ring_noise()
os.write(2, b"[ring] Socket 5 was closed by the peer\\nkept\\n")
if sys.argv[1] == "thread":
    with Watchdog().guard("the test collective", 1.0):
        time.sleep(30)
else:
    with process_watchdog(30, "never printed"):
        pass
    with process_watchdog(1.0, "could not form the group"):
        time.sleep(30)
"""


@pytest.mark.parametrize("watchdog", ["thread", "process"])
def test_a_passed_deadline_ends_the_rank_with_one_line(watchdog):
    """The collective watchdog (a thread) and the group-forming one (a helper process): past
    the deadline, one error line after the rest of stderr, MLX's [ring] lines dropped."""
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", STOPPING, watchdog], capture_output=True,
                          text=True, timeout=60)
    assert time.monotonic() - t0 < 20
    if watchdog == "thread":
        assert proc.returncode == 75, proc.stderr
        error = ("error: rank 1 of 2: no answer from the other ranks for 1 s during the test "
                 "collective: a rank died, hangs or lost the network; stopping (continue later)")
    else:
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        error = "error: rank 1 of 2: could not form the group"
    assert proc.stderr.splitlines() == ["kept", error]


# ---- real launches on loopback --------------------------------------------------------

@pytest.fixture(scope="module")
def dense(dense_files):
    return dense_files


def train_args(model_dir, dense, out, steps, **extra):
    args = ["train", "jsonl", "--data", str(dense / "data.jsonl"),
            "--reward-fn", f"{dense / 'reward.py'}:digits", "--model", str(model_dir),
            "--out", str(out), "--steps", str(steps), "--prompts-per-step", "3",
            "--group-size", "8", "--max-new-tokens", "16", "--temperature", "1.0",
            "--lr", "3e-3", "--warmup-steps", "0", "--algo", "s-grpo", "--sgrpo-alpha", "4",
            "--sgrpo-k", "8"]
    for k, v in extra.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def launch(command, **extra_env):
    """Two ranks of `command` under mlx.launch on loopback."""
    return subprocess.Popen(launch_command(2, command), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=launch_env(**extra_env))


SPY = """
import sys
import mlx.core as mx
from mlx_tokenrl import trainer
from mlx_tokenrl.checkpoint import adapter_weights

real = trainer.run_step

def run_step(model, tokenizer, task, cfg, world, *args, **kwargs):
    metrics = real(model, tokenizer, task, cfg, world, *args, **kwargs)
    mx.save_safetensors(f"{sys.argv[1]}/rank{world.rank()}-step{metrics['step']}.safetensors",
                        adapter_weights(model))
    return metrics

trainer.run_step = run_step
from tokenrl_cli.main import app
app(sys.argv[2:])
"""


@pytest.mark.slow
@pytest.mark.parametrize("extra", [{}, {"updates_per_rollout": 2}])
def test_launched_two_ranks_match_each_other_and_one_process(tiny_model_dir, dense, tmp_path,
                                                              extra):
    """mlx.launch -n 2 --backend ring: after every step both ranks hold bitwise identical
    adapters; rank 0 alone writes the run; the result is the 1-process run's. With two
    updates per rollout batch, the gradients are summed before each update."""
    (tmp_path / "spy.py").write_text(SPY)
    spy = tmp_path / "adapters"
    spy.mkdir()
    out = tmp_path / "two"
    proc = launch([sys.executable, str(tmp_path / "spy.py"), str(spy),
                   *train_args(tiny_model_dir, dense, out, 3, save_every=3, **extra)])
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "exited with code" not in stderr, stdout + stderr
    for step in (1, 2, 3):
        a = mx.load(str(spy / f"rank0-step{step}.safetensors"))
        b = mx.load(str(spy / f"rank1-step{step}.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            assert np.array_equal(np.array(a[k]), np.array(b[k])), (step, k)
    # one run directory, written once: one checkpoint, 3 metric lines, one progress
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-000003"]
    metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(m["ranks"] == 2 and m["allreduce_bytes"] > 0 for m in metrics)
    # one all-reduce of the same gradient tree per update
    assert len({m["allreduce_bytes"] / m["updates"] for m in metrics}) == 1
    assert stdout.count("adapter written to") == 1
    # the same training in one process: same rewards, same adapter up to float order
    single = tmp_path / "one"
    from typer.testing import CliRunner
    from tokenrl_cli.main import app
    result = CliRunner().invoke(app, train_args(tiny_model_dir, dense, single, 3, save_every=3,
                                                **extra))
    assert result.exit_code == 0, result.output
    ref = [json.loads(line) for line in open(single / "metrics.jsonl")]
    for m, r in zip(metrics, ref):
        assert m["selected_tokens"] == r["selected_tokens"]
        assert abs(m["reward_mean"] - r["reward_mean"]) < 1e-6
        assert m["updates"] == r["updates"] == extra.get("updates_per_rollout", 1)
        for key in ("ratio_min", "ratio_max", "ratio_mean", "approx_kl", "clip_fraction"):
            assert m[key] == pytest.approx(r[key], rel=1e-3, abs=1e-4), key
    a, b = mx.load(str(out / "adapters.safetensors")), mx.load(str(single / "adapters.safetensors"))
    for k in a:
        np.testing.assert_allclose(np.array(a[k]), np.array(b[k]), atol=1e-4, rtol=0)
    # --resume on 2 ranks: rank 0 reads config + checkpoint and sends them to rank 1
    proc = launch(["tokenrl-mlx", "train", "--resume", str(out), "--steps", "4"])
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "exited with code" not in stderr, stdout + stderr
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1, 2, 3, 4]
    assert (out / "checkpoints" / "latest").read_text() == "step-000004"


# Each rank's clock says something else: rank 1's steps take 100x rank 0's.
UNEVEN_CLOCKS = """
import sys
from mlx_tokenrl import trainer

real = trainer.run_step

def run_step(model, tokenizer, task, cfg, world, *args, **kwargs):
    metrics = real(model, tokenizer, task, cfg, world, *args, **kwargs)
    metrics["step_s"] = 10.0 if world.rank() == 0 else 1000.0
    return metrics

trainer.run_step = run_step
from tokenrl_cli.main import app
app(sys.argv[1:])
"""


@pytest.mark.slow
def test_launched_ranks_follow_rank_0s_time_budget(tiny_model_dir, dense, tmp_path):
    """Ranks' step times differ: rank 0's decide the plan and the stop for all, so no rank
    leaves the others waiting in a collective. Rank 0's clock: 10 s steps against a 25 s
    budget: 3 steps, planned after the first (no warmup) as 1 + ceil(15 / 10)."""
    (tmp_path / "clocks.py").write_text(UNEVEN_CLOCKS)
    out = tmp_path / "run"
    proc = launch([sys.executable, str(tmp_path / "clocks.py"),
                   *train_args(tiny_model_dir, dense, out, 50, time_budget=25)])
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "exited with code" not in stderr, stdout + stderr
    metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [(m["step"], m["planned_steps"]) for m in metrics] == [(1, 3), (2, 3), (3, 3)]
    assert not any(m.get("resynced") for m in metrics)  # the same schedule on both ranks
    assert "--time-budget 25 s reached after 3 steps" in stdout


# Wraps the CLI: once a rank has finished step 2 (imports, model load, compile and the first
# steps behind it: what a busy machine slows down unevenly between ranks) it switches to the
# short peer deadline under test and leaves a mark.
IN_THE_LOOP = """
import os
import sys
from pathlib import Path

from mlx_tokenrl import trainer

marks, peer_timeout = Path(sys.argv[1]), sys.argv[2]
real = trainer.run_step

def run_step(model, tokenizer, task, cfg, world, *args, **kwargs):
    metrics = real(model, tokenizer, task, cfg, world, *args, **kwargs)
    if metrics["step"] == 2:
        os.environ["TOKENRL_PEER_TIMEOUT"] = peer_timeout  # read at every collective
        (marks / f"rank{world.rank()}").touch()
    return metrics

trainer.run_step = run_step
from tokenrl_cli.main import app
app(sys.argv[3:])
"""
HANG_GUARD = 900.0  # s: only a run that stopped making progress takes this long


def wait_until(condition, proc, what: str):
    """Wait while the launched ranks run, however slowly a busy machine runs them."""
    deadline = time.monotonic() + HANG_GUARD
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} did not happen within {HANG_GUARD:.0f} s")


def steps_written(metrics: Path) -> int:
    return len(metrics.read_text().splitlines()) if metrics.exists() else 0


def wait_gone(pid, timeout):
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if not alive(pid):
            return time.monotonic() - start
        time.sleep(0.02)
    return None


@pytest.mark.slow
@pytest.mark.parametrize("how", ["kill -9", "freeze"])
def test_a_dead_or_frozen_rank_ends_the_other_within_the_bound(tiny_model_dir, dense, tmp_path, how):
    """kill -9: the peer's sockets close, the survivor stops at once (under mlx.launch the
    launcher ends it even sooner). A frozen rank (SIGSTOP: what a vanished machine looks
    like) closes nothing: the survivor's watchdog stops it after max(TOKENRL_PEER_TIMEOUT,
    3 x slowest step).

    The run starts with a long peer deadline, since on a busy machine one rank's start-up and
    first steps can run many seconds behind the other's (a 6 s deadline from the start ended
    healthy ranks); the ranks switch to the 6 s under test once both are in the training
    loop, and a rank is stopped only after a whole step has run with it on both."""
    out = tmp_path / "run"
    marks = tmp_path / "in-the-loop"
    marks.mkdir()
    (tmp_path / "in_the_loop.py").write_text(IN_THE_LOOP)
    peer_timeout = 6.0
    proc = launch([sys.executable, str(tmp_path / "in_the_loop.py"), str(marks), str(peer_timeout),
                   *train_args(tiny_model_dir, dense, out, 1000, save_every=1000)],
                  TOKENRL_PEER_TIMEOUT=HANG_GUARD)
    pids = []
    try:
        pids = launched_rank_pids(proc, 2, timeout=HANG_GUARD)
        assert len(pids) == 2, "mlx.launch did not start two ranks"
        wait_until(lambda: len(list(marks.iterdir())) == 2, proc, "both ranks reaching step 2")
        # rank 0 writes a step's metrics after its collectives: step 4 ran on the short deadline
        wait_until(lambda: steps_written(out / "metrics.jsonl") >= 4, proc, "step 4")
        slowest = max(json.loads(line)["step_s"] for line in open(out / "metrics.jsonl"))
        os.kill(pids[1], signal.SIGKILL if how == "kill -9" else signal.SIGSTOP)
        # the documented bound: one step of its own work, then the collective's deadline
        bound = max(peer_timeout, 3 * slowest * 1.5) + 2 * slowest + 3.0
        took = wait_gone(pids[0], bound + 30)
        assert took is not None and took < bound, (took, bound)
    finally:
        if how == "freeze" and len(pids) == 2:
            with contextlib.suppress(ProcessLookupError):  # not to hide why the test failed
                os.kill(pids[1], signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=120)
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: rank 0 of 2:"), stderr
    assert f"--resume {out}" in errors[0]
    assert not any(line.startswith("[ring]") for line in stderr.splitlines())  # MLX's noise
    assert "Traceback" not in stderr
    if how == "freeze":
        assert "no answer from the other ranks" in errors[0]


def solo_rank(args, port, rank, **extra):
    """One rank of a 2-rank ring started by hand (its peer is absent or started apart)."""
    hostfile = Path(args[args.index("--out") + 1]).parent / f"hosts-{port}.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{port}"], [f"127.0.0.1:{port + 1}"]]))
    return subprocess.Popen([str(BIN / "tokenrl-mlx"), *args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=launch_env(MLX_HOSTFILE=hostfile, MLX_RANK=rank, **extra))


@pytest.mark.slow
def test_bad_launches_fail_with_one_line(tiny_model_dir, dense, tmp_path):
    # a host that never answers (unreachable, or its rank never started): bounded, one line
    port = free_ports()
    t0 = time.monotonic()
    alone = solo_rank(train_args(tiny_model_dir, dense, tmp_path / "alone", 3), port, 0,
                      TOKENRL_CONNECT_TIMEOUT=2)
    _, stderr = alone.communicate(timeout=60)
    assert time.monotonic() - t0 < 30 and alone.returncode != 0
    assert stderr.strip().count("\n") == 0 and "could not form the ring group" in stderr, stderr
    # ranks started with different settings: both stop, naming the difference
    port = free_ports()
    ranks = [solo_rank(train_args(tiny_model_dir, dense, tmp_path / "mixed", 3, lr=lr), port, r)
             for r, lr in enumerate(("3e-3", "1e-3"))]
    for p in ranks:
        _, stderr = p.communicate(timeout=60)
        assert p.returncode == 1, stderr
        assert "different configurations: lr (rank 0: 0.003, rank 1: 0.001)" in stderr
        assert "Traceback" not in stderr
