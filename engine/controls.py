"""Held keys -> camera poses, one pixel frame at a time (spec: camera.md §1-§5).

One incremental integrator (`CameraIntegrator.step(held) -> c2w`) serves both the action DSL rollout and
live driving, so a recorded session, a DSL string and a person at the keyboard go through the same
arithmetic. Two key maps:

- `v1` (first release, the diffusers pipeline): a/d strafe, j/l yaw, 0.05 per frame and 1.2° per frame,
  no smoothing, a pitch step that would leave ±85° is dropped whole.
- `v2` (current NVlabs, the default): a/d yaw, j/l strafe, 0.025 and 0.6°, velocity smoothing that snaps
  on a fresh press and eases/coasts otherwise, pitch clamped at ±60° (partial step kept).

Poses are camera-to-world 4×4, OpenCV axes (+X right, +Y down, +Z forward), starting at the identity.
Arithmetic is float64; poses are handed out as float32. This module knows nothing about models, sockets
or pygame.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from engine.errors import InputError
from protocol.keys import CONTROLS, DSL_KEYMAPS, DSL_LETTERS

# The vocabulary (canonical controls, DSL letters, both key maps) lives in the wire format, so the
# engine, the clients and actions.log cannot disagree on it.
DSL_KEYS = DSL_LETTERS
KEYMAPS = DSL_KEYMAPS

# A DSL string expands to one key set per frame; past this many frames it is almost surely a typo
# (16 fps: 2**20 frames are 18 hours) and would only exhaust memory.
MAX_DSL_FRAMES = 1 << 20
MAX_DSL_LENGTH = 1 << 16


@dataclass(frozen=True)
class KeymapParams:
    """Speeds and behaviour of one key map. `None` fields of `keymap_params` take these defaults."""

    name: str
    translation_speed: float  # per pixel frame, "metric scale" units
    rotation_speed_deg: float  # per pixel frame
    pitch_limit_deg: float
    smooth: bool  # v2 velocity smoothing (v1 never smooths)
    tau_press_s: float = 0.45  # ease-in time constant while a control is held
    tau_coast_s: float = 1.0  # coast-out time constant after release
    fps: float = 16.0


DEFAULTS = {
    "v1": KeymapParams("v1", 0.05, 1.2, 85.0, smooth=False),
    "v2": KeymapParams("v2", 0.025, 0.6, 60.0, smooth=True),
}


def keymap_params(
    keymap: str = "v2",
    *,
    translation_speed: float | None = None,
    rotation_speed_deg: float | None = None,
    pitch_limit_deg: float | None = None,
    smooth: bool | None = None,
) -> KeymapParams:
    """The parameters of `keymap` with the given overrides, validated."""
    if keymap not in DEFAULTS:
        raise InputError(f"unknown key map {keymap!r}; accepted: {sorted(DEFAULTS)}")
    base = DEFAULTS[keymap]
    p = KeymapParams(
        name=keymap,
        translation_speed=base.translation_speed if translation_speed is None else float(translation_speed),
        rotation_speed_deg=base.rotation_speed_deg if rotation_speed_deg is None else float(rotation_speed_deg),
        pitch_limit_deg=base.pitch_limit_deg if pitch_limit_deg is None else float(pitch_limit_deg),
        smooth=base.smooth if smooth is None else bool(smooth),
        tau_press_s=base.tau_press_s,
        tau_coast_s=base.tau_coast_s,
        fps=base.fps,
    )
    if keymap == "v1" and p.smooth:
        raise InputError("smooth=True is not accepted with the v1 key map (v1 never smooths); use keymap='v2'")
    for name in ("translation_speed", "rotation_speed_deg"):
        v = getattr(p, name)
        if not math.isfinite(v) or v < 0:
            raise InputError(f"{name}={v!r} is not accepted; it must be a finite number >= 0")
    if not math.isfinite(p.pitch_limit_deg) or not 0 <= p.pitch_limit_deg < 90:
        raise InputError(f"pitch_limit_deg={p.pitch_limit_deg!r} is not accepted; it must lie in [0, 90)")
    return p


# ----------------------------------------------------------------------------------------------- DSL


def parse_action(action: str) -> list[frozenset[str]]:
    """Expand an action DSL string into one set of held DSL letters per frame (camera.md §2).

    `"w-3,jw-2"` -> `[{w}, {w}, {w}, {j, w}, {j, w}]`. Case-insensitive, whitespace ignored, the full-width
    comma accepted, `none` means no key. Raises InputError naming the offending segment.
    """
    if not isinstance(action, str):
        raise InputError(f"action must be a string like 'w-80,jw-40', got {type(action).__name__}")
    if len(action) > MAX_DSL_LENGTH:
        raise InputError(f"action string of {len(action)} characters is too long (at most {MAX_DSL_LENGTH})")
    text = "".join(action.split()).replace("，", ",").lower()
    if not text:
        raise InputError("action string is empty; expected segments like 'w-80,jw-40' or 'none-16'")
    frames: list[frozenset[str]] = []
    for segment in text.split(","):
        keys_part, sep, count_part = segment.rpartition("-")
        if not sep:
            raise InputError(f"action segment {segment!r} has no '-<frames>' count; expected e.g. 'w-16'")
        if keys_part.endswith("-"):
            raise InputError(f"action segment {segment!r}: frame count must be > 0, got -{count_part}")
        if not keys_part:
            raise InputError(f"action segment {segment!r} names no key; use letters of {DSL_KEYS!r} or 'none'")
        if not count_part.isdigit() or not count_part.isascii():
            raise InputError(f"action segment {segment!r}: frame count {count_part!r} is not a positive integer")
        count = int(count_part)
        if count <= 0:
            raise InputError(f"action segment {segment!r}: frame count must be > 0, got {count}")
        if len(frames) + count > MAX_DSL_FRAMES:
            raise InputError(f"action segment {segment!r} takes the action past {MAX_DSL_FRAMES} frames")
        if keys_part == "none":
            held: frozenset[str] = frozenset()
        else:
            bad = sorted(set(keys_part) - set(DSL_KEYS))
            if bad:
                raise InputError(
                    f"action segment {segment!r}: unknown key {bad[0]!r}; accepted keys are "
                    f"{', '.join(DSL_KEYS)} or 'none'"
                )
            held = frozenset(keys_part)
        frames.extend([held] * count)
    return frames


def format_action(frames: Iterable[Iterable[str]]) -> str:
    """The shortest DSL string for a list of per-frame held letter sets (inverse of `parse_action`)."""
    out: list[str] = []
    prev: frozenset[str] | None = None
    count = 0
    for held in frames:
        held = frozenset(held)
        if held == prev:
            count += 1
            continue
        if prev is not None:
            out.append(f"{''.join(sorted(prev)) or 'none'}-{count}")
        prev, count = held, 1
    if prev is not None:
        out.append(f"{''.join(sorted(prev)) or 'none'}-{count}")
    if not out:
        raise InputError("cannot format an empty action: at least one frame is needed")
    return ",".join(out)


# ------------------------------------------------------------------------------------- integrator


def _rot_x(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def _rot_y(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _horizontal(v: np.ndarray, eps: float) -> np.ndarray:
    """`v` with its vertical (y) part removed, normalised by (norm + eps); zero stays zero."""
    h = np.array([v[0], 0.0, v[2]])
    n = math.sqrt(h[0] * h[0] + h[2] * h[2])
    return h / (n + eps) if n > 0 else h


@dataclass
class IntegratorState:
    """Everything that determines the next pose: enough to snapshot and resume bit-exactly."""

    rotation: np.ndarray = field(default_factory=lambda: np.eye(3))  # [3, 3] float64, camera-to-world
    translation: np.ndarray = field(default_factory=lambda: np.zeros(3))  # [3] float64, camera centre
    pitch: float = 0.0  # radians, accumulated pitch (the limit applies to it)
    velocity: np.ndarray = field(default_factory=lambda: np.zeros(4))  # v2: (tx, sx, yaw, pitch) per frame
    prev_controls: frozenset[str] = frozenset()  # v2: controls held on the previous frame
    frame: int = 0  # pixel frames integrated so far (pose index of the current pose)

    def c2w(self) -> np.ndarray:
        m = np.eye(4)
        m[:3, :3] = self.rotation
        m[:3, 3] = self.translation
        return m.astype(np.float32)

    def to_dict(self) -> dict:
        """JSON-safe snapshot. Floats are stored as their exact hex form so a restore is bit-exact."""
        return {
            "rotation": [float(x).hex() for x in self.rotation.reshape(-1)],
            "translation": [float(x).hex() for x in self.translation],
            "pitch": float(self.pitch).hex(),
            "velocity": [float(x).hex() for x in self.velocity],
            "prev_controls": sorted(self.prev_controls),
            "frame": self.frame,
        }

    @classmethod
    def from_dict(cls, d: dict) -> IntegratorState:
        try:
            state = cls(
                rotation=np.array([float.fromhex(x) for x in d["rotation"]]).reshape(3, 3),
                translation=np.array([float.fromhex(x) for x in d["translation"]]),
                pitch=float.fromhex(d["pitch"]),
                velocity=np.array([float.fromhex(x) for x in d["velocity"]]),
                prev_controls=frozenset(d["prev_controls"]),
                frame=int(d["frame"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"integrator snapshot is malformed ({e!r}); expected IntegratorState.to_dict()") from e
        if state.velocity.shape != (4,) or state.translation.shape != (3,):
            raise InputError("integrator snapshot has wrong vector lengths; expected velocity[4], translation[3]")
        unknown = sorted(state.prev_controls - set(CONTROLS))
        if unknown:
            raise InputError(f"integrator snapshot names unknown control {unknown[0]!r}; accepted: {CONTROLS}")
        return state


class CameraIntegrator:
    """Integrates held controls into camera-to-world poses, one pixel frame per `step`.

    `step(held)` takes the DSL letters held during the frame (a set; order and duplicates do not matter)
    and returns the new pose `[4, 4]` float32. Poses start at the identity (pose 0, the input image's
    camera); N steps give poses 1..N.
    """

    def __init__(self, params: KeymapParams | str = "v2") -> None:
        self.params = keymap_params(params) if isinstance(params, str) else params
        self.keymap = KEYMAPS[self.params.name]
        self.state = IntegratorState()

    def controls_of(self, held: Iterable[str]) -> frozenset[str]:
        """DSL letters -> canonical controls, rejecting anything else."""
        out = set()
        for key in held:
            control = self.keymap.get(key.lower()) if isinstance(key, str) else None
            if control is None:
                raise InputError(f"held key {key!r} is not a DSL key; accepted: {', '.join(DSL_KEYS)}")
            out.add(control)
        return frozenset(out)

    @staticmethod
    def check_controls(controls: Iterable[str]) -> frozenset[str]:
        """Canonical control names (as on the wire and in actions.log), rejecting anything else."""
        out = frozenset(controls)
        bad = sorted(c for c in out if c not in CONTROLS)
        if bad:
            raise InputError(f"unknown control {bad[0]!r}; accepted: {', '.join(CONTROLS)}")
        return out

    def snapshot(self) -> dict:
        return {"keymap": self.params.__dict__.copy(), "state": self.state.to_dict()}

    def restore(self, snap: dict) -> None:
        params = KeymapParams(**snap["keymap"])
        if params.name not in KEYMAPS:
            raise InputError(f"snapshot names unknown key map {params.name!r}; accepted: {sorted(KEYMAPS)}")
        self.params = params
        self.keymap = KEYMAPS[params.name]
        self.state = IntegratorState.from_dict(snap["state"])

    def step(self, held: Iterable[str]) -> np.ndarray:
        """Advance one pixel frame with the DSL letters `held` (under this key map); the new pose."""
        return self.step_controls(self.controls_of(held))

    def step_controls(self, controls: Iterable[str]) -> np.ndarray:
        """Advance one pixel frame with canonical controls held (what live keys and actions.log carry)."""
        c = self.check_controls(controls)
        if self.params.name == "v1":
            self._step_v1(c)
        else:
            self._step_v2(c)
        self.state.frame += 1
        return self.state.c2w()

    def _step_v1(self, c: frozenset[str]) -> None:
        p, s = self.params, self.state
        r = math.radians(p.rotation_speed_deg)
        lim = math.radians(p.pitch_limit_deg)
        dp = r * ("pitch_up" in c) - r * ("pitch_down" in c)
        if -lim <= s.pitch + dp <= lim:
            s.pitch += dp
        else:
            dp = 0.0
        dy = r * ("yaw_right" in c) - r * ("yaw_left" in c)
        s.rotation = _rot_y(dy) @ s.rotation @ _rot_x(dp)
        fwd = _horizontal(s.rotation[:, 2], 0.0)
        rgt = _horizontal(s.rotation[:, 0], 0.0)
        move_f = ("forward" in c) - ("back" in c)
        move_r = ("strafe_right" in c) - ("strafe_left" in c)
        s.translation = s.translation + p.translation_speed * (fwd * move_f + rgt * move_r)

    def _step_v2(self, c: frozenset[str]) -> None:
        p, s = self.params, self.state
        r = math.radians(p.rotation_speed_deg)
        lim = math.radians(p.pitch_limit_deg)
        target = np.array([
            p.translation_speed * (("forward" in c) - ("back" in c)),
            p.translation_speed * (("strafe_right" in c) - ("strafe_left" in c)),
            r * (("yaw_right" in c) - ("yaw_left" in c)),
            r * (("pitch_up" in c) - ("pitch_down" in c)),
        ])
        if p.smooth:
            if c - s.prev_controls:
                v = target.copy()
            else:
                dt = 1.0 / p.fps
                v = s.velocity.copy()
                for i in range(4):
                    tau = p.tau_press_s if abs(target[i]) > 1e-12 else p.tau_coast_s
                    v[i] += (1.0 - math.exp(-dt / tau)) * (target[i] - v[i])
            s.prev_controls = c
        else:
            v = target
        s.velocity = v
        new_pitch = min(max(s.pitch + v[3], -lim), lim)
        step = new_pitch - s.pitch
        s.pitch = new_pitch
        s.rotation = _rot_y(v[2]) @ s.rotation @ _rot_x(step)
        fwd = _horizontal(s.rotation[:, 2], 1e-6)
        rgt = _horizontal(s.rotation[:, 0], 1e-6)
        s.translation = s.translation + fwd * v[0] + rgt * v[1]


def rollout(frames: Iterable[Iterable[str]], params: KeymapParams | str = "v2") -> np.ndarray:
    """Poses `[N+1, 4, 4]` float32 for N per-frame held-key sets, starting at the identity."""
    integrator = CameraIntegrator(params)
    poses = [integrator.state.c2w()]
    poses.extend(integrator.step(held) for held in frames)
    return np.stack(poses)


def action_to_c2w(
    action: str,
    keymap: str = "v2",
    *,
    translation_speed: float | None = None,
    rotation_speed_deg: float | None = None,
    pitch_limit_deg: float | None = None,
    smooth: bool | None = None,
) -> np.ndarray:
    """Camera-to-world poses `[N+1, 4, 4]` float32 for an action DSL string of N frames (pose 0 = identity)."""
    params = keymap_params(
        keymap,
        translation_speed=translation_speed,
        rotation_speed_deg=rotation_speed_deg,
        pitch_limit_deg=pitch_limit_deg,
        smooth=smooth,
    )
    return rollout(parse_action(action), params)
