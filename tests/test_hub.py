"""The hub is asked only when it answers: offline or unreachable, models and gsm8k fail in one
line within seconds (never huggingface_hub's ~25 s of retries) and cached models still load."""

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from huggingface_hub import constants
from typer.testing import CliRunner

from mlx_tokenrl.hub import unreachable_reason
from mlx_tokenrl.models import ModelLoadError, load_model
from tokenrl_cli.main import app

REFUSED = "http://127.0.0.1:9"  # the discard port: nothing listens, the connection is refused


@pytest.fixture
def hub_at(monkeypatch):
    """Point huggingface_hub at `endpoint` (None: offline mode), with cache dir `cache`."""
    def point(endpoint, cache):
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", endpoint is None)
        monkeypatch.setattr(constants, "ENDPOINT", endpoint or REFUSED)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return point


UNAVAILABLE = {None: "HF_HUB_OFFLINE is set", REFUSED: f"cannot reach the Hugging Face hub at {REFUSED} ("}


def test_probe_refused_endpoint_is_a_reason(hub_at, tmp_path):
    hub_at(REFUSED, tmp_path)
    start = time.perf_counter()
    reason = unreachable_reason()
    assert time.perf_counter() - start < 3
    assert reason.startswith(f"cannot reach the Hugging Face hub at {REFUSED} (")


def test_probe_offline_sends_nothing(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def no_session():
        raise AssertionError("offline: no request may be made")

    monkeypatch.setattr("huggingface_hub.utils.get_session", no_session)
    assert unreachable_reason() == "HF_HUB_OFFLINE is set"


class NotFound(BaseHTTPRequestHandler):
    def do_HEAD(self):
        self.send_response(404)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_probe_any_http_answer_means_reachable(hub_at, tmp_path):
    # An error status still means downloads can work; huggingface_hub handles it as usual.
    server = ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        hub_at(f"http://127.0.0.1:{server.server_port}", tmp_path)
        assert unreachable_reason() is None
    finally:
        server.shutdown()


def test_probe_connected_but_silent_means_reachable(hub_at, tmp_path, monkeypatch):
    # The kernel accepts the connection (listen backlog) and nothing ever answers: a slow hub,
    # not a missing one, so downloads go ahead with huggingface_hub's own retries.
    monkeypatch.setattr("mlx_tokenrl.hub.PROBE_TIMEOUT_S", 0.3)
    with socket.create_server(("127.0.0.1", 0)) as silent:
        hub_at(f"http://127.0.0.1:{silent.getsockname()[1]}", tmp_path)
        assert unreachable_reason() is None


def cache_snapshot(cache, repo, model_dir):
    """Lay `model_dir` out as huggingface_hub's cache holds a downloaded `repo`."""
    root = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(model_dir, root / "snapshots" / "0123abcd")
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text("0123abcd")


@pytest.mark.parametrize("endpoint", [None, REFUSED])
def test_cached_model_loads_without_the_hub(hub_at, tmp_path, tiny_model_dir, endpoint):
    hub_at(endpoint, tmp_path)
    cache_snapshot(tmp_path, "someone/tiny", tiny_model_dir)
    net, tokenizer = load_model("someone/tiny")
    assert len(net.layers) == 2 and tokenizer.eos_token_ids


@pytest.mark.parametrize("endpoint", [None, REFUSED])
def test_uncached_model_fails_at_once_in_one_line(hub_at, tmp_path, endpoint):
    hub_at(endpoint, tmp_path)
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as info:
        load_model("someone/absent")
    assert time.perf_counter() - start < 3
    msg = str(info.value)
    assert msg.startswith(f"could not load model 'someone/absent' ({UNAVAILABLE[endpoint]}")
    assert "not in the local cache" in msg and "a .gguf file with --model" in msg and "\n" not in msg


def test_cli_gsm8k_unreachable_hub_is_one_line(hub_at, tmp_path):
    hub_at(REFUSED, tmp_path)
    result = CliRunner().invoke(app, ["eval", "gsm8k", "--model", "someone/absent"])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    text = " ".join(result.output.split())  # rich wraps the one line at the terminal width
    assert f"could not load 'openai/gsm8k' (cannot reach the Hugging Face hub at {REFUSED}" in text
    assert "--data PATH" in text


# Imports first, so the clock times only the failing calls, not Python starting up.
PROBE_SCRIPT = """
import json, time
import datasets
from mlx_tokenrl.models import ModelLoadError, load_model
from mlx_tokenrl.tasks import TaskError, load_task

failures = {}
for name, call, error in [("model", lambda: load_model("Qwen/Qwen2-0.5B-Instruct"), ModelLoadError),
                          ("gsm8k", lambda: load_task("gsm8k"), TaskError)]:
    start = time.perf_counter()
    try:
        call()
    except error as exc:
        failures[name] = {"seconds": time.perf_counter() - start, "message": str(exc)}
print(json.dumps(failures))
"""


@pytest.mark.slow  # a fresh Python importing mlx, mlx-lm and datasets: 5-20 s each here
@pytest.mark.parametrize("setting", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": REFUSED}])
def test_hub_failures_are_fast_and_one_line(setting, tmp_path):
    """As a user's shell sets it: huggingface_hub reads these variables when imported."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_ENDPOINT")}
    env.update(setting, HF_HOME=str(tmp_path), HF_HUB_CACHE=str(tmp_path / "hub"))
    run = subprocess.run([sys.executable, "-c", PROBE_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    failures = json.loads(run.stdout)
    assert set(failures) == {"model", "gsm8k"}
    for failure in failures.values():
        assert failure["seconds"] < 3, failure
        assert "\n" not in failure["message"]
    assert "--model" in failures["model"]["message"]
    assert "--data PATH" in failures["gsm8k"]["message"]
    assert "Retrying" not in run.stderr
