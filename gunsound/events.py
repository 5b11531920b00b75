"""Per-file results: the summary row, the shots that fall in gunshot windows, and their bursts.

This module imports no gunsound module and no Ray: the exported scorer ships it as it is (numpy, pandas).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

NO_GUNSHOT = "no gunshot"  # the top class of a file none of whose windows reaches the threshold


def short_note(duration: float, window_seconds: float) -> str:
    """The note of a file that is scored although shorter than a window: its one window is mostly padding."""
    if not duration < window_seconds:  # NaN too: a header that was not read
        return ""
    return f"shorter than a window ({duration:.2f} s < {window_seconds:g} s): zero-padded"


def summarize_file(path: str, duration: float, windows: pd.DataFrame, onsets: np.ndarray, classes: list[str], *,
                   method: str, threshold: float, error: str = "", window_seconds: float = 0.0) -> tuple[dict, list[dict]]:
    """The per-file row and its events. `windows` has start, end and probs (one array per window). A file
    scored without error but shorter than `window_seconds` gets `short_note` (0: no note). A window
    whose probabilities all stay under the threshold is 'no gunshot', and so is a file without a gunshot window,
    whatever the method; an onset inside a gunshot window becomes an event of that window's class. `method`
    "Fix" ranks classes by their mean over the file, "Sliding" by their peak."""
    probs = np.stack(windows["probs"].to_numpy()) if not (error or windows.empty) else np.zeros((0, len(classes)))
    # A model that overflows (fp16 on a GPU) gives NaN or inf: maxima, means, a top class and shots made from
    # such windows would be made up, so the file is an error instead.
    broken = int((~np.isfinite(probs)).any(axis=1).sum())
    if broken:
        error = f"the model gave non-finite probabilities for {broken} of {len(probs)} windows"
    row = {"file": path, "duration": duration, "status": "error" if error else "ok", "error": error,
           "windows": len(windows), "top_class": "", "top_probability": float("nan"), "shots": 0,
           "gunshot_windows": 0, "note": "" if error else short_note(duration, window_seconds)}
    if error or windows.empty:
        for c in classes:
            row[f"max_{c}"] = row[f"mean_{c}"] = float("nan")
        return row, []
    weights = (windows["end"] - windows["start"]).to_numpy()
    mean = (probs * weights[:, None]).sum(axis=0) / max(weights.sum(), 1e-9)
    peak = probs.max(axis=0)
    for i, c in enumerate(classes):
        row[f"max_{c}"], row[f"mean_{c}"] = float(peak[i]), float(mean[i])
    gunshot = probs.max(axis=1) >= threshold
    row["gunshot_windows"] = int(gunshot.sum())
    score = mean if method == "Fix" else peak
    top = int(score.argmax())
    row["top_class"] = classes[top] if gunshot.any() else NO_GUNSHOT
    row["top_probability"] = float(score[top])
    events = []
    starts, ends = windows["start"].to_numpy(), windows["end"].to_numpy()
    for t in np.sort(onsets):
        covering = (starts <= t) & (t < ends)
        if not covering.any():
            continue
        p = probs[covering].mean(axis=0)
        if p.max() < threshold:
            continue
        events.append({"file": path, "time": float(t), "class": classes[int(p.argmax())],
                       "probability": float(p.max())})
    bursts(events)
    row["shots"] = len(events)
    return row, events


def bursts(events: list[dict], max_gap: float = 0.5) -> None:
    """Group shots (sorted by time) at most max_gap apart into bursts, in place: each event gets its burst
    number, the burst's shot count and its rate of fire, 60 / median interval."""
    members: list[dict] = []
    groups: list[list[dict]] = []
    for e in events:
        if members and e["time"] - members[-1]["time"] > max_gap:
            groups.append(members)
            members = []
        members.append(e)
    if members:
        groups.append(members)
    for burst, group in enumerate(groups):
        gaps = np.diff([e["time"] for e in group])
        rpm = float(60.0 / np.median(gaps)) if len(gaps) else float("nan")
        for e in group:
            e.update({"burst": burst, "shots_in_burst": len(group), "rounds_per_minute": rpm})
