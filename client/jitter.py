"""Jitter buffer: frames arrive in bursts (a chunk at a time), leave one by one at the session fps.

    buf = JitterBuffer(fps=16.0, max_depth=72)
    buf.push(index, item, now)          # any order; late or duplicate frames are refused (counted)
    item = buf.pop_due(now)             # the frame due now, or None (keep showing the last one)

Playout is paced by a clock anchored at the first frame shown: frame k after the anchor is due at
anchor + k/fps. Underrun (nothing due when a frame should be shown): the last frame stays on screen,
the underrun is counted, and the clock re-anchors when the next frame arrives, so a late burst is
played at fps rather than rushed. Overrun (more than `max_depth` frames waiting): the oldest waiting
frames are dropped (counted) and the clock re-anchors, so latency cannot grow without bound.
`pause()` stops the clock, `resume()` re-anchors it. Plain code: every method takes `now` (seconds).
No pygame, no sockets.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field


@dataclass
class JitterStats:
    pushed: int = 0
    shown: int = 0
    late: int = 0  # refused: index at or before the last frame shown (or a duplicate)
    underruns: int = 0  # times a frame was due and none was waiting
    overrun_drops: int = 0  # frames dropped because the buffer was over max_depth
    skipped: int = 0  # gaps in the index sequence (frames the engine dropped for us)


@dataclass
class JitterBuffer:
    fps: float
    max_depth: int = 72  # frames waiting before the oldest are dropped (3 chunks of 24)
    start_depth: int = 1  # frames waiting before playout (re)starts
    stats: JitterStats = field(default_factory=JitterStats)

    def __post_init__(self) -> None:
        if not self.fps > 0:
            raise ValueError(f"fps={self.fps!r} is not accepted; it must be > 0")
        if self.max_depth < max(1, self.start_depth):
            raise ValueError(f"max_depth={self.max_depth} must be >= start_depth={self.start_depth} and >= 1")
        self._heap: list[tuple[int, object]] = []  # (frame index, item), smallest index first
        self._indices: set[int] = set()
        self._anchor: float | None = None  # clock time at which `_played` frames had been due
        self._played = 0  # frames shown since the anchor
        self._paused = False
        self._starved = False  # an underrun happened; re-anchor on the next frame
        self.last_index = -1  # index of the last frame popped (shown)

    # ---------------------------------------------------------------- input

    def push(self, index: int, item, now: float) -> bool:
        """Queue frame `index`. False (and counted as late) if it is at or before the last frame shown."""
        if index <= self.last_index or index in self._indices:
            self.stats.late += 1
            return False
        heapq.heappush(self._heap, (index, item))
        self._indices.add(index)
        self.stats.pushed += 1
        excess = len(self._heap) - self.max_depth
        if excess > 0:
            for _ in range(excess):
                i, _item = heapq.heappop(self._heap)
                self._indices.discard(i)
                self.last_index = max(self.last_index, i)
            self.stats.overrun_drops += excess
            self._anchor = None  # start afresh from the oldest frame kept
        return True

    def clear(self, last_index: int = -1) -> None:
        """Forget every waiting frame (a new session); `last_index`: frames at or before it are late."""
        self._heap.clear()
        self._indices.clear()
        self._anchor = None
        self._starved = False
        self.last_index = last_index

    # ---------------------------------------------------------------- output

    def pop_due(self, now: float):
        """The next frame if it is due at `now`, else None (paused, not yet due, or underrun)."""
        if self._paused:
            return None
        if self._anchor is None:
            if len(self._heap) < self.start_depth:
                return None
            self._anchor, self._played = now, 0
        due = self._anchor + self._played / self.fps
        if now < due:
            return None
        if not self._heap:
            if not self._starved:
                self.stats.underruns += 1
                self._starved = True
            return None
        if self._starved:  # restart the clock at the first frame after an underrun
            self._starved = False
            self._anchor, self._played = now, 0
        elif now - due > 1.0 / self.fps:  # we were not called for a while: do not rush to catch up
            self._anchor, self._played = now, 0
        index, item = heapq.heappop(self._heap)
        self._indices.discard(index)
        if self.last_index >= 0 and index > self.last_index + 1:
            self.stats.skipped += index - self.last_index - 1
        self.last_index = index
        self._played += 1
        self.stats.shown += 1
        return item

    def pause(self) -> None:
        self._paused = True

    def resume(self) -> None:
        self._paused = False
        self._anchor = None

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def depth(self) -> int:
        """Frames waiting to be shown."""
        return len(self._heap)

    def depth_s(self) -> float:
        """Seconds of video waiting to be shown."""
        return len(self._heap) / self.fps
