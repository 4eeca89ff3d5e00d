"""Field specs: how one message field is checked when a message is built or decoded.

A spec's `check(value, name)` returns the normalised value (lists become tuples or frozensets, ints
in float fields become floats) or raises ProtocolError("invalid_field", name, ...). `wire(value)`
returns what msgpack writes. Messages declare their fields with `spec(...)` (messages.py).
"""

from __future__ import annotations

import math
import re
from dataclasses import MISSING, field

from protocol.errors import ProtocolError
from protocol.keys import check_controls, sort_controls


def _bad(name: str, message: str) -> ProtocolError:
    return ProtocolError("invalid_field", name, message)


class Int:
    def __init__(self, lo: int, hi: int):
        self.lo, self.hi = lo, hi

    def check(self, v, name):
        if isinstance(v, bool) or not isinstance(v, int):
            raise _bad(name, f"expected an integer in [{self.lo}, {self.hi}], got {type(v).__name__} {v!r:.40}")
        if not self.lo <= v <= self.hi:
            raise _bad(name, f"{v} is outside [{self.lo}, {self.hi}]")
        return v

    def wire(self, v):
        return v


class Float:
    """A finite float in [lo, hi] (or (lo, hi] with lo_open). Integers are accepted and converted."""

    def __init__(self, lo: float = -math.inf, hi: float = math.inf, lo_open: bool = False):
        self.lo, self.hi, self.lo_open = lo, hi, lo_open

    def describe(self) -> str:
        return f"a finite number in {'(' if self.lo_open else '['}{self.lo}, {self.hi}]"

    def check(self, v, name):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise _bad(name, f"expected {self.describe()}, got {type(v).__name__} {v!r:.40}")
        try:
            v = float(v)
        except OverflowError:
            raise _bad(name, f"{v} does not fit a float64; expected {self.describe()}") from None
        below = v <= self.lo if self.lo_open else v < self.lo
        if not math.isfinite(v) or below or v > self.hi:
            raise _bad(name, f"{v!r} is not {self.describe()}")
        return v

    def wire(self, v):
        return v


class Bool:
    def check(self, v, name):
        if not isinstance(v, bool):
            raise _bad(name, f"expected true or false, got {type(v).__name__} {v!r:.40}")
        return v

    def wire(self, v):
        return v


class Str:
    """A str of at most max_chars characters; optionally one of `choices` or matching `pattern`."""

    def __init__(
        self, max_chars: int, choices: tuple[str, ...] | None = None, pattern: str | None = None, min_chars: int = 0
    ):
        self.max_chars, self.choices, self.min_chars = max_chars, choices, min_chars
        self.pattern = re.compile(pattern) if pattern else None

    def check(self, v, name):
        if not isinstance(v, str):
            raise _bad(name, f"expected a string, got {type(v).__name__} {v!r:.40}")
        if self.choices is not None and v not in self.choices:
            raise _bad(name, f"{v!r:.80} is not one of {', '.join(self.choices)}")
        if not self.min_chars <= len(v) <= self.max_chars:
            raise _bad(name, f"{len(v)} characters; accepted {self.min_chars} to {self.max_chars}")
        if self.pattern is not None and not self.pattern.fullmatch(v):
            raise _bad(name, f"{v!r:.80} does not match {self.pattern.pattern}")
        return v

    def wire(self, v):
        return v


class Bytes:
    def __init__(self, max_bytes: int, min_bytes: int = 0):
        self.max_bytes, self.min_bytes = max_bytes, min_bytes

    def check(self, v, name):
        if not isinstance(v, (bytes, bytearray, memoryview)):
            raise _bad(name, f"expected binary data (msgpack bin), got {type(v).__name__}")
        v = bytes(v)
        if not self.min_bytes <= len(v) <= self.max_bytes:
            raise _bad(name, f"{len(v)} bytes; accepted {self.min_bytes} to {self.max_bytes}")
        return v

    def wire(self, v):
        return v


class Optional:
    """None (msgpack nil) or a value of `inner`."""

    def __init__(self, inner):
        self.inner = inner

    def check(self, v, name):
        return None if v is None else self.inner.check(v, name)

    def wire(self, v):
        return None if v is None else self.inner.wire(v)


class Tuple:
    """A list of items of `item`, as a tuple; `length` fixes the length, `unique` forbids repeats."""

    def __init__(self, item, min_len: int = 0, max_len: int = 64, length: int | None = None, unique: bool = False):
        self.item, self.unique = item, unique
        self.min_len, self.max_len = (length, length) if length is not None else (min_len, max_len)

    def check(self, v, name):
        if not isinstance(v, (list, tuple)):
            raise _bad(name, f"expected a list, got {type(v).__name__} {v!r:.40}")
        if not self.min_len <= len(v) <= self.max_len:
            n = f"exactly {self.min_len}" if self.min_len == self.max_len else f"{self.min_len} to {self.max_len}"
            raise _bad(name, f"{len(v)} items; accepted {n}")
        out = tuple(self.item.check(x, f"{name}[{i}]") for i, x in enumerate(v))
        if self.unique:
            for i, x in enumerate(out):
                if x in out[:i]:
                    raise _bad(f"{name}[{i}]", f"{x!r:.40} is listed twice")
        return out

    def wire(self, v):
        return [self.item.wire(x) for x in v]


class Controls:
    """A set of control tokens (protocol/keys.py): frozenset in Python, a list in CONTROLS order on the wire."""

    def check(self, v, name):
        return check_controls(v, name)

    def wire(self, v):
        return list(sort_controls(v))


def spec(kind, default=MISSING):
    """A dataclass field checked by `kind` (fields with a default may be omitted on the wire)."""
    return field(default=default, metadata={"spec": kind})
