"""Reprojection as math: the client's numpy pose predictor against the engine's integrator, the homography
of a pure yaw/pitch against the integrator's next pose, forward motion as a zoom about the principal point."""

import numpy as np
import pytest

from client.reproject import (
    Intrinsics,
    PosePredictor,
    Reprojector,
    Warper,
    apply_homography,
    crop_intrinsics,
    default_intrinsics,
    homography,
    predict_params,
    relative_pose,
)
from engine.controls import CameraIntegrator, keymap_params
from protocol.keys import CONTROLS

H, W = 704, 1280


def _project(k: Intrinsics, c2w: np.ndarray, ray_world: np.ndarray) -> np.ndarray:
    """Pixel of a world direction (a point at infinity) in camera c2w."""
    d = c2w[:3, :3].T @ ray_world
    p = k.matrix() @ d
    return p[:2] / p[2]


@pytest.mark.parametrize("keymap", ["v1", "v2"])
def test_predictor_matches_engine_integrator(keymap):
    rng = np.random.default_rng(0)
    engine = CameraIntegrator(keymap_params(keymap))
    pred = PosePredictor(predict_params(keymap))
    held = frozenset()
    for i in range(300):
        if i % 7 == 0:
            held = frozenset(c for c in CONTROLS if rng.random() < 0.3)
        want = engine.step_controls(held).astype(np.float64)
        got = pred.step(held)
        assert np.abs(got - want).max() < 1e-6, (i, sorted(held))
    assert np.abs(pred.c2w()[:3, 3]).max() > 0.1  # it moved: the comparison was not of two identities


@pytest.mark.parametrize("control", ["yaw_right", "yaw_left", "pitch_up", "pitch_down"])
@pytest.mark.parametrize("k", [default_intrinsics(W, H), Intrinsics(1000.0, 980.0, 600.0, 380.0)])
def test_rotation_homography_maps_centre_ray_to_integrator_next_pose(control, k):
    # start from a non-trivial pose reached by the engine integrator itself
    engine = CameraIntegrator(keymap_params("v2"))
    for _ in range(20):
        engine.step_controls({"yaw_left", "pitch_up"})
    for _ in range(10):
        engine.step_controls(set())  # let it coast nearly to rest
    shown = engine.state.c2w().astype(np.float64)
    pred = PosePredictor(predict_params("v2"))
    pred.reset_to(shown)
    centre = np.array([[k.cx, k.cy]])
    ray = shown[:3, :3] @ np.linalg.inv(k.matrix()) @ np.array([k.cx, k.cy, 1.0])
    max_err, max_move = 0.0, 0.0
    for _ in range(24):
        nxt = engine.step_controls({control}).astype(np.float64)
        predicted = pred.step({control})
        hmat = homography(k, relative_pose(shown, predicted))
        got = apply_homography(hmat, centre)[0]
        want = _project(k, nxt, ray)
        max_err = max(max_err, float(np.abs(got - want).max()))
        max_move = max(max_move, float(np.abs(want - centre[0]).max()))
    assert max_err <= 0.5, max_err
    assert max_move > 50  # the centre ray really moved (24 frames of 0.6°/frame ≈ 150 px)
    # the direction is the sign convention of camera.md §1: yaw right moves the scene left, pitch up moves it down
    sign = {"yaw_right": (0, -1), "yaw_left": (0, 1), "pitch_up": (1, 1), "pitch_down": (1, -1)}[control]
    assert np.sign(want[sign[0]] - centre[0][sign[0]]) == sign[1]


def test_forward_motion_is_a_zoom_about_the_principal_point():
    k = default_intrinsics(W, H)
    engine = CameraIntegrator(keymap_params("v2"))
    shown = engine.state.c2w().astype(np.float64)
    for _ in range(12):
        nxt = engine.step_controls({"forward"}).astype(np.float64)
    rel = relative_pose(shown, nxt)
    dz = rel[2, 3]
    assert dz > 0.2 and np.allclose(rel[:3, :3], np.eye(3)) and abs(rel[0, 3]) < 1e-9
    depth = 3.0
    hmat = homography(k, rel, depth)
    s = depth / (depth - dz)
    pts = np.array([[k.cx, k.cy], [0.0, 0.0], [W - 1.0, 100.0], [37.0, H - 5.0]])
    got = apply_homography(hmat, pts)
    want = np.array([k.cx, k.cy]) + s * (pts - np.array([k.cx, k.cy]))
    assert np.abs(got - want).max() < 1e-6
    assert s > 1.05  # a visible zoom in
    # the warped image: the pixel at the principal point stays, content moves outwards by s
    img = np.zeros((H, W, 3), np.uint8)
    img[:, :, 0] = (np.arange(W) % 256).astype(np.uint8)[None]
    img[:, :, 1] = (np.arange(H) % 256).astype(np.uint8)[:, None]
    out = Warper()(img, hmat)
    cy, cx = int(k.cy), int(k.cx)
    assert (out[cy, cx] == img[cy, cx]).all()
    x_src = 200
    x_dst = int(round(k.cx + s * (x_src - k.cx)))
    assert abs(int(out[cy, x_dst, 0]) - x_src % 256) <= 1


def test_back_motion_far_away_does_not_mirror():
    k = default_intrinsics(W, H)
    rel = np.eye(4)
    rel[2, 3] = 10.0  # far beyond the assumed scene depth
    hmat = homography(k, rel, depth=3.0)
    p = apply_homography(hmat, np.array([[0.0, 0.0]]))[0]
    assert p[0] < k.cx and p[1] < k.cy  # still zoomed in the same direction, clamped


def test_warper_identity_and_shift():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
    warp = Warper()
    assert (warp(img, np.eye(3)) == img).all()
    shift = np.array([[1.0, 0, 5], [0, 1.0, -3], [0, 0, 1]])  # content moves 5 right, 3 up
    out = warp(img, shift)
    assert (out[0:30, 10:50] == img[3:33, 5:45]).all()


def test_crop_intrinsics_follow_camera_md_section_7():
    # 1000x500 -> resized 1408x704, offset (64, 0) (camera.md §7 example)
    k = crop_intrinsics([500.0, 500.0, 500.0, 250.0], (1000, 500), (1280, 704))
    assert k.fx == pytest.approx(500 * 1408 / 1000) and k.cx == pytest.approx(500 * 1408 / 1000 - 64)
    assert k.cy == pytest.approx(250 * 704 / 500)


def test_reprojector_warps_at_once_and_stops_when_generated_frames_catch_up():
    k = default_intrinsics(320, 192)
    rp = Reprojector(k, predict_params("v2"))
    pose = np.eye(4)
    rp.on_shown(10, pose, keys_seq=3, applied=frozenset())
    assert rp.homography() is None  # nothing pressed: the frame as it is
    rp.on_keys({"yaw_right"}, seq=7)
    h1 = rp.homography()
    assert h1 is not None and not np.allclose(h1, np.eye(3))  # response before any new frame arrives
    x1 = apply_homography(h1, [[160, 96]])[0, 0]
    rp.on_shown(11, pose, keys_seq=5, applied=frozenset())  # old keys still on screen: prediction grows
    x2 = apply_homography(rp.homography(), [[160, 96]])[0, 0]
    assert x2 < x1 < 160
    rp.on_shown(12, pose, keys_seq=7, applied=frozenset({"yaw_right"}))  # generated video has the change
    assert rp.homography() is None
    rp.enabled = False
    rp.on_keys(set(), seq=9)
    assert rp.homography() is None
