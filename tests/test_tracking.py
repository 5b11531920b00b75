"""Experiment tracking: a real training's epochs, config and report read back with MLflow's client, TensorBoard
event files read back with TensorBoard's reader, and the settings that are refused."""

import json
import shutil

import matplotlib
import pytest

from gunsound import storage, tracking
from gunsound.config import ConfigError, load_config
from gunsound.tracking import FoldTracker, TrackingSettings
from tests.conftest import LAPTOP_CONFIG


@pytest.mark.ray
def test_a_training_with_mlflow_writes_runs_that_mlflow_reads_back(trained_run, tmp_path):
    from mlflow import MlflowClient

    # The session's shared run (tests/conftest.py): `main(train_args(synth_dir, out, *TRAINED_RUN_EXTRA))`, two
    # folds of FAST on two Train workers each with `logging.logger=MLflow`; rank 0 logs the epochs.
    out = trained_run
    cfg = load_config(out / "config.yaml")  # the command's resolved config
    assert cfg.logging.logger == "MLflow"
    settings = TrackingSettings.from_config(cfg, str(out))
    results = json.loads((out / "metrics.json").read_text())

    assert settings.tracking_uri == f"sqlite:///{out / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=settings.tracking_uri)
    experiment = client.get_experiment_by_name("laptop")
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert len(runs) == 3 and sorted(children) == ["fold_0", "fold_1"]
    for fold, child in children.items():
        assert child.info.status == "FINISHED"
        # Every epoch of the fold, as its metrics.json has it.
        epochs = json.loads((out / fold / "metrics.json").read_text())
        for key in ("train_loss", "valid_loss", "valid_roc_auc", "lr"):
            history = client.get_metric_history(child.info.run_id, key)
            assert [(m.step, m.value) for m in history] == [(e["epoch"], pytest.approx(e[key])) for e in epochs]
    # The command's run: the resolved config, the cross-validated metrics and the report.
    assert parent.info.status == "FINISHED"
    assert parent.data.params["training.epochs"] == "2" and parent.data.params["architecture.backbone"] == "resnet10t"
    assert parent.data.params["environment.seed"] == str(cfg.environment.seed)  # the resolved seed
    assert parent.data.metrics["cv.mean_over_folds.roc_auc.mean"] == pytest.approx(
        results["cv"]["mean_over_folds"]["roc_auc"]["mean"])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"config.json", "metrics.json", "report"} <= artifacts
    report = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert "report/report.html" in report and any(p.endswith(".png") for p in report)
    assert list((out / "mlruns").rglob("report.html"))  # artifacts stay beside the outputs

    # A rerun of the same command into the same OUTPUT continues the same run (into an OUTPUT of its own: the
    # shared run is read, never written).
    rerun = tmp_path / "run"
    settings = TrackingSettings.from_config(cfg, str(rerun))
    client = MlflowClient(tracking_uri=settings.tracking_uri)
    tracking.start_run(settings, cfg.to_dict())
    first = json.loads((rerun / "tracking.json").read_text())["run_id"]
    tracking.finish_run(settings, results)
    tracking.start_run(settings, cfg.to_dict())
    assert json.loads((rerun / "tracking.json").read_text())["run_id"] == first
    assert client.get_run(first).info.status == "RUNNING"
    tracking.finish_run(settings, None, failed=True)
    assert client.get_run(first).info.status == "FAILED"
    assert len(client.search_runs([client.get_experiment_by_name("laptop").experiment_id])) == 1


