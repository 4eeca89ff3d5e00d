"""`ProtocolError`: the one error a peer's bytes can cause, naming the field at fault.

The engine answers it with an `error` message carrying the same `code`, `field` and `message`, so a
client author sees exactly which field of which message was refused and what is accepted instead.
"""

from __future__ import annotations

# Codes the decoder raises (the first six) and codes a server may answer with (the rest).
ERROR_CODES = (
    "malformed",  # not msgpack, not a map, trailing bytes, ext types, too deeply nested
    "too_large",  # the message or one of its parts is over the size limit
    "unknown_type",  # field `type` names no message this protocol version knows
    "version",  # field `v` is not this side's PROTOCOL_VERSION
    "missing_field",  # a required field is absent
    "unknown_field",  # a field this message type does not have
    "invalid_field",  # a field has the wrong type, range, length or value
    "bad_state",  # a valid message that is not allowed now (e.g. keys before start)
    "not_found",  # a session id or chunk that does not exist
    "busy",  # the engine cannot take another session
    "internal",  # the engine failed; the message says what happened
)

# `field` for errors about the message as a whole rather than one of its fields.
WHOLE_MESSAGE = "message"


class ProtocolError(ValueError):
    """A message (or the bytes of one) is not acceptable.

    code:    one of ERROR_CODES
    field:   the offending field ("pose[3]", "held[1]"), or "message" for the whole message
    message: what was wrong and what is accepted instead
    """

    def __init__(self, code: str, field: str, message: str):
        assert code in ERROR_CODES, code
        super().__init__(f"{code} in field {field!r}: {message}")
        self.code = code
        self.field = field
        self.message = message
