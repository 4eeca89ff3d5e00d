"""`sana-wm play`: a pygame window that drives an engine with the keyboard (or a gamepad).

    app = PlayApp(PlayConfig(address="tcp://127.0.0.1:5555", prompt="a street"))
    while app.step():           # one pass of the window's loop: events, network, playout, drawing
        app.clock.tick(60)
    app.close()

or `run_play(config)` / `run_demo_window(address, image_bytes=..., prompt=...)`.

What happens in `step` (the one path for a person and for the tests, which post synthetic events):
1. pygame events -> held physical keys -> held controls (bindings.py, data), one-shot actions; gamepad;
2. a change of the held set goes to the network thread (net.py), which sends it at once and the
   full set again every tick, with the index of the last frame shown;
3. engine messages (non-blocking): status, frames into the jitter buffer (jitter.py), errors, ended;
4. the frame due now leaves the buffer at the session fps; until generated frames reflect the latest
   key change it is warped by the pose change the keys predict (reproject.py);
5. the frame is drawn letterboxed into the (resizable) window and the HUD (hud.py) on top (draw.py).

The window never waits on the network. Imports protocol, zmq, numpy, pygame and Pillow only.
"""

from __future__ import annotations

import io
import os
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")

import numpy as np  # noqa: E402
import pygame  # noqa: E402
from PIL import Image  # noqa: E402

from client.bindings import (  # noqa: E402
    Bindings,
    BindingsError,
    default_bindings,
    load_bindings,
    pygame_key_exists,
)
from client.draw import FrameSurface, Painter  # noqa: E402
from client.hud import HudModel  # noqa: E402
from client.jitter import JitterBuffer  # noqa: E402
from client.net import EngineLink  # noqa: E402
from client.reproject import (  # noqa: E402
    Reprojector,
    Warper,
    crop_intrinsics,
    default_intrinsics,
    predict_params,
)
from protocol import (  # noqa: E402
    Branch,
    Control,
    Dropped,
    Ended,
    Error,
    FrameHeader,
    Hello,
    ProtocolError,
    Start,
    Status,
    Welcome,
)

DEFAULT_PROMPT = "a sunlit street in an old town, cobblestones, shops on both sides"
DEFAULT_IMAGE = Path(__file__).resolve().parents[1] / "engine" / "assets" / "first_frame.png"
QUALITY_ORDER = ("preview", "full")
LOG_LIMIT = 100_000  # frame headers / key changes PlayLog keeps (about 1.7 h of frames at 16 fps)


@dataclass
class PlayConfig:
    address: str = "tcp://127.0.0.1:5555"
    image: bytes | str | Path | None = None  # first image (PNG/JPEG bytes or a path); None: the bundled one
    prompt: str = DEFAULT_PROMPT
    quality: str = "preview"
    keymap: str = "v2"
    bindings: str | Path | None = None  # TOML file (client/bindings.py)
    reproject: bool = True
    record: bool = True
    seed: int = 0
    intrinsics: tuple[float, float, float, float] | None = None  # in the first image's pixels
    hud: bool = True
    fullscreen: bool = False
    window_size: tuple[int, int] | None = None  # initial (width, height); None: fit the frames to ~960 wide
    tick_hz: float = 30.0  # keys messages per second (plus one on every change)
    display_hz: float = 60.0
    reprojection_depth: float = 3.0  # assumed distance of the scene (translation warp only)
    max_buffer_frames: int = 72
    curve_dir: str | Path | None = None
    seconds: float | None = None  # stop after this long (demo / screenshots); None: until closed
    screenshot: str | Path | None = None  # save the window to this PNG when closing


def image_bytes_of(image) -> bytes:
    """PNG/JPEG bytes of a first image given as bytes, a path, or None (the bundled image, else a gradient)."""
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    if image is not None:
        return Path(image).read_bytes()
    if DEFAULT_IMAGE.is_file():
        return DEFAULT_IMAGE.read_bytes()
    h, w = 192, 320
    y = np.linspace(0, 1, h)[:, None, None]
    img = np.concatenate(
        [
            np.broadcast_to(120 + 100 * (1 - y), (h, w, 1)),
            np.broadcast_to(150 + 60 * (1 - y), (h, w, 1)),
            np.broadcast_to(200 - 120 * y, (h, w, 1)),
        ],
        axis=2,
    ).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


class WindowError(RuntimeError):
    """The window cannot be opened (no display)."""


@dataclass
class Shown:
    header: FrameHeader
    frame: np.ndarray  # uint8 [H, W, 3]


