"""A scripted client: drive a running engine from an action DSL string, with no window.

    result = run_headless("tcp://127.0.0.1:5555", "first.png", "a street", "w-48,jw-24", lossless=True)
    result.frames, result.poses, result.held, result.dropped, result.chunk_seconds

It says hello, starts a session (image bytes, prompt, settings) and holds, before each chunk, the DSL's
controls for that chunk's first frame: the engine samples held keys once per chunk (its live path),
so a DSL whose key changes fall on chunk boundaries reproduces exactly; a change inside a chunk shows
from the next chunk on. In `lossless` mode the client grants credit one chunk at a time, after setting
that chunk's keys, so the engine cannot sample them early and generates as fast as it can; in `live`
mode it plays frames at the engine's fps (reporting the last shown frame, which drives the engine's
just-in-time scheduler) and may lose frames (counted in `dropped`). Keys are also sent at a steady
tick: they are the heartbeat. Frames go to a list and/or an mp4 (PyAV).

This is what `sana-wm replay --connect` and the tests use. Imports protocol, zmq, numpy, Pillow and
PyAV only (never torch or engine/), so it runs on a laptop against a remote GPU.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
import zmq
from PIL import Image

from protocol import (
    MAX_MESSAGE_BYTES,
    MAX_PIXEL_BYTES,
    Branch,
    Control,
    Credit,
    Dropped,
    Ended,
    Error,
    FrameHeader,
    Hello,
    Keys,
    ProtocolError,
    Resume,
    Start,
    Status,
    Welcome,
    decode_parts,
    encode,
    letters_to_controls,
)

MAX_DSL_FRAMES = 1 << 20


class HeadlessError(RuntimeError):
    """The engine refused a request (`error` holds its reply) or did not answer in time."""

    def __init__(self, message: str, error: Error | None = None):
        super().__init__(message)
        self.error = error


def parse_action(action: str, keymap: str = "v2") -> list[frozenset[str]]:
    """Action DSL ("w-24,jw-24", case-insensitive, `none` = no key) -> held controls per frame.

    The same grammar as the engine's `engine.controls.parse_action`, mapped through the key map."""
    text = "".join(str(action).split()).replace("，", ",").lower()
    if not text:
        raise ValueError("action string is empty; expected segments like 'w-24,jw-24'")
    frames: list[frozenset[str]] = []
    for segment in text.split(","):
        letters, sep, count = segment.rpartition("-")
        if not sep or not letters or not count.isdigit() or not count.isascii() or int(count) <= 0:
            raise ValueError(f"action segment {segment!r} is not '<keys>-<frames>' with frames > 0, e.g. 'w-24'")
        if len(frames) + int(count) > MAX_DSL_FRAMES:
            raise ValueError(f"action segment {segment!r} takes the action past {MAX_DSL_FRAMES} frames")
        try:
            held = letters_to_controls(letters, keymap)
        except ProtocolError as e:
            raise ValueError(f"action segment {segment!r}: {e.message}") from None
        frames.extend([held] * int(count))
    return frames


def load_client_keys(directory: str | Path) -> dict[str, bytes]:
    """CURVE options for a client socket from a `sana-wm keys DIR` directory."""
    from zmq.auth import load_certificate

    d = Path(directory)
    public, secret = load_certificate(d / "client.key_secret")
    server_public, _ = load_certificate(d / "server.key")
    if secret is None:
        raise ValueError(f"{d / 'client.key_secret'} holds no secret key")
    return {"curve_publickey": public, "curve_secretkey": secret, "curve_serverkey": server_public}


def connect(address: str, *, curve_dir: str | Path | None = None, rcvhwm: int = 1000,
            context: zmq.Context | None = None) -> zmq.Socket:
    """A DEALER socket connected to the engine (CURVE-encrypted when `curve_dir` is given)."""
    ctx = context or zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES + MAX_PIXEL_BYTES)
    sock.setsockopt(zmq.RCVHWM, rcvhwm)
    sock.setsockopt(zmq.LINGER, 500)
    if curve_dir is not None:
        for name, value in load_client_keys(curve_dir).items():
            setattr(sock, name, value)
    sock.connect(address)
    return sock


def recv_message(sock: zmq.Socket, timeout_s: float):
    """(message, pixels or None), or (None, None) after `timeout_s` without one."""
    if not sock.poll(int(timeout_s * 1000)):
        return None, None
    return decode_parts(sock.recv_multipart())


def decode_pixels(header: FrameHeader, pixels: bytes) -> np.ndarray:
    """A frame's pixel part -> uint8 [H, W, 3]."""
    if header.encoding == "rgb24":
        return np.frombuffer(pixels, np.uint8).reshape(header.height, header.width, 3)
    if header.encoding == "jpeg":
        return np.asarray(Image.open(io.BytesIO(pixels)).convert("RGB"))
    raise ValueError(f"encoding {header.encoding!r} is not decoded by this client")


