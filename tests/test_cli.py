"""The command line's contract without Ray: exit statuses by what went wrong and when, one line per failure,
the ranges of its numeric flags, the outputs a Ray job must name, and what `tune --then-train` trains."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from gunsound import cli, training, tuning
from gunsound.config import ConfigError
from gunsound.synthesis import generate_dataset
from tests.conftest import LAPTOP_CONFIG


def _one_error_line(capsys) -> str:
    """The command's message: one line, no traceback (log lines may share stderr)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def wav(tmp_path) -> str:
    sf.write(tmp_path / "a.wav", np.zeros(16000, dtype=np.float32), 16000)
    return str(tmp_path / "a.wav")


@pytest.fixture
def missing_fold_run(tmp_path) -> str:
    """A run whose ensemble.json names a fold that is not there."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "ensemble.json").write_text(json.dumps({"models": ["fold_3/model.pt"]}))
    return str(tmp_path / "run")


# ------------------------------------------------------------------------------------------------ exit statuses


@pytest.mark.parametrize("case", ["score: ensemble names a missing fold", "predict: ensemble names a missing fold",
                                  "export: ensemble names a missing fold", "export: RUN is missing",
                                  "score: OUTPUT is a file", "train: OUTPUT is a file",
                                  "predict: FILE is no audio", "predict: FILE is missing"])
def test_input_found_bad_before_the_job_starts_exits_2(case, tmp_path, wav, missing_fold_run, capsys):
    (tmp_path / "taken.txt").write_text("a file where OUTPUT should go")
    (tmp_path / "text.wav").write_text("not audio")
    out, taken = str(tmp_path / "out"), str(tmp_path / "taken.txt")
    argv, says = {
        "score: ensemble names a missing fold": (["score", missing_fold_run, wav, out], "fold_3/model.pt"),
        "predict: ensemble names a missing fold": (["predict", missing_fold_run, wav], "fold_3/model.pt"),
        "export: ensemble names a missing fold": (["export", missing_fold_run, out], "fold_3/model.pt"),
        "export: RUN is missing": (["export", str(tmp_path / "no_run"), out], "no_run"),
        "score: OUTPUT is a file": (["score", missing_fold_run, wav, taken], f"OUTPUT {taken}: an existing file"),
        "train: OUTPUT is a file": (["train", str(LAPTOP_CONFIG), "--output", taken, "--dry-run"],
                                    f"OUTPUT {taken}: an existing file"),
        "predict: FILE is no audio": (["predict", missing_fold_run, str(tmp_path / "text.wav")], "text.wav"),
        "predict: FILE is missing": (["predict", missing_fold_run, str(tmp_path / "none.wav")], "none.wav"),
    }[case]
    assert cli.main(argv) == cli.EXIT_USAGE
    assert says in _one_error_line(capsys)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def _ray_task_error(cause: Exception) -> Exception:
    """What the driver gets when a Ray task (a Ray Data map, a fold's task) raised `cause`."""
    from ray.exceptions import RayTaskError

    return RayTaskError("map_batches", "Traceback (most recent call last):\n  ...\nValueError: ...",
                        cause).as_instanceof_cause()


def _worker_group_error(cause: Exception) -> Exception:
    from ray.train.v2.api.exceptions import WorkerGroupError

    return WorkerGroupError("Worker 0 failed:\nTraceback (most recent call last):\n  ...", {0: cause})


def _client_error() -> Exception:
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": "NoSuchBucket", "Message": "The specified bucket does not exist"}},
                       "PutObject")


def _botocore_error() -> Exception:
    from botocore.exceptions import EndpointConnectionError

    return EndpointConnectionError(endpoint_url="http://127.0.0.1:9")


