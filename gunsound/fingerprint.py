"""What an OUTPUT folder's results were made with (OUTPUT/fingerprint.json), so that a rerun into it resumes
only the same work.

A training run's fingerprint is its resolved config (the drawn seed and the auto-chosen audio parameters
included) less the keys that do not change what it trains (IGNORED_TRAINING_KEYS), and a digest of its data
manifest: every clip's row, path, label, group, fold, duration and sample rate. The files' bytes are not
hashed, which would read the whole dataset; their headers were read for the manifest already. A scoring
output's fingerprint is its scoring settings less those that only size the work (IGNORED_SCORING_KEYS) and a
digest of the model files' bytes; the input is not part of it, since files are keyed by path and more inputs
may be scored into one OUTPUT.

A run into an OUTPUT holding another fingerprint is refused, naming what differs; `overwrite` first removes
gunsound's own outputs there (the names the caller owns; nothing else in the folder) and starts afresh.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd
import pyarrow.fs as pafs

from gunsound import storage
from gunsound.config import Config

log = logging.getLogger(__name__)

FINGERPRINT_FILE = "fingerprint.json"

# Keys (or whole sections, ending in ".") that leave a training run's models and metrics unchanged: a label,
# where it runs and logs, how CPU work is sized, which folds of the same split run now, scoring's and tuning's
# settings (a later `gunsound score` reads its own).
IGNORED_TRAINING_KEYS = ("experiment_name", "environment.ray_address", "environment.number_of_workers",
                         "environment.cpus_per_worker",
                         "dataset.folds", "logging.", "storage.", "scoring.", "search_space", "search_space.")
# Scoring settings that size the work but leave every row the same.
IGNORED_SCORING_KEYS = ("batch_size", "shard_files", "actors")
MANIFEST_COLUMNS = ["row", "path", "label", "group", "fold", "duration", "sample_rate"]


class OutputMismatch(Exception):
    """OUTPUT holds results made with other settings, data or model (or of another kind)."""


@dataclass
class Fingerprint:
    kind: str  # "train" or "score"
    settings: dict[str, Any]  # flattened "section.key": value
    data: dict[str, Any] = field(default_factory=dict)  # training: source, clips, digest
    model: dict[str, Any] = field(default_factory=dict)  # scoring: location, digest, files

    def differences(self, new: Fingerprint) -> list[str]:
        """What differs from `new`, each as `what old -> new`."""
        out = []
        for key in sorted(set(self.settings) | set(new.settings)):
            old, now = self.settings.get(key, "unset"), new.settings.get(key, "unset")
            if old != now:
                out.append(f"{key} {json.dumps(old)} -> {json.dumps(now)}")
        if self.data.get("digest") != new.data.get("digest"):
            out.append(f"data ({self.data.get('clips')} clips from {self.data.get('source')}, digest "
                       f"{str(self.data.get('digest'))[:12]} -> {new.data.get('clips')} clips from "
                       f"{new.data.get('source')}, digest {str(new.data.get('digest'))[:12]})")
        if self.model.get("digest") != new.model.get("digest"):
            out.append(f"model ({self.model.get('location')}, sha256 {str(self.model.get('digest'))[:12]} -> "
                       f"{new.model.get('location')}, sha256 {str(new.model.get('digest'))[:12]})")
        return out


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _ignored(key: str, ignored: tuple[str, ...]) -> bool:
    return any(key == i or (i.endswith(".") and key.startswith(i)) for i in ignored)


def _plain(value: Any) -> Any:
    """As it reads back from JSON (tuples as lists), so stored and new fingerprints compare equal."""
    return json.loads(json.dumps(value))


def training_fingerprint(cfg: Config, manifest: pd.DataFrame, source: str) -> Fingerprint:
    """A training run's fingerprint: `cfg` resolved, `manifest` the clips with their `fold` column."""
    settings = {k: v for k, v in _flatten(cfg.to_dict()).items() if not _ignored(k, IGNORED_TRAINING_KEYS)}
    columns = [c for c in MANIFEST_COLUMNS if c in manifest.columns]
    digest = hashlib.sha256(manifest[columns].to_csv(index=False).encode()).hexdigest()
    return Fingerprint("train", _plain(settings), {"source": source, "clips": len(manifest), "digest": digest})