def test_tensorboard_event_files_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = tmp_path / "run"
    cfg = load_config(LAPTOP_CONFIG, ["logging.logger=TensorBoard"])
    settings = TrackingSettings.from_config(cfg, str(out))
    tracking.start_run(settings, cfg.to_dict())
    fold = FoldTracker(settings, "fold_3", epochs=2)
    fold.log_epoch(1, {"epoch": 1, "train_loss": 0.9, "valid_roc_auc": 0.6, "train_batch_loss": [1.0, 0.8],
                       "device": "cpu"})
    fold.log_epoch(2, {"epoch": 2, "train_loss": 0.5, "valid_roc_auc": 0.8, "valid_f1": float("nan")})
    fold.close()
    fig = plt.figure(figsize=(2, 1))
    fig.savefig(out / "curves.png")
    plt.close(fig)
    (out / "report.html").write_text("<html></html>")
    tracking.finish_run(settings, {"cv": {"folds": [3], "pooled": {"roc_auc": 0.8, "accuracy": 0.5}}})

    events = EventAccumulator(str(out / "tensorboard" / "fold_3"))
    events.Reload()
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("valid_roc_auc")] == [(1, 0.6), (2, 0.8)]
    assert [e.value for e in events.Scalars("train_loss")] == pytest.approx([0.9, 0.5])
    assert "train_batch_loss" not in events.Tags()["scalars"] and "valid_f1" not in events.Tags()["scalars"]
    run = EventAccumulator(str(out / "tensorboard" / "run"), size_guidance={"tensors": 0, "images": 0})
    run.Reload()
    assert run.Scalars("cv.pooled.roc_auc")[0].value == pytest.approx(0.8)
    assert "report/curves.png" in run.Tags()["images"]
    texts = {t for t in run.Tags()["tensors"]}
    assert {"config/text_summary", "report/text_summary"} <= texts


def test_no_logger_tracks_nothing(tmp_path):
    cfg = load_config(LAPTOP_CONFIG)
    assert cfg.logging.logger is None and TrackingSettings.from_config(cfg, str(tmp_path)) is None
    tracking.start_run(None, cfg.to_dict())
    tracking.finish_run(None, {"cv": {}})
    assert list(tmp_path.iterdir()) == []


def test_mlflow_with_an_s3_output_needs_a_tracking_server():
    cfg = load_config(LAPTOP_CONFIG, ["logging.logger=MLflow"])
    with pytest.raises(ConfigError, match="logging.tracking_uri: an output on s3://b/run needs an MLflow"):
        TrackingSettings.from_config(cfg, "s3://b/run")
    cfg = load_config(LAPTOP_CONFIG, ["logging.logger=MLflow", "logging.tracking_uri=https://mlflow.example:5000"])
    settings = TrackingSettings.from_config(cfg, "s3://b/run")
    assert settings.tracking_uri == "https://mlflow.example:5000" and settings.artifact_location is None


def test_folds_without_an_opened_run_are_a_clear_error(tmp_path):
    cfg = load_config(LAPTOP_CONFIG, ["logging.logger=MLflow"])
    settings = TrackingSettings.from_config(cfg, str(tmp_path / "run"))
    with pytest.raises(RuntimeError, match="tracking.start_run was not called"):
        FoldTracker(settings, "fold_0", epochs=1)
    assert not storage.exists(str(tmp_path / "run" / "tracking.json"))


def _tree(folder):
    """Every file under `folder` with its size and modification time: what a write there would change."""
    return {str(f.relative_to(folder)): (f.stat().st_size, f.stat().st_mtime_ns)
            for f in sorted(folder.rglob("*")) if f.is_file()}


