"""Experiment tracking (`logging.logger`: MLflow, TensorBoard or Neptune; None logs nothing).

One tracked run per training command, and one per fold inside it: folds train side by side, each with its own
epoch axis, so each gets a run of its own (MLflow: a child run under the command's parent run; TensorBoard: a
folder per fold; Neptune: a namespace per fold in one run). The driver opens the command's run and logs the
resolved config (`start_run`), rank 0 of every fold's Train workers logs each epoch's metrics as the epoch ends
(`FoldTracker`), and the driver closes the run with the cross-validated metrics and the report (`finish_run`).

A rerun of the same command into the same OUTPUT continues the same runs: OUTPUT/tracking.json keeps the
parent run's id; `--overwrite` removes it with the run's other outputs, so the fresh run is tracked anew. An OUTPUT copied or moved elsewhere keeps a default MLflow store that names the first
folder's artifacts: a rerun into it is refused at its start rather than logging into the first folder (or
recreating it, once deleted).
Credentials come from the environment of the processes that log (MLFLOW_TRACKING_USERNAME / PASSWORD / TOKEN,
NEPTUNE_API_TOKEN), never from the config: settings hold only plain, secret-free values.

    MLflow       logging.tracking_uri, or by default sqlite:///OUTPUT/mlflow.db with artifacts in OUTPUT/mlruns/
    TensorBoard  OUTPUT/tensorboard/ (run/ for the command, fold_<k>/ per fold)
    Neptune      logging.neptune_project; the run is found again by a custom id kept in OUTPUT/tracking.json
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import posixpath
import re
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gunsound import storage
from gunsound.config import Config, ConfigError, redact_uri

log = logging.getLogger(__name__)

TRACKING_FILE = "tracking.json"


@dataclass(frozen=True)
class TrackingSettings:
    """Where a training command's runs go, as plain values (pickled to every Train worker)."""

    logger: str  # "MLflow", "TensorBoard" or "Neptune"
    output: str  # the command's OUTPUT
    experiment: str
    tracking_uri: str | None = None  # MLflow: resolved here, so that every process logs to the same store
    artifact_location: str | None = None  # MLflow's default local store keeps artifacts beside OUTPUT's files
    neptune_project: str = ""

    @classmethod
    def from_config(cls, cfg: Config, output: str) -> TrackingSettings | None:
        """The settings of a command that writes to `output`; None when `logging.logger` is None."""
        lg = cfg.logging
        if lg.logger is None:
            return None
        uri, artifacts = lg.tracking_uri, None
        if lg.logger == "MLflow" and uri is None:
            if not storage.is_local(output):
                raise ConfigError(f"logging.tracking_uri: an output on {output} needs an MLflow tracking server "
                                  "(the default store is a SQLite file beside a local output)")
            if cfg.experiment_name == DEFAULT_EXPERIMENT:
                raise ConfigError(f"experiment_name: '{DEFAULT_EXPERIMENT}' is the experiment MLflow makes in every "
                                  "store, with its artifacts in the working directory; name the experiment otherwise, "
                                  "or set logging.tracking_uri")
            database, artifact_folder = _default_store(output)
            uri, artifacts = f"sqlite:///{database}", artifact_folder.as_uri()
        return cls(logger=lg.logger, output=output, experiment=cfg.experiment_name, tracking_uri=uri,
                   artifact_location=artifacts, neptune_project=lg.neptune_project)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: nested settings and metrics as the flat keys trackers take."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def numbers(data: dict[str, Any]) -> dict[str, float]:
    """The finite numbers among flat values (booleans and text are not metrics)."""
    return {k: float(v) for k, v in data.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}


def _state_uri(settings: TrackingSettings) -> str:
    return storage.join(settings.output, TRACKING_FILE)


def _read_state(settings: TrackingSettings) -> dict[str, Any]:
    uri = _state_uri(settings)
    if not storage.exists(uri):
        return {}
    state = json.loads(storage.read_text(uri))
    # tracking.json keeps the URI redacted (earlier versions wrote it whole): compared as redacted.
    written = state.get("tracking_uri")
    same_store = (None if written is None else redact_uri(written)) == _shown_uri(settings)
    return state if state.get("logger") == settings.logger and same_store else {}


def _shown_uri(settings: TrackingSettings) -> str | None:
    """The tracking URI as it may be logged or written (`config.redact_uri`); the settings keep it whole for the
    client."""
    return None if settings.tracking_uri is None else redact_uri(settings.tracking_uri)


def _loggable(config: dict[str, Any]) -> dict[str, Any]:
    """The resolved config as trackers log it: its tracking URI redacted."""
    uri = config.get("logging", {}).get("tracking_uri")
    if uri is None:
        return config
    return {**config, "logging": {**config["logging"], "tracking_uri": redact_uri(uri)}}


