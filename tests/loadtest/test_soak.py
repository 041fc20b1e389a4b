import pytest

from harness.procs import proc_fds, proc_rss_kib
from loadtest.soak import summarise


def _w(t: float, rss: int, fds: int, errors: int = 0) -> dict[str, float]:
    return {
        "t_s": t,
        "requests": 100,
        "errors": errors,
        "p50_ms": 1.0,
        "p99_ms": 5.0,
        "rss_kib": rss,
        "fds": fds,
    }


def test_growth_is_measured_from_the_end_of_warmup() -> None:
    # default: the first window is the warm-up; growth is counted from its end
    s = summarise([_w(10, 30000, 10), _w(20, 40000, 12), _w(30, 42000, 12)])
    assert s["rss_kib_after_warmup"] == 30000
    assert s["rss_growth_pct"] == 40.0
    assert not s["targets"]["rss_growth_le_10pct"]
    s2 = summarise([_w(10, 40000, 10), _w(20, 40000, 12), _w(30, 44000, 12)], warmup_windows=2)
    assert s2["rss_growth_pct"] == 10.0
    assert s2["targets"]["rss_growth_le_10pct"]
    assert s2["fds_min"] == 12 and s2["fds_max"] == 12


def test_errors_fail_the_target() -> None:
    s = summarise([_w(10, 100, 5), _w(20, 100, 5, errors=3)])
    assert s["errors"] == 3
    assert not s["targets"]["errors_zero"]


def test_empty_is_refused() -> None:
    with pytest.raises(ValueError):
        summarise([])


def test_proc_readers_see_this_process() -> None:
    import os

    assert proc_rss_kib(os.getpid()) > 0
    assert proc_fds(os.getpid()) >= 3
