"""The window's connection to the engine: one network thread owns the socket, the window never waits on it.

    link = EngineLink("tcp://127.0.0.1:5555", Hello(client="sana-wm-play", encodings=("rgb24", "jpeg")))
    link.start()
    link.send(Start(...)); link.keys_on()           # in this order on the wire
    seq = link.keys.set(held, now)                   # a change: sent at once; the full set also every tick
    link.keys.set_last_shown(index)
    for msg, frame in link.poll(): ...               # never blocks; frame: uint8 [H, W, 3] or None
    link.close()

`KeySender` is plain code (a lock, no socket): it decides which `keys` message goes out when. Every
message carries the whole held set and a seq one higher than the last, so losing one is harmless.
The network thread sends queued messages in order, then a due `keys` message, then reads whatever
arrived (decoding JPEG off the window's thread) into an inbox queue.
"""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path

import zmq

from client.headless import connect, decode_pixels
from protocol import FrameHeader, Hello, Keys, Message, ProtocolError, decode_parts, encode


class KeySender:
    """Which `keys` message to send, and when: on every change and every `tick_s` while enabled."""

    def __init__(self, tick_s: float = 1 / 30) -> None:
        self.tick_s = tick_s
        self._lock = threading.Lock()
        self._seq = 0
        self._held: frozenset[str] = frozenset()
        self._last_shown = -1
        self._pending: Keys | None = None  # a change not sent yet
        self._next_tick = 0.0
        self.enabled = False  # only after start/branch went out (keys before that are an engine error)
        self.sent = 0

    def set(self, held, now: float) -> int | None:
        """A new held set. Returns the seq of the `keys` message that will carry it (None: unchanged,
        or no session to send it to yet)."""
        held = frozenset(held)
        with self._lock:
            if held == self._held:
                return None
            self._held = held
            if not self.enabled:
                return None
            if self._pending is None:
                self._seq += 1
            self._pending = Keys(seq=self._seq, held=held, last_shown_frame=self._last_shown, client_time=now)
            return self._seq

    def set_last_shown(self, index: int) -> None:
        with self._lock:
            self._last_shown = max(-1, int(index))

    @property
    def held(self) -> frozenset[str]:
        return self._held

    def enable(self, on: bool, now: float) -> None:
        with self._lock:
            self.enabled = on
            self._pending = None
            self._next_tick = now  # the current state goes out at once

    def due(self, now: float) -> Keys | None:
        """The message to send now, if any."""
        with self._lock:
            if not self.enabled:
                return None
            msg = self._pending
            if msg is None and now >= self._next_tick:
                self._seq += 1
                msg = Keys(seq=self._seq, held=self._held, last_shown_frame=self._last_shown, client_time=now)
            if msg is not None:
                self._pending = None
                self._next_tick = now + self.tick_s
                self.sent += 1
            return msg


_KEYS_ON, _KEYS_OFF = object(), object()


class EngineLink:
    """A DEALER socket to the engine, driven by its own thread (see the module docstring)."""

    def __init__(
        self,
        address: str,
        hello: Hello,
        *,
        tick_s: float = 1 / 30,
        curve_dir: str | Path | None = None,
        poll_ms: int = 4,
    ) -> None:
        self.address = address
        self.hello = hello
        self.keys = KeySender(tick_s)
        self.curve_dir = curve_dir
        self.poll_ms = poll_ms
        self._out: queue.Queue = queue.Queue()
        self._in: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None  # what stopped the thread, if anything
        self.received = 0

    def start(self) -> EngineLink:
        self._out.put(self.hello)
        self._thread = threading.Thread(target=self._run, name="sana-wm-play-net", daemon=True)
        self._thread.start()
        return self

    def send(self, msg: Message) -> None:
        """Queue a message (never blocks)."""
        self._out.put(msg)

    def keys_on(self) -> None:
        """From here on (in wire order) send keys at the tick."""
        self._out.put(_KEYS_ON)

    def keys_off(self) -> None:
        self._out.put(_KEYS_OFF)

    def poll(self, limit: int = 10_000) -> list[tuple[object, object]]:
        """Everything that arrived: (message, frame uint8 [H, W, 3] or None), or (ProtocolError, None)."""
        out = []
        for _ in range(limit):
            try:
                out.append(self._in.get_nowait())
            except queue.Empty:
                break
        return out

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def close(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    # ---------------------------------------------------------------- network thread

    def _run(self) -> None:
        ctx = zmq.Context()
        sock = None
        try:  # a bad address or a missing key file is reported to the window like any other failure
            sock = connect(self.address, curve_dir=self.curve_dir, context=ctx)
            while not self._stop.is_set():
                now = time.monotonic()
                while True:
                    try:
                        item = self._out.get_nowait()
                    except queue.Empty:
                        break
                    if item is _KEYS_ON or item is _KEYS_OFF:
                        self.keys.enable(item is _KEYS_ON, now)
                    else:
                        sock.send(encode(item))
                msg = self.keys.due(now)
                if msg is not None:
                    sock.send(encode(msg))
                if sock.poll(self.poll_ms):
                    for _ in range(64):
                        try:
                            parts = sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._in.put(self._decode(parts))
                        self.received += 1
        except BaseException as e:  # noqa: BLE001 - reported to the window through `error`
            self.error = e
            self._in.put((e, None))
        finally:
            if sock is not None:
                sock.close(0)
            ctx.term()

    @staticmethod
    def _decode(parts):
        try:
            msg, pixels = decode_parts(parts)
            frame = decode_pixels(msg, pixels) if isinstance(msg, FrameHeader) else None
            return msg, frame
        except ProtocolError as e:
            return e, None
        except (ValueError, OSError) as e:  # undecodable pixels
            return ProtocolError("malformed", "pixels", str(e)), None
