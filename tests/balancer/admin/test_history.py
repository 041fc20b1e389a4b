"""The charts' history: bounded, one sample per step, oldest dropped after the window."""

from __future__ import annotations

import pytest

from balancer.admin.history import History, Sample


def test_keeps_ten_minutes_of_one_second_samples_and_no_more() -> None:
    h = History()
    for i in range(2000):
        h.record(1000.0 + i, {"b1": i, "b2": 2 * i})
    samples = h.as_dict()["samples"]
    assert len(samples) == 601
    assert samples[0]["t"] == 1000.0 + 2000 - 1 - 600
    assert samples[-1] == {"t": 2999.0, "requests": {"b1": 1999, "b2": 3998}}


def test_calls_closer_than_half_a_step_are_one_sample() -> None:
    h = History(window=10.0, step=1.0)
    h.record(0.0, {"b1": 1})
    h.record(0.2, {"b1": 2})
    h.record(1.0, {"b1": 3})
    assert [s["requests"]["b1"] for s in h.as_dict()["samples"]] == [1, 3]


def test_a_sample_is_a_copy_of_the_counters() -> None:
    h = History()
    counts = {"b1": 1}
    h.record(0.0, counts)
    counts["b1"] = 99
    assert h.as_dict()["samples"][0]["requests"] == {"b1": 1}


@pytest.mark.parametrize(("window", "step"), [(0.0, 1.0), (10.0, 0.0), (1.0, 2.0)])
def test_bad_sizes_are_refused(window: float, step: float) -> None:
    with pytest.raises(ValueError, match="history needs"):
        History(window, step)


def test_the_present_ends_the_view_without_being_stored() -> None:
    h = History()
    h.record(10.0, {"b1": 1})
    view = h.as_dict(now=Sample(10.3, {"b1": 5}))
    assert [s["requests"]["b1"] for s in view["samples"]] == [1, 5]
    assert len(h.samples) == 1
