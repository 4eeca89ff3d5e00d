"""Bindings are data: physical keys and gamepad inputs -> controls (held) or actions (pressed once).

    b = default_bindings("v2")                 # or load_bindings("my.toml", "v2")
    b.keys["w"] == "forward"; b.keys["p"] == "pause"
    b.held_controls({"w", "a", "p"}) == {"forward", "yaw_left"}
    b.gamepad.held(axes=[0.0, -0.9, ...], buttons=[...], hats=[(0, 0)]) -> controls held by a gamepad
    b.gamepad.button_action(7) == "pause"

Key names are pygame's lower-case names (`pygame.key.name`: "w", "up", "left shift", "f11"). This
module does not import pygame (only `pygame_key_exists` does, when called); a caller may pass
`key_exists` to check names. A control is one of `protocol.keys.CONTROLS`; an action is one of
`ACTIONS`. A TOML file replaces or extends the defaults:

    keymap = "v2"            # optional: which default table to start from (v1 | v2)
    replace = false          # true: start from an empty key table instead of the defaults
    [keys]
    w = "forward"            # physical key -> control or action
    space = "pause"
    q = "none"               # "none" unbinds a default
    [gamepad]
    dead_zone = 0.3
    axes = { "0" = ["strafe_left", "strafe_right"], "1" = ["forward", "back"] }   # axis -> [negative, positive]
    buttons = { "7" = "pause" }
    hat = { left = "yaw_left", right = "yaw_right", up = "pitch_up", down = "pitch_down" }

Every problem raises BindingsError naming the file, the entry and the accepted values.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from protocol.keys import CONTROLS, DSL_KEYMAPS, LIVE_BINDINGS

# One-shot actions of the window (pressed, not held).
ACTIONS: tuple[str, ...] = (
    "pause",  # pause / resume the session (and playback)
    "reset",  # restart the session from the first image
    "prompt",  # open the prompt text box
    "quality",  # switch preview <-> full
    "branch",  # fork a new session after the chunk on screen
    "hud",  # show / hide the HUD
    "fullscreen",  # toggle fullscreen
    "reproject",  # turn instant-response reprojection on / off
    "quit",
)

# Physical keys of the window's actions, the same for both key maps.
ACTION_KEYS: dict[str, str] = {
    "p": "pause",
    "r": "reset",
    "t": "prompt",
    "q": "quality",
    "b": "branch",
    "h": "hud",
    "f11": "fullscreen",
    "f2": "reproject",
    "escape": "quit",
}

# Arrow keys as in the NVlabs live demo (spec/camera.md §5), for both key maps.
ARROW_KEYS: dict[str, str] = {k: v for k, v in LIVE_BINDINGS.items() if k in ("up", "down", "left", "right")}

HAT_DIRECTIONS = ("left", "right", "up", "down")


class BindingsError(ValueError):
    """A bindings file or table is wrong; the message names the entry and what is accepted."""


@dataclass(frozen=True)
class GamepadMap:
    """Gamepad inputs -> controls/actions. Axis values in [-1, 1]; |value| < dead_zone counts as centred.

    Defaults follow the Linux xpad layout of pygame's joystick API (left stick 0/1, right stick 3/4,
    d-pad = hat 0); a TOML file can say otherwise.
    """

    dead_zone: float = 0.25
    axes: Mapping[int, tuple[str, str]] = field(
        default_factory=lambda: {
            0: ("strafe_left", "strafe_right"),  # left stick x
            1: ("forward", "back"),  # left stick y (up is negative)
            3: ("yaw_left", "yaw_right"),  # right stick x
            4: ("pitch_up", "pitch_down"),  # right stick y
        }
    )
    buttons: Mapping[int, str] = field(default_factory=lambda: {7: "pause", 6: "reset", 3: "hud", 2: "branch"})
    hat: Mapping[str, str] = field(
        default_factory=lambda: {"left": "yaw_left", "right": "yaw_right", "up": "pitch_up", "down": "pitch_down"}
    )

    def held(
        self, axes: Iterable[float], buttons: Iterable[bool] = (), hats: Iterable[tuple[int, int]] = ()
    ) -> frozenset[str]:
        """Controls held by this gamepad state (axes past the dead zone, held buttons, hat 0 directions)."""
        out: set[str] = set()
        for i, value in enumerate(axes):
            pair = self.axes.get(i)
            if pair is None or not math.isfinite(value) or abs(value) < self.dead_zone:
                continue
            out.add(pair[0] if value < 0 else pair[1])
        for i, down in enumerate(buttons):
            name = self.buttons.get(i)
            if down and name in CONTROLS:
                out.add(name)
        for hx, hy in list(hats)[:1]:
            for direction, on in (("left", hx < 0), ("right", hx > 0), ("up", hy > 0), ("down", hy < 0)):
                name = self.hat.get(direction)
                if on and name in CONTROLS:
                    out.add(name)
        return frozenset(out)

    def button_action(self, button: int) -> str | None:
        """The action a button press triggers (None: the button is unbound or a held control)."""
        name = self.buttons.get(button)
        return name if name in ACTIONS else None


@dataclass(frozen=True)
class Bindings:
    """Physical key name -> control or action, plus the gamepad map."""

    keys: Mapping[str, str]
    gamepad: GamepadMap = field(default_factory=GamepadMap)
    keymap: str = "v2"  # the key map the session runs with (integrator defaults), sent in `start`

    def held_controls(self, pressed: Iterable[str]) -> frozenset[str]:
        """Controls held, given the names of the physical keys held now."""
        return frozenset(c for k in pressed if (c := self.keys.get(k)) in CONTROLS)

    def action_of(self, key: str) -> str | None:
        name = self.keys.get(key)
        return name if name in ACTIONS else None

    def describe(self) -> str:
        """One line per control/action with its keys, for --help-like listings."""
        by_target: dict[str, list[str]] = {}
        for k, v in self.keys.items():
            by_target.setdefault(v, []).append(k)
        return "\n".join(f"{t:>13}: {', '.join(sorted(ks))}" for t, ks in sorted(by_target.items()))


def pygame_key_exists(name: str) -> bool:
    """Whether `name` is one of pygame's key names (imports pygame when called; works before pygame.init)."""
    import os
    import warnings

    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
    import pygame

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "pygame.init() has not been called": the name table is static
        try:
            pygame.key.key_code(name)
            return True
        except ValueError:
            return False