def test_a_copied_output_with_the_default_mlflow_store_is_refused_and_the_original_is_left_alone(tmp_path):
    from mlflow import MlflowClient

    cfg = load_config(LAPTOP_CONFIG, ["logging.logger=MLflow"])
    out, copy = tmp_path / "first run", tmp_path / "copy"  # a space: the store names its artifacts by a file URI
    settings = TrackingSettings.from_config(cfg, str(out))
    tracking.start_run(settings, cfg.to_dict())
    run_id = json.loads((out / "tracking.json").read_text())["run_id"]
    tracking.finish_run(settings, None, failed=True)
    shutil.copytree(out, copy)
    before, copied = _tree(out), _tree(copy)

    # The copy's mlflow.db still names the first folder's mlruns/: refused at the run's start, before anything is
    # logged (training.run opens the run before Ray starts, and closes only a run it opened).
    moved = TrackingSettings.from_config(cfg, str(copy))
    with pytest.raises(ConfigError) as refused:
        tracking.start_run(moved, cfg.to_dict())
    message = str(refused.value)
    assert message.startswith(f"logging.tracking_uri: {copy / 'mlflow.db'}, the default MLflow store")
    assert f"experiment 'laptop' in {(out / 'mlruns').as_uri()}, not in {(copy / 'mlruns').as_uri()}" in message
    assert f"remove {copy / 'mlflow.db'}, {copy / 'mlruns'} and {copy / 'tracking.json'}" in message
    assert _tree(out) == before and _tree(copy) == copied

    # A copy whose tracking.json names its own store (as an earlier gunsound left it after a rerun there): the run
    # it would reopen keeps its artifacts in the first folder too, and is refused before it is touched.
    state = json.loads((copy / "tracking.json").read_text()) | {"tracking_uri": moved.tracking_uri}
    (copy / "tracking.json").write_text(json.dumps(state))
    copied = _tree(copy)
    with pytest.raises(ConfigError, match=f"keeps the artifacts of run {run_id} of experiment 'laptop' in file:"):
        tracking.start_run(moved, cfg.to_dict())
    assert _tree(out) == before and _tree(copy) == copied

    # The same folder is this output's own store: its run continues, also when named through a symlink and with
    # a trailing slash.
    tracking.start_run(settings, cfg.to_dict())
    assert json.loads((out / "tracking.json").read_text())["run_id"] == run_id
    assert MlflowClient(tracking_uri=settings.tracking_uri).get_run(run_id).info.status == "RUNNING"
    tracking.finish_run(settings, None, failed=True)
    (tmp_path / "link").symlink_to(out)
    tracking.start_run(TrackingSettings.from_config(cfg, str(tmp_path / "link") + "/"), cfg.to_dict())
    assert json.loads((out / "tracking.json").read_text())["run_id"] == run_id
    assert MlflowClient(tracking_uri=settings.tracking_uri).get_run(run_id).info.status == "RUNNING"

    # With the first folder gone the copy is still refused. Removing what the error names tracks a moved copy
    # afresh with artifacts in its own mlruns/ (moved first: MLflow keeps each store's database open for the life
    # of the process, as a new `gunsound train` would not).
    shutil.rmtree(out)
    with pytest.raises(ConfigError, match=r"first%20run/mlruns/\w+/artifacts \(no longer there\), not in"):
        tracking.start_run(moved, cfg.to_dict())
    again = tmp_path / "moved"
    shutil.move(copy, again)
    for name in ("mlflow.db", "tracking.json"):
        (again / name).unlink()
    shutil.rmtree(again / "mlruns")
    tracking.start_run(TrackingSettings.from_config(cfg, str(again)), cfg.to_dict())
    assert list((again / "mlruns").rglob("config.json")) and not out.exists()


def test_mlflows_own_default_experiment_is_refused_for_the_default_store(tmp_path):
    cfg = load_config(LAPTOP_CONFIG, ["logging.logger=MLflow", "experiment_name=Default"])
    with pytest.raises(ConfigError, match="experiment_name: 'Default' is the experiment MLflow makes in every store"):
        TrackingSettings.from_config(cfg, str(tmp_path / "run"))
    served = load_config(LAPTOP_CONFIG, ["logging.logger=MLflow", "experiment_name=Default",
                                         "logging.tracking_uri=https://mlflow.example:5000"])
    assert TrackingSettings.from_config(served, str(tmp_path / "run")).experiment == "Default"


def test_a_run_that_fails_while_opening_is_closed_as_failed(tmp_path):
    from mlflow import MlflowClient

    cfg = load_config(LAPTOP_CONFIG, ["logging.logger=MLflow"])
    out = tmp_path / "run"
    out.mkdir()
    (out / "mlruns").write_text("not a folder")  # the artifact store cannot take the config
    settings = TrackingSettings.from_config(cfg, str(out))
    with pytest.raises(OSError):
        tracking.start_run(settings, cfg.to_dict())
    client = MlflowClient(tracking_uri=settings.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("laptop").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"] and not (out / "tracking.json").exists()


def test_a_tracking_uri_is_logged_and_written_redacted(tmp_path, monkeypatch, caplog):
    """The URI's query may hold a database user or settings: tracking.json, the log and the logged config keep its
    keys only. A rerun still finds its run, also from a tracking.json that an earlier version wrote whole."""
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)  # a served store's artifacts default to ./mlruns
    uri = f"sqlite:///{tmp_path / 'store.db'}?timeout=30"
    cfg = load_config(LAPTOP_CONFIG, ["logging.logger=MLflow", f"logging.tracking_uri={uri}"])
    out = tmp_path / "run"
    settings = TrackingSettings.from_config(cfg, str(out))
    assert settings.tracking_uri == uri  # the client gets it whole
    shown = f"sqlite:///{tmp_path / 'store.db'}?timeout=***"
    with caplog.at_level("INFO", logger="gunsound.tracking"):
        tracking.start_run(settings, cfg.to_dict())
    state = json.loads((out / "tracking.json").read_text())
    assert state["tracking_uri"] == shown
    assert "timeout=30" not in caplog.text and f"at {shown}" in caplog.text
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(state["run_id"])
    assert run.data.params["logging.tracking_uri"] == shown
    with open(client.download_artifacts(state["run_id"], "config.json", str(tmp_path))) as f:
        logged = json.load(f)
    assert logged["logging"]["tracking_uri"] == shown
    tracking.finish_run(settings, None, failed=True)

    tracking.start_run(settings, cfg.to_dict())
    assert json.loads((out / "tracking.json").read_text())["run_id"] == state["run_id"]
    (out / "tracking.json").write_text(json.dumps(state | {"tracking_uri": uri}))
    tracking.start_run(settings, cfg.to_dict())
    assert json.loads((out / "tracking.json").read_text()) == state


