import json
import os
from dataclasses import replace

import pytest

from gunsound.config import ArchitectureConfig
from gunsound.features import FeatureParams
from gunsound.inference import load_model_files, load_scoring_model
from gunsound.model import ModelArtifact, build_model
from gunsound.model_files import describe_model, model_files


def _run_with_models(root, names: list[str], **changes: object) -> None:
    arch = ArchitectureConfig(backbone="resnet18", pretrained=False)
    artifact = ModelArtifact(classes=["a", "b"], features=FeatureParams(16000, 512, 160, 32, 50.0, 7000.0, False),
                             chunk_seconds=1.0, architecture=arch, loss_function="BCE",
                             state_dict=build_model(arch, 2).state_dict())
    artifact = replace(artifact, **changes)
    for name in names:
        artifact.save(str(root / name))


def test_a_run_loads_the_models_its_ensemble_lists(tmp_path):
    run = tmp_path / "run"
    _run_with_models(run, ["fold_0/model.pt", "fold_1/model.pt"])
    (run / "ensemble.json").write_text(json.dumps({"models": ["fold_0/model.pt", "fold_1/model.pt"]}))
    model = load_scoring_model(str(run))
    assert [s.rsplit("/", 2)[-2] for s in model.sources] == ["fold_0", "fold_1"]


@pytest.mark.parametrize(("change", "shown"), [
    ({"loss_function": "CrossEntropy"}, "loss_function 'CrossEntropy' differs from 'BCE'"),
    ({"chunk_seconds": 3.0}, "chunk_seconds 3.0 differs from 1.0"),
])
def test_members_trained_with_another_loss_or_clip_length_are_refused(tmp_path, change, shown):
    """The ensemble puts every member's logits through the first member's output function (a CrossEntropy
    fold's through a sigmoid) and cuts windows of the first member's length: members must agree on both."""
    run = tmp_path / "run"
    _run_with_models(run, ["fold_0/model.pt"])
    _run_with_models(run, ["fold_1/model.pt"], **change)
    (run / "ensemble.json").write_text(json.dumps({"models": ["fold_0/model.pt", "fold_1/model.pt"]}))
    expected = f"^{run}/fold_1/model.pt: {shown} in {run}/fold_0/model.pt; cannot ensemble$"
    with pytest.raises(ValueError, match=expected):
        load_scoring_model(str(run))
    with pytest.raises(ValueError, match=expected):
        describe_model(model_files(str(run)))


@pytest.mark.parametrize("member", ["../elsewhere/model.pt", "/tmp/model.pt", "s3://bucket/model.pt",
                                    "fold_0/../../elsewhere/model.pt", "fold_0/model.pkl", ""])
def test_an_ensemble_entry_outside_the_run_is_refused(tmp_path, member):
    run = tmp_path / "run"
    _run_with_models(tmp_path, ["elsewhere/model.pt"])
    _run_with_models(run, ["fold_0/model.pt"])
    (run / "ensemble.json").write_text(json.dumps({"models": ["fold_0/model.pt", member]}))
    with pytest.raises(ValueError, match="ensemble.json.*inside the run folder"):
        load_scoring_model(str(run))


def test_a_broken_ensemble_file_is_named(tmp_path):
    (tmp_path / "ensemble.json").write_text("{not json")
    with pytest.raises(ValueError, match="ensemble.json: not an ensemble file"):
        load_scoring_model(str(tmp_path))


