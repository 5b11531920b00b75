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
from gunsound.config import ArchitectureConfig

ARTIFACT_FORMAT = 1  # of the dictionary a model.pt holds (`model.ModelArtifact`)

# The output functions `inference.Ensemble` implements, by the loss a model was trained with: a sigmoid, a softmax.
LOSS_FUNCTIONS = ("BCE", "CrossEntropy")
# How an ensemble's members are combined: the one way `inference.Ensemble` implements (training writes it).
COMBINE = "mean_probability"
# Name prefixes by which timm reads a backbone's architecture from the Hugging Face Hub (`timm.parse_model_name`).
HUB_SOURCES = ("hf-hub", "hf_hub")
REQUIRED = object()  # a field of FEATURE_FIELDS that every model file holds (no default)
# The fields of `features.FeatureParams` (importing it would import torch), with the default of each field a later
# version added: a file saved before it existed gets what FeatureParams(**saved) gives it. A test keeps the two equal.
FEATURE_FIELDS: dict[str, object] = {"sample_rate": REQUIRED, "n_fft": REQUIRED, "hop_length": REQUIRED,
                                     "n_mels": REQUIRED, "f_min": REQUIRED, "f_max": REQUIRED,
                                     "normalize": REQUIRED, "relative_to_peak": False}


class ModelFileError(ValueError):
    """A model file or ensemble.json that cannot be scored as it is: a gunsound ValueError, so that a command
    refuses it as bad input (exit 2) wherever it is found."""


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
        ensemble = json.loads(storage.read_text(where))
        members = ensemble["models"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelFileError(f"{where}: not an ensemble file ({exc})") from exc
    if not isinstance(members, list) or not members:
        raise ModelFileError(f"{where}: 'models' must be a non-empty list of model files in the run")
    # Files written before `combine` existed lack it; any other way of combining would be scored as this one.
    combine = ensemble.get("combine", COMBINE)
    if combine != COMBINE:
        raise ModelFileError(f"{where}: combine {combine!r} is not implemented (only {COMBINE!r})")
    for member in members:
        parts = member.split("/") if isinstance(member, str) else []
        if not parts or member.startswith("/") or "\\" in member or ":" in member or any(
                p in ("", ".", "..") for p in parts) or not member.endswith(".pt"):
            raise ModelFileError(f"{where}: model {member!r} is not a .pt file inside the run folder")
    # Listed twice, a fold would count twice in the mean: an edited file, not an ensemble training writes.
    repeated = sorted({m for m in members if members.count(m) > 1})
    if repeated:
        raise ModelFileError(f"{where}: model {repeated[0]!r} is listed more than once")
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
    sigmoid for BCE, a softmax for CrossEntropy), over windows of one length (the clip length they learned)."""
    (first, ours), *others = members
    for uri, theirs in others:
        if theirs["classes"] != ours["classes"] or theirs["features"] != ours["features"]:
            raise ModelFileError(f"{uri}: classes or features differ from {first}; cannot ensemble")
        for key in ("loss_function", "chunk_seconds"):
            if theirs[key] != ours[key]:
                raise ModelFileError(f"{uri}: {key} {theirs[key]!r} differs from {ours[key]!r} in {first}; "
                                     "cannot ensemble")


def feature_values(uri: str, features: object) -> dict:
    """A saved `features` dictionary as `FeatureParams(**features)` takes it: a field added after the file was
    saved gets its default; a field this version does not know is refused, as its front end would compute
    other features than the model was trained on."""
    if not isinstance(features, dict):
        raise ModelFileError(f"{uri}: model file lacks or misnames a field (features is not a dictionary)")
    unknown = sorted(set(features) - set(FEATURE_FIELDS))
    if unknown:
        raise ModelFileError(f"{uri}: features field {unknown[0]!r} is not one this version of gunsound knows "
                             f"(it knows {', '.join(FEATURE_FIELDS)})")
    missing = [k for k, default in FEATURE_FIELDS.items() if default is REQUIRED and k not in features]
    if missing:
        raise ModelFileError(f"{uri}: model file lacks or misnames a field (features {missing[0]!r})")
    return {k: features.get(k, default) for k, default in FEATURE_FIELDS.items()}


def hub_backbone(backbone: str) -> bool:
    """Whether timm would read this backbone name's architecture from the Hugging Face Hub (an hf-hub: name)."""
    source, sep, _ = backbone.partition(":")
    return bool(sep) and source.lower() in HUB_SOURCES


