"""The checks plan.prepare makes on a dataset's split before anything trains: a validation dataframe that agrees
with the training data, folds that can be validated, and a plan that says the grouping it used."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from gunsound.config import Config, ConfigError, check_dataset_sources, config_from_dict
from gunsound.dataset import ManifestError
from gunsound.plan import prepare


def _wav(path: Path) -> None:
    """A short noise clip: the plan reads headers, never the sound."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.random.default_rng(0).normal(0, 0.1, 3200).astype(np.float32), 16000)


def _table(root: Path, name: str, first: int, labels: list, **columns: list) -> None:
    """<root>/<name> listing a<first>.wav.. with `labels`, the clips beside it."""
    paths = [f"a{i}.wav" for i in range(first, first + len(labels))]
    for path in paths:
        _wav(root / path)
    pd.DataFrame({"image": paths, "class": labels, **columns}).to_parquet(root / name)


def _cfg(**dataset: object) -> Config:
    cfg = config_from_dict({"dataset": {"data_folder": "", "train_dataframe": "train.pq", **dataset},
                            "environment": {"seed": 1}, "architecture": {"pretrained": False}})
    check_dataset_sources(cfg.dataset, "<test>")
    return cfg


def _with_validation(**dataset: object) -> Config:
    return _cfg(validation_dataframe="valid.pq", validation_strategy="custom", **dataset)


def test_validation_labels_the_training_data_lacks_are_problem_rows(tmp_path):
    """They became extra classes that never trained: ak-47 beside AK-47 doubled the classes."""
    _table(tmp_path, "train.pq", 0, ["AK-47", "M16"] * 3)
    _table(tmp_path, "valid.pq", 6, ["ak-47", "M16", "MP5", "M16"])
    with pytest.raises(ManifestError) as caught:
        prepare(_with_validation(), str(tmp_path), str(tmp_path / "out"))
    assert str(tmp_path / "valid.pq") in str(caught.value)
    assert [(p.row, p.reason) for p in caught.value.problems] == [
        (0, "label 'ak-47' is no label of the training data, so its class would never train (the training data "
            "spells it 'AK-47')"),
        (2, "label 'MP5' is no label of the training data, so its class would never train")]
    plan = prepare(_with_validation(), str(tmp_path), str(tmp_path / "out"), drop_bad_rows=True)
    assert plan.manifest.classes == ["AK-47", "M16"] and (plan.folds == 0).sum() == 2
    assert sorted(p.reason.split(":")[0] for p in plan.manifest.dropped) == ["valid.pq row 0", "valid.pq row 2"]


def test_int_labels_in_training_and_float_labels_in_validation_are_one_class(tmp_path):
    _table(tmp_path, "train.pq", 0, [1, 2] * 3)
    _table(tmp_path, "valid.pq", 6, [1.0, 2.0])
    plan = prepare(_with_validation(), str(tmp_path), str(tmp_path / "out"))
    assert plan.manifest.classes == ["1", "2"]


def test_a_validation_dataframe_that_is_not_there_is_named_not_replaced(tmp_path):
    """With one dataframe there, the training one was taken as the validation one ("shares 6 files")."""
    _table(tmp_path, "train.pq", 0, ["AK", "M16"] * 3)
    with pytest.raises(ConfigError, match=r"dataset.validation_dataframe valid.pq not found under .* \(dataframes "
                                          r"there: train.pq\)"):
        prepare(_with_validation(), str(tmp_path), str(tmp_path / "out"))


def test_groups_of_the_validation_dataframe_must_not_be_in_the_training_data(tmp_path):
    _table(tmp_path, "train.pq", 0, ["AK", "M16"] * 3, session=["s0", "s1", "s2"] * 2)
    _table(tmp_path, "valid.pq", 6, ["AK", "M16"], session=["S1 ", "s9"])
    with pytest.raises(ConfigError, match=r"dataset.group_fold_column 'session': 1 group\(s\) have clips in both "
                                          r"the training data and dataset.validation_dataframe valid.pq, e.g. 's1'"):
        prepare(_with_validation(group_fold_column="session"), str(tmp_path), str(tmp_path / "out"))


def test_the_plan_says_the_grouping_it_used(tmp_path):
    """Folder per class with the seed's group_fold_column `image` groups by file, and says so."""
    for cls in ("AK-47", "M16"):
        for i in range(5):
            _wav(tmp_path / cls / f"{i}.wav")
    plan = prepare(_cfg(train_dataframe="", group_fold_column="image"), str(tmp_path), str(tmp_path / "out"))
    line = next(line for line in plan.describe().splitlines() if line.startswith("validation"))
    assert line.endswith("(stratified by class, grouped by file)")
    assert any("read as folder per class" in note for note in plan.notes)


def test_a_fold_with_no_validation_clips_is_refused(tmp_path):
    """After a data_sample a fold may validate nothing; it trained and reported nothing meaningful."""
    _table(tmp_path, "train.pq", 0, ["AK", "M16"] * 20)
    refused = 0
    for seed in range(6):
        cfg = _cfg(data_sample=0.1, folds=[0, 1, 2, 3, 4])
        cfg.environment.seed = seed
        try:
            plan = prepare(cfg, str(tmp_path), str(tmp_path / "out"))
        except ManifestError as exc:
            assert "(dataset.folds) has no validation clips after dataset.data_sample 0.1" in str(exc)
            refused += 1
        else:
            assert all((plan.folds == k).any() for k in plan.fold_ids)
    assert refused  # 4 clips in 5 folds: every seed leaves a fold empty


def test_a_fold_validating_a_class_its_training_side_lacks_is_said(tmp_path, caplog):
    """Groups that coincide with classes: a warning naming them, not an error (rare classes grouped by package)."""
    labels = [cls for cls in ("AK", "M16", "MP5", "M4", "MG42") for _ in range(5)]
    _table(tmp_path, "train.pq", 0, labels, package=[f"pkg_{label}" for label in labels])
    with caplog.at_level(logging.WARNING, logger="gunsound.plan"):
        plan = prepare(_cfg(group_fold_column="package", folds=[0]), str(tmp_path), str(tmp_path / "out"))
    validated = sorted(set(plan.manifest.frame["label"][plan.folds == 0]))
    said = f"fold 0 validates class(es) its training side has no clip of: {', '.join(validated)}"
    assert any(said in record.getMessage() for record in caplog.records)
    assert any(said in note for note in plan.notes)