def model_digest(files: list[str]) -> dict[str, Any]:
    """sha256 of each model file's bytes, and one over them all in order."""
    total, each = hashlib.sha256(), []
    for uri in files:
        h = hashlib.sha256()
        with storage.open_input(uri) as f:
            while block := f.read(8 << 20):
                h.update(block)
        each.append({"file": uri, "sha256": h.hexdigest()})
        total.update(h.digest())
    return {"digest": total.hexdigest(), "files": each}


def scoring_fingerprint(settings: dict[str, Any], model_location: str, model_files: list[str]) -> Fingerprint:
    """A scoring output's fingerprint: its settings (`dataclasses.asdict(ScoringSettings)`) and model files."""
    kept = {k: v for k, v in settings.items() if k not in IGNORED_SCORING_KEYS}
    return Fingerprint("score", _plain(kept), model={"location": model_location, **model_digest(model_files)})


def read(output: str) -> Fingerprint | None:
    uri = storage.join(output, FINGERPRINT_FILE)
    if not storage.exists(uri):
        return None
    try:
        data = json.loads(storage.read_text(uri))
        return Fingerprint(data["kind"], data["settings"], data.get("data") or {}, data.get("model") or {})
    except (ValueError, KeyError, TypeError) as exc:
        raise OutputMismatch(f"{uri}: not a gunsound fingerprint ({exc}); pass --overwrite to start afresh "
                             "or use another output folder") from exc


def stored_seed(output: str, kind: str = "train") -> int | None:
    """The seed of the run of `kind` ("train", "tune") whose fingerprint is in OUTPUT, so that a rerun with
    `seed: -1` keeps the seed drawn before."""
    fp = read(output)
    seed = fp.settings.get("environment.seed") if fp is not None and fp.kind == kind else None
    return seed if isinstance(seed, int) and seed >= 0 else None


def _entries(output: str, owned: tuple[str, ...]) -> list[pafs.FileInfo]:
    """OUTPUT's own top-level entries: those named by one of the `owned` patterns."""
    fs, path = storage.resolve(output)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    return [i for i in infos if any(fnmatch.fnmatchcase(i.base_name, p) for p in owned)]


def remove_outputs(output: str, owned: tuple[str, ...]) -> list[str]:
    """Delete OUTPUT's entries named by `owned` (and its fingerprint, last); returns their names."""
    fs, _ = storage.resolve(output)
    entries = sorted(_entries(output, (*owned, FINGERPRINT_FILE)), key=lambda i: i.base_name == FINGERPRINT_FILE)
    for info in entries:
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(info.path)
        else:
            fs.delete_file(info.path)
    return [i.base_name for i in entries]


def claim(output: str, fp: Fingerprint, *, overwrite: bool, owned: tuple[str, ...]) -> None:
    """Make OUTPUT this run's before anything is written there: resume when its fingerprint is the same,
    refuse (OutputMismatch naming what differs) when it is not, or with `overwrite` remove the earlier
    outputs first. `owned`: name patterns of this kind of output's own entries in OUTPUT."""
    stored = read(output)
    if stored is not None and stored.kind != fp.kind:
        noun = {"train": "a training run", "score": "scoring outputs"}
        raise OutputMismatch(f"{output} holds {noun.get(stored.kind, stored.kind)}, not "
                             f"{noun.get(fp.kind, fp.kind)}: write to another folder")
    if overwrite:
        removed = remove_outputs(output, owned)
        if removed:
            log.warning("%s: --overwrite removed %s", output, ", ".join(removed))
    elif stored is None:
        leftovers = sorted(i.base_name for i in _entries(output, owned))
        if leftovers:
            raise OutputMismatch(f"{output} holds earlier outputs ({', '.join(leftovers[:4])}) but no "
                                 f"{FINGERPRINT_FILE} saying what made them: pass --overwrite to remove them "
                                 "and start afresh, or use another output folder")
    else:
        differences = stored.differences(fp)
        if differences:
            raise OutputMismatch(f"{output} holds results made differently: {'; '.join(differences)}. Rerun "
                                 "with the same settings to resume, or pass --overwrite to remove them and start "
                                 "afresh")
        return
    storage.write_text(storage.join(output, FINGERPRINT_FILE), json.dumps(asdict(fp), indent=1, sort_keys=True))
