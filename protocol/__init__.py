"""Wire format between the engine and its clients: typed, versioned messages and their codec.

Pure Python + msgpack. Never imports torch, numpy or pygame, so a laptop can drive a remote GPU.

    from protocol import Keys, encode, decode
    data = encode(Keys(seq=7, held=frozenset({"forward", "yaw_left"}), last_shown_frame=40))
    msg = decode(data)          # ProtocolError(code, field, message) on anything invalid

Messages are documented in protocol/README.md; control names in protocol/keys.py.
"""

from protocol.codec import decode, decode_parts, encode, encode_frame
from protocol.errors import ERROR_CODES, ProtocolError
from protocol.keys import CONTROLS, DSL_KEYMAPS, LIVE_BINDINGS, controls_to_letters, letters_to_controls
from protocol.limits import MAX_IMAGE_BYTES, MAX_MESSAGE_BYTES, MAX_PIXEL_BYTES
from protocol.messages import (
    CONTROL_ACTIONS,
    DELIVERIES,
    ENCODINGS,
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    QUALITIES,
    SESSION_ID_PATTERN,
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
    Resume,
    Start,
    Status,
    Watch,
    Welcome,
    error_from,
)

__all__ = [
    "CONTROLS",
    "CONTROL_ACTIONS",
    "DELIVERIES",
    "DSL_KEYMAPS",
    "ENCODINGS",
    "ERROR_CODES",
    "LIVE_BINDINGS",
    "MAX_IMAGE_BYTES",
    "MAX_MESSAGE_BYTES",
    "MAX_PIXEL_BYTES",
    "MESSAGE_TYPES",
    "PROTOCOL_VERSION",
    "QUALITIES",
    "SESSION_ID_PATTERN",
    "Branch",
    "Control",
    "Credit",
    "Dropped",
    "Ended",
    "Error",
    "FrameHeader",
    "Hello",
    "Keys",
    "Message",
    "ProtocolError",
    "Resume",
    "Start",
    "Status",
    "Watch",
    "Welcome",
    "controls_to_letters",
    "decode",
    "decode_parts",
    "encode",
    "encode_frame",
    "error_from",
    "letters_to_controls",
]
