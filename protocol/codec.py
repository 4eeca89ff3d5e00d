"""Bytes <-> messages. msgpack only, strict: no pickle, no ext types, bounded lengths.

`decode` raises ProtocolError and nothing else, whatever the bytes; the error names the field at
fault so the engine can answer with an `error` message and carry on. `encode` checks nothing more
than the message's constructor already did (a Message is valid by construction).

Wire form of one message: a msgpack map {"type": str, "v": int, <field>: <value>, ...}. Bytes
fields are msgpack bin, control sets are arrays of control names, absent optional fields may be
omitted or nil. A frame is two ZeroMQ parts: [encode(FrameHeader), pixel bytes].
"""

from __future__ import annotations

import dataclasses

import msgpack

from protocol import limits as L
from protocol.errors import WHOLE_MESSAGE, ProtocolError
from protocol.messages import MESSAGE_TYPES, PROTOCOL_VERSION, FrameHeader, Message

_ENVELOPE = ("type", "v")


def encode(msg: Message) -> bytes:
    """Message -> msgpack bytes (raises ProtocolError if the result exceeds MAX_MESSAGE_BYTES)."""
    body = {"type": msg.TYPE, "v": PROTOCOL_VERSION}
    for f in dataclasses.fields(msg):
        body[f.name] = f.metadata["spec"].wire(getattr(msg, f.name))
    data = msgpack.packb(body, use_bin_type=True)
    if len(data) > L.MAX_MESSAGE_BYTES:
        raise ProtocolError("too_large", WHOLE_MESSAGE, f"{len(data)} bytes > MAX_MESSAGE_BYTES {L.MAX_MESSAGE_BYTES}")
    return data


def unpack(data) -> dict:
    """msgpack bytes -> a map with str keys, under the decoder limits (ProtocolError otherwise)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError("malformed", WHOLE_MESSAGE, f"expected bytes, got {type(data).__name__}")
    if len(data) > L.MAX_MESSAGE_BYTES:
        raise ProtocolError("too_large", WHOLE_MESSAGE, f"{len(data)} bytes > MAX_MESSAGE_BYTES {L.MAX_MESSAGE_BYTES}")
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=L.MSGPACK_MAX_STR_BYTES,
            max_bin_len=L.MSGPACK_MAX_BIN_BYTES,
            max_array_len=L.MSGPACK_MAX_ARRAY_LEN,
            max_map_len=L.MSGPACK_MAX_MAP_LEN,
            max_ext_len=0,
        )
    except Exception as e:  # noqa: BLE001 - msgpack raises several types; all mean "not a valid message"
        if "exceeds max" in str(e):  # a str/bin/array/map over the decoder limits
            raise ProtocolError("too_large", WHOLE_MESSAGE, f"a value is over the decoder limits ({e})") from None
        raise ProtocolError("malformed", WHOLE_MESSAGE, f"not a valid msgpack message ({e})") from None
    if not isinstance(obj, dict):
        raise ProtocolError("malformed", WHOLE_MESSAGE, f"expected a msgpack map, got {type(obj).__name__}")
    bad = next((k for k in obj if not isinstance(k, str)), None)  # strict_map_key still admits bin keys
    if bad is not None:
        raise ProtocolError("malformed", WHOLE_MESSAGE, f"map key {bad!r:.40} is not a string")
    return obj


def decode(data) -> Message:
    """msgpack bytes -> the message they encode. Raises ProtocolError (only) naming the field."""
    obj = unpack(data)
    tag = obj.get("type")
    if tag is None:
        raise ProtocolError("missing_field", "type", f"every message has a 'type'; known: {', '.join(MESSAGE_TYPES)}")
    if not isinstance(tag, str) or tag not in MESSAGE_TYPES:
        raise ProtocolError(
            "unknown_type", "type", f"{tag!r:.40} is not a message type; known: {', '.join(MESSAGE_TYPES)}"
        )
    version = obj.get("v")
    if version is None:
        raise ProtocolError(
            "missing_field", "v", f"every message has a protocol version 'v' (this side speaks {PROTOCOL_VERSION})"
        )
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise ProtocolError(
            "version", "v", f"protocol version {version!r:.40} is not supported; this side speaks {PROTOCOL_VERSION}"
        )
    cls = MESSAGE_TYPES[tag]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in obj.items():
        if key in _ENVELOPE:
            continue
        if key not in fields:
            raise ProtocolError(
                "unknown_field",
                key[: L.MAX_NAME_CHARS] or "''",
                f"{tag!r} has no field {key!r:.40}; fields: {', '.join(fields)}",
            )
        kwargs[key] = value
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING:
            raise ProtocolError("missing_field", name, f"{tag!r} requires field {name!r}")
    try:
        return cls(**kwargs)
    except ProtocolError:
        raise
    except Exception as e:  # noqa: BLE001 - a spec bug must still not escape as anything but ProtocolError
        raise ProtocolError(
            "invalid_field", WHOLE_MESSAGE, f"could not build {tag!r}: {type(e).__name__}: {e}"
        ) from None


def encode_frame(header: FrameHeader, pixels) -> list[bytes]:
    """A frame as the two ZeroMQ parts [header, pixels]; len(pixels) must equal header.payload_bytes."""
    if len(pixels) != header.payload_bytes:
        raise ProtocolError(
            "invalid_field", "payload_bytes", f"header says {header.payload_bytes}, pixels are {len(pixels)} bytes"
        )
    return [encode(header), pixels]


def decode_parts(parts) -> tuple[Message, bytes | None]:
    """A multipart message from the frame or control channel -> (message, pixels or None).

    One part: any message. Two parts: a `frame` header and its pixels, checked against each other.
    """
    if not isinstance(parts, (list, tuple)) or len(parts) not in (1, 2):
        n = len(parts) if isinstance(parts, (list, tuple)) else type(parts).__name__
        raise ProtocolError(
            "malformed", WHOLE_MESSAGE, f"expected 1 part (a message) or 2 (frame header, pixels), got {n}"
        )
    msg = decode(parts[0])
    if len(parts) == 1:
        if isinstance(msg, FrameHeader):
            raise ProtocolError("malformed", WHOLE_MESSAGE, "a 'frame' header must be followed by its pixel part")
        return msg, None
    if not isinstance(msg, FrameHeader):
        raise ProtocolError(
            "malformed", WHOLE_MESSAGE, f"only a 'frame' header carries a second part, not {msg.TYPE!r}"
        )
    pixels = parts[1]
    if not isinstance(pixels, (bytes, bytearray, memoryview)):
        raise ProtocolError("malformed", "pixels", f"expected bytes, got {type(pixels).__name__}")
    if len(pixels) != msg.payload_bytes:
        raise ProtocolError(
            "invalid_field", "payload_bytes", f"header says {msg.payload_bytes}, pixel part is {len(pixels)} bytes"
        )
    return msg, bytes(pixels)