def test_the_scoring_driver_learns_the_model_without_importing_torch(tmp_path):
    import subprocess
    import sys

    run = tmp_path / "run"
    _run_with_models(run, ["fold_0/model.pt", "fold_1/model.pt"])
    (run / "ensemble.json").write_text(json.dumps({"models": ["fold_0/model.pt", "fold_1/model.pt"]}))
    (tmp_path / "planted.pt").write_bytes(b"not a model")
    # What `gunsound score`'s driver imports and does before its scorers start, in a fresh interpreter.
    code = f"""
import sys
from gunsound import cli, scoring
from gunsound.model_files import describe_model, model_files
described = describe_model(model_files({str(run)!r}))
assert described.classes == ["a", "b"] and described.sample_rate == 16000 and described.chunk_seconds == 1.0
assert [f.rsplit("/", 2)[-2] for f in described.files] == ["fold_0", "fold_1"]
try:
    describe_model([{str(tmp_path / "planted.pt")!r}])
except ValueError as exc:
    assert "planted.pt: not a gunsound model file" in str(exc), exc
else:
    raise AssertionError("a file that is not a model was described")
assert "torch" not in sys.modules, "the driver imported torch"
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    # What the driver reads is what the scorers will load.
    files = model_files(str(run))
    assert describe_model(files) == load_model_files(files).describe()


class _RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_model_file_that_would_run_code_or_disagrees_with_its_ensemble_is_refused(tmp_path):
    import io
    import zipfile

    import torch

    marker = tmp_path / "ran"
    buffer = io.BytesIO()
    torch.save({"format": 1, "classes": ["a"], "features": {"sample_rate": 16000}, "chunk_seconds": 1.0,
                "payload": _RunsCode(str(marker))}, buffer)
    (tmp_path / "planted.pt").write_bytes(buffer.getvalue())
    with pytest.raises(ValueError, match=r"planted.pt: not a gunsound model file .*posix.system is not allowed"):
        describe_model([str(tmp_path / "planted.pt")])
    assert not marker.exists()
    buffer = io.BytesIO()
    torch.save({"format": 1, "classes": ["a"], "chunk_seconds": 1.0}, buffer)
    (tmp_path / "fieldless.pt").write_bytes(buffer.getvalue())
    with pytest.raises(ValueError, match="fieldless.pt: model file lacks or misnames a field .*features"):
        describe_model([str(tmp_path / "fieldless.pt")])
    # A zip that is no torch.save archive, and a model.pt cut short: named, not described.
    with zipfile.ZipFile(tmp_path / "other.pt", "w") as zf:
        zf.writestr("notes.txt", "a zip, not a model")
    _run_with_models(tmp_path, ["whole/model.pt"])
    whole = (tmp_path / "whole" / "model.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(whole[: len(whole) // 2])
    for name in ("other.pt", "cut.pt"):
        with pytest.raises(ValueError, match=f"{name}: not a gunsound model file"):
            describe_model([str(tmp_path / name)])
    # Members of one ensemble must score the same classes from the same front end.
    arch = ArchitectureConfig(backbone="resnet18", pretrained=False)
    ModelArtifact(classes=["a", "c"], features=FeatureParams(16000, 512, 160, 32, 50.0, 7000.0, False),
                  chunk_seconds=1.0, architecture=arch, loss_function="BCE",
                  state_dict=build_model(arch, 2).state_dict()).save(str(tmp_path / "c" / "model.pt"))
    with pytest.raises(ValueError, match="c/model.pt: classes or features differ from .*whole/model.pt"):
        describe_model([str(tmp_path / "whole" / "model.pt"), str(tmp_path / "c" / "model.pt")])


def test_a_ray_worker_granted_no_gpu_computes_on_the_cpu_where_cuda_is_visible(monkeypatch):
    """Ray 2.60 leaves CUDA_VISIBLE_DEVICES alone for a worker that asked for no GPU: a CPU scorer actor on a GPU
    node sees CUDA, and must not load its model onto a GPU that Ray gave another worker."""
    import torch

    from gunsound import accelerator

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(accelerator, "in_ray_worker", lambda: True, raising=False)
    monkeypatch.setattr(accelerator, "granted_gpus", lambda: [])
    assert accelerator.compute_device("a scorer").type == "cpu"
    monkeypatch.setattr(accelerator, "granted_gpus", lambda: ["0"])
    assert accelerator.compute_device("a scorer").type == "cuda"
    # A granted GPU that CUDA cannot use stays an error unless the CPU is allowed.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="a scorer holds GPU"):
        accelerator.compute_device("a scorer")
    monkeypatch.setenv(accelerator.ALLOW_CPU_VAR, "1")
    assert accelerator.compute_device("a scorer").type == "cpu"


def test_outside_ray_a_scorer_computes_on_the_configured_device(tmp_path, monkeypatch):
    """`predict` runs without Ray: environment.device decides (cpu: the CPU though CUDA is there)."""
    import torch

    from gunsound import accelerator
    from gunsound.inference import WindowScorer

    monkeypatch.setattr(accelerator, "in_ray_worker", lambda: False, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert accelerator.compute_device("a scorer", "auto").type == "cuda"
    assert accelerator.compute_device("a scorer", "cpu").type == "cpu"
    _run_with_models(tmp_path, ["model.pt"])
    assert WindowScorer(load_scoring_model(str(tmp_path / "model.pt")), device="cpu").device.type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="environment.device is cuda but CUDA is not available"):
        accelerator.compute_device("a scorer", "cuda")
