"""What the HUD says, computed from events by plain code (no pygame): the window only draws it.

    hud = HudModel(fps=16.0)
    hud.on_key_change(seq, held, now)           # a new held set went out with `keys` seq
    hud.on_reprojected(now)                     # the screen showed a warp reflecting the latest change
    hud.on_frame_received(header, now)          # a generated frame arrived
    hud.on_frame_shown(header, now)             # ... and was put on screen
    hud.on_status(status, now); hud.on_chunk(...)
    hud.lines(buffer_depth=..., ...) -> list[str]; hud.minimap(w, h) -> [(x, y), ...]

Latency per key change (the `keys` message whose held set differs from the previous one): reprojected
= change -> first display refresh warped by it; generated = change -> first frame shown whose header
carries `keys_seq` >= the change's seq (the engine applied that key state or a later one). All times
are the client's monotonic clock, seconds.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

TRAIL_POINTS = 4096  # pose trail kept for the mini-map (memory does not grow with session length)
SAMPLES = 256  # latency samples kept
NOTE_SECONDS = 6.0


@dataclass
class LatencySample:
    seq: int
    held: frozenset[str]
    t_change: float
    t_reprojected: float | None = None  # first display refresh warped by this change
    t_received: float | None = None  # first frame reflecting it arrived
    t_shown: float | None = None  # ... and was shown

    @property
    def reprojected_s(self) -> float | None:
        return None if self.t_reprojected is None else self.t_reprojected - self.t_change

    @property
    def generated_s(self) -> float | None:
        return None if self.t_shown is None else self.t_shown - self.t_change


@dataclass
class HudModel:
    fps: float = 16.0  # session fps (from welcome)
    visible: bool = True
    session_id: str | None = None
    recording: bool = False
    quality: str = "preview"
    prompt: str = ""
    state: str = "connecting"
    note: str = ""  # the latest engine note or client message, shown for NOTE_SECONDS
    note_at: float = -1e9
    held: frozenset[str] = frozenset()
    chunk_seconds: float = 0.0  # last chunk's engine wall time (status / frame headers)
    chunk_frames: int = 24
    dropped: int = 0  # frames the engine did not send us
    samples: deque = field(default_factory=lambda: deque(maxlen=SAMPLES))
    trail: deque = field(default_factory=lambda: deque(maxlen=TRAIL_POINTS))  # (x, z) camera centres
    heading: tuple[float, float] = (0.0, 1.0)  # (x, z) of the camera's forward axis on screen
    _shown_times: deque = field(default_factory=lambda: deque(maxlen=256))
    _chunk_times: deque = field(default_factory=lambda: deque(maxlen=16))  # client time each chunk completed
    _last_chunk: int = -1

    # ---------------------------------------------------------------- events

    def new_session(self, session_id: str | None) -> None:
        self.session_id = session_id
        self.trail.clear()
        self._chunk_times.clear()
        self._last_chunk = -1
        # a change the old session never applied is not a latency sample of the new one
        self.samples = deque((s for s in self.samples if s.t_shown is not None), maxlen=SAMPLES)

    def on_key_change(self, seq: int, held, now: float) -> None:
        self.held = frozenset(held)
        if self.samples and self.samples[-1].seq == seq:  # merged into a message not sent yet
            self.samples[-1].held = self.held
            return
        self.samples.append(LatencySample(seq, self.held, now))

    def on_reprojected(self, now: float) -> None:
        for s in self.samples:
            if s.t_reprojected is None and s.t_shown is None:
                s.t_reprojected = now

    def on_frame_received(self, header, now: float) -> None:
        for s in self.samples:
            if s.t_received is None and 0 <= s.seq <= header.keys_seq:
                s.t_received = now
        if header.chunk != self._last_chunk:
            if self._last_chunk >= 0:
                self._chunk_times.append(now)
            self._last_chunk = header.chunk
        self.chunk_seconds = max(0.0, header.t_ready - header.t_sampled)

    def on_frame_shown(self, header, now: float) -> None:
        for s in self.samples:
            if s.t_shown is None and 0 <= s.seq <= header.keys_seq:
                s.t_shown = now
                if s.t_received is None:
                    s.t_received = now
        self._shown_times.append(now)
        pose = np.asarray(header.pose, np.float64).reshape(4, 4)
        self.trail.append((float(pose[0, 3]), float(pose[2, 3])))
        self.heading = (float(pose[0, 2]), float(pose[2, 2]))

    def on_status(self, status) -> None:
        self.state = status.state
        if status.quality is not None:
            self.quality = status.quality
        if status.chunk_seconds > 0:
            self.chunk_seconds = status.chunk_seconds
        self.dropped = status.dropped
        if status.note:
            self.show_note(status.note)

    def show_note(self, text: str, now: float | None = None) -> None:
        self.note, self.note_at = text, time.monotonic() if now is None else now

    # ---------------------------------------------------------------- derived numbers

    def shown_fps(self, now: float, window_s: float = 2.0) -> float:
        """Generated frames put on screen per second over the last `window_s`."""
        recent = [t for t in self._shown_times if now - t <= window_s]
        if len(recent) < 2:
            return 0.0
        span = max(recent[-1] - recent[0], 1e-6)
        return (len(recent) - 1) / span

    def chunk_rate(self) -> float:
        """Chunks completed per second (client clock, between chunk arrivals)."""
        t = list(self._chunk_times)
        if len(t) < 2:
            return 0.0
        return (len(t) - 1) / max(t[-1] - t[0], 1e-6)

    def generation_fps(self) -> float:
        """Frames the engine generates per second of its own time (chunk_frames / chunk_seconds)."""
        return self.chunk_frames / self.chunk_seconds if self.chunk_seconds > 0 else 0.0

    def latencies(self) -> tuple[list[float], list[float]]:
        """(reprojected, generated) latencies in seconds of the completed samples, oldest first."""
        rep = [s.reprojected_s for s in self.samples if s.reprojected_s is not None]
        gen = [s.generated_s for s in self.samples if s.generated_s is not None]
        return rep, gen

    def minimap(self, width: int, height: int, margin: int = 6) -> list[tuple[int, int]]:
        """The camera path seen from above (x right, z up on screen), fitted into width×height pixels.

        The scale fits the whole trail (at least ±0.5 units around it), centred; [] without poses."""
        if not self.trail:
            return []
        pts = np.asarray(self.trail, np.float64)
        lo, hi = pts.min(0), pts.max(0)
        centre = (lo + hi) / 2
        half = max(float((hi - lo).max()) / 2, 0.5)
        scale = (min(width, height) / 2 - margin) / half
        xs = width / 2 + (pts[:, 0] - centre[0]) * scale
        ys = height / 2 - (pts[:, 1] - centre[1]) * scale
        return [(int(round(x)), int(round(y))) for x, y in zip(xs, ys, strict=True)]

    def lines(
        self,
        now: float,
        *,
        buffer_depth: int,
        underruns: int = 0,
        paused: bool = False,
        reproject: bool = True,
        keymap: str = "v2",
    ) -> list[str]:
        """The HUD's text, top to bottom."""
        rep, gen = self.latencies()
        chunk_rate = self.chunk_rate()
        out = [
            f"{self.state}{' (paused)' if paused and self.state != 'paused' else ''}   quality {self.quality}"
            f"   keymap {keymap}",
            f"shown {self.shown_fps(now):4.1f} fps   engine {self.generation_fps():5.1f} fps "
            f"({self.chunk_seconds * 1000:4.0f} ms/chunk, {chunk_rate:4.2f} chunks/s)",
            f"buffer {buffer_depth} frames ({buffer_depth / self.fps:4.2f} s)   underruns {underruns}"
            f"   dropped {self.dropped}",
            f"latency  reprojected {_ms(rep)}   generated {_ms(gen)}" + ("" if reproject else "   (reprojection off)"),
            f"held  {' '.join(sorted(self.held)) or '-'}",
        ]
        if self.note and now - self.note_at < NOTE_SECONDS:
            out.append(self.note)
        return out

    def rec_label(self) -> str:
        """'REC <session id>' while recording, else the session id (or '' without a session)."""
        sid = self.session_id or ""
        return f"REC {sid}" if self.recording and sid else sid


def _ms(values: list[float]) -> str:
    """'last 120 ms (median 130, n=4)' or '-'."""
    if not values:
        return "-"
    med = float(np.median(values))
    last = values[-1]
    if not math.isfinite(last):
        return "-"
    return f"{last * 1000:.0f} ms (median {med * 1000:.0f}, n={len(values)})"
