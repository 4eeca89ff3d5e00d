"""The engine server over real sockets: `sana-wm engine` in a subprocess (tiny preset, CPU), driven by the
headless client and by hand-made hostile messages."""

import io
import os
import signal
import stat
import threading
import time

import av
import msgpack
import numpy as np
import pytest
from PIL import Image

from client.headless import HeadlessError, connect, parse_action, recv_message, run_headless
from engine.cli import main
from engine.controls import parse_action as engine_parse_action
from engine.errors import InputError
from engine.recording import SessionDir, frame_controls
from engine.rollout import ScriptedControls
from engine.server import EngineServer, JitPolicy, ServerConfig, check_bind, generate_keys, is_loopback
from engine.session import Session
from engine.spawn import spawn_engine
from engine.world import build_world
from protocol import (
    PROTOCOL_VERSION,
    Control,
    Credit,
    Dropped,
    Ended,
    Error,
    FrameHeader,
    Hello,
    Keys,
    Start,
    Status,
    Watch,
    Welcome,
    encode,
)

PROMPT = "a quiet street at dusk"
ACTION = "w-24,ja-24,ik-24"  # key changes on chunk boundaries: the live path applies keys per chunk
HEARTBEAT_S = 1.5


def _png(seed=0, hw=(150, 260)) -> bytes:
    rng = np.random.default_rng(seed)
    img = (rng.random((*hw, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """(address, record_root) of `sana-wm engine` running in a subprocess."""
    root = tmp_path_factory.mktemp("recordings")
    cmd = ["--bind", "tcp://127.0.0.1:0", "--record-root", str(root),
           "--quality", "preview", "--heartbeat-timeout", str(HEARTBEAT_S), "--sndhwm", "4",
           "--max-queued-frames", "16", "--max-sessions", "8"]
    proc, address = spawn_engine(cmd)
    yield address, root
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0


@pytest.fixture(scope="module")
def world():
    return build_world("tiny", with_refiner=False)


def _reference(world, action, seed):
    return _reference_from(world, action, seed, _png())


def _reference_from(world, action, seed, image):
    ctl = ScriptedControls.from_action(action, "v2")
    session = Session.create(world, first_image=image, prompt=PROMPT, seed=seed, record_root=None, controls=ctl)
    chunks = []
    while (c := session.step()) is not None:
        chunks.append(c)
    return chunks


@pytest.fixture(scope="module")
def reference(world):
    """The chunks of ACTION (seed 7) from an in-process session over the same tiny world."""
    return _reference(world, ACTION, seed=7)


def test_lossless_client_gets_every_frame_equal_to_in_process_rollout(engine, reference, tmp_path):
    address, root = engine
    mp4 = tmp_path / "out.mp4"
    r = run_headless(address, _png(), PROMPT, ACTION, lossless=True, seed=7, timeout=60, out_mp4=mp4)
    ref = reference
    n = sum(c.frames.shape[0] for c in ref)
    assert r.indices == list(range(n)) and r.dropped == 0
    assert r.ended is not None and r.ended.reason == "stopped" and r.ended.frames == n
    assert np.array_equal(np.stack(r.frames), np.concatenate([c.frames for c in ref]))
    assert np.array_equal(r.pose_array, np.concatenate([c.poses for c in ref]))
    # the keys the engine applied are the ones the client posted, and the DSL's
    expected = [frozenset()] + [h for c in ref for h in c.controls]
    assert r.held == expected
    assert r.held[1:] == parse_action(ACTION)
    for seq, held in zip(r.keys_seq[1:], r.held[1:], strict=True):
        assert seq >= 0 and r.posted[seq] == held
    assert len(set(r.keys_seq[1:])) == len(ref)  # one key sample per chunk
    assert len(r.chunk_seconds) == len(ref) and all(t > 0 for t in r.chunk_seconds)
    # the recording holds exactly the applied controls
    records = SessionDir.open(root / r.session_id).scan_actions().records
    assert frame_controls(records) == r.held[1:]
    with av.open(str(mp4)) as f:  # the client's own mp4 of what it received
        decoded = [fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)]
    assert len(decoded) == n and decoded[0].shape == r.frames[0].shape
    luma = np.array([0.299, 0.587, 0.114], np.float32)  # chroma is subsampled (yuv420p); compare luma
    err = [np.abs(decoded[i] @ luma - r.frames[i] @ luma).mean() for i in (0, n - 1)]
    assert max(err) < 8.0 < np.abs(decoded[-1] @ luma - r.frames[0] @ luma).mean()


def test_client_dsl_parser_matches_the_engine():
    from protocol import letters_to_controls

    action = "w-3, JW-2,none-1,ik-4，d-1"
    for keymap in ("v1", "v2"):
        ours = parse_action(action, keymap)
        theirs = [frozenset().union(*(letters_to_controls(ch, keymap) for ch in f))
                  for f in engine_parse_action(action)]
        assert ours == theirs
    for bad in ("", "w", "w-0", "q-3", "w--3"):
        with pytest.raises(ValueError):
            parse_action(bad)


def _raw(sock, parts, timeout=10.0):
    """Send raw parts; return the first error reply."""
    sock.send_multipart(parts)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        msg, _ = recv_message(sock, 0.5)
        if isinstance(msg, Error):
            return msg
    raise AssertionError("no error reply")


def _packed(**body):
    return msgpack.packb({"v": PROTOCOL_VERSION, **body}, use_bin_type=True)


def test_bad_messages_get_errors_naming_the_field_while_another_session_runs(engine):
    address, _ = engine
    started = threading.Event()
    out = {}

    def driver():
        try:
            out["result"] = run_headless(address, _png(1), PROMPT, "w-24,d-24,w-24,s-24", lossless=True, timeout=90,
                                         on_frame=lambda h, f: started.set())
        except Exception as e:  # surfaced by the assert below
            out["error"] = e
            started.set()

    t = threading.Thread(target=driver)
    t.start()
    assert started.wait(60)
    sock = connect(address)
    try:
        e = _raw(sock, [encode(Keys(seq=1))])
        assert (e.code, e.field) == ("bad_state", "type")  # before hello
        e = _raw(sock, [b"\xc1 not msgpack"])
        assert (e.code, e.field) == ("malformed", "message")
        e = _raw(sock, [encode(Hello()), b"extra"])
        assert (e.code, e.field) == ("malformed", "message")
        e = _raw(sock, [msgpack.packb({"type": "hello", "v": PROTOCOL_VERSION + 1})])
        assert (e.code, e.field) == ("version", "v")
        e = _raw(sock, [_packed(type="teleport")])
        assert (e.code, e.field) == ("unknown_type", "type")
        sock.send(encode(Hello()))
        assert isinstance(recv_message(sock, 10)[0], Welcome)
        e = _raw(sock, [_packed(type="keys", seq=2, held=["forward", "jump"])])
        assert (e.code, e.field) == ("invalid_field", "held[1]")
        e = _raw(sock, [_packed(type="start", image=_png(), prompt="x", intrinsics=[100.0, float("nan"), 1.0, 1.0])])
        assert (e.code, e.field) == ("invalid_field", "intrinsics[1]")
        e = _raw(sock, [_packed(type="start", image=_png(), prompt="x", intrinsics=[-5.0, 100.0, 1.0, 1.0])])
        assert (e.code, e.field) == ("invalid_field", "intrinsics[0]")
        e = _raw(sock, [encode(Start(image=b"\x89PNG\r\n\x1a\n garbage", prompt="x"))])
        assert (e.code, e.field) == ("invalid_field", "image")
        e = _raw(sock, [encode(Start(image=_png(hw=(1, 9000)), prompt="x"))])  # absurd size
        assert (e.code, e.field) == ("invalid_field", "image")
        e = _raw(sock, [_packed(type="start", image=_png(), prompt="x", seed=-1)])
        assert (e.code, e.field) == ("invalid_field", "seed")
        e = _raw(sock, [_packed(type="start", image=_png(), prompt="x", colour="red")])
        assert (e.code, e.field) == ("unknown_field", "colour")
        e = _raw(sock, [_packed(type="credit", frames=10)])
        assert (e.code, e.field) == ("bad_state", "frames")  # live delivery has no credit
        e = _raw(sock, [encode(Watch(session_id="20990101-000000-000-abcdef"))])
        assert (e.code, e.field) == ("bad_state", "type")  # a driver does not watch
    finally:
        sock.close()
    t.join(90)
    assert "error" not in out, out.get("error")
    r = out["result"]
    assert r.indices == list(range(97)) and r.ended.reason == "stopped" and not r.errors


def test_slow_live_spectator_loses_frames_and_is_told(engine):
    address, root = engine
    first = threading.Event()
    out = {}

    def driver():
        out["result"] = run_headless(address, _png(2), PROMPT, "w-240", lossless=True, timeout=120,
                                     on_frame=lambda h, f: (out.setdefault("sid", h.session_id), first.set()))

    t = threading.Thread(target=driver)
    t.start()
    assert first.wait(60)
    spy = connect(address, rcvhwm=2)
    try:
        spy.send(encode(Hello(role="spectator")))
        assert isinstance(recv_message(spy, 10)[0], Welcome)
        spy.send(encode(Watch(session_id=out["sid"])))
        watched = recv_message(spy, 10)[0]
        assert isinstance(watched, Status) and watched.session_id == out["sid"]
        seq = 0
        while t.is_alive():  # heartbeats only: never read while the session runs
            seq += 1
            spy.send(encode(Keys(seq=seq, held=frozenset({"forward"}))))  # ignored: spectators never control
            time.sleep(0.3)
        t.join()
        frames, dropped, ended, statuses = [], [], None, []
        while ended is None:
            msg, _ = recv_message(spy, 10)
            assert msg is not None, "the spectator never got 'ended'"
            if isinstance(msg, FrameHeader):
                frames.append(msg.index)
            elif isinstance(msg, Dropped):
                dropped.append(msg)
            elif isinstance(msg, Status):
                statuses.append(msg)
            elif isinstance(msg, Ended):
                ended = msg
    finally:
        spy.close()
    r = out["result"]
    assert r.indices == list(range(241)) and r.dropped == 0  # the lossless driver lost nothing
    assert r.held[1:] == [frozenset({"forward"})] * 240
    assert dropped, "a spectator that did not read lost no frames"
    total = dropped[-1].total
    assert all(b.total == a.total + b.count for a, b in zip(dropped, dropped[1:], strict=False))
    assert frames == sorted(frames) and len(set(frames)) == len(frames)
    assert len(frames) + total == ended.frames - watched.frames  # every frame after joining: shown or counted
    assert frames[-1] == ended.frames - 1  # the newest frames are kept, the oldest dropped
    records = SessionDir.open(root / r.session_id).scan_actions().records
    assert frame_controls(records) == r.held[1:]  # the recording lost nothing either


def test_silent_client_session_is_paused_with_a_snapshot_and_resumable(engine, world):
    address, root = engine
    r = run_headless(address, _png(3), PROMPT, "w-24", lossless=True, stop=False, timeout=60)
    assert r.indices == list(range(25)) and r.ended is None
    sdir = SessionDir.open(root / r.session_id)
    deadline = time.monotonic() + HEARTBEAT_S + 20
    while time.monotonic() < deadline and not (sdir.snapshot_chunks() and sdir.read_manifest().status == "paused"):
        time.sleep(0.2)
    assert sdir.snapshot_chunks() == [0]
    assert sdir.read_manifest().status == "paused"
    # another client takes the paused session over and continues it exactly
    action = "w-24,d-24"
    r2 = run_headless(address, None, None, action, resume=r.session_id, timeout=60)
    assert r2.session_id == r.session_id and r2.indices == list(range(25, 49))
    ref = _reference_from(world, action, seed=0, image=_png(3))
    assert np.array_equal(np.stack(r2.frames), ref[1].frames)
    assert np.array_equal(r2.pose_array, ref[1].poses)
    assert r2.held == [frozenset({"yaw_right"})] * 24
    records = sdir.scan_actions().records
    assert frame_controls(records) == parse_action(action)
    assert any(rec["t"] == "pause" for rec in records)


def test_driver_controls_pause_prompt_and_stop(engine):
    address, root = engine
    sock = connect(address)

    def until(kind, timeout=30.0, keys=None):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if keys is not None:
                sock.send(encode(keys))
            msg, pixels = recv_message(sock, 0.2)
            if isinstance(msg, kind):
                return msg
            assert not isinstance(msg, (Error, FrameHeader)), msg
        return None

    try:
        sock.send(encode(Hello(delivery="lossless")))
        assert until(Welcome) is not None
        sock.send(encode(Start(image=_png(5), prompt=PROMPT)))
        running = until(Status)
        while running.state != "running":
            running = until(Status)
        sid = running.session_id
        sock.send(encode(Keys(seq=1, held=frozenset({"forward"}))))
        sock.send(encode(Credit(frames=25)))
        got = []
        while len(got) < 25:
            msg, _ = recv_message(sock, 30)
            assert msg is not None and not isinstance(msg, Error), msg
            if isinstance(msg, FrameHeader):
                got.append(msg)
        sock.send(encode(Control(action="set_prompt", prompt="a beach at noon")))
        sock.send(encode(Control(action="pause")))
        paused = until(Status)
        while paused.note != "paused by the driver":
            paused = until(Status)
        assert paused.state == "paused" and paused.frames == 25
        sock.send(encode(Credit(frames=24)))
        assert until(FrameHeader, timeout=1.0, keys=Keys(seq=2, held=frozenset({"back"}))) is None  # paused
        sock.send(encode(Control(action="set_quality", quality="full")))
        e = until(Error)
        assert (e.code, e.field) == ("bad_state", "quality")
        sock.send(encode(Control(action="resume")))
        first = None
        while first is None or first.index < 48:
            msg, _ = recv_message(sock, 30)
            if isinstance(msg, FrameHeader):
                first = msg
                assert msg.held == frozenset({"back"}) and msg.keys_seq == 2
        sock.send(encode(Control(action="stop")))
        ended = until(Ended)
        assert ended.session_id == sid and ended.reason == "stopped" and ended.frames == 49
    finally:
        sock.close()
    assert [m.index for m in got] == list(range(25))
    sdir = SessionDir.open(root / sid)
    records = sdir.scan_actions().records
    assert {"t": "prompt", "i": 25, "prompt": "a beach at noon"} in records
    assert {"t": "pause", "i": 25} in records
    assert {"t": "resume", "i": 25} in records
    assert records.index({"t": "pause", "i": 25}) < records.index({"t": "resume", "i": 25})
    assert sdir.read_manifest().status == "stopped"


def test_jpeg_encoding(engine, reference):
    address, _ = engine
    r = run_headless(address, _png(), PROMPT, ACTION[:4], encodings=("jpeg", "rgb24"), seed=7, timeout=60)
    assert r.welcome.encoding == "jpeg" and r.indices == list(range(25))
    ref = reference[0].frames  # ACTION's first chunk is the same 24 frames of "w"
    for got, want in zip(r.frames, ref, strict=True):  # the reference frame through the same JPEG round trip
        buf = io.BytesIO()
        Image.fromarray(want).save(buf, format="JPEG", quality=ServerConfig().jpeg_quality)
        assert np.array_equal(got, np.asarray(Image.open(buf).convert("RGB")))


def test_live_driver_is_scheduled_just_in_time(engine):
    address, _ = engine
    r = run_headless(address, _png(4), PROMPT, "w-24,a-24", lossless=False, timeout=60)
    assert r.indices == list(range(49)) and r.dropped == 0
    assert r.held[25:] == [frozenset({"yaw_left"})] * 24
    (s0, r0), (s1, r1) = r.chunk_times
    # Chunk 1 waits until the client's buffer (chunk 0's frames, played from their arrival) would run dry
    # within the predicted latency (chunk 0's time, the first measurement) plus the margin.
    due = len(r.held[:25]) / r.welcome.fps - (r0 - s0) - ServerConfig().jit_margin_s
    assert due - 0.15 <= s1 - r0 <= max(due, 0.0) + 1.0, (due, r.chunk_times)


def test_jit_policy():
    p = JitPolicy(fps=16.0, margin_s=0.25, latency_s=0.5)
    assert p.delay_s(-1, -1) == 0.0  # nothing sent: start now
    assert p.buffer_s(24, -1) == pytest.approx(25 / 16)
    assert p.delay_s(24, -1) == pytest.approx(25 / 16 - 0.75)
    assert p.delay_s(24, -1, age_s=0.5) == pytest.approx(25 / 16 - 0.75 - 0.5)  # it kept playing meanwhile
    assert p.delay_s(24, -1, age_s=10.0) == 0.0
    assert p.delay_s(24, 30) == 0.0  # shown past what was sent: empty buffer
    assert p.delay_s(24, 20) == 0.0  # 4 frames = 0.25 s left < latency + margin
    p.observe(2.0)  # the first measurement replaces the prior
    assert p.latency_s == 2.0 and p.delay_s(24, -1) == 0.0
    p.observe(1.0)
    assert p.latency_s == pytest.approx(0.7 * 2.0 + 0.3 * 1.0)
    slow, fast = JitPolicy(16.0, latency_s=1.0), JitPolicy(16.0, latency_s=0.1)
    assert slow.delay_s(40, 0) < fast.delay_s(40, 0)  # slower chunks start earlier


def test_non_loopback_bind_needs_curve_keys(world, capsys):
    assert is_loopback("tcp://127.0.0.1:5555") and is_loopback("tcp://localhost:1") and is_loopback("tcp://[::1]:1")
    assert is_loopback("ipc:///tmp/x")
    for ep in ("tcp://0.0.0.0:5555", "tcp://*:5555", "tcp://192.168.1.4:5555", "tcp://eth0:5555"):
        assert not is_loopback(ep)
        with pytest.raises(InputError, match="--curve-dir"):
            check_bind(ep, None)
    with pytest.raises(InputError, match="sana-wm keys"):
        EngineServer(world, ServerConfig(bind="tcp://0.0.0.0:0"))
    assert main(["engine", "--bind", "tcp://0.0.0.0:0"]) == 2
    assert "refusing to bind 'tcp://0.0.0.0:0'" in capsys.readouterr().err


def test_curve_handshake_on_loopback(world, tmp_path):
    keys = tmp_path / "keys"
    assert main(["keys", str(keys)]) == 0
    for name in ("server", "client"):
        assert stat.S_IMODE(os.stat(keys / f"{name}.key_secret").st_mode) == 0o600
    assert main(["keys", str(keys)]) == 2  # never overwrites
    stranger = generate_keys(tmp_path / "stranger")
    server = EngineServer(world, ServerConfig(bind="tcp://127.0.0.1:0", curve_dir=keys, record_root=None,
                                              qualities=("preview",)))
    address = server.start()
    try:
        r = run_headless(address, _png(), PROMPT, "w-24", curve_dir=keys, timeout=60)
        assert r.indices == list(range(25)) and r.ended.reason == "stopped"
        with pytest.raises(HeadlessError, match="no answer"):  # plain text: no handshake
            run_headless(address, _png(), PROMPT, "w-24", timeout=1.5)
        outsider = tmp_path / "outsider"  # the server's public key, a client key it does not admit
        outsider.mkdir()
        (outsider / "server.key").write_bytes((keys / "server.key").read_bytes())
        (outsider / "client.key_secret").write_bytes(stranger["client_secret"].read_bytes())
        with pytest.raises(HeadlessError, match="no answer"):
            run_headless(address, _png(), PROMPT, "w-24", curve_dir=outsider, timeout=1.5)
    finally:
        server.stop()


def test_a_binary_map_key_gets_an_error_and_the_engine_keeps_serving(engine):
    """msgpack's strict_map_key still admits bin keys: such a message once killed the IO thread."""
    address, _ = engine
    sock, other = connect(address), connect(address)
    try:
        e = _raw(sock, [msgpack.packb({"type": "hello", "v": PROTOCOL_VERSION, b"x": 1}, use_bin_type=True)])
        assert e.code == "malformed" and e.field == "message"
        other.send(encode(Hello()))
        assert isinstance(recv_message(other, 10)[0], Welcome)
    finally:
        sock.close()
        other.close()


def test_engine_keeps_serving_after_fuzz(engine):
    """Random bytes and random maps: each gets one error reply, and the engine still answers hello."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    address, _ = engine
    sock = connect(address)
    values = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(), st.text(max_size=8),
                       st.binary(max_size=8), st.lists(st.text(max_size=8), max_size=3))
    messages = st.one_of(
        st.binary(max_size=64),
        st.dictionaries(st.sampled_from(["type", "v", "seq", "held", "image", "frames", "x"]), values, max_size=4)
        .map(lambda d: msgpack.packb(d, use_bin_type=True)),
        st.dictionaries(st.one_of(st.binary(max_size=4), st.integers(0, 9)), values, min_size=1, max_size=3)
        .map(lambda d: msgpack.packb({"type": "hello", "v": PROTOCOL_VERSION, **d}, use_bin_type=True,
                                     strict_types=False)),
        st.builds(lambda t, d: msgpack.packb({"type": t, "v": PROTOCOL_VERSION, **d}, use_bin_type=True),
                  st.sampled_from(["start", "keys", "control", "credit", "watch", "frame", "resume", "branch"]),
                  st.dictionaries(st.sampled_from(["seq", "held", "action", "frames", "session_id", "chunk"]),
                                  values, max_size=3)),
    )

    @hypothesis.settings(max_examples=60, deadline=None, database=None)
    @hypothesis.given(messages)
    def fuzz(data):
        sock.send(data)
        msg, _ = recv_message(sock, 10)
        assert isinstance(msg, Error) and msg.field, msg

    sock.send(encode(Hello()))
    assert isinstance(recv_message(sock, 10)[0], Welcome)

    try:
        fuzz()
        sock.close()
        sock = connect(address)
        sock.send(encode(Hello()))
        assert isinstance(recv_message(sock, 10)[0], Welcome)
    finally:
        sock.close()


def test_a_driver_back_after_its_session_was_taken_can_start_again(engine):
    """A silent driver's session is paused; another client resumes it; the first driver, back, is free."""
    from protocol import Resume

    address, _ = engine
    first, second = connect(address), connect(address)

    def until(sock, kind, timeout=30.0, ok=lambda m: True):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            msg, _ = recv_message(sock, 0.2)
            if isinstance(msg, kind) and ok(msg):
                return msg
        raise AssertionError(f"no {kind}")

    try:
        first.send(encode(Hello()))
        until(first, Welcome)
        first.send(encode(Start(image=_png(5), prompt=PROMPT)))
        sid = until(first, Status, ok=lambda m: m.session_id is not None).session_id
        time.sleep(HEARTBEAT_S * 2.5)  # silent: the engine pauses the session and detaches the driver
        second.send(encode(Hello()))
        until(second, Welcome)
        second.send(encode(Resume(session_id=sid)))
        until(second, Status, ok=lambda m: m.session_id == sid)
        first.send(encode(Hello()))  # back: its old session has another driver now
        assert isinstance(until(first, (Welcome, Error)), Welcome)
        second.send(encode(Control(action="stop")))
        until(second, Ended)
    finally:
        first.close()
        second.close()


def test_a_chunks_frames_are_queued_one_by_one_as_they_are_encoded(world):
    """The encoder queues each frame for its client as soon as it is encoded and wakes the IO thread, so the
    chunk's first frame can go out while the others are still being encoded (it used to wait for all of them)."""
    from types import SimpleNamespace

    from engine.server import Client

    srv = EngineServer(world, ServerConfig(qualities=("preview",)))
    client = srv._clients[b"a"] = Client(ident=b"a", last_seen=0.0)
    n, h, w = 24, 8, 12
    frames = np.arange(n * h * w * 3, dtype=np.uint32).astype(np.uint8).reshape(n, h, w, 3)
    chunk = SimpleNamespace(index=1, frame_start=25, frames=frames, controls=None, key_seq=None,
                            poses=np.repeat(np.eye(4, dtype=np.float32)[None], n, axis=0))
    queued_at_wake = []
    srv._deliver_chunk([b"a"], None, "20261127-062113-243-54508f", chunk, 0.0, 1.0,
                       wake=lambda: queued_at_wake.append(len(client.outbox)))
    assert queued_at_wake == list(range(1, n + 1))
    assert [o.frame_index for o in client.outbox] == list(range(25, 25 + n))
    assert all(o.parts[1] == frames[j].tobytes() for j, o in enumerate(client.outbox))


def test_a_frame_dropped_while_the_head_is_being_sent_is_counted_and_the_sent_one_is_not(world):
    """The IO thread sends the outbox head outside the lock; if the encoder drops frames meanwhile (a live client
    at its limit), the frame being sent must not be the one counted as dropped, and the next one must not vanish
    uncounted when the IO thread then removes what it sent."""
    from engine.server import Client, Outgoing

    srv = EngineServer(world, ServerConfig(qualities=("preview",)))
    client = srv._clients[b"a"] = Client(ident=b"a", last_seen=0.0)
    for i in range(4):
        client.outbox.append(Outgoing([b"h", bytes([i])], frame_index=i))
    client.queued_frames = 4
    sent = []

    class Router:
        def send_multipart(self, parts, flags=0, copy=True):
            sent.append(parts)
            if len(sent) == 1:  # the encoder drops one frame while frame 0 is on its way
                with srv._lock:
                    srv._drop_oldest(client, 1)

    srv._flush(Router())
    frames = [p[2] for p in sent if len(p) == 3]
    notices = [p for p in sent if len(p) == 2]
    assert frames == [bytes([0]), bytes([2]), bytes([3])]  # frame 0 was sent, frame 1 dropped
    assert client.dropped_total == 1 and client.drop_last == 1 and len(notices) == 1
    assert not client.outbox and client.queued_frames == 0 and client.drop_count == 0 and client.sending is None


def test_a_live_client_at_its_limit_loses_its_oldest_frames_as_the_chunk_is_queued(world):
    """Frames queued one by one keep the live drop rule: the outbox holds at most max(max_queued_frames, chunk)
    frames, the oldest go first (counted), the new chunk's frames all stay."""
    from types import SimpleNamespace

    from engine.server import Client, Outgoing

    srv = EngineServer(world, ServerConfig(qualities=("preview",), max_queued_frames=4))
    client = srv._clients[b"a"] = Client(ident=b"a", last_seen=0.0)
    for i in range(10):
        client.outbox.append(Outgoing([b"h", b"p"], frame_index=i))
    client.queued_frames = 10
    n = 24
    chunk = SimpleNamespace(index=1, frame_start=25, frames=np.zeros((n, 4, 6, 3), np.uint8), controls=None,
                            key_seq=None, poses=np.repeat(np.eye(4, dtype=np.float32)[None], n, axis=0))
    srv._deliver_chunk([b"a"], None, "20261127-062113-243-54508f", chunk, 0.0, 1.0)
    assert [o.frame_index for o in client.outbox] == list(range(25, 25 + n))
    assert client.queued_frames == n and client.dropped_total == 10 and client.drop_last == 9
