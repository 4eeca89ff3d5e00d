"""The messages: one frozen dataclass per type, valid by construction.

Building a message (in the engine, in a client, or in the decoder) checks every field against its
spec and the message's cross-field rules, raising ProtocolError naming the field. On the wire each
message is a msgpack map `{"type": TYPE, "v": PROTOCOL_VERSION, <fields>}` (codec.py); a frame is a
two-part ZeroMQ message `[frame header, pixels]`.

Client -> engine: hello, start, keys, control, resume, branch, watch, credit.
Engine -> client: welcome, frame (header; pixels travel in the next part), status, error, ended, dropped.
See protocol/README.md for what each field means and when each message is sent.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from protocol import limits as L
from protocol.errors import ERROR_CODES, WHOLE_MESSAGE, ProtocolError
from protocol.fields import Bool, Bytes, Controls, Float, Int, Optional, Str, Tuple, spec
from protocol.keys import KEYMAPS

PROTOCOL_VERSION = 1

# Session ids: UTC creation time (sortable) + 6 random hex digits, e.g. "20261127-012227-123-3f9a1c".
# Strict, because the engine turns an id into a directory name.
SESSION_ID_PATTERN = r"\d{8}-\d{6}-\d{3}-[0-9a-f]{6}"

QUALITIES = ("preview", "full")
ENCODINGS = ("rgb24", "jpeg", "h264")  # rgb24: H*W*3 bytes row-major; jpeg: one JPEG per frame; h264: Annex-B packets
DELIVERIES = ("live", "lossless")  # live: a slow viewer loses frames; lossless: credit-based flow control
ROLES = ("driver", "spectator")
CONTROL_ACTIONS = ("pause", "resume", "reset", "set_prompt", "stop", "set_quality")
STATES = ("idle", "starting", "running", "paused", "ended")
END_REASONS = ("stopped", "error", "client_gone", "limit", "shutdown")

_NAME = Str(L.MAX_NAME_CHARS, pattern=r"[A-Za-z0-9_.:/+-]+", min_chars=1)
_TEXT = Str(L.MAX_TEXT_CHARS)
_SESSION_ID = Str(32, pattern=SESSION_ID_PATTERN)
_INDEX = Int(0, L.U63)
_COUNT = Int(0, L.U63)
_SIDE = Int(1, L.MAX_SIDE)
_TIME = Float()  # seconds; any finite value (clocks are the sender's own)
_SPEED = Optional(Float(0.0, 1e3, lo_open=True))


class Message:
    """Base of all messages: field checking on construction, the type registry."""

    TYPE: ClassVar[str]

    def __post_init__(self):
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, f.metadata["spec"].check(getattr(self, f.name), f.name))
        self._check()

    def _check(self) -> None:
        """Cross-field rules; raise ProtocolError naming the field that breaks one."""


MESSAGE_TYPES: dict[str, type[Message]] = {}


def message(tag: str):
    def register(cls):
        cls = dataclass(frozen=True)(cls)
        cls.TYPE = tag
        MESSAGE_TYPES[tag] = cls
        return cls

    return register


# ---- client -> engine -------------------------------------------------------------------------


@message("hello")
class Hello(Message):
    """First message of a connection. The engine answers `welcome` (or `error` code "version")."""

    client: str = spec(_NAME, "client")  # free-form client name and version, for logs
    encodings: tuple[str, ...] = spec(Tuple(Str(16, ENCODINGS), 1, len(ENCODINGS), unique=True), ("rgb24",))
    delivery: str = spec(Str(16, DELIVERIES), "live")
    role: str = spec(Str(16, ROLES), "driver")
    capabilities: tuple[str, ...] = spec(Tuple(_NAME, 0, L.MAX_LIST_ITEMS, unique=True), ())


@message("start")
class Start(Message):
    """Start a new session from a first image and a prompt."""

    image: bytes = spec(Bytes(L.MAX_IMAGE_BYTES, min_bytes=1))  # PNG/JPEG/WebP file bytes
    prompt: str = spec(Str(L.MAX_PROMPT_CHARS))
    # [fx, fy, cx, cy] in the original image's pixels; None: the engine's default field of view.
    intrinsics: tuple[float, ...] | None = spec(Optional(Tuple(Float(0.0, 1e7), length=4)), None)
    seed: int = spec(Int(0, L.U63), 0)
    quality: str = spec(Str(16, QUALITIES), "preview")
    record: bool = spec(Bool(), True)
    keymap: str = spec(Str(8, KEYMAPS), "v2")  # how DSL letters map to controls (recorded in the manifest)
    translation_speed: float | None = spec(_SPEED, None)  # per frame; None: the key map's default
    rotation_speed_deg: float | None = spec(_SPEED, None)  # degrees per frame
    pitch_limit_deg: float | None = spec(Optional(Float(0.0, 90.0, lo_open=True)), None)

    def _check(self):
        if self.intrinsics is not None:
            for i, name in ((0, "fx"), (1, "fy")):
                if self.intrinsics[i] <= 0.0:
                    raise ProtocolError(
                        "invalid_field",
                        f"intrinsics[{i}]",
                        f"{name} = {self.intrinsics[i]!r}; a focal length must be > 0",
                    )


@message("keys")
class Keys(Message):
    """The full set of held controls, sent at a steady tick and on every change (loss is harmless)."""

    seq: int = spec(_INDEX)  # increases by one per message from this client
    held: frozenset[str] = spec(Controls(), frozenset())
    last_shown_frame: int = spec(Int(-1, L.U63), -1)  # index of the last frame displayed; -1: none yet
    client_time: float = spec(_TIME, 0.0)  # client's clock, seconds; echoed in frame headers


@message("control")
class Control(Message):
    """pause | resume | reset | set_prompt (needs prompt) | stop | set_quality (needs quality)."""

    action: str = spec(Str(16, CONTROL_ACTIONS))
    prompt: str | None = spec(Optional(Str(L.MAX_PROMPT_CHARS)), None)
    quality: str | None = spec(Optional(Str(16, QUALITIES)), None)

    def _check(self):
        for name, needed_by in (("prompt", "set_prompt"), ("quality", "set_quality")):
            present = getattr(self, name) is not None
            if present != (self.action == needed_by):
                need = "requires" if not present else "does not take"
                raise ProtocolError("invalid_field", name, f"action {self.action!r} {need} field {name!r}")


@message("resume")
class Resume(Message):
    """Continue a recorded session at the end of chunk `chunk` (None: its last complete chunk)."""

    session_id: str = spec(_SESSION_ID)
    chunk: int | None = spec(Optional(_INDEX), None)


@message("branch")
class Branch(Message):
    """Fork a new recorded session from `session_id` after chunk `chunk`, then drive it live."""

    session_id: str = spec(_SESSION_ID)
    chunk: int = spec(_INDEX)


@message("watch")
class Watch(Message):
    """Spectate a running session (None: the engine's current one); frames only, keys are ignored."""

    session_id: str | None = spec(Optional(_SESSION_ID), None)


@message("credit")
class Credit(Message):
    """Lossless delivery: allow the engine to send `frames` more frames to this client."""

    frames: int = spec(Int(1, L.MAX_CREDIT))


# ---- engine -> client -------------------------------------------------------------------------


@message("welcome")
class Welcome(Message):
    """Answer to `hello`: what this engine runs and what was agreed."""

    server: str = spec(_NAME)  # engine name and version
    model: str = spec(_NAME)  # preset, e.g. "tiny" or "streaming"
    width: int = spec(_SIDE)
    height: int = spec(_SIDE)
    fps: float = spec(Float(0.0, 1000.0, lo_open=True))
    chunk_frames: int = spec(Int(1, 4096))  # frames generated per chunk (24)
    encoding: str = spec(Str(16, ENCODINGS))  # chosen from hello.encodings
    delivery: str = spec(Str(16, DELIVERIES))
    capabilities: tuple[str, ...] = spec(Tuple(_NAME, 0, L.MAX_LIST_ITEMS, unique=True), ())
    max_message_bytes: int = spec(Int(1, L.MAX_MESSAGE_BYTES), L.MAX_MESSAGE_BYTES)


@message("frame")
class FrameHeader(Message):
    """Header of one frame; the pixels are the next part of the same ZeroMQ message."""

    session_id: str = spec(_SESSION_ID)
    index: int = spec(_INDEX)  # frame index in the session (0 = the first image)
    chunk: int = spec(_INDEX)
    pose: tuple[float, ...] = spec(Tuple(Float(), length=16))  # c2w 4x4 row-major, OpenCV axes
    encoding: str = spec(Str(16, ENCODINGS))
    width: int = spec(_SIDE)
    height: int = spec(_SIDE)
    payload_bytes: int = spec(Int(1, L.MAX_PIXEL_BYTES))  # length of the pixel part
    held: frozenset[str] = spec(Controls(), frozenset())  # controls applied to this frame
    keys_seq: int = spec(Int(-1, L.U63), -1)  # seq of the `keys` message applied; -1: none (replay, auto-walk)
    keys_client_time: float = spec(_TIME, 0.0)  # that message's client_time (key-to-screen latency)
    t_sampled: float = spec(_TIME, 0.0)  # engine clock, s: keys sampled for this chunk
    t_ready: float = spec(_TIME, 0.0)  # engine clock, s: this chunk's frames decoded

    def _check(self):
        if tuple(self.pose[12:]) != (0.0, 0.0, 0.0, 1.0):
            raise ProtocolError("invalid_field", "pose", f"last row {list(self.pose[12:])} is not [0, 0, 0, 1]")
        if self.encoding == "rgb24" and self.payload_bytes != self.width * self.height * 3:
            raise ProtocolError(
                "invalid_field",
                "payload_bytes",
                f"{self.payload_bytes} != width*height*3 = {self.width * self.height * 3} for rgb24",
            )


@message("status")
class Status(Message):
    """Engine state, sent on change and as a heartbeat."""

    state: str = spec(Str(16, STATES))
    session_id: str | None = spec(Optional(_SESSION_ID), None)
    quality: str | None = spec(Optional(Str(16, QUALITIES)), None)
    chunks: int = spec(_COUNT, 0)  # chunks completed in this session
    frames: int = spec(_COUNT, 0)  # frames emitted in this session
    dropped: int = spec(_COUNT, 0)  # frames this client has lost so far (live delivery)
    chunk_seconds: float = spec(Float(0.0), 0.0)  # wall time of the last chunk
    engine_time: float = spec(_TIME, 0.0)
    note: str = spec(_TEXT, "")


@message("error")
class Error(Message):
    """A refused message or a failed request: `field` names what was wrong."""

    code: str = spec(Str(32, ERROR_CODES))
    field: str = spec(Str(L.MAX_NAME_CHARS))
    message: str = spec(_TEXT)


@message("ended")
class Ended(Message):
    session_id: str = spec(_SESSION_ID)
    reason: str = spec(Str(16, END_REASONS))
    chunks: int = spec(_COUNT, 0)
    frames: int = spec(_COUNT, 0)
    message: str = spec(_TEXT, "")


@message("dropped")
class Dropped(Message):
    """Live delivery: `count` frames up to `last_index` were not sent to this slow client."""

    count: int = spec(Int(1, L.U63))
    total: int = spec(Int(1, L.U63))  # dropped for this client since it connected
    last_index: int = spec(_INDEX)

    def _check(self):
        if self.total < self.count:
            raise ProtocolError("invalid_field", "total", f"total {self.total} < count {self.count}")


def error_from(exc: ProtocolError) -> Error:
    """The `error` reply for a ProtocolError (message text truncated to fit)."""
    return Error(code=exc.code, field=str(exc.field)[: L.MAX_NAME_CHARS] or WHOLE_MESSAGE,
                 message=str(exc.message)[: L.MAX_TEXT_CHARS])
