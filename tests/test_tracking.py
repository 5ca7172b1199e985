"""--report-to wandb,swanlab: offline runs read back from the trackers' own files."""

import json
import struct
import types
from dataclasses import asdict
from pathlib import Path

import pytest
from mlx_lm.tuner import callbacks
from typer.testing import CliRunner

from mlx_tokenrl.config import ConfigError, TrainConfig
from mlx_tokenrl.tracking import start_tracker
from mlx_tokenrl.trainer import train
from tokenrl_cli.main import app


@pytest.fixture
def offline_trackers(tmp_path, monkeypatch):
    """Both trackers offline, their home and cache folders inside tmp_path."""
    home = tmp_path / "tracker-home"
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR",
                 "WANDB_ARTIFACT_DIR", "SWANLAB_CONFIG_DIR", "SWANLAB_SAVE_DIR"):
        monkeypatch.setenv(name, str(home / name.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("SWANLAB_MODE", "offline")


def leveldb_records(path: Path):
    """The records of a wandb `.wandb` file: a 7-byte header (':W&B', 0xBEE1, version),
    then leveldb-log chunks (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) in
    32 KiB blocks, whose tails shorter than a chunk header are zero padding."""
    data, block = path.read_bytes(), 32768
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1)
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            yield pending
            pending = b""


def read_wandb_run(run_dir: Path):
    """(run config, history rows merged by step) of the one offline run under run_dir."""
    from wandb.proto import wandb_internal_pb2

    [path] = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    config, rows = None, {}
    for data in leveldb_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            config = {item.key: json.loads(item.value_json) for item in record.run.config.update}
            name, project = record.run.display_name, record.run.project
        elif kind == "history":
            values = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                      for item in record.history.item}
            rows.setdefault(values["_step"], {}).update(values)
    return config, name, project, rows


def read_swanlab_run(run_dir: Path):
    """(config.yaml's values, {key: {step: value}} of the scalars, {step: texts}) of the
    one offline swanlab run under run_dir."""
    import yaml
    from swanlab.proto.swanlab.record.v1.record_pb2 import Record
    from swanlab.sdk.internal.core_python.store import DataStoreReader

    [run] = run_dir.glob("swanlog/run-*")
    saved = yaml.safe_load((run / "files/config.yaml").read_text())
    # swanlab writes None as {}
    config = {k: None if v["value"] == {} else v["value"] for k, v in saved.items()}
    reader = DataStoreReader()
    reader.open(next(run.glob("run-*.swanlab")))
    scalars, texts = {}, {}
    while (data := reader.scan()) is not None:
        record = Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "scalar":
            scalar = record.scalar
            scalars.setdefault(scalar.key, {})[scalar.step] = scalar.value.number
        elif kind == "media" and record.media.key == "samples":
            texts[record.media.step] = [(run / "media/text" / item.filename).read_bytes().decode()
                                        for item in record.media.value.items]  # \r kept
    reader.close()
    return config, scalars, texts


def dense_config(model_dir, dense_files, out, **kw):
    base = dict(model=str(model_dir), out=str(out), task="jsonl",
                data=str(dense_files / "data.jsonl"),
                reward_fn=f"{dense_files / 'reward.py'}:digits",
                prompts_per_step=2, group_size=4, max_new_tokens=8, temperature=1.0, lr=3e-3,
                warmup_steps=0, steps=3, save_every=5, algo="grpo")
    return TrainConfig(**{**base, **kw})


def metric_lines(run_dir):
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl")]


def samples_by_step(run_dir):
    out = {}
    for line in open(run_dir / "samples.jsonl"):
        record = json.loads(line)
        out.setdefault(record["step"], []).append(record)
    return out


