"""Key remapping (TOML -> bindings, clear errors) and gamepad mapping, as data: no window, no device."""

import os

import pytest

os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
os.environ.setdefault("SDL_AUDIODRIVER", "dummy")

from client.bindings import (  # noqa: E402
    ACTIONS,
    BindingsError,
    GamepadMap,
    bindings_from_dict,
    default_bindings,
    load_bindings,
    pygame_key_exists,
)
from protocol.keys import CONTROLS, DSL_KEYMAPS, LIVE_BINDINGS  # noqa: E402


@pytest.mark.parametrize("keymap", ["v1", "v2"])
def test_default_bindings_follow_the_key_maps_and_the_live_arrows(keymap):
    b = default_bindings(keymap)
    for letter, control in DSL_KEYMAPS[keymap].items():
        assert b.keys[letter] == control
    for arrow in ("up", "down", "left", "right"):
        assert b.keys[arrow] == LIVE_BINDINGS[arrow]
    assert b.held_controls({"w", "a", "p", "up"}) == {"forward", "pitch_up", DSL_KEYMAPS[keymap]["a"]}
    assert b.action_of("p") == "pause" and b.action_of("w") is None
    assert set(b.keys.values()) <= set(CONTROLS) | set(ACTIONS)
    assert all(pygame_key_exists(k) for k in b.keys)  # every default name is a real pygame key name


def test_toml_remaps_unbinds_and_keeps_the_rest(tmp_path):
    f = tmp_path / "b.toml"
    f.write_text("""
[keys]
space = "pause"
x = "forward"
w = "none"
"left shift" = "back"
[gamepad]
dead_zone = 0.4
axes = { "2" = ["yaw_left", "yaw_right"], "4" = "none" }
buttons = { "0" = "branch", "1" = "forward" }
hat = { up = "forward" }
""")
    b = load_bindings(f, "v1", key_exists=pygame_key_exists)
    assert b.keymap == "v1"
    assert b.keys["space"] == "pause" and b.keys["x"] == "forward" and "w" not in b.keys
    assert b.keys["left shift"] == "back" and b.keys["a"] == "strafe_left"  # v1 default kept
    g = b.gamepad
    assert g.dead_zone == 0.4 and g.axes[2] == ("yaw_left", "yaw_right") and 4 not in g.axes
    assert g.button_action(0) == "branch" and g.button_action(1) is None
    assert g.held([0.0, 0.0, 0.5], [False, True], [(0, 1)]) == {"yaw_right", "forward"}


def test_replace_starts_from_an_empty_table():
    b = bindings_from_dict({"replace": True, "keys": {"k": "forward"}})
    assert dict(b.keys) == {"k": "forward"}


@pytest.mark.parametrize(
    "text, words",
    [
        ('[keys]\nw = "fly"', ["'w'", "'fly'", "forward"]),
        ("[keys]\nw = 3", ["'w'", "3"]),
        ('[keys]\nnosuchkey = "forward"', ["'nosuchkey'", "unknown key name"]),
        ('keymap = "v3"', ["keymap", "'v3'", "v1"]),
        ("[mouse]\nx = 1", ["'mouse'", "accepted"]),
        ("[gamepad]\ndead_zone = 1.5", ["dead_zone", "1.5", "[0, 1)"]),
        ('[gamepad]\naxes = { "x" = ["forward", "back"] }', ["'x'", "index"]),
        ('[gamepad]\naxes = { "0" = ["forward"] }', ["'0'", "['forward']", "negative"]),
        ('[gamepad]\naxes = { "0" = ["forward", "pause"] }', ["'0'", "'pause'"]),  # an axis holds controls only
        ('[gamepad]\nhat = { north = "forward" }', ["'north'", "left, right, up, down"]),
        ("[keys\nw = 1", ["not valid TOML"]),
    ],
)
def test_bad_files_raise_errors_naming_the_entry(tmp_path, text, words):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(BindingsError) as e:
        load_bindings(f, key_exists=pygame_key_exists)
    msg = str(e.value)
    assert str(f) in msg
    for w in words:
        assert w in msg, (w, msg)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(BindingsError, match="cannot read bindings file"):
        load_bindings(tmp_path / "nope.toml")


def test_gamepad_axes_dead_zone_buttons_and_hat():
    g = GamepadMap(dead_zone=0.25)
    assert g.held([0.2, -0.24, 0.0, 0.1, -0.2]) == frozenset()  # all inside the dead zone
    assert g.held([0.3, -0.9, 0.0, -0.5, 0.8]) == {"strafe_right", "forward", "yaw_left", "pitch_down"}
    assert g.held([-1.0, 1.0]) == {"strafe_left", "back"}
    assert g.held([float("nan")]) == frozenset()
    assert g.held([], [], [(-1, 0)]) == {"yaw_left"} and g.held([], [], [(1, -1)]) == {"yaw_right", "pitch_down"}
    assert g.button_action(7) == "pause" and g.button_action(42) is None
