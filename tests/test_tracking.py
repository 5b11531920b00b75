"""Experiment tracking: a real training's epochs, config and report read back with MLflow's client, TensorBoard
event files read back with TensorBoard's reader, and the settings that are refused."""

import json

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