def _parent_id(settings: TrackingSettings) -> str:
    run_id = _read_state(settings).get("run_id")
    if not run_id:
        raise RuntimeError(f"tracking: no run opened for {settings.output} (tracking.start_run was not called)")
    return run_id


def _report_files(output: str) -> Iterator[tuple[str, bytes]]:
    """report.html and the charts beside it."""
    for uri in storage.list_files(output, recursive=False):
        name = posixpath.basename(uri)
        if name == "report.html" or name.endswith(".png"):
            yield name, storage.read_bytes(uri)


# MLflow ---------------------------------------------------------------------------------------------------------

def _mlflow_client(settings: TrackingSettings):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=settings.tracking_uri)


DEFAULT_EXPERIMENT = "Default"  # MLflow's own, in every store


def _default_store(output: str) -> tuple[Path, Path]:
    """MLflow's default store of a local OUTPUT: its database and the folder of its artifacts. Resolved, so that
    a rerun that spells OUTPUT otherwise (a symlink, a trailing slash) reopens the same run."""
    folder = Path(storage.absolute(output)).resolve()
    return folder / "mlflow.db", folder / "mlruns"


def _local_folder(location: str) -> Path | None:
    """A local artifact location (a file URI or a plain path) as a resolved path; None for a remote one."""
    parsed = urllib.parse.urlparse(location)
    if parsed.scheme == "file" and parsed.netloc in ("", "localhost"):
        return Path(urllib.parse.unquote(parsed.path)).resolve()
    if parsed.scheme == "":
        return Path(location).expanduser().resolve()
    return None


def _refuse_foreign_artifacts(settings: TrackingSettings, what: str, location: str) -> None:
    """The default store's artifacts belong in OUTPUT/mlruns/. A store copied or moved with its OUTPUT still
    names the first folder's: logging there would write into another run's folder (or recreate it, once
    deleted), so refuse."""
    if settings.artifact_location is None:
        return
    database, mlruns = _default_store(settings.output)
    folder = _local_folder(location)
    if folder is not None and folder.is_relative_to(mlruns):
        return
    gone = " (no longer there)" if folder is not None and not folder.exists() else ""
    raise ConfigError(
        f"logging.tracking_uri: {database}, the default MLflow store of this output, keeps {what} of experiment "
        f"'{settings.experiment}' in {location}{gone}, not in {settings.artifact_location}: the folder was copied "
        f"or moved from another. To track this output afresh remove {database}, {mlruns} and "
        f"{database.with_name(TRACKING_FILE)} (trained folds are kept), or set logging.tracking_uri to a tracking server")


def _mlflow_experiment(client, settings: TrackingSettings) -> str:
    found = client.get_experiment_by_name(settings.experiment)
    if found is not None:
        _refuse_foreign_artifacts(settings, "the artifacts", found.artifact_location)
        return found.experiment_id
    return client.create_experiment(settings.experiment, artifact_location=settings.artifact_location)


def _mlflow_key(name: str) -> str:
    """MLflow takes letters, digits and _ - . / : and space in names; class names may hold anything."""
    return re.sub(r"[^\w./\- :]", "_", name)


def _mlflow_metrics(metrics: dict[str, float], step: int):
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(_mlflow_key(key), value, now, step) for key, value in metrics.items()]


def _mlflow_start(settings: TrackingSettings, config: dict[str, Any]) -> str:
    from mlflow.entities import Param, RunStatus

    client = _mlflow_client(settings)
    run_id = _read_state(settings).get("run_id")
    if run_id:
        run = client.get_run(run_id)
        # Each run keeps its own artifact location: checked before the run is touched.
        _refuse_foreign_artifacts(settings, f"the artifacts of run {run_id}", run.info.artifact_uri)
        client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        logged = run.data.params
    else:
        run = client.create_run(_mlflow_experiment(client, settings), run_name=posixpath.basename(settings.output),
                                tags={"gunsound.output": settings.output})
        run_id, logged = run.info.run_id, {}
    params = {_mlflow_key(k): json.dumps(v) if isinstance(v, list | dict) else str(v)
              for k, v in flatten(config).items()}
    changed = sorted(k for k, v in params.items() if k in logged and logged[k] != v)
    if changed:  # MLflow keeps a run's first value of each parameter; the config artifact holds the new one
        log.warning("tracking: this rerun changes %s; the MLflow run keeps the first values", ", ".join(changed))
    fresh = [Param(k, v) for k, v in params.items() if k not in logged]
    try:
        for i in range(0, len(fresh), 100):  # MLflow takes at most 100 params per call
            client.log_batch(run_id, params=fresh[i:i + 100])
        client.log_text(run_id, json.dumps(config, indent=1, default=str), "config.json")
    except BaseException:
        # A job closes only a run it opened: one that failed opening is closed here, not left RUNNING.
        with contextlib.suppress(Exception):
            client.set_terminated(run_id, status=RunStatus.to_string(RunStatus.FAILED))
        raise
    return run_id