class Mp4Writer:
    """Frames [H, W, 3] uint8 -> an H.264 yuv420p mp4 (PyAV)."""

    def __init__(self, path: str | Path, width: int, height: int, fps: float):
        import av

        self.container = av.open(str(path), "w")
        self.stream = self.container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, "yuv420p"
        self.stream.options = {"crf": "18"}

    def append(self, frame: np.ndarray) -> None:
        import av

        for packet in self.stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
            self.container.mux(packet)

    def close(self) -> None:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()


@dataclass
class HeadlessResult:
    session_id: str
    welcome: Welcome
    indices: list[int] = field(default_factory=list)  # frame index of each received frame
    frames: list[np.ndarray] = field(default_factory=list)  # [H, W, 3] uint8 each (if kept)
    poses: list[np.ndarray] = field(default_factory=list)  # [4, 4] float32 c2w each
    held: list[frozenset[str]] = field(default_factory=list)  # controls the engine applied to each frame
    keys_seq: list[int] = field(default_factory=list)  # `keys` seq those controls came from
    posted: dict[int, frozenset[str]] = field(default_factory=dict)  # seq -> held of every keys message sent
    dropped: int = 0  # frames the engine did not send us (live delivery)
    chunk_seconds: list[float] = field(default_factory=list)  # engine time per chunk (t_ready - t_sampled)
    chunk_times: list[tuple[float, float]] = field(default_factory=list)  # (t_sampled, t_ready), engine clock
    chunk_latency_s: list[float] = field(default_factory=list)  # client clock: chunk's keys sent -> last frame in
    errors: list[Error] = field(default_factory=list)  # error replies received after the session started
    ended: Ended | None = None

    @property
    def pose_array(self) -> np.ndarray:
        """[N, 4, 4] float32"""
        return np.stack(self.poses) if self.poses else np.zeros((0, 4, 4), np.float32)


def _image_bytes(image) -> bytes:
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    if isinstance(image, np.ndarray):
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        return buf.getvalue()
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.convert("RGB").save(buf, format="PNG")
        return buf.getvalue()
    return Path(image).read_bytes()


