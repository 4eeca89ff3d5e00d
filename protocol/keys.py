"""Control tokens: the one vocabulary for held keys shared by the engine, the wire and the clients.

Everything past the keyboard speaks in *controls*, not in letters, because the two key maps give
the same letters different meanings (v1: a/d strafe, j/l yaw; v2: a/d yaw, j/l strafe). A `keys`
message, a frame header and a record in `actions.log` all carry a set of these tokens, so a session
replays the same motion whatever key map or physical bindings produced it.

    forward  back  yaw_left  yaw_right  strafe_left  strafe_right  pitch_up  pitch_down

Opposing controls may be held together; they cancel in the integrator (engine/controls.py uses
the same names in the same order; tests/test_protocol.py checks that the tables agree).
`DSL_KEYMAPS` turns action-DSL letters (w a s d i j k l) into controls for either key map;
`LIVE_BINDINGS` is the physical-key table of the live window (spec/camera.md §4-5).
"""

from __future__ import annotations

from collections.abc import Iterable

from protocol.errors import ProtocolError

CONTROLS: tuple[str, ...] = (
    "forward",
    "back",
    "yaw_left",
    "yaw_right",
    "strafe_left",
    "strafe_right",
    "pitch_up",
    "pitch_down",
)
_ORDER = {c: i for i, c in enumerate(CONTROLS)}

DSL_LETTERS = "wasdijkl"

# Action-DSL letter -> control, per key map (spec/camera.md §3 and §4).
DSL_KEYMAPS: dict[str, dict[str, str]] = {
    "v1": {
        "w": "forward",
        "s": "back",
        "a": "strafe_left",
        "d": "strafe_right",
        "j": "yaw_left",
        "l": "yaw_right",
        "i": "pitch_up",
        "k": "pitch_down",
    },
    "v2": {
        "w": "forward",
        "s": "back",
        "a": "yaw_left",
        "d": "yaw_right",
        "j": "strafe_left",
        "l": "strafe_right",
        "i": "pitch_up",
        "k": "pitch_down",
    },
}
KEYMAPS = tuple(DSL_KEYMAPS)

# Physical key name (lower case, pygame-style names, no pygame import) -> control in the live window:
# the v2 letters plus the NVlabs demo's arrow keys (arrows up/down pitch, left/right strafe).
LIVE_BINDINGS: dict[str, str] = {
    **DSL_KEYMAPS["v2"],
    "up": "pitch_up",
    "down": "pitch_down",
    "left": "strafe_left",
    "right": "strafe_right",
}


def sort_controls(controls: Iterable[str]) -> tuple[str, ...]:
    """Controls in canonical CONTROLS order (the order they are written on the wire and on disk)."""
    return tuple(sorted(controls, key=_ORDER.__getitem__))


def check_controls(values, field: str = "held") -> frozenset[str]:
    """A list of control tokens from the wire -> frozenset; ProtocolError naming `field[i]` otherwise."""
    if not isinstance(values, (list, tuple, set, frozenset)):
        raise ProtocolError("invalid_field", field, f"expected a list of control names, got {type(values).__name__}")
    if len(values) > len(CONTROLS):
        raise ProtocolError("invalid_field", field, f"{len(values)} controls; at most {len(CONTROLS)} exist")
    seen: set[str] = set()
    for i, v in enumerate(values):
        if not isinstance(v, str) or v not in _ORDER:
            raise ProtocolError(
                "invalid_field", f"{field}[{i}]", f"{v!r} is not a control; accepted: {', '.join(CONTROLS)}"
            )
        if v in seen:
            raise ProtocolError("invalid_field", f"{field}[{i}]", f"control {v!r} is listed twice")
        seen.add(v)
    return frozenset(seen)


def letters_to_controls(letters: str, keymap: str = "v2") -> frozenset[str]:
    """DSL letters ("jw", "none", "") -> set of controls under `keymap` ("v1" or "v2").

    Case-insensitive; duplicates collapse. Raises ProtocolError naming the letter otherwise.
    """
    table = _keymap(keymap)
    letters = letters.lower()
    if letters == "none":
        return frozenset()
    out = set()
    for ch in letters:
        if ch not in table:
            raise ProtocolError(
                "invalid_field", "keys", f"{ch!r} in {letters!r} is not a key; accepted: {DSL_LETTERS} or 'none'"
            )
        out.add(table[ch])
    return frozenset(out)


def controls_to_letters(controls: Iterable[str], keymap: str = "v2") -> str:
    """Set of controls -> DSL letters in "wasdijkl" order ("none" for the empty set)."""
    table = _keymap(keymap)
    controls = set(controls)
    unknown = controls - set(CONTROLS)
    if unknown:
        raise ProtocolError(
            "invalid_field", "held", f"{sorted(unknown)} are not controls; accepted: {', '.join(CONTROLS)}"
        )
    return "".join(ch for ch in DSL_LETTERS if table[ch] in controls) or "none"


def _keymap(keymap: str) -> dict[str, str]:
    if keymap not in DSL_KEYMAPS:
        raise ProtocolError("invalid_field", "keymap", f"{keymap!r} is not a key map; accepted: {', '.join(KEYMAPS)}")
    return DSL_KEYMAPS[keymap]