def test_offline_wandb_and_swanlab_runs_hold_config_every_step_and_samples(
        tiny_model_dir, dense_files, tmp_path, offline_trackers):
    wandb = pytest.importorskip("wandb")
    pytest.importorskip("swanlab")
    cfg = dense_config(tiny_model_dir, dense_files, tmp_path / "run", eval_every=2, eval_limit=4,
                       samples_every=2, report_to=["wandb", "swanlab"], project_name="tests")
    run = train(cfg)
    wandb.teardown()  # wandb-core may still be writing the offline file when finish() returns
    metrics = metric_lines(run)
    assert [m["step"] for m in metrics] == [1, 2, 3] and "eval_accuracy" in metrics[1]
    samples = samples_by_step(run)
    assert sorted(samples) == [1, 2]  # step 1, then every 2nd

    config, name, project, rows = read_wandb_run(run)
    assert (name, project) == ("run", "tests")
    assert {k: v for k, v in config.items() if k != "_wandb"} == asdict(cfg)
    for m in metrics:  # every step, every number of metrics.jsonl (eval ones included)
        row = rows[m["step"]]
        for key, value in m.items():
            assert row[key] == pytest.approx(value), (m["step"], key)
    for step, records in samples.items():
        row = rows[step]  # wandb flattens the table's reference into samples/... keys
        assert row["samples/_type"] == "table-file" and row["samples/nrows"] == len(records)
        files = next(run.glob("wandb/offline-run-*/files"))
        content = json.loads((files / row["samples/path"]).read_text())
        assert [row[4] for row in content["data"]] == [r["completion"] for r in records]
        assert [row[5] for row in content["data"]] == pytest.approx([r["reward"] for r in records])

    config, scalars, texts = read_swanlab_run(run)
    assert config == json.loads(json.dumps(asdict(cfg)))
    for m in metrics:
        for key, value in m.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                assert scalars[key][m["step"]] == pytest.approx(value), (m["step"], key)
    assert sorted(texts) == [1, 2]
    for step, records in samples.items():
        assert len(texts[step]) == len(records)
        assert all(f"completion: {r['completion']}" in text
                   for r, text in zip(records, texts[step]))


def cli_train(*args):
    return CliRunner().invoke(app, ["train", *map(str, args)])


@pytest.mark.parametrize("trackers, message", [
    ("wandb", "--report-to wandb: the wandb package is not installed (pip install wandb)"),
    ("swanlab,wandb", "--report-to swanlab: the swanlab package is not installed"),
    ("tensorboard", "--report-to must be one of wandb, swanlab, not 'tensorboard'"),
])
def test_a_missing_or_unknown_tracker_is_one_line_before_any_work(tmp_path, monkeypatch, trackers,
                                                                 message):
    monkeypatch.setattr(callbacks, "wandb", None)  # as mlx-lm leaves it when the import fails
    monkeypatch.setattr(callbacks, "swanlab", None)
    out = tmp_path / "run"
    result = cli_train("multiply", "--model", tmp_path / "no-model", "--report-to", trackers,
                       "--out", out)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert not out.exists()


def test_a_tracker_that_cannot_start_is_one_line(tmp_path, monkeypatch):
    """A stand-in wandb whose run refuses to start (as wandb does when not logged in)."""
    def init(**kwargs):
        raise RuntimeError("api_key not configured (no-tty)\ncall wandb.login")

    monkeypatch.setattr(callbacks, "wandb", types.SimpleNamespace(init=init))
    with pytest.raises(ConfigError, match=r"^--report-to wandb: the tracker did not start "
                                          r"\(api_key not configured \(no-tty\)\)$"):
        start_tracker(TrainConfig(report_to=["wandb"], out=str(tmp_path)))


def test_no_report_to_starts_no_tracker(tmp_path, monkeypatch):
    def init(**kwargs):
        raise AssertionError("no tracker was asked for")

    monkeypatch.setattr(callbacks, "wandb", types.SimpleNamespace(init=init))
    tracker = start_tracker(TrainConfig(out=str(tmp_path)))
    tracker.log_step({"step": 1, "loss": 0.0})
    tracker.log_samples(1, [])
    tracker.finish()


def test_runs_in_one_process_get_a_tracker_run_each(tiny_model_dir, dense_files, tmp_path,
                                                    offline_trackers):
    """As compare's arms do: the first run's tracker is finished before the next starts."""
    wandb = pytest.importorskip("wandb")
    for arm in ("a", "b"):
        train(dense_config(tiny_model_dir, dense_files, tmp_path / arm, steps=1, samples_every=0,
                           report_to=["wandb"]))
    wandb.teardown()
    for arm in ("a", "b"):
        config, name, _, rows = read_wandb_run(tmp_path / arm)
        assert (name, config["out"], sorted(rows)) == (arm, str(tmp_path / arm), [1])