def test_an_overwritten_run_is_tracked_as_a_new_run(tmp_path, monkeypatch):
    """`--overwrite` removes tracking.json with the run's other outputs: the fresh run opens a new MLflow run (the
    old one kept its parameters and would have held two values per epoch)."""
    from gunsound import fingerprint
    from gunsound.training import TRAINING_OUTPUTS

    monkeypatch.chdir(tmp_path)
    cfg = load_config(LAPTOP_CONFIG, ["logging.logger=MLflow"])
    out = tmp_path / "run"
    settings = TrackingSettings.from_config(cfg, str(out))
    tracking.start_run(settings, cfg.to_dict())
    first = json.loads((out / "tracking.json").read_text())["run_id"]
    (out / "tensorboard" / "run").mkdir(parents=True)
    fingerprint.claim(str(out), fingerprint.Fingerprint("train", {"training.epochs": 2}), overwrite=True,
                      owned=TRAINING_OUTPUTS)
    assert not (out / "tracking.json").exists() and not (out / "tensorboard").exists()
    tracking.start_run(settings, cfg.to_dict())
    assert json.loads((out / "tracking.json").read_text())["run_id"] != first


def test_a_neptune_run_is_kept_by_its_command_and_new_after_an_overwrite(tmp_path, monkeypatch):
    """Neptune (a service the tests cannot reach; its client stood in for) opens runs by a custom id: the same for
    every process and rerun of a command (kept in tracking.json), a new one once tracking.json is removed."""
    import importlib.machinery
    import sys
    import types

    opened = []

    class Run(dict):
        def __getitem__(self, key):
            return types.SimpleNamespace(fetch=lambda: "GUN-1", append=lambda *a, **k: None)

        def stop(self):
            pass

    neptune = types.ModuleType("neptune")
    neptune.__spec__ = importlib.machinery.ModuleSpec("neptune", None)  # found by the config's installed check
    neptune.init_run = lambda **kwargs: opened.append(kwargs["custom_run_id"]) or Run()
    neptune.utils = types.ModuleType("neptune.utils")
    neptune.utils.stringify_unsupported = lambda value: value
    monkeypatch.setitem(sys.modules, "neptune", neptune)
    monkeypatch.setitem(sys.modules, "neptune.utils", neptune.utils)
    monkeypatch.setenv("NEPTUNE_API_TOKEN", "not-a-real-token")
    cfg = load_config(LAPTOP_CONFIG, ["logging.logger=Neptune", "logging.neptune_project=team/gunsound"])
    out = tmp_path / "run"
    settings = TrackingSettings.from_config(cfg, str(out))
    tracking.start_run(settings, cfg.to_dict())
    FoldTracker(settings, "fold_0", epochs=1).close()  # a worker opens the command's run
    tracking.start_run(settings, cfg.to_dict())  # a rerun of the command
    (out / "tracking.json").unlink()  # what --overwrite does
    tracking.start_run(settings, cfg.to_dict())
    assert opened[0] == opened[1] == opened[2] != opened[3]


def test_a_tracking_store_that_fails_at_the_end_does_not_decide_the_jobs_outcome(tmp_path, caplog):
    settings = TrackingSettings.from_config(load_config(LAPTOP_CONFIG, ["logging.logger=MLflow"]), str(tmp_path))
    with caplog.at_level("WARNING", logger="gunsound.tracking"):
        tracking.finish_run_quietly(settings, {"cv": {}})  # no run was opened: finish_run raises
    assert "could not close the MLflow run" in caplog.text
    with pytest.raises(RuntimeError, match="no run opened"):
        tracking.finish_run(settings, {"cv": {}})
