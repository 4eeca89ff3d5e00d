"""Instant response by reprojection: warp the frame on screen by the camera motion the held keys predict.

The engine applies a key change to the next chunk it starts, so generated frames reflect it 1-3 s
later. Until they do, the window shows the latest generated frame warped from its own camera (the
pose in its header) to the camera the held keys predict:

- rotation (yaw, pitch) is the homography `K Rᵀ K⁻¹` (exact for a pure rotation, any scene);
- translation is approximated by a fronto-parallel plane at `depth` in front of the camera:
  `K Rᵀ (I − t nᵀ/depth) K⁻¹`, n = +Z; pure forward motion is a zoom by depth/(depth − t_z) about the
  principal point, a strafe a shift by f·t_x/depth.

`PosePredictor` is a numpy copy of the engine's integrator (engine/controls.py, spec/camera.md §3-4):
a *prediction only* (the client never knows the engine's velocity state exactly and the engine's
poses, in frame headers, are the truth). Poses are camera-to-world 4×4, OpenCV axes (+X right, +Y
down, +Z forward). Pure numpy: no pygame, no sockets, no torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from protocol.keys import CONTROLS

# ------------------------------------------------------------------------------------ intrinsics


@dataclass(frozen=True)
class Intrinsics:
    """Pinhole intrinsics in the pixels of the frames on the wire."""

    fx: float
    fy: float
    cx: float
    cy: float

    def matrix(self) -> np.ndarray:
        """[3, 3] float64"""
        return np.array([[self.fx, 0.0, self.cx], [0.0, self.fy, self.cy], [0.0, 0.0, 1.0]])


def default_intrinsics(width: int, height: int) -> Intrinsics:
    """The engine presets' default field of view (fx = fy = 0.9·W, centred principal point)."""
    return Intrinsics(0.9 * width, 0.9 * width, width / 2.0, height / 2.0)


def crop_intrinsics(k: Iterable[float], image_wh: tuple[int, int], out_wh: tuple[int, int]) -> Intrinsics:
    """[fx, fy, cx, cy] in the original image's pixels -> the engine's resized + centre-cropped frame
    (spec/camera.md §7: scale to cover, Python rounding, centre crop)."""
    fx, fy, cx, cy = (float(v) for v in k)
    w, h = image_wh
    ow, oh = out_wh
    scale = max(oh / h, ow / w)
    rw, rh = max(ow, int(round(w * scale))), max(oh, int(round(h * scale)))
    left, top = (rw - ow) // 2, (rh - oh) // 2
    return Intrinsics(fx * rw / w, fy * rh / h, cx * rw / w - left, cy * rh / h - top)


# ----------------------------------------------------------------------------- pose prediction


@dataclass(frozen=True)
class PredictParams:
    """Speeds of a key map (same defaults as engine/controls.py DEFAULTS)."""

    keymap: str = "v2"
    translation_speed: float = 0.025  # per frame
    rotation_speed_deg: float = 0.6  # per frame
    pitch_limit_deg: float = 60.0
    smooth: bool = True
    tau_press_s: float = 0.45
    tau_coast_s: float = 1.0
    fps: float = 16.0


def predict_params(
    keymap: str = "v2",
    *,
    translation_speed: float | None = None,
    rotation_speed_deg: float | None = None,
    pitch_limit_deg: float | None = None,
) -> PredictParams:
    """The key map's defaults (v1: 0.05, 1.2°, 85°, no smoothing; v2: 0.025, 0.6°, 60°, smoothing) with overrides."""
    base = PredictParams("v1", 0.05, 1.2, 85.0, smooth=False) if keymap == "v1" else PredictParams()
    if keymap not in ("v1", "v2"):
        raise ValueError(f"keymap {keymap!r} is not accepted; accepted: v1, v2")
    return PredictParams(
        keymap,
        base.translation_speed if translation_speed is None else float(translation_speed),
        base.rotation_speed_deg if rotation_speed_deg is None else float(rotation_speed_deg),
        base.pitch_limit_deg if pitch_limit_deg is None else float(pitch_limit_deg),
        base.smooth,
    )


