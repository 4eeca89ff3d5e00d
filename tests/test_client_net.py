"""The network side of the window, as plain code: which `keys` message goes out when, and frame decoding."""

import io

import numpy as np
from PIL import Image

from client.net import EngineLink, KeySender
from protocol import FrameHeader, ProtocolError, Status, encode, encode_frame


def test_key_sender_sends_changes_at_once_and_the_full_set_every_tick():
    ks = KeySender(tick_s=1 / 30)
    assert ks.set({"forward"}, 0.0) is None  # no session yet: nothing to send
    assert ks.due(0.0) is None
    ks.enable(True, 0.0)
    m = ks.due(0.0)
    assert m.seq == 1 and m.held == {"forward"}  # the current state at once
    assert ks.due(0.01) is None  # not due before the tick
    m = ks.due(0.034)
    assert m.seq == 2 and m.held == {"forward"}
    seq = ks.set({"forward", "yaw_left"}, 0.04)
    assert seq == 3
    ks.set_last_shown(12)
    assert ks.set({"forward", "yaw_left"}, 0.041) is None  # unchanged
    m = ks.due(0.041)  # a change goes out without waiting for the tick
    assert (m.seq, m.held, m.client_time) == (3, {"forward", "yaw_left"}, 0.04)
    assert ks.set(set(), 0.05) == 4 and ks.set({"back"}, 0.051) == 4  # merged into the message not sent yet
    m = ks.due(0.052)
    assert (m.seq, m.held) == (4, {"back"})
    m = ks.due(0.1)
    assert m.seq == 5 and m.last_shown_frame == 12  # one higher per message, always the full set


def _header(encoding: str, payload: bytes, h: int = 12, w: int = 20) -> FrameHeader:
    return FrameHeader(
        session_id="20261127-000000-000-abcdef",
        index=3,
        chunk=0,
        pose=tuple(np.eye(4).reshape(16)),
        encoding=encoding,
        width=w,
        height=h,
        payload_bytes=len(payload),
        held=frozenset({"forward"}),
        keys_seq=2,
    )


def test_frames_are_decoded_on_the_network_thread_side():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (12, 20, 3), dtype=np.uint8)
    msg, frame = EngineLink._decode(encode_frame(_header("rgb24", img.tobytes()), img.tobytes()))
    assert isinstance(msg, FrameHeader) and (frame == img).all()
    smooth = np.zeros((12, 20, 3), np.uint8)  # JPEG keeps a smooth picture close
    smooth[..., 0] = np.arange(20)[None] * 12
    smooth[..., 1] = np.arange(12)[:, None] * 20
    smooth[..., 2] = 90
    img = smooth
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=95)
    msg, frame = EngineLink._decode(encode_frame(_header("jpeg", buf.getvalue()), buf.getvalue()))
    assert frame.shape == (12, 20, 3) and np.abs(frame.astype(int) - img).mean() < 4
    bad, frame = EngineLink._decode([encode(_header("rgb24", b"x" * 720)), b"x" * 719])  # length mismatch
    assert isinstance(bad, ProtocolError) and frame is None
    status, frame = EngineLink._decode([encode(Status(state="running"))])
    assert isinstance(status, Status) and frame is None
