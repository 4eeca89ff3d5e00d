"""protocol/: every message round-trips, every refusal names its field, and no bytes make decode raise
anything but ProtocolError. Pure Python: nothing here needs torch."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import protocol as P
from protocol import fields as F
from protocol import limits as L
from protocol.codec import unpack

ROOT = Path(__file__).resolve().parent.parent
SID = "20261127-012227-123-3f9a1c"
POSE = (1.0, 0.0, 0.0, 0.5, 0.0, 1.0, 0.0, -0.25, 0.0, 0.0, 1.0, 2.0, 0.0, 0.0, 0.0, 1.0)

# One valid instance of every message type (the base for the field-by-field error tests).
SAMPLES = {
    "hello": P.Hello(
        client="test-client/1",
        encodings=("jpeg", "rgb24"),
        delivery="lossless",
        role="driver",
        capabilities=("spectate",),
    ),
    "start": P.Start(
        image=b"\x89PNG....",
        prompt="a forest path",
        intrinsics=(500.0, 500.0, 320.0, 240.0),
        seed=7,
        quality="full",
        record=True,
        keymap="v1",
        translation_speed=0.05,
        rotation_speed_deg=1.2,
        pitch_limit_deg=85.0,
    ),
    "keys": P.Keys(seq=12, held=frozenset({"forward", "yaw_left"}), last_shown_frame=40, client_time=1234.5),
    "control": P.Control(action="set_prompt", prompt="night falls"),
    "resume": P.Resume(session_id=SID, chunk=3),
    "branch": P.Branch(session_id=SID, chunk=2),
    "watch": P.Watch(session_id=SID),
    "credit": P.Credit(frames=48),
    "welcome": P.Welcome(
        server="sana-wm-live/0.1.0",
        model="tiny",
        width=128,
        height=64,
        fps=16.0,
        chunk_frames=24,
        encoding="rgb24",
        delivery="live",
        capabilities=("lossless", "spectate"),
    ),
    "frame": P.FrameHeader(
        session_id=SID,
        index=30,
        chunk=1,
        pose=POSE,
        encoding="rgb24",
        width=8,
        height=4,
        payload_bytes=96,
        held=frozenset({"back"}),
        keys_seq=11,
        keys_client_time=1.25,
        t_sampled=10.0,
        t_ready=10.4,
    ),
    "status": P.Status(
        state="running",
        session_id=SID,
        quality="preview",
        chunks=2,
        frames=49,
        dropped=3,
        chunk_seconds=0.8,
        engine_time=99.0,
        note="ok",
    ),
    "error": P.Error(code="invalid_field", field="intrinsics[0]", message="fx must be > 0"),
    "ended": P.Ended(session_id=SID, reason="stopped", chunks=4, frames=97, message="bye"),
    "dropped": P.Dropped(count=5, total=9, last_index=77),
}


def wire(msg) -> dict:
    return msgpack.unpackb(P.encode(msg), raw=False)


def pack(d) -> bytes:
    return msgpack.packb(d, use_bin_type=True)


def test_samples_cover_every_type():
    assert set(SAMPLES) == set(P.MESSAGE_TYPES)
    for tag, msg in SAMPLES.items():
        assert msg.TYPE == tag


# ---- round trip (hypothesis, strategies derived from the field specs) ---------------------------


def strategy(spec):
    if isinstance(spec, F.Int):
        return st.integers(spec.lo, spec.hi)
    if isinstance(spec, F.Float):
        lo = max(spec.lo, -1e300)
        return st.floats(lo, min(spec.hi, 1e300), allow_nan=False, exclude_min=spec.lo_open)
    if isinstance(spec, F.Bool):
        return st.booleans()
    if isinstance(spec, F.Str):
        if spec.choices is not None:
            return st.sampled_from(spec.choices)
        if spec.pattern is not None:
            return st.from_regex(spec.pattern, fullmatch=True).filter(lambda s: len(s) <= spec.max_chars)
        return st.text(min_size=spec.min_chars, max_size=min(spec.max_chars, 40))
    if isinstance(spec, F.Bytes):
        return st.binary(min_size=max(spec.min_bytes, 0), max_size=64)
    if isinstance(spec, F.Optional):
        return st.none() | strategy(spec.inner)
    if isinstance(spec, F.Tuple):
        items = st.lists(strategy(spec.item), min_size=spec.min_len, max_size=min(spec.max_len, 8), unique=spec.unique)
        return items.map(tuple)
    if isinstance(spec, F.Controls):
        return st.frozensets(st.sampled_from(P.CONTROLS))
    raise AssertionError(f"no strategy for {spec!r}")


# Fields whose valid values are a tiny subset of their spec's (cross-field rules).
OVERRIDES = {
    ("frame", "pose"): st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=12, max_size=12).map(
        lambda v: tuple(v) + (0.0, 0.0, 0.0, 1.0)
    ),
}


@st.composite
def messages(draw, tag):
    cls = P.MESSAGE_TYPES[tag]
    kwargs = {}
    for f in dataclasses.fields(cls):
        kwargs[f.name] = draw(OVERRIDES.get((tag, f.name), strategy(f.metadata["spec"])))
    if tag == "frame" and kwargs["encoding"] == "rgb24":
        kwargs["payload_bytes"] = kwargs["width"] * kwargs["height"] * 3
    try:
        return cls(**kwargs)
    except P.ProtocolError:  # a cross-field rule (control needs prompt, dropped total >= count)
        assume(False)


@pytest.mark.parametrize("tag", sorted(P.MESSAGE_TYPES))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(data=st.data())
def test_round_trip(tag, data):
    msg = data.draw(messages(tag))
    encoded = P.encode(msg)
    back = P.decode(encoded)
    assert type(back) is type(msg)
    assert back == msg
    assert P.encode(back) == encoded  # canonical: control sets in CONTROLS order, fields in declaration order
    body = msgpack.unpackb(encoded, raw=False)
    assert body["type"] == tag and body["v"] == P.PROTOCOL_VERSION


def test_frame_parts_round_trip():
    hdr = SAMPLES["frame"]
    pixels = bytes(range(96))
    parts = P.encode_frame(hdr, pixels)
    msg, got = P.decode_parts(parts)
    assert msg == hdr and got == pixels
    msg, got = P.decode_parts([P.encode(SAMPLES["keys"])])
    assert msg == SAMPLES["keys"] and got is None


def test_optional_fields_may_be_omitted():
    msg = P.decode(pack({"type": "keys", "v": P.PROTOCOL_VERSION, "seq": 5}))
    assert msg == P.Keys(seq=5, held=frozenset(), last_shown_frame=-1, client_time=0.0)
    msg = P.decode(pack({"type": "start", "v": 1, "image": b"png", "prompt": "p", "intrinsics": None}))
    assert msg.intrinsics is None and msg.quality == "preview" and msg.keymap == "v2"


# ---- field-by-field validation -----------------------------------------------------------------

# Values no field accepts: each must be refused naming the field it was put in.
NEVER_VALID = [{"a": 1}, ["x"] * 100]


def _decode_error(body) -> P.ProtocolError:
    with pytest.raises(P.ProtocolError) as info:
        P.decode(pack(body))
    return info.value


@pytest.mark.parametrize("tag", sorted(P.MESSAGE_TYPES))
def test_every_field_is_validated_by_name(tag):
    base = wire(SAMPLES[tag])
    for name in base:
        if name in ("type", "v"):
            continue
        for bad in NEVER_VALID:
            err = _decode_error({**base, name: bad})
            assert err.code in ("invalid_field", "too_large"), (name, err)
            if err.code == "invalid_field":
                assert err.field == name or err.field.startswith(name + "["), (name, err)


@pytest.mark.parametrize("tag", sorted(P.MESSAGE_TYPES))
def test_missing_and_unknown_fields_are_named(tag):
    base = wire(SAMPLES[tag])
    cls = P.MESSAGE_TYPES[tag]
    for f in dataclasses.fields(cls):
        if f.default is dataclasses.MISSING:
            body = {k: v for k, v in base.items() if k != f.name}
            err = _decode_error(body)
            assert (err.code, err.field) == ("missing_field", f.name)
    err = _decode_error({**base, "colour": 1})
    assert (err.code, err.field) == ("unknown_field", "colour")


@pytest.mark.parametrize(
    "tag, field, value, want_field",
    [
        ("start", "intrinsics", [float("nan"), 500.0, 320.0, 240.0], "intrinsics[0]"),
        ("start", "intrinsics", [500.0, -1.0, 320.0, 240.0], "intrinsics[1]"),
        ("start", "intrinsics", [0.0, 500.0, 320.0, 240.0], "intrinsics[0]"),
        ("start", "intrinsics", [500.0, 500.0, -3.0, 240.0], "intrinsics[2]"),
        ("start", "intrinsics", [500.0, 500.0, 320.0, float("inf")], "intrinsics[3]"),
        ("start", "intrinsics", [500.0, 500.0, 320.0], "intrinsics"),
        ("start", "image", b"", "image"),
        ("start", "quality", "ultra", "quality"),
        ("start", "keymap", "v3", "keymap"),
        ("start", "seed", -1, "seed"),
        ("start", "seed", 1 << 63, "seed"),
        ("start", "record", 1, "record"),
        ("start", "prompt", "x" * (L.MAX_PROMPT_CHARS + 1), "prompt"),
        ("start", "pitch_limit_deg", 90.5, "pitch_limit_deg"),
        ("start", "translation_speed", 0.0, "translation_speed"),
        ("keys", "held", ["forward", "jump"], "held[1]"),
        ("keys", "held", ["forward", "forward"], "held[1]"),
        ("keys", "held", "forward", "held"),
        ("keys", "seq", True, "seq"),
        ("keys", "seq", 1.0, "seq"),
        ("keys", "last_shown_frame", -2, "last_shown_frame"),
        ("keys", "client_time", float("nan"), "client_time"),
        ("control", "action", "explode", "action"),
        ("control", "prompt", None, "prompt"),  # set_prompt without a prompt
        ("frame", "pose", list(POSE[:12]) + [0.0, 0.0, 1.0, 1.0], "pose"),
        ("frame", "pose", list(POSE[:15]), "pose"),
        ("frame", "pose", list(POSE[:5]) + [float("nan")] + list(POSE[6:]), "pose[5]"),
        ("frame", "payload_bytes", 95, "payload_bytes"),  # rgb24: must be w*h*3
        ("frame", "width", 0, "width"),
        ("frame", "width", L.MAX_SIDE + 1, "width"),
        ("resume", "session_id", "../../etc", "session_id"),
        ("resume", "session_id", SID + "/x", "session_id"),
        ("hello", "encodings", [], "encodings"),
        ("hello", "encodings", ["rgb24", "rgb24"], "encodings[1]"),
        ("hello", "encodings", ["png"], "encodings[0]"),
        ("hello", "client", "", "client"),
        ("error", "code", "oops", "code"),
        ("dropped", "total", 2, "total"),  # total < count
        ("credit", "frames", 0, "frames"),
    ],
)
def test_specific_refusals_name_the_field(tag, field, value, want_field):
    err = _decode_error({**wire(SAMPLES[tag]), field: value})
    assert err.code == "invalid_field"
    assert err.field == want_field, err


def test_control_rules():
    assert P.Control(action="pause").prompt is None
    assert P.Control(action="set_quality", quality="full").quality == "full"
    with pytest.raises(P.ProtocolError) as info:
        P.Control(action="pause", quality="full")
    assert info.value.field == "quality"


def test_envelope_errors():
    base = wire(SAMPLES["keys"])
    err = _decode_error({**base, "v": 2})
    assert (err.code, err.field) == ("version", "v")
    for v in (True, 1.0, "1"):
        err = _decode_error({**base, "v": v})
        assert (err.code, err.field) == ("version", "v")
    err = _decode_error({k: v for k, v in base.items() if k != "v"})
    assert (err.code, err.field) == ("missing_field", "v")
    err = _decode_error({**base, "type": "teleport"})
    assert (err.code, err.field) == ("unknown_type", "type")
    err = _decode_error({k: v for k, v in base.items() if k != "type"})
    assert (err.code, err.field) == ("missing_field", "type")
    for not_a_map in ([1, 2], "keys", 3, None):
        with pytest.raises(P.ProtocolError) as info:
            P.decode(pack(not_a_map))
        assert info.value.code == "malformed" and info.value.field == "message"


def test_oversize_is_refused_before_unpacking():
    with pytest.raises(P.ProtocolError) as info:
        P.decode(b"\x00" * (P.MAX_MESSAGE_BYTES + 1))
    assert info.value.code == "too_large"
    # An image one byte over its limit: refused by the msgpack bin limit.
    body = {**wire(SAMPLES["start"]), "image": b"\x00" * (P.MAX_IMAGE_BYTES + 1)}
    with pytest.raises(P.ProtocolError) as info:
        P.decode(pack(body))
    assert info.value.code == "too_large"
    # A long array (e.g. a 10**4-entry pose) never gets materialised.
    with pytest.raises(P.ProtocolError) as info:
        P.decode(pack({**wire(SAMPLES["frame"]), "pose": [0.0] * 10_000}))
    assert info.value.code == "too_large"
    # encode refuses to produce what the other side would refuse.
    with pytest.raises(P.ProtocolError):
        P.Start(image=b"\x00" * (P.MAX_IMAGE_BYTES + 1), prompt="")


def test_strict_msgpack_options():
    base = wire(SAMPLES["keys"])
    ext = msgpack.packb({**base, "client_time": msgpack.ExtType(5, b"abc")}, use_bin_type=True)
    timestamp = msgpack.packb({**base, "client_time": msgpack.Timestamp(1, 0)}, use_bin_type=True)
    int_key = msgpack.packb({**base, 7: 1}, use_bin_type=True)
    trailing = P.encode(SAMPLES["keys"]) + b"\x00"
    bad_utf8 = P.encode(SAMPLES["keys"]).replace(b"forward", b"forw\xffrd")
    nested = b"\x91" * 100_000 + b"\x00"
    for data in (ext, timestamp, int_key, trailing, bad_utf8, nested, b"", b"\xc1"):
        with pytest.raises(P.ProtocolError) as info:
            P.decode(data)
        assert info.value.code in ("malformed", "too_large"), data[:20]
    assert unpack(P.encode(SAMPLES["keys"]))["seq"] == 12


def test_decode_parts_checks_pixels_against_header():
    hdr = P.encode(SAMPLES["frame"])
    for parts in ([hdr], [hdr, b"\x00" * 95], [P.encode(SAMPLES["keys"]), b"x"], [], [hdr, b"x", b"y"], b"x"):
        with pytest.raises(P.ProtocolError):
            P.decode_parts(parts)
    with pytest.raises(P.ProtocolError) as info:
        P.encode_frame(SAMPLES["frame"], b"\x00" * 10)
    assert info.value.field == "payload_bytes"


def test_error_reply_from_exception():
    try:
        P.decode(pack({**wire(SAMPLES["keys"]), "held": ["jump"]}))
    except P.ProtocolError as e:
        reply = P.decode(P.encode(P.error_from(e)))
    assert (reply.code, reply.field) == ("invalid_field", "held[0]")
    assert "jump" in reply.message


# ---- fuzz: decode raises ProtocolError and nothing else ----------------------------------------

msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(1 << 63), (1 << 64) - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20,
)


def _decode_only_protocol_errors(data):
    try:
        msg = P.decode(data)
    except P.ProtocolError as e:
        assert e.code in P.ERROR_CODES and e.field
        return
    assert P.decode(P.encode(msg)) == msg  # whatever is accepted is a valid message


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_garbage_bytes(data):
    _decode_only_protocol_errors(data)


@settings(max_examples=400, deadline=None)
@given(
    tag=st.sampled_from(sorted(P.MESSAGE_TYPES) + ["nope"]),
    version=st.sampled_from([1, 1, 1, 0, 2, "1"]),
    fields=st.dictionaries(st.text(max_size=12), msgpack_values, max_size=6),
    data=st.data(),
)
def test_fuzz_structured(tag, version, fields, data):
    body = {**fields, "type": tag, "v": version}
    if tag in SAMPLES and data.draw(st.booleans()):  # start from a valid message, overwrite some fields
        names = [n for n in wire(SAMPLES[tag]) if n not in ("type", "v")]
        body = {**wire(SAMPLES[tag]), "v": version}
        for name in data.draw(st.lists(st.sampled_from(names), max_size=3)):
            body[name] = data.draw(msgpack_values)
    _decode_only_protocol_errors(pack(body))


@settings(max_examples=300, deadline=None)
@given(
    tag=st.sampled_from(sorted(SAMPLES)),
    cut=st.integers(0, 10_000),
    flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
)
def test_fuzz_mutated_valid_messages(tag, cut, flips):
    data = bytearray(P.encode(SAMPLES[tag]))
    for pos, byte in flips:
        data[pos % len(data)] = byte
    _decode_only_protocol_errors(bytes(data[: max(1, len(data) - cut % len(data))]))


# ---- keys -------------------------------------------------------------------------------------


def test_dsl_letters_map_to_controls_per_keymap():
    assert P.letters_to_controls("jw", "v1") == {"yaw_left", "forward"}
    assert P.letters_to_controls("jw", "v2") == {"strafe_left", "forward"}
    assert P.letters_to_controls("AD", "v2") == {"yaw_left", "yaw_right"}
    assert P.letters_to_controls("none", "v2") == frozenset()
    assert P.letters_to_controls("ww", "v1") == {"forward"}
    for keymap, table in P.DSL_KEYMAPS.items():
        assert sorted(table.values()) == sorted(P.CONTROLS)  # each key map is a bijection
        for letter in "wasdijkl":
            assert P.controls_to_letters(P.letters_to_controls(letter, keymap), keymap) == letter
    # v1 strings keep their motion in v2 by swapping a/d <-> j/l (spec/camera.md §4).
    swap = str.maketrans("adjl", "jlad")
    for letters in ("a", "jw", "dl", "wasdijkl"):
        assert P.letters_to_controls(letters, "v1") == P.letters_to_controls(letters.translate(swap), "v2")
    assert set(P.LIVE_BINDINGS.values()) == set(P.CONTROLS)


def test_tables_agree_with_the_engine_integrator():
    controls = pytest.importorskip("engine.controls")
    assert P.CONTROLS == controls.CONTROLS
    assert P.DSL_KEYMAPS == controls.KEYMAPS


def test_bad_letters_and_keymaps_are_named():
    with pytest.raises(P.ProtocolError) as info:
        P.letters_to_controls("wx", "v2")
    assert "'x'" in info.value.message
    with pytest.raises(P.ProtocolError) as info:
        P.letters_to_controls("w", "v9")
    assert info.value.field == "keymap"


# ---- import hygiene ---------------------------------------------------------------------------


def test_protocol_imports_neither_torch_nor_numpy():
    code = (
        "import sys, protocol, protocol.codec, protocol.keys, protocol.messages; "
        "bad = [m for m in ('torch', 'numpy', 'pygame') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_limits_are_consistent():
    assert L.MSGPACK_MAX_BIN_BYTES >= P.MAX_IMAGE_BYTES
    assert P.MAX_MESSAGE_BYTES > P.MAX_IMAGE_BYTES + 4 * L.MAX_PROMPT_CHARS + 4096
    # the largest valid start message still encodes under MAX_MESSAGE_BYTES
    big = P.Start(image=b"\x00" * P.MAX_IMAGE_BYTES, prompt="\U0001f600" * L.MAX_PROMPT_CHARS)
    assert P.decode(P.encode(big)) == big


def test_binary_and_integer_map_keys_are_malformed():
    import msgpack

    for key in (b"x", 3):
        data = msgpack.packb({"type": "hello", "v": P.PROTOCOL_VERSION, key: 1}, use_bin_type=True)
        with pytest.raises(P.ProtocolError) as info:
            P.decode(data)
        assert info.value.code == "malformed" and info.value.field == "message"
        assert P.error_from(info.value).field == "message"
