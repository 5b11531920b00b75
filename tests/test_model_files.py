"""What the scoring driver reads of a model (`model_files`) and what the scorers load (`ModelArtifact.load`) must
agree: a file one refuses, the other refuses too, by name, as bad input (a gunsound ValueError: exit 2)."""

import dataclasses
import io
import json
from dataclasses import asdict, replace

import numpy as np
import pytest
import soundfile as sf
import torch

from gunsound import scoring
from gunsound.config import ArchitectureConfig
from gunsound.features import FeatureParams
from gunsound.inference import WindowScorer, load_model_files, load_scoring_model
from gunsound.model import ModelArtifact, build_model
from gunsound.model_files import FEATURE_FIELDS, REQUIRED, ModelFileError, describe_model, model_files

ARCH = ArchitectureConfig(backbone="resnet18", pretrained=False)
FEATURES = FeatureParams(16000, 512, 160, 32, 50.0, 7000.0, False)


def _artifact(seed: int = 0, **changes: object) -> ModelArtifact:
    torch.manual_seed(seed)
    artifact = ModelArtifact(classes=["a", "b"], features=FEATURES, chunk_seconds=1.0, architecture=ARCH,
                             loss_function="BCE", state_dict=build_model(ARCH, 2).state_dict())
    return replace(artifact, **changes)


def _saved(path, artifact: ModelArtifact, **fields: object) -> str:
    """A model.pt of `artifact` whose saved dictionary has `fields` changed: what another version could write."""
    values = {"format": 1, "classes": artifact.classes, "features": asdict(artifact.features),
              "chunk_seconds": artifact.chunk_seconds, "architecture": asdict(artifact.architecture),
              "loss_function": artifact.loss_function, "state_dict": artifact.state_dict, **fields}
    buffer = io.BytesIO()
    torch.save(values, buffer)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())
    return str(path)


def _run(root, ensemble: dict) -> str:
    _artifact(0).save(str(root / "fold_0" / "model.pt"))
    _artifact(1).save(str(root / "fold_1" / "model.pt"))
    (root / "ensemble.json").write_text(json.dumps(ensemble))
    return str(root)


def test_an_ensemble_that_lists_a_fold_twice_is_refused(tmp_path):
    """A fold listed twice would weigh double in the mean."""
    run = _run(tmp_path, {"models": ["fold_0/model.pt", "fold_0/model.pt", "fold_1/model.pt"],
                          "combine": "mean_probability"})
    for read in (lambda: model_files(run), lambda: load_scoring_model(run)):
        with pytest.raises(ModelFileError, match=f"^{run}/ensemble.json: model 'fold_0/model.pt' is listed more"):
            read()


def test_an_ensemble_combined_otherwise_than_by_the_mean_probability_is_refused(tmp_path):
    run = _run(tmp_path, {"models": ["fold_0/model.pt", "fold_1/model.pt"], "combine": "geometric_mean"})
    with pytest.raises(ModelFileError, match=f"^{run}/ensemble.json: combine 'geometric_mean' is not implemented"):
        load_scoring_model(run)
    # What training writes, and a file written before `combine` existed, are scored.
    for ensemble in ({"models": ["fold_0/model.pt", "fold_1/model.pt"], "combine": "mean_probability"},
                     {"models": ["fold_0/model.pt", "fold_1/model.pt"]}):
        (tmp_path / "ensemble.json").write_text(json.dumps(ensemble))
        assert len(load_scoring_model(run).artifacts) == 2


def test_the_drivers_feature_fields_are_those_of_feature_params():
    """model_files cannot import FeatureParams (it imports torch): its copy of the fields must not drift."""
    fields = {f.name: REQUIRED if f.default is dataclasses.MISSING else f.default
              for f in dataclasses.fields(FeatureParams)}
    assert FEATURE_FIELDS == fields


@pytest.mark.parametrize(("fields", "shown"), [
    ({"classes": ["a", "b", "c"]}, "lists 3 classes but the model's head scores 2"),
    ({"features": {**asdict(FEATURES), "pcen": True}}, "features field 'pcen' is not one this version"),
    ({"loss_function": "Focal"}, "loss_function 'Focal' is not one this version scores"),
    ({"loss_function": "bce"}, "loss_function 'bce' is not one this version scores"),
])
def test_a_model_file_the_scorers_cannot_score_is_refused_by_the_driver_as_well(tmp_path, fields, shown):
    """Each of these passed the driver's check and then failed in every scorer without naming the file (an
    unknown loss was scored through a softmax): now both refuse it, naming it."""
    path = _saved(tmp_path / "fold_0" / "model.pt", _artifact(), **fields)
    for read in (lambda: describe_model([path]), lambda: load_model_files([path])):
        with pytest.raises(ModelFileError, match=f"^{path}: {shown}"):
            read()


def test_a_fold_saved_before_relative_to_peak_ensembles_with_a_current_one(tmp_path):
    """The field's default stands in for it, for the driver as for the scorers."""
    old = {k: v for k, v in asdict(FEATURES).items() if k != "relative_to_peak"}
    files = [_saved(tmp_path / "old.pt", _artifact(0), features=old), str(tmp_path / "new.pt")]
    _artifact(1).save(files[1])
    assert describe_model(files) == load_model_files(files).describe()


def test_weights_that_do_not_fit_their_model_are_refused_naming_the_file(tmp_path):
    """ModelArtifact.build, where a scorer builds the model: torch's own message names neither the file nor the
    settings."""
    path = _saved(tmp_path / "model.pt", _artifact(), architecture=asdict(replace(ARCH, pool="GeM")))
    with pytest.raises(ModelFileError, match=f"^{path}: its weights do not fit the model it describes .*pool.gem.p"):
        WindowScorer(load_model_files([path]))


def test_a_relative_model_path_reaches_the_scorers_absolute(tmp_path, monkeypatch):
    """The scorer actors run in a working directory of Ray's: a relative MODEL would not be found there."""

    class Described(Exception):
        pass

    def described(files: list[str]):
        raise Described(files)

    _artifact().save(str(tmp_path / "run" / "fold_0" / "model.pt"))
    sf.write(tmp_path / "shot.wav", np.zeros(1600, dtype=np.float32), 16000)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(scoring, "describe_model", described)  # stop before Ray starts: the files are resolved
    with pytest.raises(Described) as stopped:
        scoring._score("run/fold_0", str(tmp_path / "shot.wav"), str(tmp_path / "out"),
                       scoring.scoring_config("run/fold_0", []), False, False)
    assert stopped.value.args[0] == [str(tmp_path / "run" / "fold_0" / "model.pt")]