def _rot_x(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def _rot_y(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _flat(v: np.ndarray, eps: float) -> np.ndarray:
    h = np.array([v[0], 0.0, v[2]])
    n = math.hypot(h[0], h[2])
    return h / (n + eps) if n > 0 else h


@dataclass
class PosePredictor:
    """One-frame-at-a-time pose integration under a key map (a prediction of what the engine will do)."""

    params: PredictParams = field(default_factory=PredictParams)
    rotation: np.ndarray = field(default_factory=lambda: np.eye(3))  # [3, 3] float64, camera-to-world
    translation: np.ndarray = field(default_factory=lambda: np.zeros(3))  # [3] float64
    pitch: float = 0.0  # radians, accumulated
    velocity: np.ndarray = field(default_factory=lambda: np.zeros(4))  # v2: (forward, strafe, yaw, pitch) per frame
    prev: frozenset[str] = frozenset()  # v2: controls of the previous frame

    def reset_to(self, c2w: np.ndarray, held: Iterable[str] = ()) -> None:
        """Continue from a frame's pose, assuming the engine was moving at the steady speed of `held`."""
        c2w = np.asarray(c2w, np.float64).reshape(4, 4)
        self.rotation = c2w[:3, :3].copy()
        self.translation = c2w[:3, 3].copy()
        self.pitch = math.asin(max(-1.0, min(1.0, -self.rotation[1, 2])))  # R = Ry(yaw)·Rx(pitch)
        self.prev = frozenset(held)
        self.velocity = self._target(self.prev)

    def c2w(self) -> np.ndarray:
        """[4, 4] float64"""
        m = np.eye(4)
        m[:3, :3], m[:3, 3] = self.rotation, self.translation
        return m

    def _target(self, c: frozenset[str]) -> np.ndarray:
        p = self.params
        r = math.radians(p.rotation_speed_deg)
        return np.array(
            [
                p.translation_speed * (("forward" in c) - ("back" in c)),
                p.translation_speed * (("strafe_right" in c) - ("strafe_left" in c)),
                r * (("yaw_right" in c) - ("yaw_left" in c)),
                r * (("pitch_up" in c) - ("pitch_down" in c)),
            ]
        )

    def step(self, held: Iterable[str]) -> np.ndarray:
        """Advance one frame with these controls held; the new pose [4, 4] float64."""
        c = frozenset(held)
        bad = sorted(c - set(CONTROLS))
        if bad:
            raise ValueError(f"unknown control {bad[0]!r}; accepted: {', '.join(CONTROLS)}")
        p = self.params
        lim = math.radians(p.pitch_limit_deg)
        target = self._target(c)
        if p.keymap == "v1":  # no smoothing; a pitch step leaving the range is dropped whole
            v = target
            dp = v[3] if -lim <= self.pitch + v[3] <= lim else 0.0
            self.pitch += dp
            eps = 0.0
        else:
            if p.smooth and not (c - self.prev):
                v = self.velocity.copy()
                dt = 1.0 / p.fps
                for i in range(4):
                    tau = p.tau_press_s if abs(target[i]) > 1e-12 else p.tau_coast_s
                    v[i] += (1.0 - math.exp(-dt / tau)) * (target[i] - v[i])
            else:
                v = target
            new_pitch = min(max(self.pitch + v[3], -lim), lim)
            dp, self.pitch = new_pitch - self.pitch, new_pitch
            eps = 1e-6
        self.prev, self.velocity = c, v
        self.rotation = _rot_y(v[2]) @ self.rotation @ _rot_x(dp)
        fwd = _flat(self.rotation[:, 2], eps)
        rgt = _flat(self.rotation[:, 0], eps)
        self.translation = self.translation + fwd * v[0] + rgt * v[1]
        return self.c2w()


# ------------------------------------------------------------------------------------- homography


def relative_pose(c2w_from: np.ndarray, c2w_to: np.ndarray) -> np.ndarray:
    """Pose of camera `to` in the coordinates of camera `from`: inv(from) @ to, [4, 4] float64."""
    a = np.asarray(c2w_from, np.float64).reshape(4, 4)
    b = np.asarray(c2w_to, np.float64).reshape(4, 4)
    inv = np.eye(4)
    inv[:3, :3] = a[:3, :3].T
    inv[:3, 3] = -a[:3, :3].T @ a[:3, 3]
    return inv @ b


def homography(k: Intrinsics, rel: np.ndarray, depth: float = 3.0, min_scale: float = 0.25) -> np.ndarray:
    """[3, 3] float64 mapping pixels of the shown frame to pixels of the camera `rel` (= relative_pose).

    Rotation: K Rᵀ K⁻¹. Translation: the plane z = depth, K Rᵀ (I − t nᵀ/depth) K⁻¹; the forward part is
    clamped so the plane stays at least `min_scale`·depth ahead (no mirror image when moving far)."""
    rel = np.asarray(rel, np.float64)
    r, t = rel[:3, :3], rel[:3, 3]
    km = k.matrix()
    kinv = np.linalg.inv(km)
    plane = np.eye(3)
    plane[:, 2] -= t / depth  # I − t nᵀ / depth with n = (0, 0, 1)
    plane[2, 2] = max(plane[2, 2], min_scale)
    return km @ r.T @ plane @ kinv


def apply_homography(h: np.ndarray, points: np.ndarray) -> np.ndarray:
    """[N, 2] pixels -> [N, 2] pixels through a 3×3 homography."""
    pts = np.asarray(points, np.float64).reshape(-1, 2)
    q = np.c_[pts, np.ones(len(pts))] @ np.asarray(h, np.float64).T
    return q[:, :2] / q[:, 2:3]


class Warper:
    """Warps uint8 [H, W, 3] frames by a homography (inverse mapping, nearest neighbour, edges clamped).

    The pixel-centre grid [3, H·W] is built once per frame size."""

    def __init__(self) -> None:
        self._shape: tuple[int, int] | None = None
        self._grid: np.ndarray | None = None  # [3, H*W] float32: x, y, 1 of every output pixel

    def __call__(self, image: np.ndarray, h: np.ndarray) -> np.ndarray:
        hh, ww = image.shape[:2]
        if self._shape != (hh, ww):
            ys, xs = np.mgrid[0:hh, 0:ww].astype(np.float32)
            self._grid = np.stack([xs.ravel(), ys.ravel(), np.ones(hh * ww, np.float32)])
            self._shape = (hh, ww)
        src = np.linalg.inv(np.asarray(h, np.float64)).astype(np.float32) @ self._grid  # output -> shown pixel
        w = src[2]
        w = np.where(np.abs(w) < 1e-6, 1e-6, w)
        xs = np.clip(np.rint(src[0] / w), 0, ww - 1).astype(np.intp)
        ys = np.clip(np.rint(src[1] / w), 0, hh - 1).astype(np.intp)
        return image[ys, xs].reshape(hh, ww, image.shape[2])


# ------------------------------------------------------------------------------------- reprojector


class Reprojector:
    """Which warp the frame on screen needs now.

        rp.on_shown(index, pose, keys_seq, applied)   # every generated frame put on screen
        rp.on_keys(held, seq)                          # a change of the held set (seq of its `keys` message)
        h = rp.homography()                            # None: show the frame as it is

    On a change, prediction starts at the frame on screen (its pose and applied controls) and takes one
    step at once (so the next display refresh already moves), then one step per new frame shown. Once
    a frame arrives whose header's `keys_seq` covers the latest change, the generated video reflects
    the keys and prediction stops. At most `max_steps` predicted frames (a stalled engine must not
    warp forever).
    """

    def __init__(
        self, k: Intrinsics, params: PredictParams, depth: float = 3.0, max_steps: int = 72, enabled: bool = True
    ) -> None:
        self.k = k
        self.params = params
        self.depth = depth
        self.max_steps = max_steps
        self.enabled = enabled
        self.predictor = PosePredictor(params)
        self.reset()

    def reset(self) -> None:
        self.active = False
        self.pending_seq = -1  # seq of the latest change not yet reflected by generated frames
        self.held: frozenset[str] = frozenset()
        self.steps = 0
        self.shown_index = -1
        self.shown_pose: np.ndarray | None = None  # [4, 4] of the frame on screen
        self.shown_applied: frozenset[str] = frozenset()

    def on_keys(self, held: Iterable[str], seq: int) -> None:
        self.held = frozenset(held)
        self.pending_seq = max(self.pending_seq, seq)
        if not self.enabled or self.shown_pose is None:
            return
        if not self.active:
            self.predictor.reset_to(self.shown_pose, self.shown_applied)
            self.active, self.steps = True, 0
        self._advance(1)

    def on_shown(self, index: int, pose, keys_seq: int, applied: Iterable[str]) -> None:
        new = max(0, index - self.shown_index) if self.shown_index >= 0 else 0
        self.shown_index = index
        self.shown_pose = np.asarray(pose, np.float64).reshape(4, 4)
        self.shown_applied = frozenset(applied)
        if self.active and keys_seq >= self.pending_seq:
            self.active = False  # the generated video has caught up with the keys
        elif self.active:
            self._advance(new)

    def _advance(self, n: int) -> None:
        for _ in range(n):
            if self.steps >= self.max_steps:
                return
            self.predictor.step(self.held)
            self.steps += 1

    def homography(self) -> np.ndarray | None:
        if not (self.enabled and self.active) or self.shown_pose is None:
            return None
        return homography(self.k, relative_pose(self.shown_pose, self.predictor.c2w()), self.depth)
