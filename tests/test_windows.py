"""Window planning: chunks own every window exactly once and read exactly the span their windows need."""

import inspect

import numpy as np
import pytest

from gunsound import onsets
from gunsound.windows import (
    BURST_LOOK_AHEAD,
    FRAME_REACH,
    SHOT_CONTEXT_AFTER,
    SHOT_CONTEXT_BEFORE,
    cut_windows,
    plan_chunks,
    window_starts,
)


@pytest.mark.parametrize(("duration", "window", "hop", "read"), [
    (0.4, 2.0, 1.0, 60.0), (2.0, 2.0, 1.0, 60.0), (121.3, 2.0, 0.5, 20.0), (3600.0, 2.0, 1.0, 60.0),
    (59.99, 2.0, 1.0, 10.0), (7.0, 60.0, 60.0, 60.0),
])
def test_chunks_own_every_window_exactly_once(duration, window, hop, read):
    expected = window_starts(duration, window, hop)
    chunks = plan_chunks("f.wav", duration, window_seconds=window, hop_seconds=hop, read_seconds=read)
    owned = np.concatenate([c["starts"] for c in chunks])
    np.testing.assert_allclose(owned, expected)  # none lost, none twice, in order
    assert expected[-1] + window >= duration and (len(expected) == 1 or expected[-1] < duration)
    # The shots' spans tile the file: each chunk's from its first window's start to the next chunk's.
    assert [c["starts"][0] for c in chunks[1:]] == [c["owned_end"] for c in chunks[:-1]]
    assert chunks[0]["starts"][0] == 0.0 and chunks[-1]["owned_end"] == duration
    for c in chunks:  # each chunk reads its windows and the shot detector's context around its span
        assert c["read_start"] == max(0.0, c["starts"][0] - SHOT_CONTEXT_BEFORE) or c["starts"][0] - c["read_start"] \
            == pytest.approx(SHOT_CONTEXT_BEFORE, abs=0.005)
        assert round(c["read_start"] / 0.005, 6) % 1 == 0  # on the detector's 5 ms frame grid
        assert c["read_end"] == max(c["starts"][-1] + window, min(duration, c["owned_end"] + SHOT_CONTEXT_AFTER))


def _default(function, name: str) -> float:
    return inspect.signature(function).parameters[name].default


def test_a_chunk_reads_past_its_span_as_far_as_the_shot_detector_looks_ahead():
    """windows.py ships without onsets.py's constants (the exported scorer), so they are restated there: the
    read past a chunk's span must cover what the detector reads after a shot to judge a burst."""
    fps = int(round(1.0 / onsets.FRAME_SECONDS))
    longest_period = int(_default(onsets.detect_shots, "body_seconds") * fps)
    # burst_period's segment, as detect_shots calls it (span=fps // 2, longest=its body).
    correlated = max(fps // 2, onsets.SKIP + 2 * longest_period) / fps
    run = ((_default(onsets.find_shots, "min_shots") - 1) * _default(onsets.find_shots, "longest")
           + _default(onsets.find_shots, "shortest"))  # a run of blasts and the shots counted against it
    assert BURST_LOOK_AHEAD >= max(correlated, run)
    # A frame's level reaches half the analysis window ahead, detect_shots' standing median 3 frames more.
    assert FRAME_REACH >= onsets.WINDOW_SECONDS / 2 + 3 * onsets.FRAME_SECONDS
    assert SHOT_CONTEXT_AFTER >= BURST_LOOK_AHEAD + FRAME_REACH


def test_cut_windows_are_zero_padded_where_the_audio_ends():
    wave = np.arange(10, dtype=np.float32)
    pieces = cut_windows(wave, 2, read_start=1.0, starts=np.array([1.0, 3.0, 5.0]), window=4)
    assert pieces.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 0]]


def test_read_groups_hold_about_a_batch_of_windows_and_keep_long_chunks_alone():
    from gunsound.windows import pack_chunks

    chunks = [c for d in (1.0, 3.0, 0.5, 2.5) * 20 for c in plan_chunks("f.wav", d, window_seconds=2.0,
                                                                        hop_seconds=2.0, read_seconds=60.0)]
    chunks += plan_chunks("long.wav", 600.0, window_seconds=2.0, hop_seconds=1.0, read_seconds=60.0)
    chunks.insert(7, {"path": "bad.wav", "starts": []})  # a file without windows weighs one row
    groups = pack_chunks(chunks, 16)
    assert [c for g in groups for c in g] == chunks  # every chunk once, in order
    sizes = [sum(max(1, len(c["starts"])) for c in g) for g in groups]
    assert all(s <= 16 for s, g in zip(sizes, groups, strict=True) if len(g) > 1)
    # Each group is as full as it can be: the next chunk would not have fitted.
    assert all(size + max(1, len(after[0]["starts"])) > 16 for size, after in zip(sizes, groups[1:], strict=False))
    assert sum(len(g) for g in groups[:-10]) == 81 and len(groups[:-10]) < 81 / 5  # short files share groups
    long_groups = [g for g in groups if g[0]["path"] == "long.wav"]
    assert len(long_groups) == 10 and all(len(g) == 1 for g in long_groups)  # 60-window chunks stand alone
