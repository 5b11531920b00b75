"""One fold trained end to end on a local Ray, through the CLI."""

import io
import json
import logging
import shutil
import sys

import pandas as pd
import pytest
import yaml

from gunsound.cli import main, setup_logging
from gunsound.model import ModelArtifact
from tests.conftest import SEED_CONFIG, SMALL_DATA_CONFIG


def test_cli_logs_to_the_stderr_of_the_moment(monkeypatch):
    """A process that runs main() more than once (a notebook, a test) may swap and close its stderr between
    runs; the log goes to the stderr of the moment, not to a closed one."""
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])  # as in a fresh process: setup_logging installs its handler
    monkeypatch.setattr(root, "level", logging.WARNING)
    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    setup_logging()
    logging.getLogger("gunsound").info("first run")
    assert "INFO gunsound: first run" in first.getvalue()
    first.close()
    monkeypatch.setattr(sys, "stderr", second)
    logging.getLogger("gunsound").info("second run")
    assert "INFO gunsound: second run" in second.getvalue() and "Logging error" not in second.getvalue()


def test_dry_run_validates_and_prints_the_plan(synth_dir, capsys):
    code = main(["train", str(SEED_CONFIG), "--data", str(synth_dir), "--dry-run",
                 "--set", "architecture.pretrained=false"])
    out = capsys.readouterr().out
    assert code == 0
    assert "95 clips, 9 classes" in out and "chunk 2 s" in out and "running [4]" in out
    assert "fold 4" in out and "dry run: nothing trained" in out


def test_cli_errors_are_clear_and_nonzero(synth_dir, tmp_path, capsys):
    assert main(["train", str(SEED_CONFIG), "--data", str(synth_dir), "--set", "training.epochz=1"]) == 2
    assert "'training.epochz'" in capsys.readouterr().err
    assert main(["train", str(SEED_CONFIG), "--data", str(tmp_path / "none"), "--dry-run"]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.ray
def test_two_folds_end_to_end_with_cv_metrics_and_report(trained_run_cli, tmp_path):
    # The session's shared run: `main(train_args(synth_dir, out, *TRAINED_RUN_EXTRA))` (tests/conftest.py).
    out, code = trained_run_cli
    assert code == 0
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["audio"]["training_chunk_seconds"] == 2.0 and resolved["audio"]["sample_rate"] == 48000
    metrics = json.loads((out / "metrics.json").read_text())
    for fold in ("0", "1"):
        epochs = metrics["folds"][fold]["epochs"]
        assert [e["epoch"] for e in epochs] == [1, 2]
        for e in epochs:
            for key in ("train_loss", "valid_loss", "valid_roc_auc", "valid_accuracy", "valid_f1", "lr"):
                assert key in e and e[key] == e[key]  # present and not NaN
        assert epochs[1]["lr"] < epochs[0]["lr"]  # cosine decay
        # Two workers of one CPU each (the run's --set), each computing on its one CPU.
        workers = json.loads((out / f"fold_{fold}" / "metrics.json").read_text())[-1]["workers"]
        assert [(w["rank"], w["threads"]) for w in workers] == [(0, 1), (1, 1)]
        model = ModelArtifact.load(str(out / f"fold_{fold}" / "model.pt"))
        assert len(model.classes) == 9 and model.features.n_mels == 32 and model.fold == int(fold)
    # Out-of-fold predictions cover every clip exactly once.
    oof = pd.read_parquet(out / "oof_predictions.parquet")
    manifest = pd.read_parquet(out / "manifest.parquet")
    assert sorted(oof["row"]) == sorted(manifest["row"])
    assert (oof.set_index("row")["fold"].sort_index() == manifest.set_index("row")["fold"].sort_index()).all()
    cv = metrics["cv"]
    assert set(cv["mean_over_folds"]) == {"roc_auc", "accuracy", "f1", "log_loss"}
    assert cv["mean_over_folds"]["roc_auc"]["n"] == 2 and cv["mean_over_folds"]["roc_auc"]["std"] >= 0
    assert sum(map(sum, cv["confusion_matrix"])) == len(manifest)
    assert set(cv["per_class"]) >= set(model.classes)
    assert json.loads((out / "ensemble.json").read_text())["models"] == ["fold_0/model.pt", "fold_1/model.pt"]
    page = (out / "report.html").read_text()
    for chart in ("learning_rate.png", "train_batch_loss.png", "validation_curves.png", "confusion_matrix.png",
                  "per_class.png", "train_spectrograms.png", "valid_predictions.png", "grad_cam.png"):
        assert f'src="{chart}"' in page and (out / chart).stat().st_size > 1000
    # While folds train, the report is rebuilt after every epoch from the per-fold metrics written so far.
    live = tmp_path / "live"
    (live / "fold_0").mkdir(parents=True)
    (live / "config.yaml").write_text((out / "config.yaml").read_text())
    (live / "fold_0" / "metrics.json").write_text((out / "fold_0" / "metrics.json").read_text())
    from gunsound.report import write_report

    write_report(str(live), live=True)
    page = (live / "report.html").read_text()
    assert "Training in progress" in page and (live / "validation_curves.png").exists()


def test_a_job_that_runs_one_fold_keeps_the_folds_earlier_jobs_finished(trained_run, synth_dir, tmp_path):
    """`dataset.folds` names which folds of the split a job runs; a second job into the same OUTPUT for another
    fold resumes the run, and the run's metrics, out-of-fold predictions and ensemble hold every finished fold
    (they held the last job's folds only: fold 0 vanished from the ensemble that `score` uses)."""
    from tests.conftest import TRAINED_RUN_EXTRA, train_args

    out = tmp_path / "run"
    shutil.copytree(trained_run, out, ignore=shutil.ignore_patterns("ray", "lease.json"))
    extra = list(TRAINED_RUN_EXTRA)
    extra[extra.index("dataset.folds=[0, 1]")] = "dataset.folds=[1]"
    # Not tracked: the copy's default MLflow store names the first folder's artifacts (refused, test_tracking).
    assert main(train_args(synth_dir, out, *extra, "--set", "logging.logger=None")) == 0  # fold 1: finished
    assert json.loads((out / "ensemble.json").read_text())["models"] == ["fold_0/model.pt", "fold_1/model.pt"]
    assert list(json.loads((out / "metrics.json").read_text())["folds"]) == ["0", "1"]
    assert sorted(pd.read_parquet(out / "oof_predictions.parquet")["fold"].unique()) == [0, 1]


@pytest.mark.parametrize("layout", ["dataframe with a package column", "folder per class"])
def test_small_data_config_takes_the_usual_overrides_on_either_layout(synth_dir, tmp_path, capsys, layout):
    data = tmp_path / "data"
    shutil.copytree(synth_dir, data)
    if layout == "folder per class":
        data = data / "Gun_Classifier"
    else:  # folds grouped by package, as on the real-sound corpus
        frame = pd.read_parquet(data / "train.pq")
        frame["package"] = [f"pkg{i % 5}" for i in range(len(frame))]
        frame.to_parquet(data / "train.pq")
    code = main(["train", str(SMALL_DATA_CONFIG), "--data", str(data), "--dry-run",
                 "--set", "dataset.validation_size=0.25", "--set", "dataset.folds=[0, 2]",
                 "--set", "training.epochs=3"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "running [0, 2]" in out and "dry run: nothing trained" in out