MID_JOB_ERRORS = {
    "a Ray task's ValueError": (lambda: _ray_task_error(ValueError("cannot reshape array")),
                                "in a Ray task: ValueError: cannot reshape array"),
    "a Ray task's ConfigError": (lambda: _ray_task_error(ConfigError("training.epochs: bad")),
                                 "ConfigError: training.epochs: bad"),
    "a driver's FileNotFoundError": (lambda: FileNotFoundError("fold_1/valid_predictions.parquet"),
                                     "error: fold_1/valid_predictions.parquet"),
    "Ray Train's worker group failed": (lambda: _worker_group_error(RuntimeError("CUDA error: out of memory")),
                                        "in Train worker 0: RuntimeError: CUDA error: out of memory"),
    "botocore's ClientError": (_client_error, "ClientError: An error occurred (NoSuchBucket) when calling the "
                                              "PutObject operation: The specified bucket does not exist"),
    "botocore's BotoCoreError": (_botocore_error, 'EndpointConnectionError: Could not connect to the endpoint '
                                                  'URL: "http://127.0.0.1:9"'),
    "a KeyError": (lambda: KeyError("valid_roc_auc"), "KeyError: 'valid_roc_auc'"),
}


@pytest.fixture
def fake_plan(monkeypatch):
    """`train` without the dataset's checks: `prepare` gives a plan that only describes itself."""
    import gunsound.plan

    monkeypatch.setattr(gunsound.plan, "prepare", lambda *_a, **_k: SimpleNamespace(describe=lambda: "(plan)"))


def _raises(exc: Exception):
    def run(*_args, **_kwargs):
        raise exc

    return run


@pytest.mark.parametrize("name", list(MID_JOB_ERRORS))
def test_a_job_that_fails_while_it_runs_exits_1_with_one_line(name, fake_plan, monkeypatch, tmp_path, capsys):
    make, says = MID_JOB_ERRORS[name]
    monkeypatch.setattr(training, "run", _raises(make()))
    assert cli.main(["train", str(LAPTOP_CONFIG), "--output", str(tmp_path / "run")]) == cli.EXIT_FAILED
    assert says in _one_error_line(capsys)


def test_a_check_inside_the_jobs_call_still_exits_2(fake_plan, monkeypatch, tmp_path, capsys):
    """training.run checks the tracking settings and the weights before Ray starts: bad config, not a failure."""
    monkeypatch.setattr(training, "run", _raises(ConfigError("logging.tracking_uri: needs a server")))
    assert cli.main(["train", str(LAPTOP_CONFIG), "--output", str(tmp_path / "run")]) == cli.EXIT_USAGE
    assert _one_error_line(capsys) == "error: logging.tracking_uri: needs a server"


@pytest.mark.parametrize("module", ["gunsound", "ray_jobs.train"])
def test_verbose_adds_the_traceback(module, fake_plan, monkeypatch, tmp_path, capsys):
    import ray_jobs.train

    monkeypatch.setattr(training, "run", _raises(KeyError("valid_roc_auc")))
    args = ["-v", str(LAPTOP_CONFIG), "--output", str(tmp_path / "run")]
    code = cli.main(["-v", "train", *args[1:]]) if module == "gunsound" else \
        cli.main(args, parser=ray_jobs.train.build_parser())
    err = capsys.readouterr().err
    assert code == cli.EXIT_FAILED
    assert "Traceback" in err and err.rstrip().endswith("error: KeyError: 'valid_roc_auc'"), err


def test_ray_job_entry_points_take_the_gunsound_options():
    import ray_jobs.score
    import ray_jobs.train
    import ray_jobs.tune

    assert ray_jobs.train.build_parser().parse_args(["-v", "c.yaml"]).verbose
    assert ray_jobs.tune.build_parser().parse_args(["c.yaml", "--verbose", "--num-samples", "2"]).verbose
    assert ray_jobs.score.build_parser().parse_args(["-v", "m", "i", "o"]).verbose


@pytest.mark.parametrize("command, says", [("predict", "2  bad arguments, config, MODEL or FILE"),
                                            ("export", "2  bad arguments, config or RUN"),
                                            ("synth", "1  writing the dataset failed")])
def test_each_commands_help_lists_its_exit_statuses(command, says, capsys):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    out = capsys.readouterr().out
    assert "exit status:" in out and says in out


# ------------------------------------------------------------------------------------------------ flags


