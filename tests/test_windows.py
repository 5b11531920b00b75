"""Window planning: chunks own every window exactly once and read exactly the span their windows need."""

import numpy as np
import pytest

from gunsound.windows import cut_windows, plan_chunks, window_starts


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
    for c in chunks:  # each chunk reads exactly the span its windows need
        assert c["read_start"] == c["starts"][0] and c["read_end"] == c["starts"][-1] + window


def test_cut_windows_are_zero_padded_where_the_audio_ends():
    wave = np.arange(10, dtype=np.float32)
    pieces = cut_windows(wave, 2, read_start=1.0, starts=np.array([1.0, 3.0, 5.0]), window=4)
    assert pieces.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 0]]
