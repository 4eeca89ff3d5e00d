"""Jitter buffer playout (fps pacing, underrun, overrun, late frames, pause), as plain code."""

import pytest

from client.jitter import JitterBuffer

FPS = 16.0


def _play(buf, t0, t1, dt=0.001):
    """(time, item) of every frame popped while polling every dt from t0 to t1."""
    out, t = [], t0
    while t < t1:
        item = buf.pop_due(t)
        if item is not None:
            out.append((t, item))
        t += dt
    return out


def test_a_burst_plays_out_at_fps():
    buf = JitterBuffer(FPS, max_depth=72)
    for i in range(24):
        buf.push(i, f"f{i}", 0.0)
    assert buf.depth == 24 and buf.depth_s() == pytest.approx(1.5)
    shown = _play(buf, 0.0, 2.0)
    assert [item for _, item in shown] == [f"f{i}" for i in range(24)]
    times = [t for t, _ in shown]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert all(abs(g - 1 / FPS) < 0.002 for g in gaps), gaps
    assert buf.stats.underruns == 1 and buf.depth == 0  # ran dry once after the burst


def test_out_of_order_frames_play_in_order_and_late_ones_are_refused():
    buf = JitterBuffer(FPS)
    for i in (2, 0, 1):
        buf.push(i, i, 0.0)
    assert [item for _, item in _play(buf, 0.0, 0.5)] == [0, 1, 2]
    assert buf.push(1, 1, 0.5) is False and buf.push(2, 2, 0.5) is False
    assert buf.stats.late == 2


def test_underrun_holds_then_restarts_the_clock_without_rushing():
    buf = JitterBuffer(FPS)
    buf.push(0, 0, 0.0)
    assert buf.pop_due(0.0) == 0
    assert buf.pop_due(0.2) is None and buf.stats.underruns == 1  # due at 1/16 s, nothing there
    for i in range(1, 5):  # a late burst at t = 1.0
        buf.push(i, i, 1.0)
    shown = _play(buf, 1.0, 2.0)
    times = [t for t, _ in shown]
    assert times[0] == pytest.approx(1.0, abs=0.002)
    assert all(
        abs((b - a) - 1 / FPS) < 0.002 for a, b in zip(times, times[1:], strict=False)
    )  # played at fps, not rushed
    assert buf.stats.underruns == 2  # and the next dry spell counts again


def test_overrun_drops_the_oldest_and_skipped_frames_are_counted():
    buf = JitterBuffer(FPS, max_depth=10)
    for i in range(25):
        buf.push(i, i, 0.0)
    assert buf.depth == 10 and buf.stats.overrun_drops == 15
    assert buf.pop_due(0.0) == 15  # the oldest kept
    assert buf.push(3, 3, 0.0) is False  # a dropped frame is late now
    buf2 = JitterBuffer(FPS)
    buf2.push(0, 0, 0.0)
    buf2.push(5, 5, 0.0)  # the engine dropped 1..4 for us
    _play(buf2, 0.0, 0.5)
    assert buf2.stats.skipped == 4


def test_pause_stops_playout_and_resume_reanchors():
    buf = JitterBuffer(FPS)
    for i in range(4):
        buf.push(i, i, 0.0)
    assert buf.pop_due(0.0) == 0
    buf.pause()
    assert buf.pop_due(5.0) is None and buf.stats.underruns == 0
    buf.resume()
    assert buf.pop_due(10.0) == 1 and buf.pop_due(10.01) is None and buf.pop_due(10.0 + 1 / FPS) == 2


def test_clear_for_a_new_session():
    buf = JitterBuffer(FPS)
    buf.push(0, 0, 0.0)
    buf.clear(last_index=99)
    assert buf.depth == 0 and buf.push(99, 99, 0.0) is False and buf.push(100, 100, 0.0) is True


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="fps"):
        JitterBuffer(0.0)
    with pytest.raises(ValueError, match="max_depth"):
        JitterBuffer(FPS, max_depth=0)
