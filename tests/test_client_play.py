"""The pygame client under SDL's dummy video driver against a real engine subprocess (tiny preset, CPU).

Synthetic key events go through the window's one `step` (the path a person's keys take); the checks use
the HUD's data (latency samples, buffer depth, pose trail) and the frame headers (what the engine applied)."""

import io
import os
import signal
import time

import numpy as np
import pytest
from PIL import Image

os.environ["SDL_VIDEODRIVER"] = "dummy"
os.environ["SDL_AUDIODRIVER"] = "dummy"

import pygame  # noqa: E402

from client.play import PlayApp, PlayConfig, run_demo_window  # noqa: E402
from engine.spawn import spawn_engine  # noqa: E402

PROMPT = "a quiet street at dusk"


def _png(hw=(150, 260)) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray((rng.random((*hw, 3)) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """Address of `python -m engine.cli engine --preset tiny` in a subprocess (records to a temp dir)."""
    root = tmp_path_factory.mktemp("recordings")
    cmd = [
        "--preset",
        "tiny",
        "--bind",
        "tcp://127.0.0.1:0",
        "--record-root",
        str(root),
        "--quality",
        "preview",
    ]
    proc, address = spawn_engine(cmd)
    yield address
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0


class Driver:
    """Runs the window's loop at ~60 Hz, posting key events; records what the checks need."""

    def __init__(self, app: PlayApp):
        self.app = app
        self.max_depth = 0
        self.shown_at: list[tuple[float, int]] = []  # (time, frame index) of every frame put on screen

    def run_until(self, cond, timeout: float, events=()):
        """Step until cond() (or timeout: a test failure); `events`: (seconds from now, type, key or attrs)."""
        t0 = time.monotonic()
        pending = sorted(events, key=lambda e: e[0])
        while True:
            now = time.monotonic()
            while pending and now - t0 >= pending[0][0]:
                _, etype, attrs = pending.pop(0)
                pygame.event.post(pygame.event.Event(etype, attrs if isinstance(attrs, dict) else {"key": attrs}))
            before = self.app.current
            assert self.app.step(), "the window closed"
            if self.app.current is not before and self.app.current is not None:
                self.shown_at.append((time.monotonic(), self.app.current.header.index))
            if self.app.jitter is not None:
                self.max_depth = max(self.max_depth, self.app.jitter.depth)
            if not pending and cond():
                return
            assert now - t0 < timeout, f"timed out; HUD: {self.app.hud.lines(now, buffer_depth=0)}"
            time.sleep(1 / 60)


def _expected_held(posted: dict[int, frozenset], keys_seq: int) -> frozenset:
    """What the `keys` message `keys_seq` carried: the last change at or before it (each holds the full set)."""
    changes = [s for s in posted if s <= keys_seq]
    return posted[max(changes)] if changes else frozenset()


def test_window_drives_the_engine_and_the_hud_measures_it(engine):
    app = PlayApp(PlayConfig(address=engine, image=_png(), prompt=PROMPT, window_size=(640, 384)))
    d = Driver(app)
    try:
        d.run_until(lambda: app.current is not None, 60)  # the first image on screen
        assert app.welcome.width == app.current.frame.shape[1]
        d.run_until(
            lambda: any("yaw_right" in h.held for h in app.log.received),
            60,
            events=[
                (0.2, pygame.KEYDOWN, pygame.K_w),
                (2.2, pygame.KEYUP, pygame.K_w),
                (2.2, pygame.KEYDOWN, pygame.K_d),  # v2: d = yaw right
            ],
        )
        d.run_until(lambda: True, 5, events=[(1.0, pygame.KEYUP, pygame.K_d)])
        # play until the screen shows a frame generated with the last change (the release of d)
        d.run_until(lambda: app.current.header.keys_seq >= max(app.log.posted), 60)
        log, hud = app.log, app.hud
        assert log.errors == [] and len(log.sessions) == 1

        # the engine applied the posted keys: every header's held set is what the keys message it names carried
        changes = {seq: held for seq, held in log.posted.items()}
        assert [changes[s] for s in sorted(changes)][:3] == [{"forward"}, {"yaw_right"}, frozenset()]
        applied = [h for h in log.received if h.keys_seq >= 0]
        assert applied and all(h.held == _expected_held(changes, h.keys_seq) for h in applied)
        assert {"forward"} in [h.held for h in applied] and {"yaw_right"} in [h.held for h in applied]
        assert [h.index for h in log.received] == list(range(len(log.received)))  # nothing lost on loopback

        # latency samples: generated (the first frame carrying the change's seq) and reprojected (next refresh)
        samples = {s.seq: s for s in hud.samples}
        for seq in sorted(changes)[:2]:
            s = samples[seq]
            assert s.generated_s is not None and s.reprojected_s is not None, s
            assert 0 < s.reprojected_s < 0.25 and s.reprojected_s < s.generated_s, s
            first = next(h for h in log.received if h.keys_seq >= seq)
            assert first.held == changes[seq]
        rep, gen = hud.latencies()
        assert len(rep) >= 2 and len(gen) >= 2

        # buffer depth: chunks arrive in bursts and wait in the jitter buffer
        assert d.max_depth >= 8
        # pose trail: one point per frame shown, moving forward (+z) then turning right
        assert len(hud.trail) == app.jitter.stats.shown == len(d.shown_at)
        trail = np.array(hud.trail)
        assert trail[-1, 1] > 0.1 and hud.heading[0] > 0.05
        assert len(hud.minimap(100, 100)) == len(trail)
        # playout at the session fps: frames shown one display refresh apart at most from 1/16 s
        gaps = np.diff([t for t, _ in d.shown_at])
        assert 0.045 < float(np.median(gaps)) < 0.09, np.median(gaps)
        text = "\n".join(hud.lines(time.monotonic(), buffer_depth=app.jitter.depth))
        assert "latency" in text and "buffer" in text and "fps" in text
        assert hud.rec_label() == f"REC {log.sessions[0]}"
    finally:
        app.close()
    assert log.ended and log.ended[-1].reason == "stopped"  # closing the window stopped the session


def test_pause_prompt_branch_reset_and_quality_from_the_window(engine):
    app = PlayApp(PlayConfig(address=engine, image=_png(), prompt=PROMPT, window_size=(640, 384), hud=False))
    d = Driver(app)
    try:
        d.run_until(lambda: app.current is not None and app.current.header.chunk >= 1, 60)
        d.run_until(lambda: app.hud.state == "paused", 10, events=[(0.0, pygame.KEYDOWN, pygame.K_p)])
        assert app.jitter.paused
        d.run_until(lambda: app.hud.state == "running", 10, events=[(0.0, pygame.KEYDOWN, pygame.K_p)])
        typed = [(0.0, pygame.KEYDOWN, pygame.K_t), (0.0, pygame.TEXTINPUT, {"text": "t"})]  # the opening key
        typed += [(0.1, pygame.KEYDOWN, pygame.K_BACKSPACE)] * len(PROMPT)
        typed += [(0.2, pygame.TEXTINPUT, {"text": "a snowy forest"}), (0.3, pygame.KEYDOWN, pygame.K_RETURN)]
        d.run_until(lambda: app.hud.note == "prompt changed", 10, events=typed)
        assert app.prompt == "a snowy forest" and app.typing is None
        # R on a started session: the engine itself ends it and starts a new one from the first image
        d.run_until(
            lambda: len(app.log.sessions) == 2 and app.current is not None,
            60,
            events=[(0.0, pygame.KEYDOWN, pygame.K_r)],
        )
        assert app.current.header.index < app.welcome.chunk_frames and app.log.errors == []
        d.run_until(lambda: app.current.header.chunk >= 1, 60)
        first = app.session_id
        chunk = app.current.header.chunk
        d.run_until(
            lambda: len(app.log.sessions) == 3 and app.current is not None,
            60,
            events=[(0.0, pygame.KEYDOWN, pygame.K_b)],
        )
        assert app.log.errors == []
        branched = app.current.header
        assert branched.session_id != first and branched.session_id == app.session_id
        assert branched.index > chunk * app.welcome.chunk_frames  # continues after the chunk on screen
        assert app.log.ended[-1].session_id == first

        # R: a new session from the first image (frames from index 0); the engine refuses to reset a branched
        # session, so the client stops it and starts afresh
        d.run_until(
            lambda: len(app.log.sessions) == 4 and app.current is not None,
            60,
            events=[(0.0, pygame.KEYDOWN, pygame.K_r)],
        )
        assert app.current.header.index < app.welcome.chunk_frames
        assert [(e.code, e.field) for e in app.log.errors] == [("bad_state", "action")]
        app.log.errors.clear()
        # Q: this engine fixes quality per session and serves preview only: the client restarts in full, is
        # refused, and goes back to preview in a fresh session
        d.run_until(
            lambda: len(app.log.sessions) == 5 and app.current is not None,
            60,
            events=[(0.0, pygame.KEYDOWN, pygame.K_q)],
        )
        assert [(e.code, e.field) for e in app.log.errors] == [("bad_state", "quality"), ("invalid_field", "quality")]
        assert app.quality == "preview" and app.hud.state == "running"
    finally:
        app.close()


def test_run_demo_window_plays_for_a_while_and_stops_the_session(engine, tmp_path):
    shot = tmp_path / "shot.png"
    log = run_demo_window(engine, image_bytes=_png(), prompt=PROMPT, seconds=6.0, screenshot=shot)
    assert len(log.sessions) == 1 and log.errors == [] and len(log.received) > 0
    assert log.ended and log.ended[-1].session_id == log.sessions[0] and log.ended[-1].reason == "stopped"
    with Image.open(shot) as im:
        assert im.size == (960, 576)  # the window, with the tiny preset's 320x192 frames scaled 3x
