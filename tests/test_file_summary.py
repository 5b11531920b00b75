"""The per-file row of a file whose model output is not finite: an error row, never a made-up summary."""

import numpy as np
import pandas as pd
import pytest

from gunsound.events import summarize_file

CLASSES = ["a", "b"]


def _windows(probs: list[list[float]]) -> pd.DataFrame:
    starts = np.arange(len(probs), dtype=float)
    return pd.DataFrame({"start": starts, "end": starts + 2.0,
                         "probs": [np.array(p, dtype=np.float32) for p in probs]})


@pytest.mark.parametrize("method", ["Sliding", "Fix"])
@pytest.mark.parametrize(("bad", "broken"), [([np.nan, np.nan], 1), ([np.inf, 0.1], 1), ([0.2, -np.inf], 1),
                                             ([np.nan, 0.3], 1)])
def test_non_finite_probabilities_make_the_file_an_error_without_events(method, bad, broken):
    """One overflowing window (fp16 on a GPU) made every max_/mean_ NaN, the top class the argmax of NaNs and a
    shot with a NaN probability, all under status ok."""
    windows = _windows([bad, [0.1, 0.9], [0.1, 0.2]])
    row, events = summarize_file("f.wav", 4.0, windows, np.array([0.5, 1.5]), CLASSES, method=method,
                                 threshold=0.5)
    assert events == []
    assert row["status"] == "error"
    assert row["error"] == f"the model gave non-finite probabilities for {broken} of 3 windows"
    error_row, _ = summarize_file("f.wav", 4.0, windows, np.zeros(0), CLASSES, method=method, threshold=0.5,
                                  error="decode failed: x")
    assert list(row) == list(error_row)  # the shape of every other error row
    assert {k: row[k] for k in ("top_class", "shots", "gunshot_windows")} == {"top_class": "", "shots": 0,
                                                                             "gunshot_windows": 0}
    assert all(np.isnan(row[f"{s}_{c}"]) for s in ("max", "mean") for c in CLASSES)
    assert np.isnan(row["top_probability"])


def test_every_window_non_finite_is_counted():
    row, _ = summarize_file("f.wav", 4.0, _windows([[np.nan, 0.1], [0.1, np.nan]]), np.zeros(0), CLASSES,
                            method="Sliding", threshold=0.5)
    assert row["error"] == "the model gave non-finite probabilities for 2 of 2 windows"


@pytest.mark.parametrize("method", ["Sliding", "Fix"])
def test_a_file_without_a_gunshot_window_is_no_gunshot_whatever_the_method(method):
    """Under Fix a silent file's top class was a gun class (the argmax of means all under the threshold)."""
    quiet, _ = summarize_file("f.wav", 5.0, _windows([[0.07, 0.01]] * 3), np.zeros(0), CLASSES, method=method,
                              threshold=0.5)
    assert (quiet["top_class"], quiet["gunshot_windows"]) == ("no gunshot", 0)
    assert quiet["top_probability"] == pytest.approx(0.07)  # still what the method ranks by
    heard, _ = summarize_file("f.wav", 5.0, _windows([[0.07, 0.01], [0.2, 0.6]]), np.zeros(0), CLASSES,
                              method=method, threshold=0.5)
    assert (heard["top_class"], heard["gunshot_windows"]) == ("b", 1)
