"""Where a scoring model's files are, and what a scoring driver needs to know of the model, without torch.

A model location is a training run (its fold ensemble, listed in ensemble.json), a fold folder, or one model.pt
file. The scoring job's driver resolves it here and learns the model's classes and input from a
`ModelDescription`, read from the files' pickled values without their tensors; only the scorers load the
weights, so the driver never imports torch.
"""

from __future__ import annotations

import collections
import json
import pickle
import zipfile
from dataclasses import dataclass

from gunsound import storage

ARTIFACT_FORMAT = 1  # of the dictionary a model.pt holds (`model.ModelArtifact`)


@dataclass(frozen=True)
class ModelDescription:
    """What the driver of a scoring job needs of its model: the classes it scores, the rate its windows are read
    at, the training clip length (the window it learned to see) and the files its scorers load."""

    classes: list[str]
    sample_rate: int
    chunk_seconds: float
    files: list[str]


def ensemble_members(run: str) -> list[str]:
    """The model files a run's ensemble.json lists, as paths relative to the run: each must stay inside the
    run folder, so an edited or planted ensemble.json cannot point scoring at a model elsewhere."""
    where = storage.join(run, "ensemble.json")
    try:
        members = json.loads(storage.read_text(where))["models"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{where}: not an ensemble file ({exc})") from exc
    if not isinstance(members, list) or not members:
        raise ValueError(f"{where}: 'models' must be a non-empty list of model files in the run")
    for member in members:
        parts = member.split("/") if isinstance(member, str) else []
        if not parts or member.startswith("/") or "\\" in member or ":" in member or any(
                p in ("", ".", "..") for p in parts) or not member.endswith(".pt"):
            raise ValueError(f"{where}: model {member!r} is not a .pt file inside the run folder")
    return members


def model_files(location: str) -> list[str]:
    """The model files at `location`: a training run's ensemble (ensemble.json), a fold folder's model.pt, or
    a model.pt file itself."""
    if location.endswith(".pt"):
        if not storage.exists(location):
            raise FileNotFoundError(f"{location}: no such model file")
        return [location]
    if storage.exists(storage.join(location, "ensemble.json")):
        return [storage.join(location, *m.split("/")) for m in ensemble_members(location)]
    if storage.exists(storage.join(location, "model.pt")):
        return [storage.join(location, "model.pt")]
    raise FileNotFoundError(f"{location}: not a training run (ensemble.json), a fold folder or a model.pt file")


def check_ensemble(members: list[tuple[str, dict]]) -> None:
    """Refuse members (each its file and its values) that cannot be scored as one model: the ensemble averages
    their probabilities per class, all made by one front end, through the output function of one loss (a
    sigmoid for BCE, a softmax otherwise), over windows of one length (the clip length they learned)."""
    (first, ours), *others = members
    for uri, theirs in others:
        if theirs["classes"] != ours["classes"] or theirs["features"] != ours["features"]:
            raise ValueError(f"{uri}: classes or features differ from {first}; cannot ensemble")
        for key in ("loss_function", "chunk_seconds"):
            if theirs[key] != ours[key]:
                raise ValueError(f"{uri}: {key} {theirs[key]!r} differs from {ours[key]!r} in {first}; "
                                 "cannot ensemble")


def describe_model(files: list[str]) -> ModelDescription:
    """The classes and input of the model these files make together (an ensemble's members must agree), read
    without torch: each file's values come from the pickle inside its torch.save archive, its tensors left
    out, and only that member is read (on S3, a few ranged reads however large the weights). A file that is
    not a gunsound model is a ValueError naming it; one that storage cannot read, an OSError naming it."""
    described = []
    for uri in files:
        saved = _saved_values(uri)
        try:
            features = dict(saved["features"])
            described.append((uri, {"classes": list(saved["classes"]), "features": features,
                                    "sample_rate": int(features["sample_rate"]),
                                    "chunk_seconds": float(saved["chunk_seconds"]),
                                    "loss_function": str(saved["loss_function"])}))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{uri}: model file lacks or misnames a field ({exc!r})") from exc
    check_ensemble(described)
    first = described[0][1]
    return ModelDescription(classes=first["classes"], sample_rate=first["sample_rate"],
                            chunk_seconds=first["chunk_seconds"], files=list(files))


def _saved_values(uri: str) -> dict:
    """The dictionary a model.pt holds, every tensor in it None."""
    try:
        with storage.open_input(uri) as raw, zipfile.ZipFile(raw) as archive:
            pickled = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
            if len(pickled) != 1:
                raise ValueError("no torch.save archive")
            with archive.open(pickled[0]) as f:
                saved = _ValuesWithoutTensors(f).load()
    except Exception as exc:  # not a zip, a refused pickle, truncation: "not our model file"; unless a read failed
        raise storage.refusal(uri, exc, "not a gunsound model file") from exc
    if not isinstance(saved, dict) or saved.get("format") != ARTIFACT_FORMAT:
        raise ValueError(f"{uri}: not a gunsound model file of format {ARTIFACT_FORMAT}")
    return saved


def _no_tensor(*_args, **_kwargs) -> None:
    return None


class _ValuesWithoutTensors(pickle.Unpickler):
    """Unpickles what torch.save wrote of plain values and state dicts; a tensor becomes None and its storage
    is never read. Any other class is refused, as `torch.load(weights_only=True)` refuses it: a planted file
    cannot run code."""

    _TENSORS = {("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
                ("torch.storage", "UntypedStorage")}

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) in self._TENSORS or (module == "torch" and name.endswith("Storage")):
            return _no_tensor
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a model file")

    def persistent_load(self, pid) -> None:
        return None
