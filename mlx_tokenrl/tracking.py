"""Experiment tracking: `--report-to wandb,swanlab` and `--project-name`, as in mlx_lm.lora.

Built on mlx-lm's reporting callbacks (mlx_lm.tuner.callbacks): `get_reporting_callbacks`
starts each tracker's run (named after the run directory, files under it) with the run
config, and chains the callbacks. Their interface is mlx-lm's SFT trainer's: a dict per
report, logged at the step `info["iteration"]`, training and validation reports apart. The
`Tracker` adapts our step metrics (metrics.jsonl's dict) to it and adds what the callbacks
lack: sample tables, and finishing the runs (mlx_lm.lora's runs end with its process;
`compare` trains several runs in one process, and a run left open would take the next one's
logs).
"""

from dataclasses import asdict, dataclass

from mlx_lm.tuner import callbacks

from .config import ConfigError
from .messages import first_line

# The module each of mlx-lm's callbacks logs through (mlx_lm.tuner.callbacks imported it,
# or holds None when it is not installed).
TRACKER_MODULES = {callbacks.WandBCallback: "wandb", callbacks.SwanLabCallback: "swanlab"}
SAMPLE_COLUMNS = ["step", "group", "row", "prompt", "completion", "reward", "selected"]


def callback_chain(callback):
    """mlx-lm's callbacks, outermost first: each wraps the one made before it."""
    while callback is not None:
        yield callback
        callback = getattr(callback, "wrapped_callback", None)


def tracker_module(callback):
    return getattr(callbacks, TRACKER_MODULES[type(callback)])


def selected_text(record) -> str:
    """A record's selected tokens as one line: `position 'token' advantage`, ..."""
    return ", ".join(f"{t.position} {t.token!r} {t.advantage:+.3f}" for t in record.selected)


def sample_row(record) -> list:
    return [record.step, record.group, record.row, record.prompt, record.completion,
            record.reward, selected_text(record)]


def sample_text(record) -> str:
    return "\n".join(f"{column}: {value}"
                     for column, value in zip(SAMPLE_COLUMNS, sample_row(record)))


@dataclass
class Tracker:
    callback: object = None  # mlx-lm's TrainingCallback chain; None: no tracking

    def log_step(self, metrics: dict):
        """The step's metrics as mlx-lm's training report, its eval_* ones (when the step
        evaluated) as its validation report, both at the step's number."""
        if self.callback is None:
            return
        at = {"iteration": metrics["step"]}
        evals = {k: v for k, v in metrics.items() if k.startswith("eval_")}
        self.callback.on_train_loss_report(
            {**{k: v for k, v in metrics.items() if k not in evals}, **at})
        if evals:
            self.callback.on_val_loss_report({**evals, **at})

    def log_samples(self, step: int, records):
        """samples.SampleRecords as a wandb Table; trackers without tables get text."""
        for callback in callback_chain(self.callback):
            module = tracker_module(callback)
            if hasattr(module, "Table"):
                samples = module.Table(columns=SAMPLE_COLUMNS,
                                       data=[sample_row(r) for r in records])
            else:
                samples = [module.Text(sample_text(r), caption=f"group {r.group}, row {r.row}")
                           for r in records]
            module.log({"samples": samples}, step=step)

    def finish(self):
        for callback in callback_chain(self.callback):
            tracker_module(callback).finish()


def start_tracker(cfg) -> Tracker:
    """Start the runs of `cfg.report_to` (none: a Tracker that logs nothing), with the
    TrainConfig as their run config. A tracker that cannot start (not logged in, ...)
    stops the run with one line; TrainConfig.validate already refused a missing package."""
    if not cfg.report_to:
        return Tracker()
    names = ",".join(cfg.report_to)
    try:
        return Tracker(callbacks.get_reporting_callbacks(
            names, project_name=cfg.project_name, log_dir=cfg.out, config=asdict(cfg)))
    except Exception as exc:  # the tracker's own failure (login, network), not a bug here
        raise ConfigError(f"--report-to {names}: the tracker did not start "
                          f"({first_line(exc)})") from exc
