"""The engine server (`sana-wm engine`): sessions over ZeroMQ, frames back to each client.

Wire (DESIGN.md "Process model and wire", protocol/README.md): one ROUTER socket; every client's
DEALER sends one-part messages and gets back one-part messages and two-part frames
`[header, pixels]` over the same connection.

Threads. pyzmq sockets are not thread-safe, so each socket has exactly one owner:

- IO thread: owns the ROUTER and the PULL end of an inproc wake-up pipe. It decodes and validates every
  inbound message (a bad one gets an `error` naming the field; nothing else happens), keeps each
  client's key state and credit, hands session work to the engine thread through a queue, and flushes
  every client's outbox with non-blocking sends.
- engine thread: owns the `Session`s (the GPU). It steps whichever session is due (`JitPolicy` for a
  live driver, credit for a lossless one) and hands each chunk to the encoder.
- encoder thread: turns chunks into pixel payloads (raw RGB or JPEG) off the engine thread, appends
  frames and engine messages to the recipients' outboxes in order, and wakes the IO thread.

A live client never slows the engine: its outbox holds at most `max_queued_frames` frames; older ones
are dropped (counted, and the client is told with `dropped`) when libzmq's send queue (`sndhwm`) is
full. A lossless client is never dropped: the engine does not start a chunk until the client's unused
credit covers it. The recording (Session.step) never depends on any client.

Knows nothing about models beyond `engine.session.Session`; importing it does not import torch.
"""

from __future__ import annotations

import io
import ipaddress
import logging
import os
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zmq
from PIL import Image

from engine import __version__
from engine.errors import InputError
from protocol import (
    MAX_MESSAGE_BYTES,
    Branch,
    Control,
    Credit,
    Dropped,
    Ended,
    Error,
    FrameHeader,
    Hello,
    Keys,
    Message,
    ProtocolError,
    Resume,
    Start,
    Status,
    Watch,
    Welcome,
    decode,
    encode,
    encode_frame,
    error_from,
)
from protocol.errors import WHOLE_MESSAGE

log = logging.getLogger("sana_wm.engine")

SERVER_NAME = f"sana-wm-engine/{__version__}"
SUPPORTED_ENCODINGS = ("rgb24", "jpeg")  # h264 is in the protocol but not served yet
MAX_IMAGE_SIDE = 8192  # a first image larger than this on a side is refused before decoding
MAX_OUTBOX_REPLIES = 1024  # replies (errors, welcome) queued for a client that does not read them
MAX_COMMANDS_PER_PASS = 64  # engine loop: commands handled before the due sessions get their next chunk
MAX_OUTSTANDING_CREDIT = 1 << 20  # lossless: frames a client may have granted ahead (the rest is ignored)
HEARTBEAT_BACKLOG = 64  # a client with more messages queued than this (not reading) gets no heartbeat status
KEYS_MEMORY = 256  # recent keys messages per client whose client_time is echoed in frame headers


@dataclass
class ServerConfig:
    bind: str = "tcp://127.0.0.1:5555"  # "tcp://127.0.0.1:0" picks a free port
    record_root: str | Path | None = "recordings"  # None: sessions are not recorded (resume/branch unavailable)
    curve_dir: str | Path | None = None  # from `sana-wm keys DIR`; required for a non-loopback bind
    qualities: tuple[str, ...] = ("preview", "full")  # what `start.quality` may ask for
    heartbeat_timeout_s: float = 5.0  # a driver silent this long has its session paused (and snapshotted)
    status_every_s: float = 1.0  # heartbeat `status` to every attached client
    max_sessions: int = 4
    sndhwm: int = 32  # messages libzmq queues per client before a send would block
    max_queued_frames: int = 48  # live delivery: frames a client's outbox holds (at least one chunk); older drop
    jit_margin_s: float = 0.25  # jitter margin of the just-in-time scheduler
    jpeg_quality: int = 90
    snapshot_every: int = 8  # chunks between periodic snapshots
    forget_after_s: float = 60.0  # drop the record of a silent client that has no session


# ------------------------------------------------------------------------------ scheduling policy


@dataclass
class JitPolicy:
    """Just-in-time chunk scheduling for a live driver.

    The client reports the last frame it showed; frames sent past it are its playback buffer. The next
    chunk starts when that buffer would run dry within the predicted chunk latency (an EMA of measured
    chunk times) plus a margin, so the keys for the chunk are sampled as late as possible.
    """

    fps: float
    margin_s: float = 0.25
    alpha: float = 0.3  # EMA weight of the newest measurement
    latency_s: float = 0.5  # predicted chunk latency; a prior until the first measurement
    measured: int = 0

    def observe(self, chunk_seconds: float) -> None:
        if self.measured == 0:
            self.latency_s = float(chunk_seconds)
        else:
            self.latency_s = (1.0 - self.alpha) * self.latency_s + self.alpha * float(chunk_seconds)
        self.measured += 1

    def buffer_s(self, last_sent: int, last_shown: int, age_s: float = 0.0) -> float:
        """Seconds of video the client still has to show: frames sent after the last one it reported
        showing, less the time since it reported (it kept playing meanwhile)."""
        ahead = max(0, last_sent - last_shown)
        return max(0.0, ahead / self.fps - max(0.0, age_s))

    def delay_s(self, last_sent: int, last_shown: int, age_s: float = 0.0) -> float:
        """Seconds until the next chunk must start (0: start now)."""
        return max(0.0, self.buffer_s(last_sent, last_shown, age_s) - self.latency_s - self.margin_s)


# ------------------------------------------------------------------------------------ bind policy


CLOSE_GRACE_S = 300.0  # how long `stop` waits beyond its timeout for sessions to finish their recordings


