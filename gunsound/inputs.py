"""What a scoring input holds: the audio files under a folder or S3 prefix, inside a zip, in a manifest's `path`
column, or one file; and every other entry under it, with the reason it is not scored.

A folder or prefix is listed a page at a time (`open_inputs`, on `storage.entry_pages`), so a listing of
millions of keys is never held whole; `list_inputs` gathers it for callers that want the whole list.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field

import pandas as pd
import pyarrow.fs as pafs

from gunsound import audio, storage

__all__ = ["InputListing", "InputManifestError", "Inputs", "entry_reason", "list_inputs", "open_inputs"]


@dataclass(frozen=True)
class Inputs:
    """What an input location holds: the audio files to score, and every other entry under it with the reason
    it is not scored (another format, a folder named like audio, a broken link)."""

    files: list[str]
    skipped: dict[str, str] = field(default_factory=dict)


class InputManifestError(ValueError):
    """A scoring manifest with bad rows; the message names the manifest and every bad row."""


def _is_audio_name(uri: str, *, named: bool = False) -> bool:
    """Named with an extension libsndfile reads, or with none where that is how audio comes: S3 keys often have
    none, and a file named on its own is meant to be scored. In a local folder an extensionless file is a
    README, a LICENSE or a Makefile far more often than audio."""
    name = uri.rsplit("/", 1)[-1].lower()
    return name.endswith(audio.AUDIO_EXTENSIONS) or ("." not in name and (named or storage.is_s3(uri)))


def _not_audio(uri: str) -> str:
    name = uri.rsplit("/", 1)[-1]
    if "." not in name:
        return "no extension: in a local folder not taken for audio (name it .wav, .flac, .ogg or .mp3)"
    return f"not an audio format libsndfile reads (.{name.rsplit('.', 1)[-1]})"


def _manifest_location(base: str, text: str) -> str:
    """A manifest's path cell as a location: relative ones under the manifest's folder, others as they are."""
    if "://" in text or text.startswith(("/", "\\")):
        return text
    rel = text.replace("\\", "/")
    if storage.is_s3(base):
        return "s3://" + posixpath.normpath(posixpath.join(base[len("s3://"):], rel))
    if storage.is_local(base):
        return os.path.normpath(os.path.join(base, rel))
    return storage.join(base, posixpath.normpath(rel))


def _manifest_inputs(location: str, allow_outside: bool) -> Inputs:
    try:
        frame = storage.read_table(location)  # a blank line is an empty row: reported as one
    except ValueError as exc:
        raise InputManifestError(str(exc)) from exc
    if "path" not in frame.columns:
        raise InputManifestError(f"{location}: a scoring manifest needs a 'path' column; its columns are "
                                 f"{list(frame.columns)}")
    if not len(frame):
        raise InputManifestError(f"{location}: the manifest has no rows: nothing to score")
    base = location.rsplit("/", 1)[0] if "/" in location else "."
    files, seen, problems = [], {}, []
    for row, cell in enumerate(frame["path"]):
        text = cell.strip() if isinstance(cell, str) else "" if pd.api.types.is_scalar(cell) and pd.isna(cell) \
            else str(cell).strip()
        if not text:
            problems.append(f"row {row}: empty path")
            continue
        if storage.escapes_folder(text) and not allow_outside:
            problems.append(f"row {row}: {text!r} is outside the manifest's folder (absolute, a URI or ../); "
                            "allow locations outside it to score it (--allow-outside)")
            continue
        path = _manifest_location(base, text)
        if path in seen:
            problems.append(f"row {row}: {text!r} is listed again (first in row {seen[path]})")
            continue
        seen[path] = row
        files.append(path)
    if problems:
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        raise InputManifestError(f"{location}: {len(problems)} bad row(s) (rows count from 0):\n  "
                                 + "\n  ".join(problems[:50]) + more)
    return Inputs(files)


def list_inputs(location: str, *, allow_outside: bool = False) -> Inputs:
    """Audio files under a folder or prefix, inside a zip, in a manifest's `path` column, or one file; with
    everything else under a folder as skipped, with the reason. A listing is sorted; a manifest keeps its order.

    A manifest's (CSV or Parquet) paths are relative to its folder, as training's are; absolute paths, URIs
    and ../ are refused unless `allow_outside`.
    """
    listing = open_inputs(location, allow_outside=allow_outside)
    files, skipped = [], {}
    for page in listing.pages:
        for uri, reason in page:
            if reason:
                skipped[uri] = reason
            else:
                files.append(uri)
    if listing.folder is not None:
        return Inputs(sorted(files), dict(sorted(skipped.items())))
    return Inputs(files, skipped)


@dataclass
class InputListing:
    """An input's entries a page at a time: (URI, "" for an audio file or the reason it is not scored).
    `folder`: the folder, prefix or zip listed, so that every entry's URI begins with `folder` + "/"; None for
    a manifest or one file, whose entries are given whole, in one page."""

    pages: Iterator[list[tuple[str, str]]]
    folder: str | None


def open_inputs(location: str, *, allow_outside: bool = False) -> InputListing:
    """The entries of an input (see `list_inputs`), a folder or prefix listed a page at a time as it is
    read (`storage.entry_pages`): nothing holds a whole listing of millions of keys."""
    lower = location.lower()
    if lower.endswith(".zip"):
        location, lower = storage.zip_location(location), ""
    if lower.endswith((".csv", ".pq", ".parquet")):
        inputs = _manifest_inputs(location, allow_outside)
        return InputListing(iter([[(f, "") for f in inputs.files]]), None)
    entry = storage.file_info(location)
    if entry.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"input {location} does not exist")
    if entry.type == pafs.FileType.File:
        named = _is_audio_name(location, named=True)
        return InputListing(iter([[(location, "" if named else _not_audio(location))]]), None)
    pages = ([(uri, reason) for uri, info in page if (reason := entry_reason(uri, info)) is not None]
             for page in storage.entry_pages(location))
    return InputListing(pages, location.rstrip("/"))


def entry_reason(uri: str, info: pafs.FileInfo) -> str | None:
    """"" for an audio file to score, the reason for an entry that is not scored (reported as skipped), None
    for a plain folder (its files are entries of their own)."""
    if info.type == pafs.FileType.File:
        return "" if _is_audio_name(uri) else _not_audio(uri)
    if info.type == pafs.FileType.Directory:
        if uri.lower().endswith(audio.AUDIO_EXTENSIONS):
            return "a folder named like an audio file (the files in it are listed on their own)"
        return None
    return getattr(info, "reason", "") or "not a readable file (a broken link?)"