def run_headless(address: str, image, prompt: str, action: str, *, keymap: str = "v2", lossless: bool = True,
                 out_mp4: str | Path | None = None, timeout: float = 120.0, seed: int = 0, quality: str = "preview",
                 intrinsics=None, record: bool = True, encodings: tuple[str, ...] = ("rgb24",),
                 tick_s: float = 1 / 30, keep_frames: bool = True, curve_dir: str | Path | None = None,
                 translation_speed: float | None = None, rotation_speed_deg: float | None = None,
                 pitch_limit_deg: float | None = None, stop: bool = True, on_frame=None,
                 resume: str | None = None, branch: tuple[str, int] | None = None) -> HeadlessResult:
    """Drive one session with the DSL `action` and collect its frames (see the module docstring).

    The session runs until len(action) // chunk_frames chunks exist (a partial last chunk is not generated,
    as in a scripted rollout). `image`: PNG/JPEG bytes, a path, a PIL image or uint8 [H, W, 3].
    `resume=session_id` continues that session instead of starting one, `branch=(session_id, chunk)` forks
    it after `chunk` (image, prompt and settings are the recorded ones; `action` still counts from frame 1
    of the session, so its first chunks are already done). `stop=False` leaves the session to the engine
    (heartbeats stop with the client, so the engine pauses it)."""
    script = parse_action(action, keymap)
    deadline = time.monotonic() + timeout
    sock = connect(address, curve_dir=curve_dir)
    writer = None
    try:
        sock.send(encode(Hello(client="sana-wm-headless", encodings=tuple(encodings),
                               delivery="lossless" if lossless else "live")))
        welcome = _expect(sock, Welcome, deadline, "hello")
        per_chunk = welcome.chunk_frames
        chunks = len(script) // per_chunk
        if chunks == 0:
            raise ValueError(f"action of {len(script)} frames is shorter than one chunk ({per_chunk} frames)")
        last_index = chunks * per_chunk  # index of the last frame wanted (frame 0 is the first image)

        seq = 0
        result = None
        posted: dict[int, frozenset[str]] = {}

        def send_keys(chunks_done: int, last_shown: int) -> float:
            nonlocal seq
            seq += 1
            held = script[min(chunks_done * per_chunk, len(script) - 1)]  # the next chunk's first frame
            posted[seq] = held
            now = time.monotonic()
            sock.send(encode(Keys(seq=seq, held=held, last_shown_frame=last_shown, client_time=now)))
            return now

        if resume is not None:
            sock.send(encode(Resume(session_id=resume)))
        elif branch is not None:
            sock.send(encode(Branch(session_id=branch[0], chunk=int(branch[1]))))
        else:
            sock.send(encode(Start(image=_image_bytes(image), prompt=prompt, seed=seed, quality=quality,
                                   intrinsics=None if intrinsics is None else tuple(float(x) for x in intrinsics),
                                   record=record, keymap=keymap, translation_speed=translation_speed,
                                   rotation_speed_deg=rotation_speed_deg, pitch_limit_deg=pitch_limit_deg)))
        # Until the engine says where the session stands, keys are a heartbeat only (lossless: no credit yet).
        chunks_done, in_chunk, received_last = 0, 0, -1
        chunk_keys_at = send_keys(chunks_done, received_last)
        play_start: float | None = None
        first_shown = 0
        next_tick = time.monotonic() + tick_s
        while True:
            now = time.monotonic()
            if now > deadline:
                raise HeadlessError(f"timed out after {timeout:g} s with {chunks_done}/{chunks} chunks received")
            if received_last >= last_index:
                break
            if now >= next_tick:
                if lossless or play_start is None:
                    shown = received_last
                else:  # a player showing frames at fps since the first one arrived
                    shown = min(received_last, first_shown + int((now - play_start) * welcome.fps))
                send_keys(chunks_done, shown)
                next_tick = now + tick_s
            msg, pixels = recv_message(sock, max(0.0, next_tick - time.monotonic()))
            if msg is None:
                continue
            if isinstance(msg, Error):
                if result is None:
                    raise HeadlessError(f"engine refused: {msg.code} in field {msg.field!r}: {msg.message}", msg)
                result.errors.append(msg)
            elif isinstance(msg, Status):
                if result is None and msg.session_id is not None and msg.state == "running":
                    result = HeadlessResult(msg.session_id, welcome, posted=posted)
                    chunks_done, received_last = msg.chunks, msg.frames - 1  # > 0 after resume/branch
                    chunk_keys_at = send_keys(chunks_done, received_last)  # keys first, then credit
                    if lossless:
                        sock.send(encode(Credit(frames=per_chunk + (1 if msg.frames == 0 else 0))))
            elif isinstance(msg, Dropped):
                if result is not None:
                    result.dropped = msg.total
            elif isinstance(msg, Ended):
                if result is None:
                    raise HeadlessError(f"session ended before it started: {msg.reason} {msg.message}")
                result.ended = msg
                break
            elif isinstance(msg, FrameHeader):
                if result is None:
                    result = HeadlessResult(msg.session_id, welcome, posted=posted)
                frame = decode_pixels(msg, pixels)
                if play_start is None:
                    play_start, first_shown = time.monotonic(), msg.index
                if keep_frames:
                    result.frames.append(frame.copy())
                if out_mp4 is not None:
                    if writer is None:
                        writer = Mp4Writer(out_mp4, msg.width, msg.height, welcome.fps)
                    writer.append(frame)
                if on_frame is not None:
                    on_frame(msg, frame)
                result.indices.append(msg.index)
                result.poses.append(np.asarray(msg.pose, np.float32).reshape(4, 4))
                result.held.append(msg.held)
                result.keys_seq.append(msg.keys_seq)
                received_last = msg.index
                in_chunk += 1
                chunks_done = max(chunks_done, msg.chunk)  # (live: the last frame of a chunk may be dropped)
                if msg.index >= per_chunk * (msg.chunk + 1):  # the chunk's last frame
                    result.chunk_seconds.append(msg.t_ready - msg.t_sampled)
                    result.chunk_times.append((msg.t_sampled, msg.t_ready))
                    result.chunk_latency_s.append(time.monotonic() - chunk_keys_at)
                    chunks_done = msg.chunk + 1
                    if lossless and chunks_done < chunks:
                        chunk_keys_at = send_keys(chunks_done, received_last)  # keys first, then credit
                        sock.send(encode(Credit(frames=in_chunk)))
                    in_chunk = 0
        if result is None:
            raise HeadlessError("the engine sent nothing for this session")
        if stop and result.ended is None:
            sock.send(encode(Control(action="stop")))
            end = time.monotonic() + 10.0
            while result.ended is None and time.monotonic() < end:
                msg, _ = recv_message(sock, 0.2)
                if isinstance(msg, Ended):
                    result.ended = msg
                elif isinstance(msg, Dropped):
                    result.dropped = msg.total
        return result
    finally:
        if writer is not None:
            writer.close()
        sock.close()


def _expect(sock: zmq.Socket, kind, deadline: float, what: str):
    while time.monotonic() < deadline:
        msg, _ = recv_message(sock, 0.2)
        if msg is None:
            continue
        if isinstance(msg, Error):
            raise HeadlessError(f"engine refused {what!r}: {msg.code} in field {msg.field!r}: {msg.message}", msg)
        if isinstance(msg, kind):
            return msg
    raise HeadlessError(f"no answer to {what!r} from the engine in time (is it running at this address?)")
