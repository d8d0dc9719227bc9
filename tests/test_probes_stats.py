"""AttentionStats: .npz + JSON header round trip (atomic, numpy-only), merging by summation, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from packcache import SequenceLayout
from probes import AttentionStats, StatsError

LAYOUT = SequenceLayout(text_tokens=4, num_frames=5, height=3, width=4, row_separator=True, frame_prefix=1,
                        frame_suffix=1, convention="mmrope", scales=(1, 4, 4))


def filled(seed: int) -> AttentionStats:
    st = AttentionStats.empty("m", 2, 4, 2, LAYOUT, recent_frames=2, num_steps=3)
    rng = np.random.default_rng(seed)
    for name, arr in st.arrays.items():
        st.arrays[name] = rng.integers(0, 9, arr.shape).astype(arr.dtype)
    st.num_samples, st.forwards = 3, 7
    return st


def test_save_load_round_trip_is_numpy_only_and_atomic(tmp_path):
    st = filled(0)
    path = tmp_path / "sub" / "stats.npz"
    st.save(path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["stats.npz"]  # no temporary file left behind
    with np.load(path, allow_pickle=False) as raw:  # the dashboard's view: numpy + json, no torch, no pickle
        header = json.loads(str(raw["header"]))
        assert header["schema"] == "packcache.stats/v1" and header["key_groups"][:5] == ["text", "cond", "special",
                                                                                           "future", "d0"]
        assert raw["mass"].shape == (2, 4, 5, header["max_distance"] + 5)
    back = AttentionStats.load(path)
    assert back.header() == st.header() and back.layout == LAYOUT
    for name in st.arrays:
        np.testing.assert_array_equal(back.arrays[name], st.arrays[name])


def test_merge_sums_every_array_and_count():
    a, b = filled(1), filled(2)
    total = a + b
    for name in a.arrays:
        np.testing.assert_array_equal(total.arrays[name], a.arrays[name] + b.arrays[name])
    assert (total.num_samples, total.forwards) == (6, 14)
    assert a.mass.sum() != total.mass.sum()  # __add__ leaves its operands alone


def test_incompatible_merges_and_foreign_files_are_refused(tmp_path):
    other = AttentionStats.empty("m", 2, 4, 2, LAYOUT.with_frames(6))
    with pytest.raises(StatsError, match="different layout"):
        filled(0).merge(other)
    bad = tmp_path / "x.npz"
    np.savez(bad, mass=np.zeros(3))
    with pytest.raises(StatsError, match="not a packcache statistics file"):
        AttentionStats.load(bad)


def test_distance_profile_averages_only_over_frames_that_have_the_distance():
    st = AttentionStats.empty("m", 1, 1, 1, LAYOUT, max_distance=4, recent_frames=0)
    st.arrays["queries"][:] = 10
    st.arrays["mass"][0, 0, 3, 4 + 2] = 10 * 0.3  # frame 3 looks 2 back (frame 1) with mass 0.3
    st.arrays["mass"][0, 0, 4, 4 + 2] = 10 * 0.1  # frame 4 looks 2 back (frame 2) with mass 0.1
    ds, mean, _ = st.distance_profile()
    assert ds.tolist() == [1, 2, 3]
    assert mean[0, 0, 1] == pytest.approx(0.2)  # frames 3 and 4 only: frame 2 - 2 = 0 is the condition
    assert mean[0, 0, 0] == 0.0 and mean[0, 0, 2] == 0.0
