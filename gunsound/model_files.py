"""Where a scoring model's files are, and what a scoring driver needs to know of the model, without torch.

A model location is a training run (its fold ensemble, listed in ensemble.json), a fold folder, or one model.pt
file. The scoring job's driver resolves it here and learns the model's classes and input from a
`ModelDescription`; only the scorers load the weights, so the driver never imports torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from gunsound import storage


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