def _mlflow_finish(settings: TrackingSettings, results: dict[str, Any], status: str) -> None:
    client = _mlflow_client(settings)
    run_id = _parent_id(settings)
    if results:
        metrics = numbers(flatten({"cv": {k: v for k, v in results.get("cv", {}).items() if k != "folds"}}))
        for i in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=_mlflow_metrics(dict(list(metrics.items())[i:i + 1000]), 0))
        client.log_text(run_id, json.dumps(results, indent=1, default=str), "metrics.json")
        for name, data in _report_files(settings.output):
            with tempfile.TemporaryDirectory() as d:
                (Path(d) / name).write_bytes(data)
                client.log_artifact(run_id, str(Path(d) / name), "report")
    client.set_terminated(run_id, status)


class _MlflowFold:
    def __init__(self, settings: TrackingSettings, fold: str, epochs: int):
        self.client = _mlflow_client(settings)
        parent = _parent_id(settings)
        experiment = self.client.get_run(parent).info.experiment_id
        found = self.client.search_runs(
            [experiment], f"tags.mlflow.parentRunId = '{parent}' and tags.`gunsound.fold` = '{fold}'", max_results=1)
        self.run_id = found[0].info.run_id if found else self.client.create_run(
            experiment, run_name=fold, tags={"mlflow.parentRunId": parent, "gunsound.fold": fold}).info.run_id
        self.epochs = epochs

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        self.client.log_batch(self.run_id, metrics=_mlflow_metrics(metrics, epoch))
        if epoch == self.epochs:
            self.client.set_terminated(self.run_id, "FINISHED")


# TensorBoard ----------------------------------------------------------------------------------------------------

class _TensorBoardFolder:
    """A SummaryWriter on a folder of the output: written in place when local, else written in a temporary
    folder and copied to the output after every flush (TensorBoard's writer cannot write to S3 itself)."""

    def __init__(self, uri: str):
        from torch.utils.tensorboard import SummaryWriter

        self.uri = uri
        self.scratch = None if storage.is_local(uri) else tempfile.TemporaryDirectory(prefix="gunsound-tb-")
        self.writer = SummaryWriter(log_dir=uri if self.scratch is None else self.scratch.name)

    def flush(self) -> None:
        self.writer.flush()
        if self.scratch is not None:
            storage.upload_dir(self.scratch.name, self.uri)

    def close(self) -> None:
        self.flush()
        self.writer.close()
        if self.scratch is not None:
            self.scratch.cleanup()


def _tensorboard_start(settings: TrackingSettings, config: dict[str, Any]) -> None:
    import yaml

    tb = _TensorBoardFolder(storage.join(settings.output, "tensorboard", "run"))
    tb.writer.add_text("config", "```\n" + yaml.safe_dump(config, sort_keys=True) + "```")
    tb.close()


def _tensorboard_finish(settings: TrackingSettings, results: dict[str, Any]) -> None:
    import io

    import matplotlib.image

    if not results:
        return
    tb = _TensorBoardFolder(storage.join(settings.output, "tensorboard", "run"))
    for key, value in numbers(flatten({"cv": {k: v for k, v in results.get("cv", {}).items()
                                              if k != "folds"}})).items():
        tb.writer.add_scalar(key, value, 0)
    for name, data in _report_files(settings.output):
        if name.endswith(".png"):
            tb.writer.add_image(f"report/{name}", matplotlib.image.imread(io.BytesIO(data), format="png"), 0,
                                dataformats="HWC")
        else:
            tb.writer.add_text("report", f"{storage.join(settings.output, name)}")
    tb.close()


class _TensorBoardFold:
    def __init__(self, settings: TrackingSettings, fold: str):
        self.folder = _TensorBoardFolder(storage.join(settings.output, "tensorboard", fold))

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.folder.writer.add_scalar(key, value, epoch)
        self.folder.flush()

    def close(self) -> None:
        self.folder.close()


# Neptune --------------------------------------------------------------------------------------------------------

def _neptune_run(settings: TrackingSettings, run_key: str):
    import neptune

    if not os.environ.get("NEPTUNE_API_TOKEN"):
        raise RuntimeError("tracking: logging.logger is Neptune but NEPTUNE_API_TOKEN is not set in the environment")
    return neptune.init_run(project=settings.neptune_project, name=settings.experiment, custom_run_id=run_key,
                            capture_stdout=False, capture_stderr=False, capture_hardware_metrics=False)