@pytest.mark.parametrize("argv, flag", [
    (["tune", str(LAPTOP_CONFIG), "--data", "none", "--dry-run", "--num-samples", "0"], "--num-samples"),
    (["tune", str(LAPTOP_CONFIG), "--data", "none", "--dry-run", "--num-samples", "-1"], "--num-samples"),
    (["synth", "{out}", "--clips-per-class", "0"], "--clips-per-class"),
    (["synth", "{out}", "--clips-per-class", "1", "--background", "-1"], "--background"),
    (["synth", "{out}", "--clips-per-class", "1", "--seed", "-5"], "--seed"),
    (["predict", "none", "none.wav", "--top", "-1"], "--top"),
    (["predict", "none", "none.wav", "--top", "0"], "--top"),
])
def test_counts_out_of_range_are_refused_naming_the_flag(argv, flag, tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        cli.main([a.format(out=tmp_path / "synth") for a in argv])
    assert stopped.value.code == cli.EXIT_USAGE
    assert f"argument {flag}: must be at least" in capsys.readouterr().err
    assert not (tmp_path / "synth").exists()


# ------------------------------------------------------------------------------------------------ Ray jobs


@pytest.mark.parametrize("variable", ["RAY_JOB_CONFIG_JSON_ENV_VAR", "RAY_JOB_ID"])
@pytest.mark.parametrize("argv, says", [
    (["train", str(LAPTOP_CONFIG), "--dry-run"], "--output is required in a Ray job"),
    (["tune", str(LAPTOP_CONFIG), "--dry-run"], "--output is required in a Ray job"),
    (["train", str(LAPTOP_CONFIG), "--output", "runs/a", "--dry-run"], "--output runs/a: a relative path"),
    (["score", "run", "in", "scores"], "OUTPUT scores: a relative path"),
])
def test_a_ray_job_must_name_where_its_outputs_go(variable, argv, says, monkeypatch, tmp_path, capsys):
    """`ray job submit` runs the command in Ray's temporary copy of the working dir (`ray job submit` sets
    RAY_JOB_CONFIG_JSON_ENV_VAR for it; Ray's workers have RAY_JOB_ID): what is written there is lost."""
    monkeypatch.setenv(variable, "{}" if variable.endswith("JSON_ENV_VAR") else "01000000")
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == cli.EXIT_USAGE
    line = _one_error_line(capsys)
    assert says in line and f"working folder ({tmp_path}) is Ray's temporary copy" in line
    assert list(tmp_path.iterdir()) == []


def test_a_ray_job_with_an_absolute_output_runs(fake_plan, monkeypatch, tmp_path):
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    monkeypatch.setattr(training, "run", lambda *_a, **_k: {"folds": {}})
    assert cli.main(["train", str(LAPTOP_CONFIG), "--output", str(tmp_path / "run")]) == cli.EXIT_OK


# ------------------------------------------------------------------------------------------------ tune


@pytest.fixture(scope="module")
def one_split_data(tmp_path_factory):
    """A small dataset with a separate validation dataframe (one clip per class) besides its training one."""
    root = tmp_path_factory.mktemp("one_split")
    frame = generate_dataset(root, clips_per_class=3, background=0, seed=3)
    valid = frame.groupby("class").head(1)
    frame.drop(valid.index).to_parquet(root / "train_only.pq")
    valid.to_parquet(root / "valid.pq")
    return root


def test_then_train_trains_the_folds_of_the_split(one_split_data, monkeypatch, tmp_path):
    """With a validation dataframe the split is one fold (0): --then-train trains it, not k folds of which all
    but fold 0 would hold no validation clip."""
    trained = {}

    def best_is_the_plan(plan, _num_samples, **_kwargs):
        return tuning.TuneResult(table=pd.DataFrame({"trial": [0]}), best_params={}, best_config=plan.cfg,
                                 best_config_uri="(fake)")

    def train(plan, **_kwargs):
        trained.update(folds=list(plan.fold_ids), config_folds=list(plan.cfg.dataset.folds),
                       validating={k: int((plan.folds == k).sum()) for k in plan.fold_ids})
        return {"cv": {"mean_over_folds": {}}}

    monkeypatch.setattr(tuning, "run_tune", best_is_the_plan)
    monkeypatch.setattr(training, "run", train)
    sets = ["dataset.train_dataframe=train_only.pq", "dataset.validation_dataframe=valid.pq",
            "dataset.validation_strategy=custom"]
    assert cli.main(["tune", str(LAPTOP_CONFIG), "--data", str(one_split_data), "--output", str(tmp_path / "sweep"),
                     "--then-train", *[a for kv in sets for a in ("--set", kv)]]) == cli.EXIT_OK
    assert trained == {"folds": [0], "config_folds": [0], "validating": {0: 9}}