def default_bindings(keymap: str = "v2") -> Bindings:
    """The default window bindings: the key map's letters (v1: a/d strafe, j/l yaw; v2: a/d yaw, j/l
    strafe), the live demo's arrow keys, and ACTION_KEYS."""
    if keymap not in DSL_KEYMAPS:
        raise BindingsError(f"keymap {keymap!r} is not accepted; accepted: {', '.join(DSL_KEYMAPS)}")
    return Bindings(keys={**DSL_KEYMAPS[keymap], **ARROW_KEYS, **ACTION_KEYS}, keymap=keymap)


def load_bindings(
    path: str | Path, keymap: str | None = None, key_exists: Callable[[str], bool] | None = None
) -> Bindings:
    """Read a TOML bindings file (format in the module docstring) on top of the defaults.

    `keymap` (e.g. from --keymap) wins over the file's `keymap`; `key_exists(name)` (optional) says
    whether a physical key name is known (the window passes pygame's table)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise BindingsError(f"cannot read bindings file {path}: {e}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise BindingsError(f"bindings file {path} is not valid TOML: {e}") from None
    return bindings_from_dict(data, keymap=keymap, key_exists=key_exists, source=str(path))


def bindings_from_dict(
    data: Mapping,
    *,
    keymap: str | None = None,
    key_exists: Callable[[str], bool] | None = None,
    source: str = "bindings",
) -> Bindings:
    """Validate a parsed bindings table (see the module docstring) -> Bindings."""
    _only(data, ("keymap", "replace", "keys", "gamepad"), source, "top level")
    file_keymap = data.get("keymap", "v2")
    if file_keymap not in DSL_KEYMAPS:
        raise BindingsError(f"{source}: keymap = {file_keymap!r} is not accepted; accepted: {', '.join(DSL_KEYMAPS)}")
    keymap = keymap or file_keymap
    replace = data.get("replace", False)
    if not isinstance(replace, bool):
        raise BindingsError(f"{source}: replace = {replace!r} is not accepted; use true or false")
    keys = {} if replace else dict(default_bindings(keymap).keys)
    table = data.get("keys", {})
    if not isinstance(table, Mapping):
        raise BindingsError(f'{source}: [keys] must be a table of key = "control or action"')
    for raw, target in table.items():
        name = str(raw).strip().lower()
        where = f"{source}: [keys] {raw!r}"
        if not name:
            raise BindingsError(f"{where}: an empty key name is not accepted")
        if key_exists is not None and not key_exists(name):
            raise BindingsError(
                f"{where}: unknown key name {raw!r}; use pygame key names such as "
                "'w', 'up', 'space', 'left shift', 'f5'"
            )
        if target == "none":
            keys.pop(name, None)
            continue
        keys[name] = _target(target, where)
    gamepad = _gamepad(data.get("gamepad", {}), source)
    return Bindings(keys=keys, gamepad=gamepad, keymap=keymap)


def _target(value, where: str, allow_actions: bool = True) -> str:
    if not isinstance(value, str) or (value not in CONTROLS and not (allow_actions and value in ACTIONS)):
        accepted = ", ".join(CONTROLS) + (f"; actions: {', '.join(ACTIONS)}" if allow_actions else "")
        raise BindingsError(f"{where} = {value!r} is not accepted; controls: {accepted}; or 'none' to unbind")
    return value


def _only(table: Mapping, allowed: tuple[str, ...], source: str, where: str) -> None:
    for k in table:
        if k not in allowed:
            raise BindingsError(f"{source}: {where}: unknown entry {k!r}; accepted: {', '.join(allowed)}")


def _index(raw, where: str) -> int:
    text = str(raw).strip()
    if not text.isdigit() or int(text) > 255:
        raise BindingsError(f'{where}: {raw!r} is not an index; use "0".."255"')
    return int(text)


def _gamepad(table, source: str) -> GamepadMap:
    if not isinstance(table, Mapping):
        raise BindingsError(f"{source}: [gamepad] must be a table")
    _only(table, ("dead_zone", "axes", "buttons", "hat", "replace"), source, "[gamepad]")
    base = GamepadMap()
    replace = table.get("replace", False)
    dz = table.get("dead_zone", base.dead_zone)
    if isinstance(dz, bool) or not isinstance(dz, (int, float)) or not 0.0 <= dz < 1.0:
        raise BindingsError(f"{source}: [gamepad] dead_zone = {dz!r} is not accepted; use a number in [0, 1)")
    axes = {} if replace else dict(base.axes)
    for raw, pair in _table(table.get("axes", {}), source, "axes").items():
        where = f"{source}: [gamepad.axes] {raw!r}"
        i = _index(raw, where)
        if pair == "none":
            axes.pop(i, None)
            continue
        if not isinstance(pair, list) or len(pair) != 2:
            raise BindingsError(f'{where} = {pair!r} is not accepted; use ["negative control", "positive control"]')
        axes[i] = (_target(pair[0], where, False), _target(pair[1], where, False))
    buttons = {} if replace else dict(base.buttons)
    for raw, name in _table(table.get("buttons", {}), source, "buttons").items():
        where = f"{source}: [gamepad.buttons] {raw!r}"
        i = _index(raw, where)
        if name == "none":
            buttons.pop(i, None)
        else:
            buttons[i] = _target(name, where)
    hat = {} if replace else dict(base.hat)
    for direction, name in _table(table.get("hat", {}), source, "hat").items():
        where = f"{source}: [gamepad.hat] {direction!r}"
        if direction not in HAT_DIRECTIONS:
            raise BindingsError(f"{where}: unknown direction; accepted: {', '.join(HAT_DIRECTIONS)}")
        if name == "none":
            hat.pop(direction, None)
        else:
            hat[direction] = _target(name, where, False)
    return GamepadMap(dead_zone=float(dz), axes=axes, buttons=buttons, hat=hat)


def _table(value, source: str, name: str) -> Mapping:
    if not isinstance(value, Mapping):
        raise BindingsError(f"{source}: [gamepad.{name}] must be a table, got {value!r}")
    return value
