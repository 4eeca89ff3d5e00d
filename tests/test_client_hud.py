"""The HUD's numbers from events, as plain code: latency per key change, fps, chunk rate, mini-map, notes."""

from types import SimpleNamespace

import numpy as np
import pytest

from client.hud import NOTE_SECONDS, HudModel


def _header(index, keys_seq, chunk=0, x=0.0, z=0.0, t_sampled=0.0, t_ready=0.5):
    pose = np.eye(4)
    pose[0, 3], pose[2, 3] = x, z
    return SimpleNamespace(
        index=index, keys_seq=keys_seq, chunk=chunk, pose=tuple(pose.reshape(16)), t_sampled=t_sampled, t_ready=t_ready
    )


def test_latency_per_key_change_ends_at_the_first_frame_carrying_its_seq():
    hud = HudModel(fps=16.0)
    hud.on_key_change(5, {"forward"}, now=10.0)
    hud.on_reprojected(10.02)
    hud.on_frame_shown(_header(30, keys_seq=4), 10.5)  # older keys: not yet
    hud.on_key_change(9, {"yaw_left"}, now=11.0)
    hud.on_reprojected(11.01)
    hud.on_frame_received(_header(50, keys_seq=7), 11.2)
    hud.on_frame_shown(_header(50, keys_seq=7), 12.0)  # covers seq 5, not seq 9
    a, b = hud.samples
    assert a.reprojected_s == pytest.approx(0.02) and a.generated_s == pytest.approx(2.0)
    assert a.t_received == pytest.approx(11.2)
    assert b.reprojected_s == pytest.approx(0.01) and b.generated_s is None
    hud.on_frame_shown(_header(74, keys_seq=12), 13.5)
    assert b.generated_s == pytest.approx(2.5)
    rep, gen = hud.latencies()
    assert rep == pytest.approx([0.02, 0.01]) and gen == pytest.approx([2.0, 2.5])
    text = "\n".join(hud.lines(13.5, buffer_depth=8))
    assert "generated 2500 ms (median 2250, n=2)" in text and "buffer 8 frames (0.50 s)" in text


def test_a_change_merged_into_an_unsent_message_is_one_sample():
    hud = HudModel()
    hud.on_key_change(3, {"forward"}, 1.0)
    hud.on_key_change(3, {"back"}, 1.01)
    assert len(hud.samples) == 1 and hud.samples[0].held == {"back"} and hud.samples[0].t_change == 1.0


def test_shown_fps_chunk_rate_and_generation_fps():
    hud = HudModel(fps=16.0, chunk_frames=24)
    for i in range(33):
        chunk = i // 24
        h = _header(i, -1, chunk=chunk, t_sampled=1.0, t_ready=1.75)
        hud.on_frame_received(h, now=chunk * 1.5)
        hud.on_frame_shown(h, now=i / 16)
    assert hud.shown_fps(now=32 / 16) == pytest.approx(16.0)
    assert hud.generation_fps() == pytest.approx(24 / 0.75)
    for c in (2, 3):
        hud.on_frame_received(_header(24 * c, -1, chunk=c), now=c * 1.5)
    assert hud.chunk_rate() == pytest.approx(1 / 1.5)


def test_minimap_fits_the_trail_and_a_new_session_clears_it():
    hud = HudModel()
    assert hud.minimap(100, 100) == []
    for i in range(11):
        hud.on_frame_shown(_header(i, -1, x=0.0, z=i * 0.5), now=i)
    pts = hud.minimap(100, 80, margin=5)
    assert len(pts) == 11
    xs, ys = zip(*pts, strict=True)
    assert max(ys) - min(ys) == 70 and len(set(xs)) == 1  # fitted to the box height, path straight ahead
    assert ys[-1] < ys[0]  # forward (+z) is up on the map
    hud.new_session("20261127-000000-000-abcdef")
    assert hud.minimap(100, 100) == []


def test_notes_expire_and_rec_label():
    hud = HudModel(recording=True)
    hud.show_note("prompt changed", now=1.0)
    assert "prompt changed" in hud.lines(2.0, buffer_depth=0)
    assert "prompt changed" not in hud.lines(1.0 + NOTE_SECONDS + 0.1, buffer_depth=0)
    assert hud.rec_label() == ""
    hud.new_session("20261127-000000-000-abcdef")
    assert hud.rec_label() == "REC 20261127-000000-000-abcdef"