def is_loopback(endpoint: str) -> bool:
    """Whether a ZeroMQ bind endpoint is reachable only from this machine."""
    scheme, sep, rest = endpoint.partition("://")
    if not sep:
        raise InputError(f"bind address {endpoint!r} is not accepted; use e.g. tcp://127.0.0.1:5555")
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        raise InputError(f"bind address {endpoint!r}: transport {scheme!r} is not accepted; use tcp:// or ipc://")
    host = rest.rsplit(":", 1)[0].split(";")[-1].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # '*', an interface name or a host name: not provably local
        return False


def check_bind(endpoint: str, curve_dir: str | Path | None) -> None:
    """Refuse a non-loopback bind without CURVE keys (InputError saying how to fix it)."""
    if not is_loopback(endpoint) and curve_dir is None:
        raise InputError(
            f"refusing to bind {endpoint!r} without encryption: a non-loopback address exposes the engine to "
            "the network. Generate keys with `sana-wm keys DIR` and pass `--curve-dir DIR`, or bind to "
            "tcp://127.0.0.1:PORT")


# ------------------------------------------------------------------------------------ CURVE keys

SERVER_KEY, CLIENT_KEY = "server", "client"


def _write_cert(path: Path, public: bytes, secret: bytes | None) -> None:
    lines = ["#   sana-wm CURVE certificate (zmq.auth format); keep *.key_secret private", "metadata", "curve",
             f'    public-key = "{public.decode("ascii")}"']
    if secret is not None:
        lines.append(f'    secret-key = "{secret.decode("ascii")}"')
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if secret is not None else 0o644)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")


def generate_keys(directory: str | Path) -> dict[str, Path]:
    """`sana-wm keys DIR`: server and client keypairs as zmq certificate files.

    DIR/server.key, DIR/client.key: public keys (the engine admits every `*.key` in DIR as a client);
    DIR/server.key_secret, DIR/client.key_secret: secret keys, mode 0600. Refuses to overwrite."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    paths = {}
    for name in (SERVER_KEY, CLIENT_KEY):
        pub, sec = d / f"{name}.key", d / f"{name}.key_secret"
        if pub.exists() or sec.exists():
            raise InputError(f"{pub} already exists; refusing to overwrite keys (choose another directory)")
        public, secret = zmq.curve_keypair()
        _write_cert(sec, public, secret)
        _write_cert(pub, public, None)
        paths[name] = pub
        paths[name + "_secret"] = sec
    return paths


def _load_server_keys(directory: str | Path) -> tuple[bytes, bytes]:
    from zmq.auth import load_certificate

    path = Path(directory) / f"{SERVER_KEY}.key_secret"
    try:
        public, secret = load_certificate(path)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read the engine's CURVE key {path} ({e}); "
                         "make keys with `sana-wm keys DIR`") from None
    if secret is None:
        raise InputError(f"{path} holds no secret key; make keys with `sana-wm keys DIR`")
    return public, secret


# ----------------------------------------------------------------------------------- bookkeeping


@dataclass
class Outgoing:
    parts: list[bytes]
    frame_index: int = -1  # >= 0: a frame (droppable under live delivery)


@dataclass
class Client:
    """One connection (a ROUTER identity). Guarded by the server lock; touched by all three threads."""

    ident: bytes
    last_seen: float
    hello: Hello | None = None
    encoding: str = "rgb24"
    delivery: str = "live"
    role: str = "driver"
    session_id: str | None = None  # driving or watching
    pending: bool = False  # a start/resume/branch is with the engine
    started: bool = False  # has ever asked for a session (keys after that are never an error)
    gone: bool = False  # silent past the heartbeat timeout
    keys: Keys | None = None
    keys_at: float = 0.0  # monotonic time the last keys arrived
    key_times: dict[int, float] = field(default_factory=dict)  # seq -> client_time, recent ones
    credit: int = 0  # lossless: frames the client can still take that no chunk has reserved
    outbox: deque[Outgoing] = field(default_factory=deque)
    sending: Outgoing | None = None  # the outbox head the IO thread is sending now (never dropped meanwhile)
    queued_frames: int = 0
    dropped_total: int = 0
    drop_count: int = 0  # dropped since the last `dropped` notice
    drop_last: int = -1


@dataclass
class Live:
    """A session the engine is running, with who drives and who watches it. Engine thread only."""

    session: object  # engine.session.Session
    driver: bytes | None
    jit: JitPolicy
    started_at: float
    start_msg: Start | None = None  # for `reset`
    spectators: set[bytes] = field(default_factory=set)
    paused: bool = False
    last_sent: int = -1  # index of the last frame emitted
    chunk_seconds: float = 0.0
    last_step: float = 0.0
    last_status: float = 0.0


def _guess_field(message: str) -> str:
    """The Start field an engine-side InputError is about (its message names the value, not the field)."""
    low = message.lower()
    for key, name in (("intrinsic", "intrinsics"), ("image", "image"), ("prompt", "prompt"),
                      ("keymap", "keymap"), ("key map", "keymap"), ("quality", "quality"),
                      ("translation", "translation_speed"), ("rotation", "rotation_speed_deg"),
                      ("pitch", "pitch_limit_deg")):
        if key in low:
            return name
    return WHOLE_MESSAGE


def check_image_bytes(data: bytes) -> None:
    """Refuse what is not a PNG/JPEG/WebP of sane size before anything decodes it (field `image`)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt, (w, h) = im.format, im.size
    except Exception as e:  # noqa: BLE001 - PIL raises many types for garbage bytes
        raise ProtocolError("invalid_field", "image", f"not a readable image ({type(e).__name__}: {e}); "
                            "send PNG, JPEG or WebP file bytes") from None
    if fmt not in ("PNG", "JPEG", "WEBP"):
        raise ProtocolError("invalid_field", "image", f"format {fmt} is not accepted; send PNG, JPEG or WebP")
    if not (1 <= w <= MAX_IMAGE_SIDE and 1 <= h <= MAX_IMAGE_SIDE):
        raise ProtocolError("invalid_field", "image", f"{w}x{h} pixels; each side must be 1..{MAX_IMAGE_SIDE}")


