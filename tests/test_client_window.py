"""The window's own logic under SDL's dummy driver, no engine: keys and gamepad -> held controls, the prompt
text box, HUD toggle, resize with kept aspect, fullscreen toggle. (The address has no engine behind it; the
network thread just waits.)"""

import os

import pytest

os.environ["SDL_VIDEODRIVER"] = "dummy"
os.environ["SDL_AUDIODRIVER"] = "dummy"

import pygame  # noqa: E402

from client.draw import letterbox  # noqa: E402
from client.play import PlayApp, PlayConfig  # noqa: E402


class FakePad:
    """A gamepad as pygame's Joystick reads it (left stick pushed up and left, d-pad right)."""

    def get_numaxes(self):
        return 5

    def get_axis(self, i):
        return {0: -0.6, 1: -0.9}.get(i, 0.05)

    def get_numbuttons(self):
        return 8

    def get_button(self, i):
        return 0

    def get_numhats(self):
        return 1

    def get_hat(self, i):
        return (1, 0)


@pytest.fixture
def app():
    a = PlayApp(PlayConfig(address="tcp://127.0.0.1:9", window_size=(400, 300), keymap="v1"))
    yield a
    a.close()


def _post(*events):
    for etype, attrs in events:
        pygame.event.post(pygame.event.Event(etype, attrs))


def test_keys_and_gamepad_make_the_held_set(app):
    _post(
        (pygame.KEYDOWN, {"key": pygame.K_w}),
        (pygame.KEYDOWN, {"key": pygame.K_a}),
        (pygame.KEYDOWN, {"key": pygame.K_UP}),
    )
    app.step()
    assert app.held_controls() == {"forward", "strafe_left", "pitch_up"}  # v1: a = strafe left
    _post((pygame.KEYUP, {"key": pygame.K_a}), (pygame.KEYUP, {"key": pygame.K_UP}))
    app.step()
    assert app.held_controls() == {"forward"}
    _post((pygame.WINDOWFOCUSLOST, {}))
    app.step()
    assert app.held_controls() == frozenset()  # keys released elsewhere never send KEYUP
    app.joysticks[0] = FakePad()
    app.step()
    assert app.held_controls() == {"forward", "strafe_left", "yaw_right"}
    assert app.link.keys.held == app.held_controls()  # what the network thread sends


def test_prompt_box_swallows_movement_keys_and_applies_on_enter(app):
    _post((pygame.KEYDOWN, {"key": pygame.K_w}))
    app.step()
    _post((pygame.KEYDOWN, {"key": pygame.K_t}), (pygame.TEXTINPUT, {"text": "t"}))
    app.step()
    assert app.typing == app.prompt and app.held_controls() == frozenset()  # typing holds no control
    _post(*[(pygame.KEYDOWN, {"key": pygame.K_BACKSPACE})] * len(app.prompt))
    _post((pygame.TEXTINPUT, {"text": "wasd in the snow"}), (pygame.KEYDOWN, {"key": pygame.K_RETURN}))
    app.step()
    assert app.typing is None and app.prompt == "wasd in the snow" and app.hud.prompt == app.prompt
    _post(
        (pygame.KEYDOWN, {"key": pygame.K_t}),
        (pygame.TEXTINPUT, {"text": "x"}),
        (pygame.KEYDOWN, {"key": pygame.K_ESCAPE}),
    )
    app.step()
    assert app.typing is None and app.prompt == "wasd in the snow"  # Esc cancels
    assert app.running  # Esc closed the box, not the window


def test_hud_toggle_resize_fullscreen_and_quit(app):
    assert app.hud.visible
    _post((pygame.KEYDOWN, {"key": pygame.K_h}))
    app.step()
    assert not app.hud.visible
    _post((pygame.VIDEORESIZE, {"w": 900, "h": 300, "size": (900, 300)}))
    app.step()
    assert app.screen.get_size() == (900, 300)
    rect = letterbox((320, 192), (900, 300))
    assert rect.size == (500, 300) and rect.x == 200  # aspect kept, centred
    _post((pygame.KEYDOWN, {"key": pygame.K_F11}))
    app.step()
    assert app.fullscreen
    _post((pygame.KEYDOWN, {"key": pygame.K_F11}))
    app.step()
    assert not app.fullscreen and app.screen.get_size() == (900, 300)
    _post((pygame.KEYDOWN, {"key": pygame.K_ESCAPE}))
    assert app.step() is False