def check_saved_model(uri: str, saved: dict) -> None:
    """Refuse, naming the file, what the scorers could not score as the file says, checked wherever a model file
    is read (the driver's `describe_model` and `model.ModelArtifact.load` alike, so the two agree): a loss whose
    output function is not implemented, a Hub backbone without the timm architecture it resolves to (scoring
    never contacts the Hub), and classes that are not the head's rows. A missing or unknown field is a KeyError or
    a TypeError, which the callers report as such."""
    classes, loss = list(saved["classes"]), saved["loss_function"]
    if loss not in LOSS_FUNCTIONS:
        raise ModelFileError(f"{uri}: loss_function {loss!r} is not one this version scores "
                             f"({' or '.join(LOSS_FUNCTIONS)})")
    backbone = ArchitectureConfig(**saved["architecture"]).backbone
    resolved = saved.get("backbone_timm")
    if resolved is not None and not (isinstance(resolved, dict) and isinstance(resolved.get("architecture"), str)
                                     and isinstance(resolved.get("model_args", {}), dict)):
        raise ModelFileError(f"{uri}: backbone_timm {resolved!r} is not a timm architecture and its arguments")
    if hub_backbone(backbone) and resolved is None:
        raise ModelFileError(f"{uri}: architecture.backbone {backbone!r} is a Hugging Face Hub name, and the file "
                             "does not record the timm architecture it resolves to (files saved by this version "
                             "do); scoring builds models without contacting the Hub, so it cannot build this one")
    head = saved["state_dict"].get("head.weight")
    shape = getattr(head, "shape", None)
    if shape and shape[0] != len(classes):
        raise ModelFileError(f"{uri}: lists {len(classes)} classes but the model's head scores {shape[0]}")


def describe_model(files: list[str]) -> ModelDescription:
    """The classes and input of the model these files make together (an ensemble's members must agree), read
    without torch: each file's values come from the pickle inside its torch.save archive, its tensors left
    out (their shapes kept), and only that member is read (on S3, a few ranged reads however large the weights).
    Each file is checked as `model.ModelArtifact.load` checks it. A file that is not a gunsound model, or one
    that cannot be scored, is a ValueError naming it; one that storage cannot read, an OSError naming it."""
    described = []
    for uri in files:
        saved = _saved_values(uri)
        try:
            features = feature_values(uri, saved["features"])
            check_saved_model(uri, saved)
            described.append((uri, {"classes": list(saved["classes"]), "features": features,
                                    "sample_rate": int(features["sample_rate"]),
                                    "chunk_seconds": float(saved["chunk_seconds"]),
                                    "loss_function": str(saved["loss_function"])}))
        except ModelFileError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ModelFileError(f"{uri}: model file lacks or misnames a field ({exc!r})") from exc
    check_ensemble(described)
    first = described[0][1]
    return ModelDescription(classes=first["classes"], sample_rate=first["sample_rate"],
                            chunk_seconds=first["chunk_seconds"], files=list(files))


def _saved_values(uri: str) -> dict:
    """The dictionary a model.pt holds, every tensor in it a `_SavedTensor`."""
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
        raise ModelFileError(f"{uri}: not a gunsound model file of format {ARTIFACT_FORMAT}")
    return saved


@dataclass(frozen=True)
class _SavedTensor:
    """A tensor of a model file as the driver reads it: its shape, its data left unread."""

    shape: tuple[int, ...]


def _no_tensor(*_args, **_kwargs) -> None:
    return None


def _tensor_shape(_storage, _offset, size, *_rest) -> _SavedTensor:
    """torch._utils._rebuild_tensor_v2's arguments: the storage (never read), its offset, the size, ..."""
    return _SavedTensor(tuple(int(n) for n in size))


def _parameter(data, *_rest):
    return data


class _ValuesWithoutTensors(pickle.Unpickler):
    """Unpickles what torch.save wrote of plain values and state dicts; a tensor becomes its shape and its
    storage is never read. Any other class is refused, as `torch.load(weights_only=True)` refuses it: a planted
    file cannot run code."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _tensor_shape
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return _parameter
        if (module, name) == ("torch.storage", "UntypedStorage") or (module == "torch" and name.endswith("Storage")):
            return _no_tensor
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a model file")

    def persistent_load(self, pid) -> None:
        return None