# ---------------------------------------------------------------------------------------- server


class EngineServer:
    """`sana-wm engine`: serve sessions of one `World` over ZeroMQ.

        server = EngineServer(build_world("tiny"), ServerConfig(bind="tcp://127.0.0.1:0"))
        address = server.start()    # the bound endpoint; threads running
        ...
        server.stop()               # ends every session (reason "shutdown"), joins the threads
    """

    def __init__(self, world, config: ServerConfig | None = None) -> None:
        self.world = world
        self.config = cfg = config or ServerConfig()
        check_bind(cfg.bind, cfg.curve_dir)
        bad = [q for q in cfg.qualities if q not in ("preview", "full")]
        if bad or not cfg.qualities:
            raise InputError(f"qualities {cfg.qualities!r} are not accepted; choose from ('preview', 'full')")
        if "full" in cfg.qualities and world.refiner is None:
            raise InputError("quality 'full' needs a world built with the refiner")
        self.fps = float(world.preset.fps)
        self.height, self.width = world.preset.pixel_hw
        from engine.rollout import chunk_plan

        self.chunk_frames = chunk_plan(1).pixel_count
        self.address: str | None = None
        self._t0 = time.monotonic()
        self._lock = threading.Lock()
        self._clients: dict[bytes, Client] = {}
        self._controls: dict[bytes, object] = {}  # driver ident -> its session's LiveControls
        self._poke_pending = False
        self._commands: queue.Queue = queue.Queue()
        self._encode: queue.Queue = queue.Queue()
        self._stopping = threading.Event()
        self._ctx = zmq.Context()
        self._auth = None
        self._threads: list[threading.Thread] = []
        self._sessions: dict[str, Live] = {}  # engine thread only
        self._wake_endpoint = f"inproc://sana-wm-wake-{id(self)}"

    # ------------------------------------------------------------------ lifecycle

    def clock(self) -> float:
        """Engine clock (seconds since the server started), as in frame headers and status."""
        return time.monotonic() - self._t0

    def start(self) -> str:
        cfg = self.config
        router = self._ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        router.setsockopt(zmq.SNDHWM, cfg.sndhwm)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a full or vanished peer raises instead of silently dropping
        router.setsockopt(zmq.LINGER, 0)
        if cfg.curve_dir is not None:
            from zmq.auth.thread import ThreadAuthenticator

            public, secret = _load_server_keys(cfg.curve_dir)
            self._auth = ThreadAuthenticator(self._ctx)
            self._auth.start()
            self._auth.configure_curve(domain="*", location=str(cfg.curve_dir))
            router.curve_secretkey, router.curve_publickey, router.curve_server = secret, public, True
        bind = cfg.bind
        if bind.startswith("tcp://") and bind.endswith(":0"):
            bind = bind[:-2] + ":*"
        try:
            router.bind(bind)
        except zmq.ZMQError as e:
            router.close()
            raise InputError(f"cannot bind {cfg.bind!r}: {e}") from None
        self.address = router.getsockopt(zmq.LAST_ENDPOINT).decode()
        wake_pull = self._ctx.socket(zmq.PULL)
        wake_pull.bind(self._wake_endpoint)
        wake_push = self._ctx.socket(zmq.PUSH)
        wake_push.connect(self._wake_endpoint)
        for name, target, args in (("sana-wm-io", self._io_loop, (router, wake_pull)),
                                   ("sana-wm-engine", self._engine_loop, ()),
                                   ("sana-wm-encoder", self._encoder_loop, (wake_push,))):
            t = threading.Thread(target=target, args=args, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        return self.address

    def stop(self, timeout: float = 10.0) -> None:
        """End every session (reason `shutdown`), deliver what can be delivered, stop the threads."""
        if not self._threads:
            return
        self._commands.put(("shutdown",))
        self._threads[1].join(timeout)  # engine: closes sessions (final snapshots written), then stops the encoder
        if self._threads[1].is_alive():  # a session's final snapshot is still being written (GBs at release size)
            log.warning("engine stop: waiting up to %.0f s more for sessions to finish writing", CLOSE_GRACE_S)
            self._threads[1].join(CLOSE_GRACE_S)
        self._threads[2].join(timeout)
        time.sleep(0.05)  # let the IO thread flush the `ended` messages
        self._stopping.set()
        self._threads[0].join(timeout)
        if self._auth is not None:
            self._auth.stop()
        self._ctx.term()
        self._threads = []

    def serve_forever(self) -> None:
        try:
            while self._threads and all(t.is_alive() for t in self._threads):
                time.sleep(0.2)
        finally:
            self.stop()

    # ------------------------------------------------------------------ IO thread

    def _io_loop(self, router: zmq.Socket, wake: zmq.Socket) -> None:
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(wake, zmq.POLLIN)
        last_check = 0.0
        blocked = False
        try:
            while not self._stopping.is_set():
                events = dict(poller.poll(10 if blocked else 100))
                if wake in events:
                    while True:
                        try:
                            wake.recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                if router in events:
                    for _ in range(256):
                        try:
                            parts = router.recv_multipart(zmq.NOBLOCK, copy=True)
                        except zmq.Again:
                            break
                        self._on_message(parts[0], parts[1:])
                blocked = self._flush(router)
                now = time.monotonic()
                if now - last_check > 0.1:
                    last_check = now
                    self._check_heartbeats(now)
            self._flush(router)  # the last `ended` messages
        finally:
            router.close(linger=500)
            wake.close(0)

    def _reply(self, client: Client, msg: Message) -> None:
        """Queue a one-part message for `client` (caller holds the lock). A client that floods the engine
        without reading its replies stops getting them rather than growing its outbox without bound."""
        if len(client.outbox) < MAX_OUTBOX_REPLIES:
            client.outbox.append(Outgoing([encode(msg)]))

    def _poke(self) -> None:
        """Wake the engine thread to re-check what is due (keys or credit changed); caller holds the lock.
        At most one wake-up is queued, however fast keys arrive."""
        if not self._poke_pending:
            self._poke_pending = True
            self._commands.put(("poke",))

    def _on_message(self, ident: bytes, parts: list[bytes]) -> None:
        now = time.monotonic()
        try:
            if len(parts) != 1:
                raise ProtocolError("malformed", WHOLE_MESSAGE, f"a client message is one part; got {len(parts)}")
            msg, refused = decode(parts[0]), None
        except ProtocolError as e:
            msg, refused = None, e
        with self._lock:
            client = self._clients.get(ident)
            if client is None:
                client = self._clients[ident] = Client(ident, now)
            client.last_seen = now
            if client.gone:
                client.gone = False
                if client.session_id is not None and client.role == "driver":
                    self._commands.put(("back", ident))
            try:
                if refused is not None:
                    raise refused
                self._handle(client, msg, now)
            except ProtocolError as e:
                self._reply(client, error_from(e))
            except Exception as e:  # noqa: BLE001 - one client's message must never take the IO thread down
                log.exception("handling a message from client %s failed", ident.hex())
                self._reply(client, Error(code="internal", field=WHOLE_MESSAGE,
                                          message=f"the engine failed on this message: {type(e).__name__}: {e}"[:1000]))

    def _handle(self, client: Client, msg: Message, now: float) -> None:
        """Dispatch one valid message (IO thread, lock held). Raises ProtocolError for a refused one."""
        if isinstance(msg, (Welcome, FrameHeader, Status, Error, Ended, Dropped)):
            raise ProtocolError("bad_state", "type", f"{msg.TYPE!r} is sent by the engine, not by a client")
        if isinstance(msg, Hello):
            if client.session_id is not None and client.role == "driver" and client.ident not in self._controls:
                client.session_id = None  # a driver detached while silent starts afresh (`resume` gets it back)
            if client.session_id is not None or client.pending:
                raise ProtocolError("bad_state", "type", "hello again while attached to a session; stop it first")
            client.encoding = self._choose_encoding(msg.encodings)
            client.hello, client.role = msg, msg.role
            client.delivery = "live" if msg.role == "spectator" else msg.delivery
            client.credit = 0
            self._reply(client, Welcome(
                server=SERVER_NAME, model=self.world.preset.name, width=self.width, height=self.height,
                fps=self.fps, chunk_frames=self.chunk_frames, encoding=client.encoding, delivery=client.delivery,
                capabilities=("credit", "spectate", "resume", "branch")))
            return
        if client.hello is None:
            raise ProtocolError("bad_state", "type", f"{msg.TYPE!r} before 'hello'; send hello first")
        if isinstance(msg, Keys):
            client.keys, client.keys_at = msg, now
            client.key_times[msg.seq] = msg.client_time
            if len(client.key_times) > KEYS_MEMORY:
                for seq in sorted(client.key_times)[: len(client.key_times) - KEYS_MEMORY]:
                    del client.key_times[seq]
            if client.role == "driver":
                ctl = self._controls.get(client.ident)
                if ctl is not None:
                    ctl.set_held(msg.held, msg.seq)
                elif not client.started:
                    raise ProtocolError("bad_state", "type", "'keys' before 'start', 'resume' or 'branch'")
            self._poke()
            return
        if isinstance(msg, Credit):
            if client.delivery != "lossless":
                raise ProtocolError("bad_state", "frames", "credit applies only to lossless delivery (see hello)")
            client.credit = min(client.credit + msg.frames, MAX_OUTSTANDING_CREDIT)
            self._poke()
            return
        if isinstance(msg, (Start, Resume, Branch)):
            if client.role != "driver":
                raise ProtocolError("bad_state", "type", f"a spectator cannot send {msg.TYPE!r}")
            if client.session_id is not None or client.pending:
                raise ProtocolError("bad_state", "type", "this client already has a session; stop it first")
            if isinstance(msg, Start):
                if msg.quality not in self.config.qualities:
                    raise ProtocolError("invalid_field", "quality",
                                        f"{msg.quality!r} is not served by this engine; it serves "
                                        f"{', '.join(self.config.qualities)}")
                check_image_bytes(msg.image)
            client.pending = client.started = True
            self._commands.put((msg.TYPE, client.ident, msg))
            return
        if isinstance(msg, Watch):
            if client.role != "spectator":
                raise ProtocolError("bad_state", "type", "'watch' needs hello with role 'spectator'")
            if client.session_id is not None or client.pending:
                raise ProtocolError("bad_state", "type", "this client already has a session; stop it first")
            client.pending = True
            self._commands.put(("watch", client.ident, msg))
            return
        if isinstance(msg, Control):
            if client.role != "driver":
                raise ProtocolError("bad_state", "action", "a spectator cannot control the session")
            if client.session_id is None:
                raise ProtocolError("bad_state", "action", "no session to control; send start, resume or branch")
            self._commands.put(("control", client.ident, msg))
            return
        raise ProtocolError("unknown_type", "type", f"{msg.TYPE!r} is not handled by this engine")

    def _choose_encoding(self, offered: tuple[str, ...]) -> str:
        usable = [e for e in offered if e in SUPPORTED_ENCODINGS]
        if not usable:
            raise ProtocolError("invalid_field", "encodings", f"none of {list(offered)} is served; this engine "
                                f"sends {', '.join(SUPPORTED_ENCODINGS)}")
        if not is_loopback(self.config.bind) and "jpeg" in usable:
            return "jpeg"  # ~43 MB/s of raw RGB is for loopback only
        return usable[0]

    def _flush(self, router: zmq.Socket) -> bool:
        """Send what every outbox holds, without blocking. Returns whether some client could not take more."""
        blocked = False
        with self._lock:
            clients = list(self._clients.values())
        for c in clients:
            while True:
                # The send runs outside the lock, so the encoder may queue frames and drop the oldest meanwhile:
                # the head being sent is marked (`sending`, which `_drop_oldest` skips), and a notice resets only the
                # drops it reported.
                with self._lock:
                    if c.drop_count:
                        notified = c.drop_count
                        item = Outgoing([encode(Dropped(count=c.drop_count, total=c.dropped_total,
                                                        last_index=c.drop_last))])
                        is_notice = True
                    elif c.outbox:
                        item, is_notice = c.outbox[0], False
                        c.sending = item
                    else:
                        break
                try:
                    router.send_multipart([c.ident, *item.parts], zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    with self._lock:
                        c.sending = None
                    blocked = True
                    break
                except zmq.ZMQError as e:
                    if e.errno != zmq.EHOSTUNREACH:
                        raise
                    with self._lock:  # the peer is gone: nothing queued for it can be delivered
                        c.outbox.clear()
                        c.sending = None
                        c.queued_frames = c.drop_count = 0
                    break
                with self._lock:
                    if is_notice:
                        c.drop_count -= notified
                    else:
                        c.sending = None
                        c.outbox.popleft()  # still `item`: drops keep the order and skip the item being sent
                        if item.frame_index >= 0:
                            c.queued_frames -= 1
        return blocked

    def _check_heartbeats(self, now: float) -> None:
        cfg = self.config
        with self._lock:
            for ident, c in list(self._clients.items()):
                silent = now - c.last_seen
                if not c.gone and silent > cfg.heartbeat_timeout_s:
                    c.gone = True
                    self._commands.put(("gone", ident))
                elif c.gone and silent > cfg.forget_after_s and c.session_id is None and not c.pending:
                    del self._clients[ident]

    # ------------------------------------------------------------------ engine thread

    def _engine_loop(self) -> None:
        wait = 0.0
        try:
            while True:
                try:
                    cmd = self._commands.get(timeout=wait) if wait > 0 else self._commands.get_nowait()
                except queue.Empty:
                    cmd = None
                handled = 0
                while cmd is not None:
                    if cmd[0] == "shutdown":
                        for live in list(self._sessions.values()):
                            self._end(live, "shutdown", "the engine is shutting down")
                        return
                    self._command(cmd)
                    handled += 1
                    if handled >= MAX_COMMANDS_PER_PASS:  # a flood of controls must not starve the sessions
                        break
                    try:
                        cmd = self._commands.get_nowait()
                    except queue.Empty:
                        cmd = None
                self._heartbeat_status()
                live, wait = self._pick_due()
                if live is not None:
                    self._step(live)
                    wait = 0.0
                else:
                    wait = min(max(wait, 0.002), 0.1)
        finally:
            self._encode.put(None)

    def _command(self, cmd: tuple) -> None:
        kind = cmd[0]
        if kind == "poke":
            with self._lock:
                self._poke_pending = False
            return
        ident = cmd[1]
        if kind in ("start", "resume", "branch"):
            self._send([ident], Status(state="starting", engine_time=self.clock(), note=f"{kind} received"))
        try:
            if kind == "start":
                self._start(ident, cmd[2])
            elif kind == "resume":
                self._resume(ident, cmd[2])
            elif kind == "branch":
                self._branch(ident, cmd[2])
            elif kind == "watch":
                self._watch(ident, cmd[2])
            elif kind == "control":
                self._control(ident, cmd[2])
            elif kind == "gone":
                self._gone(ident)
            elif kind == "back":
                self._back(ident)
        except ProtocolError as e:
            self._error(ident, e)
        except InputError as e:
            self._error(ident, ProtocolError("invalid_field", _guess_field(str(e)), str(e)))
        except Exception as e:  # noqa: BLE001 - one failed request must not take the engine down
            log.exception("%s from client %s failed", kind, ident.hex())
            self._error(ident, ProtocolError("internal", WHOLE_MESSAGE, f"{type(e).__name__}: {e}"))
        finally:
            if kind in ("start", "resume", "branch", "watch"):
                with self._lock:
                    c = self._clients.get(ident)
                    if c is not None:
                        c.pending = False

    def _error(self, ident: bytes, e: ProtocolError) -> None:
        self._send([ident], error_from(e))

    def _send(self, idents, msg: Message) -> None:
        self._encode.put(("msg", list(idents), encode(msg)))

    def _recipients(self, live: Live) -> list[bytes]:
        return ([live.driver] if live.driver is not None else []) + sorted(live.spectators)

    def _status(self, live: Live, state: str, note: str = "", idents=None, heartbeat: bool = False) -> None:
        s = live.session
        fields = dict(state=state, session_id=s.id, quality=s.quality, chunks=s.next_chunk_index,
                      frames=s.frames_emitted, chunk_seconds=live.chunk_seconds, engine_time=self.clock(),
                      note=note[:1024])
        recipients = list(idents if idents is not None else self._recipients(live))
        self._encode.put(("status", recipients, fields, heartbeat))
        live.last_status = time.monotonic()

    def _heartbeat_status(self) -> None:
        now = time.monotonic()
        for live in self._sessions.values():
            if now - live.last_status > self.config.status_every_s:
                self._status(live, "paused" if live.paused else "running", heartbeat=True)

    def _attach(self, live: Live, ident: bytes) -> None:
        """Make `ident` the session's driver: its keys go to the session's LiveControls from now on."""
        ctl = live.session.controls
        live.driver = ident
        with self._lock:
            c = self._clients.get(ident)
            self._controls[ident] = ctl
            keys = c.keys if c is not None else None
            if c is not None:
                c.session_id = live.session.id
        # The new driver's sequence numbers start afresh: forget the previous one's.
        ctl.set_held(keys.held if keys is not None else frozenset(), None)
        if keys is not None:
            ctl.set_held(keys.held, keys.seq)

    def _detach_driver(self, live: Live) -> None:
        if live.driver is None:
            return
        with self._lock:
            self._controls.pop(live.driver, None)
            c = self._clients.get(live.driver)
            if c is not None:
                c.session_id = None
                c.credit = 0
        live.driver = None

    def _open(self, ident: bytes, session, start_msg: Start | None, note: str) -> None:
        live = Live(session, None, JitPolicy(self.fps, margin_s=self.config.jit_margin_s), time.monotonic(),
                    start_msg=start_msg, last_sent=session.frames_emitted - 1)
        self._sessions[session.id] = live
        self._attach(live, ident)
        self._status(live, "running", note)
        log.info("session %s %s (%s, %d frames so far)", session.id, note, session.quality, session.frames_emitted)
        with self._lock:
            c = self._clients.get(ident)
            gone = c is None or c.gone
        if gone:  # the client vanished while its session was being prepared
            self._gone(ident)

    def _check_capacity(self) -> None:
        """Room for one more session: close the oldest orphans (paused, driver gone) if need be; they stay
        resumable from their recording."""
        orphans = sorted((x for x in self._sessions.values() if x.driver is None), key=lambda x: x.last_step)
        while len(self._sessions) >= self.config.max_sessions and orphans:
            self._end(orphans.pop(0), "client_gone", "closed to make room; resume it from its recording")
        if len(self._sessions) >= self.config.max_sessions:
            raise ProtocolError("busy", WHOLE_MESSAGE,
                                f"the engine runs {len(self._sessions)} sessions, its limit; try again later")

    def _record_root(self):
        return None if self.config.record_root is None else Path(self.config.record_root)

    def _start(self, ident: bytes, msg: Start) -> None:
        from engine.session import Session

        self._check_capacity()
        session = Session.create(
            self.world, first_image=msg.image, prompt=msg.prompt,
            intrinsics=list(msg.intrinsics) if msg.intrinsics is not None else None, seed=msg.seed,
            quality=msg.quality, keymap=msg.keymap, translation_speed=msg.translation_speed,
            rotation_speed_deg=msg.rotation_speed_deg, pitch_limit_deg=msg.pitch_limit_deg,
            record_root=self._record_root() if msg.record else None, snapshot_every=self.config.snapshot_every)
        self._open(ident, session, msg, "started")

    def _recorded(self, session_id: str) -> Path:
        root = self._record_root()
        path = None if root is None else root / session_id
        if path is None or not (path / "manifest.json").is_file():
            raise ProtocolError("not_found", "session_id", f"no recorded session {session_id!r} on this engine")
        return path

    def _resume(self, ident: bytes, msg: Resume) -> None:
        from engine.session import Session

        live = self._sessions.get(msg.session_id)
        if live is not None:  # still in memory: take it over if nobody drives it
            if live.driver is not None:
                raise ProtocolError("busy", "session_id", f"session {msg.session_id} has a driver")
            if msg.chunk is not None and msg.chunk != live.session.next_chunk_index - 1:
                raise ProtocolError("invalid_field", "chunk", "a running session resumes after its last chunk "
                                    f"({live.session.next_chunk_index - 1}); use branch for an earlier one")
            self._attach(live, ident)
            if live.paused:
                live.session.unpause()
            live.paused = False
            self._status(live, "running", "resumed")
            return
        path = self._recorded(msg.session_id)
        if msg.chunk is not None:
            raise ProtocolError("invalid_field", "chunk", "resume continues after the last committed chunk "
                                "(omit chunk); use branch to continue from an earlier chunk")
        self._check_capacity()
        session = Session.resume(self.world, path, snapshot_every=self.config.snapshot_every)
        self._open(ident, session, None, "resumed")

    def _branch(self, ident: bytes, msg: Branch) -> None:
        from engine.session import Session

        path = self._recorded(msg.session_id)
        self._check_capacity()
        try:
            session = Session.branch(self.world, path, msg.chunk, record_root=self._record_root(),
                                     snapshot_every=self.config.snapshot_every)
        except InputError as e:
            raise ProtocolError("invalid_field", "chunk", str(e)) from None
        self._open(ident, session, None, f"branched from {msg.session_id} after chunk {msg.chunk}")

    def _watch(self, ident: bytes, msg: Watch) -> None:
        if msg.session_id is None:
            if not self._sessions:
                raise ProtocolError("not_found", "session_id", "no session is running")
            live = max(self._sessions.values(), key=lambda x: x.started_at)
        else:
            live = self._sessions.get(msg.session_id)
            if live is None:
                raise ProtocolError("not_found", "session_id", f"no running session {msg.session_id!r}")
        live.spectators.add(ident)
        with self._lock:
            c = self._clients.get(ident)
            if c is not None:
                c.session_id = live.session.id
        self._status(live, "paused" if live.paused else "running", "watching", idents=[ident])

    def _live_of(self, ident: bytes) -> Live:
        for live in self._sessions.values():
            if live.driver == ident:
                return live
        raise ProtocolError("bad_state", "action", "this client drives no session")

    def _control(self, ident: bytes, msg: Control) -> None:
        live = self._live_of(ident)
        s = live.session
        if msg.action == "pause":
            s.pause()
            live.paused = True
            self._status(live, "paused", "paused by the driver")
        elif msg.action == "resume":
            if live.paused:
                s.unpause()
            live.paused = False
            self._status(live, "running", "resumed by the driver")
        elif msg.action == "set_prompt":
            try:
                s.set_prompt(msg.prompt)
            except InputError as e:
                raise ProtocolError("invalid_field", "prompt", str(e)) from None
            self._status(live, "paused" if live.paused else "running", "prompt changed")
        elif msg.action == "stop":
            self._end(live, "stopped", "stopped by the driver")
        elif msg.action == "reset":
            if live.start_msg is None:
                raise ProtocolError("bad_state", "action", "reset restarts a session begun with 'start'; "
                                    "this one was resumed or branched")
            start = live.start_msg
            self._end(live, "stopped", "reset: a new session starts from the first image")
            with self._lock:
                if ident in self._clients:
                    self._clients[ident].pending = True
            try:
                self._start(ident, start)
            finally:
                with self._lock:
                    if ident in self._clients:
                        self._clients[ident].pending = False
        elif msg.action == "set_quality":
            raise ProtocolError("bad_state", "quality", "quality is fixed for a session; stop it and start a new "
                                "one with the quality you want")

    def _gone(self, ident: bytes) -> None:
        for live in list(self._sessions.values()):
            if ident in live.spectators:
                live.spectators.discard(ident)
                with self._lock:
                    if ident in self._clients:
                        self._clients[ident].session_id = None
            if live.driver == ident:
                live.session.pause()
                live.paused = True
                with self._lock:  # keep the client's session_id: it may come back
                    self._controls.pop(ident, None)
                live.driver = None
                self._status(live, "paused", f"driver silent for {self.config.heartbeat_timeout_s:g} s: session "
                             "paused and snapshotted; resume it with 'resume'")

    def _back(self, ident: bytes) -> None:
        with self._lock:
            c = self._clients.get(ident)
            sid = c.session_id if c is not None else None
        live = self._sessions.get(sid) if sid is not None else None
        if live is not None and live.driver is None:
            self._attach(live, ident)
            self._status(live, "paused", "driver back; send control resume to continue")
        elif c is not None and (live is None or live.driver != ident):  # ended, or another client drives it now
            with self._lock:
                c.session_id = None

    def _end(self, live: Live, reason: str, message: str = "") -> None:
        s = live.session
        log.info("session %s ended (%s): %s", s.id, reason, message)
        try:
            s.close("stopped" if reason != "client_gone" else "paused")
        except Exception:  # noqa: BLE001 - the session is over either way; its recording says how far it got
            log.exception("session %s: closing its recording failed", s.id)
        finally:
            self._sessions.pop(s.id, None)
            self._send(self._recipients(live), Ended(session_id=s.id, reason=reason, chunks=s.next_chunk_index,
                                                     frames=s.frames_emitted, message=message[:1024]))
            with self._lock:
                for ident in live.spectators:
                    c = self._clients.get(ident)
                    if c is not None:
                        c.session_id = None
            self._detach_driver(live)

    def _next_chunk_frames(self, live: Live) -> int:
        s = live.session
        return self.chunk_frames + (1 if s.frames_emitted == 0 and s.quality == "preview" else 0)

    def _pick_due(self) -> tuple[Live | None, float]:
        """The session to step now (least recently stepped among the due ones), else how long to wait."""
        now = time.monotonic()
        due, wait = [], 0.1
        with self._lock:
            for live in self._sessions.values():
                if live.paused or live.driver is None:
                    continue
                c = self._clients.get(live.driver)
                if c is None or c.gone:
                    continue
                if c.delivery == "lossless":
                    need = self._next_chunk_frames(live)
                    # credit it has not read yet does not count: frames wait in memory only up to a bound
                    if c.credit >= need and c.queued_frames + need <= max(self.config.max_queued_frames, need):
                        due.append(live)
                    continue
                shown = c.keys.last_shown_frame if c.keys is not None else -1
                since = c.keys_at if c.keys is not None else live.started_at
                delay = live.jit.delay_s(live.last_sent, shown, now - since)
                if delay <= 0:
                    due.append(live)
                else:
                    wait = min(wait, delay)
        if not due:
            return None, wait
        return min(due, key=lambda x: x.last_step), 0.0

    def _step(self, live: Live) -> None:
        s = live.session
        need = self._next_chunk_frames(live)
        with self._lock:
            c = self._clients.get(live.driver)
            lossless = c is not None and c.delivery == "lossless"
            if lossless:
                c.credit -= need
        t_sampled = self.clock()
        try:
            chunk = s.step(finish=False)  # its deferred work runs below, once the frames are queued
        except Exception as e:  # noqa: BLE001 - a failed session ends; the engine and other sessions go on
            log.exception("session %s: chunk %d failed", s.id, s.next_chunk_index)
            self._send(self._recipients(live), error_from(
                ProtocolError("internal", WHOLE_MESSAGE, f"chunk failed: {type(e).__name__}: {e}")))
            self._end(live, "error", f"{type(e).__name__}: {e}")
            return
        t_ready = self.clock()
        live.last_step = time.monotonic()
        if chunk is None:
            self._end(live, "stopped", "the control source has no more controls")
            return
        n = chunk.frames.shape[0]
        if lossless and n != need:
            with self._lock:
                c.credit += need - n
        live.chunk_seconds = t_ready - t_sampled
        live.jit.observe(live.chunk_seconds)
        live.last_sent = chunk.frame_start + n - 1
        self._encode.put(("chunk", self._recipients(live), live.driver, s.id, chunk, t_sampled, t_ready))
        try:  # while the encoder thread sends the frames: the chunk's stage-1 cache pass (and a due snapshot)
            s.finish_chunk()
        except Exception as e:  # noqa: BLE001 - as a failed chunk: the session ends, the engine goes on
            log.exception("session %s: finishing chunk %d failed", s.id, chunk.index)
            self._send(self._recipients(live), error_from(
                ProtocolError("internal", WHOLE_MESSAGE, f"chunk failed: {type(e).__name__}: {e}")))
            self._end(live, "error", f"{type(e).__name__}: {e}")

    # ------------------------------------------------------------------ encoder thread

    def _encoder_loop(self, wake: zmq.Socket) -> None:
        try:
            while True:
                item = self._encode.get()
                if item is None:
                    return
                if item[0] == "msg":
                    _, idents, data = item
                    with self._lock:
                        for ident in idents:
                            c = self._clients.get(ident)
                            if c is not None and len(c.outbox) < MAX_OUTBOX_REPLIES + self.config.max_queued_frames:
                                c.outbox.append(Outgoing([data]))
                elif item[0] == "status":
                    _, idents, fields, heartbeat = item
                    with self._lock:
                        for ident in idents:
                            c = self._clients.get(ident)
                            full = len(c.outbox) >= MAX_OUTBOX_REPLIES + self.config.max_queued_frames if c else True
                            if c is not None and not full and not (heartbeat and len(c.outbox) > HEARTBEAT_BACKLOG):
                                c.outbox.append(Outgoing([encode(Status(dropped=c.dropped_total, **fields))]))
                else:
                    try:
                        self._deliver_chunk(*item[1:], wake=lambda: self._wake_io(wake))
                    except Exception:  # noqa: BLE001 - one chunk's delivery must not stop every later one
                        log.exception("delivering a chunk failed; its frames are still in the recording")
                self._wake_io(wake)
        finally:
            wake.close(0)

    @staticmethod
    def _wake_io(wake: zmq.Socket) -> None:
        try:
            wake.send(b"", zmq.NOBLOCK)
        except zmq.Again:  # the IO thread has wake-ups pending already
            pass

    def _payload(self, frame: np.ndarray, encoding: str) -> bytes:
        if encoding == "rgb24":
            return np.ascontiguousarray(frame).tobytes()
        buf = io.BytesIO()
        Image.fromarray(frame).save(buf, format="JPEG", quality=self.config.jpeg_quality)
        return buf.getvalue()

    def _deliver_chunk(self, idents, driver, session_id, chunk, t_sampled, t_ready, wake=lambda: None) -> None:
        """Encodes the chunk's frames in order and queues each one for its clients as soon as it is encoded
        (then `wake`s the IO thread), so the first frame goes out while the later ones are still being encoded."""
        from engine.rollout import chunk_plan

        with self._lock:
            clients = [self._clients[i] for i in idents if i in self._clients]
            # each client's encoding as of now: a `hello` arriving while this chunk encodes must not change it
            chosen = {c.ident: c.encoding for c in clients}
            encodings = set(chosen.values())
            key_time = 0.0
            if driver is not None and driver in self._clients and chunk.key_seq is not None:
                key_time = self._clients[driver].key_times.get(chunk.key_seq, 0.0)
        plan = chunk_plan(chunk.index)
        n, (h, w) = chunk.frames.shape[0], chunk.frames.shape[1:3]
        limit = max(self.config.max_queued_frames, n)  # a chunk arrives whole: its frames always get a chance
        for j in range(n):
            index = chunk.frame_start + j
            step = index - plan.pixel_start
            held = chunk.controls[step] if chunk.controls is not None and step >= 0 else frozenset()
            keys_seq = chunk.key_seq if chunk.key_seq is not None and step >= 0 else -1
            pose = tuple(float(x) for x in chunk.poses[j].reshape(16))
            parts = {}
            for enc in encodings:
                pixels = self._payload(chunk.frames[j], enc)
                header = FrameHeader(session_id=session_id, index=index, chunk=chunk.index, pose=pose, encoding=enc,
                                     width=int(w), height=int(h), payload_bytes=len(pixels), held=held,
                                     keys_seq=keys_seq, keys_client_time=key_time if keys_seq >= 0 else 0.0,
                                     t_sampled=t_sampled, t_ready=t_ready)
                parts[enc] = encode_frame(header, pixels)
            with self._lock:
                for c in clients:
                    c.outbox.append(Outgoing(parts[chosen[c.ident]], index))
                    c.queued_frames += 1
                    if c.delivery == "live" and c.queued_frames > limit:
                        self._drop_oldest(c, c.queued_frames - limit)
            wake()

    @staticmethod
    def _drop_oldest(c: Client, count: int) -> None:
        """Live delivery: drop the `count` oldest queued frames of a client that cannot keep up (never the one the IO
        thread is sending)."""
        kept: deque[Outgoing] = deque()
        for item in c.outbox:
            if count > 0 and item.frame_index >= 0 and item is not c.sending:
                count -= 1
                c.queued_frames -= 1
                c.dropped_total += 1
                c.drop_count += 1
                c.drop_last = max(c.drop_last, item.frame_index)
            else:
                kept.append(item)
        c.outbox = kept


# ---------------------------------------------------------------------------------------- driver


def serve(*, preset: str = "tiny", device: str = "cpu", config: ServerConfig | None = None,
          announce=print, weights: str | None = None, dtype: str | None = None, fast: tuple[str, ...] = ()) -> None:
    """Build the world and serve until interrupted (`sana-wm engine`)."""
    import signal

    from engine.world import build_world, resolve_dtype

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    config = config or ServerConfig()
    check_bind(config.bind, config.curve_dir)  # before the (slow) model build
    if config.curve_dir is not None:
        _load_server_keys(config.curve_dir)
    world = build_world(preset, device=device, dtype=resolve_dtype(dtype, device),
                        with_refiner="full" in config.qualities, weights=weights)
    world.fast = tuple(fast)
    if world.fast:
        from engine.fast import warm_compiled

        t0 = time.perf_counter()
        if warmed := warm_compiled(world, config.qualities):
            announce(f"sana-wm engine: compiled fast paths warmed ({', '.join(warmed)}) in "
                     f"{time.perf_counter() - t0:.0f} s")
    server = EngineServer(world, config)
    address = server.start()
    announce(f"sana-wm engine: listening on {address} (preset {world.preset.name}, {world.preset.pixel_hw[1]}x"
             f"{world.preset.pixel_hw[0]} at {world.preset.fps:g} fps, device {device}, "
             f"{'CURVE' if config.curve_dir else 'loopback, no encryption'})")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        while not stop.wait(0.2):
            if not all(t.is_alive() for t in server._threads):
                raise RuntimeError("an engine thread died; see the traceback above")
    finally:
        server.stop()