@dataclass
class AfterEnd:
    """What to do once the current session has ended (branch or restart at another quality)."""

    kind: str  # "branch" | "start"
    session_id: str = ""
    chunk: int = 0
    quality: str = "preview"


@dataclass
class PlayLog:
    """What a run did, for callers and tests."""

    sessions: list[str] = field(default_factory=list)
    errors: list[Error] = field(default_factory=list)
    ended: list[Ended] = field(default_factory=list)
    # the latest frame headers that arrived and key changes posted (bounded: a session can run for hours)
    received: deque[FrameHeader] = field(default_factory=lambda: deque(maxlen=LOG_LIMIT))
    posted: dict[int, frozenset[str]] = field(default_factory=dict)  # seq -> held set of each key change


class PlayApp:
    """The window, its state and its one `step`."""

    def __init__(self, config: PlayConfig) -> None:
        self.config = cfg = config
        if cfg.quality not in QUALITY_ORDER:
            raise ValueError(f"quality {cfg.quality!r} is not accepted; accepted: {', '.join(QUALITY_ORDER)}")
        self.bindings: Bindings = (
            load_bindings(cfg.bindings, cfg.keymap, key_exists=pygame_key_exists)
            if cfg.bindings
            else default_bindings(cfg.keymap)
        )
        self.image = image_bytes_of(cfg.image)
        with Image.open(io.BytesIO(self.image)) as im:
            self.image_wh = im.size
        try:  # no pygame.init(): the mixer (audio) is not needed
            pygame.display.init()
            pygame.font.init()
            pygame.display.set_caption("sana-wm play")
            self.window_size = cfg.window_size or (960, 576)
            self.fullscreen = False
            self.screen = pygame.display.set_mode(self.window_size, pygame.RESIZABLE)
        except pygame.error as e:
            pygame.quit()
            raise WindowError(
                f"cannot open a window ({e}); on a machine without a display use the headless "
                "client (sana-wm demo --headless / sana-wm replay --connect)"
            ) from None
        if cfg.fullscreen:
            self.toggle_fullscreen()
        self.painter = Painter()
        self.picture = FrameSurface()
        self.clock = pygame.time.Clock()
        self.hud = HudModel(visible=cfg.hud, quality=cfg.quality, prompt=cfg.prompt, recording=cfg.record)
        self.log = PlayLog()
        self.link = EngineLink(
            cfg.address,
            Hello(client="sana-wm-play", encodings=("rgb24", "jpeg")),
            tick_s=1.0 / cfg.tick_hz,
            curve_dir=cfg.curve_dir,
        ).start()
        self.welcome: Welcome | None = None
        self.jitter: JitterBuffer | None = None
        self.reprojector: Reprojector | None = None
        self.warper = Warper()
        self.quality = cfg.quality
        self.prompt = cfg.prompt
        self.session_id: str | None = None
        self.session_live = False  # a session is running or paused (not ended)
        self.paused = False
        self.after_end: AfterEnd | None = None
        self.pressed: set[str] = set()  # physical keys held now
        self.pad_held: frozenset[str] = frozenset()
        self.joysticks: dict[int, object] = {}
        self.typing: str | None = None  # the prompt text box's content while it is open
        self._swallow_text: str | None = None
        self.current: Shown | None = None
        self._warped = False  # the picture on screen is a reprojection
        self._warped_for = -1  # pending seq the last drawn warp reflected
        self._asked_quality: str | None = None  # Q pressed: the quality asked for
        self._fallback_quality: str | None = None  # restarting at another quality: the one to go back to
        self._just_shown: FrameHeader | None = None  # shown by this step, timed at the flip
        self._resetting = False  # reset sent: the session's `ended` is expected, a new one follows
        self.running = True
        self.started_at = time.monotonic()
        pygame.joystick.init()
        for i in range(pygame.joystick.get_count()):
            self._add_joystick(i)

    # ------------------------------------------------------------------ the loop

    def step(self, now: float | None = None) -> bool:
        """One pass of the loop; False once the window should close."""
        now = time.monotonic() if now is None else now
        for ev in pygame.event.get():
            self.handle_event(ev, now)
        self._poll_gamepad()
        self._update_keys(now)
        self._network(now)
        self._playout(now)
        self.draw(now)
        if self.config.seconds is not None and now - self.started_at >= self.config.seconds:
            self.running = False
        if self.link.error is not None and self.running:
            self.hud.show_note(f"network: {type(self.link.error).__name__}: {self.link.error}")
        return self.running

    def run(self) -> PlayLog:
        try:
            while self.step():
                self.clock.tick(self.config.display_hz)
        finally:
            self.close()
        return self.log

    def close(self) -> None:
        if self.config.screenshot:
            self.save_screenshot(self.config.screenshot)
        if self.session_live:
            self.link.send(Control(action="stop"))
            end = time.monotonic() + 2.0
            while self.session_live and time.monotonic() < end:  # let the recording close cleanly
                self._network(time.monotonic())
                time.sleep(0.02)
        self.link.close()
        pygame.quit()

    def save_screenshot(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        pygame.image.save(self.screen, str(path))

    # ------------------------------------------------------------------ input

    def handle_event(self, ev, now: float) -> None:
        if ev.type == pygame.QUIT:
            self.running = False
        elif ev.type == pygame.VIDEORESIZE and not self.fullscreen:
            self.window_size = (max(64, ev.w), max(64, ev.h))
            self.screen = pygame.display.set_mode(self.window_size, pygame.RESIZABLE)
        elif ev.type in (pygame.WINDOWFOCUSLOST,):
            self.pressed.clear()  # keys released while the window was away never send KEYUP
        elif self.typing is not None and ev.type in (pygame.KEYDOWN, pygame.TEXTINPUT):
            self._text_event(ev)
        elif ev.type == pygame.KEYDOWN:
            name = pygame.key.name(ev.key)
            action = self.bindings.action_of(name)
            if action is not None:
                self.do(action, now)
            else:
                self.pressed.add(name)
        elif ev.type == pygame.KEYUP:
            self.pressed.discard(pygame.key.name(ev.key))
        elif ev.type == pygame.JOYDEVICEADDED:
            self._add_joystick(ev.device_index)
        elif ev.type == pygame.JOYDEVICEREMOVED:
            self.joysticks.pop(ev.instance_id, None)
        elif ev.type == pygame.JOYBUTTONDOWN:
            action = self.bindings.gamepad.button_action(ev.button)
            if action is not None:
                self.do(action, now)

    def _text_event(self, ev) -> None:
        if ev.type == pygame.TEXTINPUT:
            if self._swallow_text is not None and ev.text == self._swallow_text:
                self._swallow_text = None  # the key that opened the box
                return
            self.typing += ev.text
        elif ev.key in (pygame.K_RETURN, pygame.K_KP_ENTER):
            text, self.typing = self.typing.strip(), None
            if text and text != self.prompt:
                self.prompt = self.hud.prompt = text
                if self.session_live:
                    self.link.send(Control(action="set_prompt", prompt=text))
        elif ev.key == pygame.K_ESCAPE:
            self.typing = None
        elif ev.key == pygame.K_BACKSPACE:
            self.typing = self.typing[:-1]
        self._swallow_text = None

    def do(self, action: str, now: float) -> None:
        """A one-shot action (client/bindings.py ACTIONS)."""
        if action == "quit":
            self.running = False
        elif action == "hud":
            self.hud.visible = not self.hud.visible
        elif action == "fullscreen":
            self.toggle_fullscreen()
        elif action == "reproject":
            if self.reprojector is not None:
                self.reprojector.enabled = not self.reprojector.enabled
                self.reprojector.active = False
            self.config.reproject = not self.config.reproject
        elif action == "prompt":
            self.typing, self._swallow_text = self.prompt, "t"
            self.pressed.clear()
        elif action == "pause":
            if not self.session_live:
                return
            self.paused = not self.paused
            self.link.send(Control(action="pause" if self.paused else "resume"))
            if self.jitter is not None:
                (self.jitter.pause if self.paused else self.jitter.resume)()
        elif action == "reset":
            if self.session_live:
                self.link.send(Control(action="reset"))
                self._resetting = True
                self.hud.show_note("reset: a new session from the first image")
            elif self.welcome is not None:
                self._start(self.quality)
        elif action == "quality":
            new = QUALITY_ORDER[(QUALITY_ORDER.index(self.quality) + 1) % len(QUALITY_ORDER)]
            if self.session_live:
                self.link.send(Control(action="set_quality", quality=new))
                self.hud.show_note(f"asking for quality {new}")
                self._asked_quality = new
        elif action == "branch":
            self.branch()

    def branch(self) -> None:
        """Fork a new session after the chunk on screen (the current one is stopped; it stays recorded)."""
        if not (self.session_live and self.current is not None and self.config.record):
            self.hud.show_note("branch needs a recorded session with a frame on screen")
            return
        chunk = self.current.header.chunk
        self.after_end = AfterEnd("branch", self.current.header.session_id, chunk)
        self.link.send(Control(action="stop"))
        self.hud.show_note(f"branching after chunk {chunk}")

    def toggle_fullscreen(self) -> None:
        self.fullscreen = not self.fullscreen
        if self.fullscreen:
            self.screen = pygame.display.set_mode((0, 0), pygame.FULLSCREEN)
        else:
            self.screen = pygame.display.set_mode(self.window_size, pygame.RESIZABLE)

    def _add_joystick(self, index: int) -> None:
        try:
            js = pygame.joystick.Joystick(index)
            self.joysticks[js.get_instance_id()] = js
        except pygame.error:
            pass

    def _poll_gamepad(self) -> None:
        held: set[str] = set()
        pad = self.bindings.gamepad
        for js in self.joysticks.values():
            held |= pad.held(
                [js.get_axis(i) for i in range(js.get_numaxes())],
                [bool(js.get_button(i)) for i in range(js.get_numbuttons())],
                [js.get_hat(i) for i in range(js.get_numhats())],
            )
        self.pad_held = frozenset(held)

    def held_controls(self) -> frozenset[str]:
        if self.typing is not None:
            return frozenset()
        return self.bindings.held_controls(self.pressed) | self.pad_held

    def _update_keys(self, now: float) -> None:
        held = self.held_controls()
        seq = self.link.keys.set(held, now)
        if seq is None:
            self.hud.held = held
            return
        self.log.posted[seq] = held
        if len(self.log.posted) > LOG_LIMIT:
            del self.log.posted[next(iter(self.log.posted))]  # oldest first (insertion order)
        self.hud.on_key_change(seq, held, now)
        if self.reprojector is not None:
            self.reprojector.on_keys(held, seq)

    # ------------------------------------------------------------------ network

    def _start(self, quality: str) -> None:
        cfg = self.config
        self.link.keys_off()
        self.link.send(
            Start(
                image=self.image,
                prompt=self.prompt,
                seed=cfg.seed,
                quality=quality,
                record=cfg.record,
                keymap=self.bindings.keymap,
                intrinsics=None if cfg.intrinsics is None else tuple(map(float, cfg.intrinsics)),
            )
        )
        self.link.keys_on()
        self.quality = quality

    def _network(self, now: float) -> None:
        for msg, frame in self.link.poll():
            if isinstance(msg, FrameHeader):
                self._on_frame(msg, frame, now)
            elif isinstance(msg, Status):
                self._on_status(msg)
            elif isinstance(msg, Welcome):
                self._on_welcome(msg)
            elif isinstance(msg, Dropped):
                self.hud.dropped = msg.total
            elif isinstance(msg, Error):
                self._on_error(msg)
            elif isinstance(msg, Ended):
                self._on_ended(msg)
            elif isinstance(msg, ProtocolError):
                self.hud.show_note(f"bad message from the engine: {msg}")
            elif isinstance(msg, BaseException):
                self.hud.show_note(f"network stopped: {type(msg).__name__}: {msg}")

    def _on_welcome(self, w: Welcome) -> None:
        self.welcome = w
        self.hud.fps, self.hud.chunk_frames, self.hud.state = w.fps, w.chunk_frames, "starting"
        if self.config.window_size is None and not self.fullscreen:
            scale = max(1, round(960 / w.width)) if w.width < 960 else 960 / w.width
            self.window_size = (int(w.width * scale), int(w.height * scale))
            self.screen = pygame.display.set_mode(self.window_size, pygame.RESIZABLE)
        self.jitter = JitterBuffer(w.fps, max_depth=max(self.config.max_buffer_frames, 2 * w.chunk_frames))
        if self.config.intrinsics is not None:
            k = crop_intrinsics(self.config.intrinsics, self.image_wh, (w.width, w.height))
        else:
            k = default_intrinsics(w.width, w.height)
        self.reprojector = Reprojector(
            k,
            predict_params(self.bindings.keymap),
            depth=self.config.reprojection_depth,
            max_steps=3 * w.chunk_frames,
            enabled=self.config.reproject,
        )
        self._start(self.quality)

    def _on_status(self, s: Status) -> None:
        self.hud.on_status(s)
        if s.session_id is not None and s.session_id != self.session_id and s.state in ("running", "paused"):
            self._new_session(s)
            self._fallback_quality = None
        if s.session_id == self.session_id:
            if s.quality is not None:
                self.quality = s.quality
            self.session_live = s.state in ("running", "paused", "starting")
            self.paused = s.state == "paused"
            if self.jitter is not None and self.jitter.paused != self.paused:
                (self.jitter.pause if self.paused else self.jitter.resume)()

    def _new_session(self, s: Status) -> None:
        self.session_id = s.session_id
        self.session_live = True
        self.log.sessions.append(s.session_id)
        self.hud.new_session(s.session_id)
        last = s.frames - 1  # frames the engine made before this client drove it (branch, resume)
        if self.jitter is not None:
            self.jitter.clear(last)
        if self.reprojector is not None:
            self.reprojector.reset()
        self.link.keys.set_last_shown(last)
        self.current = None

    def _on_frame(self, header: FrameHeader, frame: np.ndarray, now: float) -> None:
        if header.session_id != self.session_id or self.jitter is None:
            return  # a frame of a session we left
        self.log.received.append(header)
        self.hud.on_frame_received(header, now)
        self.jitter.push(header.index, Shown(header, frame), now)

    def _on_error(self, e: Error) -> None:
        self.log.errors.append(e)
        if self._resetting and e.code == "bad_state" and e.field == "action":
            # the engine resets only sessions begun with `start` (not a branch): stop it and start afresh
            self._resetting = False
            self.after_end = AfterEnd("start", quality=self.quality)
            self.link.send(Control(action="stop"))
            self.hud.show_note("reset: a new session from the first image")
            return
        if e.field == "quality" and e.code == "bad_state" and self._asked_quality:
            # this engine fixes quality per session: restart from the first image at the new quality
            self.after_end = AfterEnd("start", quality=self._asked_quality)
            self._fallback_quality, self._asked_quality = self.quality, None
            self.link.send(Control(action="stop"))
            self.hud.show_note(f"quality is fixed per session: restarting in {self.after_end.quality}")
            return
        if e.field == "quality" and self._fallback_quality and not self.session_live:
            # the engine does not serve the quality asked for: start again in the one it did serve
            fallback, self._fallback_quality = self._fallback_quality, None
            self._start(fallback)
            self.hud.show_note(f"engine: {e.message} (back to {fallback})"[:200])
            return
        self.hud.show_note(f"engine: {e.code} ({e.field}): {e.message}"[:200])

    def _on_ended(self, e: Ended) -> None:
        self.log.ended.append(e)
        if e.session_id != self.session_id:
            return
        self.session_live = False
        self.hud.state = "ended"
        after, self.after_end = self.after_end, None
        if after is not None and after.kind == "branch":
            self.link.keys_off()
            self.link.send(Branch(session_id=after.session_id, chunk=after.chunk))
            self.link.keys_on()
        elif after is not None and after.kind == "start":
            self._start(after.quality)
        elif self._resetting:
            self._resetting = False  # the engine starts the new session itself
        else:
            self.hud.show_note(f"session ended ({e.reason}) {e.message}; press R for a new one")

    # ------------------------------------------------------------------ playout and drawing

    def _playout(self, now: float) -> None:
        if self.jitter is None:
            return
        item = self.jitter.pop_due(now)
        if item is None:
            return
        self.current, self._just_shown = item, item.header
        h = item.header
        self.link.keys.set_last_shown(h.index)
        if self.reprojector is not None:
            self.reprojector.on_shown(h.index, h.pose, h.keys_seq, h.held)

    def frame_to_draw(self) -> tuple[np.ndarray | None, bool]:
        """The frame for the screen now (warped by the predicted pose change when needed) and whether it was warped."""
        if self.current is None:
            return None, False
        hmat = self.reprojector.homography() if self.reprojector is not None else None
        if hmat is None or np.allclose(hmat, np.eye(3), atol=1e-9):
            return self.current.frame, False
        return self.warper(self.current.frame, hmat), True

    def draw(self, now: float) -> None:
        self.screen.fill((12, 12, 16))
        rp = self.reprojector
        # the picture changes only with a new frame, a predictor step or a new window size
        key = (
            id(self.current),
            rp is not None and rp.active and rp.enabled,
            rp.steps if rp else 0,
            self.screen.get_size(),
        )
        if self.current is not None and key != self.picture.key:
            frame, self._warped = self.frame_to_draw()
            self.picture.update(key, frame, self.screen.get_size())
        if self.current is not None:
            self.picture.blit(self.screen)
        else:
            waiting = "connecting..." if self.welcome is None else "waiting for the first frame..."
            self.painter.text(self.screen, waiting, (20, 20), big=True)
        if self.hud.visible:
            lines = self.hud.lines(
                now,
                buffer_depth=self.jitter.depth if self.jitter else 0,
                underruns=self.jitter.stats.underruns if self.jitter else 0,
                paused=self.paused,
                reproject=rp.enabled if rp else self.config.reproject,
                keymap=self.bindings.keymap,
            )
            self.painter.hud(self.screen, self.hud, lines, self.prompt)
        if self.typing is not None:
            self.painter.text_box(self.screen, self.typing)
        pygame.display.flip()
        flipped = time.monotonic()  # latencies end when the picture is on screen
        if self._just_shown is not None:
            self.hud.on_frame_shown(self._just_shown, flipped)
            self._just_shown = None
        if self.current is not None and self._warped and self._warped_for != rp.pending_seq:
            self._warped_for = rp.pending_seq
            self.hud.on_reprojected(flipped)


# ----------------------------------------------------------------------------------- entry points


def run_play(config: PlayConfig) -> PlayLog:
    """Open the window and drive the engine at `config.address` until the window closes."""
    return PlayApp(config).run()


def run_demo_window(
    address: str,
    *,
    image_bytes: bytes,
    prompt: str,
    keymap: str = "v2",
    quality: str = "preview",
    seconds: float | None = None,
    reproject: bool = True,
    record: bool = True,
    bindings: str | Path | None = None,
    screenshot: str | Path | None = None,
) -> PlayLog:
    """The windowed `sana-wm demo`: drive the engine at `address` (already listening) with a window.

    Returns when the window is closed (or after `seconds`); the session is stopped and stays recorded."""
    return run_play(
        PlayConfig(
            address=address,
            image=image_bytes,
            prompt=prompt,
            keymap=keymap,
            quality=quality,
            seconds=seconds,
            reproject=reproject,
            record=record,
            bindings=bindings,
            screenshot=screenshot,
        )
    )


def add_arguments(p) -> None:
    """The `sana-wm play` options (argparse)."""
    p.add_argument("--connect", default="tcp://127.0.0.1:5555", help="engine address (default tcp://127.0.0.1:5555)")
    p.add_argument(
        "--keymap",
        default="v2",
        choices=["v1", "v2"],
        help="v2: a/d yaw, j/l strafe; v1: a/d strafe, j/l yaw (default v2)",
    )
    p.add_argument("--bindings", default=None, metavar="FILE.toml", help="key/gamepad remapping (client/bindings.py)")
    p.add_argument("--no-reproject", action="store_true", help="show generated frames only (no instant warp)")
    p.add_argument("--image", default=None, help="first image (PNG/JPEG); default: the bundled one")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="text prompt")
    p.add_argument("--quality", default="preview", choices=list(QUALITY_ORDER), help="preview or full")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-record", action="store_true", help="do not record the session on the engine")
    p.add_argument(
        "--intrinsics",
        type=float,
        nargs=4,
        default=None,
        metavar=("FX", "FY", "CX", "CY"),
        help="camera intrinsics in the first image's pixels (default: the engine's field of view)",
    )
    p.add_argument("--fullscreen", action="store_true")
    p.add_argument("--no-hud", action="store_true")
    p.add_argument("--curve-dir", default=None, help="CURVE keys from `sana-wm keys DIR` (non-loopback engines)")
    p.add_argument("--seconds", type=float, default=None, help="close after this many seconds")
    p.add_argument("--screenshot", default=None, help="save the window to this PNG when closing")


def run_from_args(args) -> int:
    """`sana-wm play` with parsed `add_arguments` options."""
    try:
        config = PlayConfig(
            address=args.connect,
            image=args.image,
            prompt=args.prompt,
            quality=args.quality,
            keymap=args.keymap,
            bindings=args.bindings,
            reproject=not args.no_reproject,
            record=not args.no_record,
            seed=args.seed,
            intrinsics=tuple(args.intrinsics) if args.intrinsics else None,
            hud=not args.no_hud,
            fullscreen=args.fullscreen,
            curve_dir=args.curve_dir,
            seconds=args.seconds,
            screenshot=args.screenshot,
        )
        log = run_play(config)
    except (BindingsError, WindowError, OSError, ValueError) as e:
        print(f"sana-wm play: error: {e}", file=sys.stderr)
        return 2
    if log.sessions:
        print(f"sana-wm play: sessions {', '.join(log.sessions)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="sana-wm play", description="Drive a sana-wm engine from a pygame window.")
    add_arguments(p)
    return run_from_args(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
