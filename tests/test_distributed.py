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
    return contexts, groups


def rank_gradients(model, cfg, contexts, groups, world_size):
    """Every rank's (loss, grads) on its shard, with global normalisers, in one process."""
    step = 7
    shards = []
    for rank in range(world_size):
        positions = trainer.shard(list(range(len(groups))), rank, world_size)
        rows, triples = [], []
        trainer.add_groups(cfg, [groups[p] for p in positions], [contexts[p] for p in positions],
                           [trainer.group_rng(cfg, step, p) for p in positions], rows, triples)
        shards.append((rows, triples, sum(len(groups[p]) for p in positions)))
    totals = trainer.StepTotals(completions=sum(s[2] for s in shards), groups=len(groups),
                                selected=sum(len(s[1]) for s in shards))
    loss_and_grad = make_loss_and_grad(model, 0.0, compile=False)
    out = []
    for rows, triples, _ in shards:
        if triples:
            out.append(trainer.loss_and_grads(model, loss_and_grad, cfg, rows, triples, totals))
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
def test_launched_two_ranks_match_each_other_and_one_process(tiny_model_dir, dense, tmp_path):
    """mlx.launch -n 2 --backend ring: after every step both ranks hold bitwise identical
    adapters; rank 0 alone writes the run; the result is the 1-process run's."""
    (tmp_path / "spy.py").write_text(SPY)
    spy = tmp_path / "adapters"
    spy.mkdir()
    out = tmp_path / "two"
    proc = launch([sys.executable, str(tmp_path / "spy.py"), str(spy),
                   *train_args(tiny_model_dir, dense, out, 3, save_every=3)])
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
    assert stdout.count("adapter written to") == 1
    # the same training in one process: same rewards, same adapter up to float order
    single = tmp_path / "one"
    from typer.testing import CliRunner
    from tokenrl_cli.main import app
    result = CliRunner().invoke(app, train_args(tiny_model_dir, dense, single, 3, save_every=3))
    assert result.exit_code == 0, result.output
    ref = [json.loads(line) for line in open(single / "metrics.jsonl")]
    for m, r in zip(metrics, ref):
        assert m["selected_tokens"] == r["selected_tokens"]
        assert abs(m["reward_mean"] - r["reward_mean"]) < 1e-6
    a, b = mx.load(str(out / "adapters.safetensors")), mx.load(str(single / "adapters.safetensors"))
    for k in a:
        np.testing.assert_allclose(np.array(a[k]), np.array(b[k]), atol=1e-4, rtol=0)
    # --resume on 2 ranks: rank 0 reads config + checkpoint and sends them to rank 1
    proc = launch(["tokenrl-mlx", "train", "--resume", str(out), "--steps", "4"])
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "exited with code" not in stderr, stdout + stderr
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1, 2, 3, 4]
    assert (out / "checkpoints" / "latest").read_text() == "step-000004"


def wait_for_steps(metrics: Path, n: int, proc, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if metrics.exists() and len(metrics.read_text().splitlines()) >= n:
            return
        time.sleep(0.05)
    raise AssertionError("training did not reach the step")


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
    3 x slowest step)."""
    out = tmp_path / "run"
    # Before the first step is timed the watchdog waits this long: 2 s ended healthy ranks on a
    # busy machine (one rank's first step, with its compile, ran 2 s behind the other's).
    peer_timeout = 6.0
    proc = launch(["tokenrl-mlx", *train_args(tiny_model_dir, dense, out, 1000, save_every=1000)],
                  TOKENRL_PEER_TIMEOUT=peer_timeout)
    pids = []
    try:
        pids = launched_rank_pids(proc, 2)
        assert len(pids) == 2, "mlx.launch did not start two ranks"
        wait_for_steps(out / "metrics.jsonl", 3, proc)
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
        stdout, stderr = proc.communicate(timeout=30)
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