def _neptune_key(settings: TrackingSettings) -> str:
    """The command's Neptune custom run id from tracking.json: every process and rerun of the command writes to
    one run, and an `--overwrite` (which removes tracking.json) to a new one."""
    key = _read_state(settings).get("neptune_run_key")
    if not key:
        raise RuntimeError(f"tracking: no run opened for {settings.output} (tracking.start_run was not called)")
    return key


def _neptune_start(settings: TrackingSettings, config: dict[str, Any]) -> tuple[str, str]:
    """Open (or on a rerun reopen) the command's run: its Neptune id and the custom run id it was opened by."""
    from neptune.utils import stringify_unsupported

    key = _read_state(settings).get("neptune_run_key") or uuid.uuid4().hex
    run = _neptune_run(settings, key)
    try:
        run["config"] = stringify_unsupported(config)
        run["output"] = settings.output
        return run["sys/id"].fetch(), key
    finally:
        run.stop()


def _neptune_finish(settings: TrackingSettings, results: dict[str, Any]) -> None:
    from neptune.types import File

    run = _neptune_run(settings, _neptune_key(settings))
    try:
        if results:
            for key, value in numbers(flatten({"cv": {k: v for k, v in results.get("cv", {}).items()
                                                      if k != "folds"}})).items():
                run[key.replace(".", "/")] = value
            for name, data in _report_files(settings.output):
                run[f"report/{name.replace('.', '_')}"].upload(File.from_content(data, extension=name.rsplit(".")[-1]))
    finally:
        run.stop()


class _NeptuneFold:
    def __init__(self, settings: TrackingSettings, fold: str):
        self.run, self.fold = _neptune_run(settings, _neptune_key(settings)), fold

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.run[f"{self.fold}/{key}"].append(value, step=epoch)

    def close(self) -> None:
        self.run.stop()


# The three entry points -----------------------------------------------------------------------------------------

def start_run(settings: TrackingSettings | None, config: dict[str, Any]) -> None:
    """Driver, before the folds train: open the command's run (or reopen it on a rerun) and log the resolved
    config; the run's id goes to OUTPUT/tracking.json for the folds' workers."""
    if settings is None:
        return
    config = _loggable(config)
    state: dict[str, str] = {}
    if settings.logger == "MLflow":
        run_id = _mlflow_start(settings, config)
    elif settings.logger == "TensorBoard":
        _tensorboard_start(settings, config)
        run_id = "tensorboard"
    else:
        run_id, state["neptune_run_key"] = _neptune_start(settings, config)
    storage.write_text(_state_uri(settings), json.dumps(
        {"logger": settings.logger, "tracking_uri": _shown_uri(settings), "run_id": run_id, **state}, indent=1))
    log.info("tracking: %s run %s%s", settings.logger, run_id,
             f" at {_shown_uri(settings)}" if settings.tracking_uri else "")


def finish_run_quietly(settings: TrackingSettings | None, results: dict[str, Any] | None,
                       failed: bool = False) -> None:
    """`finish_run`, with a tracking store that fails logged as a warning: the job's outcome (its outputs are
    written, or the error it failed with) stays what the user sees, as the folds' tracking is best-effort."""
    try:
        finish_run(settings, results, failed)
    except Exception as exc:  # noqa: BLE001 - any failure of the store
        log.warning("tracking: could not close the %s run (%s); the job's outputs are not affected",
                    settings.logger if settings else "", exc)


def finish_run(settings: TrackingSettings | None, results: dict[str, Any] | None, failed: bool = False) -> None:
    """Driver, after the report is written: log the cross-validated metrics and the report, close the run.
    On a failure (`failed`), only close it as failed."""
    if settings is None:
        return
    results = {} if failed or results is None else results
    if settings.logger == "MLflow":
        _mlflow_finish(settings, results, "FAILED" if failed else "FINISHED")
    elif settings.logger == "TensorBoard":
        _tensorboard_finish(settings, results)
    else:
        _neptune_finish(settings, results)


class FoldTracker:
    """Rank 0 of a fold's Train workers: one epoch's numeric metrics at a time, into the fold's run."""

    def __init__(self, settings: TrackingSettings, fold: str, epochs: int):
        if settings.logger == "MLflow":
            self._sink = _MlflowFold(settings, fold, epochs)
        elif settings.logger == "TensorBoard":
            self._sink = _TensorBoardFold(settings, fold)
        else:
            self._sink = _NeptuneFold(settings, fold)

    def log_epoch(self, epoch: int, metrics: dict[str, Any]) -> None:
        """`epoch` counts from 1; lists (per-batch losses) and text are left out."""
        self._sink.log_epoch(epoch, numbers(metrics))

    def close(self) -> None:
        close = getattr(self._sink, "close", None)
        if close is not None:
            close()
