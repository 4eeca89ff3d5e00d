"""Controls: DSL parsing, both key maps against the reference rollouts, live == DSL, snapshot/restore."""

import json

import numpy as np
import pytest
from conftest import fixture_params
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from engine.controls import (
    DSL_KEYS,
    CameraIntegrator,
    action_to_c2w,
    format_action,
    keymap_params,
    parse_action,
)
from engine.errors import InputError

CAMERA = fixture_params("camera.safetensors")


def _load(path):
    return load_file(str(path)), json.loads(path.with_suffix(".json").read_text())


@pytest.mark.parametrize("path", CAMERA)
def test_rollouts_match_reference(path):
    tensors, cfg = _load(path)
    v2 = cfg["v2_defaults"]
    assert v2["fps"] == keymap_params("v2").fps
    assert (v2["tau_press_s"], v2["tau_coast_s"]) == (keymap_params("v2").tau_press_s, keymap_params("v2").tau_coast_s)
    speeds = ("translation_speed", "rotation_speed_deg", "pitch_limit_deg")
    checked = 0
    for a in cfg["actions"]:
        cases = {
            ".c2w": action_to_c2w(a["action"], "v1", **{s: a[s] for s in speeds}),
            ".custom.c2w": action_to_c2w(a["action"], "v1", **{s: cfg["custom_speeds"][s] for s in speeds}),
            ".v2.c2w": action_to_c2w(a["action"], "v2", **{s: v2[s] for s in speeds}),
            ".v2_unsmoothed.c2w": action_to_c2w(a["action"], "v2", smooth=False, **{s: v2[s] for s in speeds}),
        }
        for suffix, ours in cases.items():
            ref = tensors[a["key"] + suffix].numpy()
            assert ours.dtype == np.float32 and ours.shape == ref.shape, (a["key"], suffix)
            np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0, err_msg=f"{a['key']}{suffix}")
            checked += 1
    assert checked == 4 * len(cfg["actions"]) > 0


def test_dsl_grammar():
    assert parse_action("w-2, JW-1") == [frozenset("w")] * 2 + [frozenset("jw")]
    assert parse_action("none-2，ww-1") == [frozenset()] * 2 + [frozenset("w")]
    assert parse_action(" w - 3 ") == [frozenset("w")] * 3
    assert format_action(parse_action("w-3,jw-2,none-1")) == "w-3,jw-2,none-1"


@pytest.mark.parametrize("bad, needle", [
    ("", "empty"), ("   ", "empty"), ("w", "no '-"), ("w-0", "> 0"), ("w--1", "> 0"),
    ("w-x", "not a positive"), ("q-3", "'q'"), ("-3", "names no key"), ("w-3,,a-2", "no '-"),
    ("w-1e3", "not a positive"), ("w-99999999999", "past"), ("w-٣", "not a positive"),
])
def test_dsl_errors_name_the_segment(bad, needle):
    with pytest.raises(InputError, match=None) as e:
        parse_action(bad)
    assert needle in str(e.value)


def test_bad_settings_are_rejected():
    with pytest.raises(InputError, match="key map"):
        action_to_c2w("w-1", "v3")
    with pytest.raises(InputError, match="pitch_limit_deg"):
        action_to_c2w("w-1", pitch_limit_deg=95)
    with pytest.raises(InputError, match="translation_speed"):
        action_to_c2w("w-1", translation_speed=float("nan"))
    with pytest.raises(InputError, match="v1"):
        action_to_c2w("w-1", "v1", smooth=True)
    with pytest.raises(InputError, match="not a DSL key"):
        CameraIntegrator().step({"x"})


@pytest.mark.parametrize("keymap", ["v1", "v2"])
def test_live_integrator_equals_dsl_and_resumes(keymap):
    action = "w-10,jw-7,none-5,ik-4,il-9,s-3,ad-6,none-12,k-30"
    frames = parse_action(action)
    ref = action_to_c2w(action, keymap)
    live = CameraIntegrator(keymap)
    poses = [live.state.c2w()]
    half = len(frames) // 2
    for held in frames[:half]:
        poses.append(live.step(sorted(held, reverse=True)))  # order of the held set must not matter
    snap = json.loads(json.dumps(live.snapshot()))  # must survive a trip through JSON
    resumed = CameraIntegrator("v1" if keymap == "v2" else "v2")
    resumed.restore(snap)
    for held in frames[half:]:
        poses.append(resumed.step(held))
    assert np.array_equal(np.stack(poses), ref)


def test_v2_coasts_after_release_and_snaps_on_press():
    c2w = action_to_c2w("w-20,none-40", "v2")
    z = c2w[:, 2, 3]
    step = np.diff(z)
    assert step[0] == pytest.approx(keymap_params("v2").translation_speed, rel=1e-5)  # snaps on press
    assert np.all(step[20:] > 0) and np.all(np.diff(step[20:]) < 0)  # coasting, decaying
    unsmoothed = action_to_c2w("w-20,none-40", "v2", smooth=False)
    assert np.all(np.diff(unsmoothed[:, 2, 3])[20:] == 0)


def test_pitch_limits():
    lim = keymap_params("v2").pitch_limit_deg
    c2w = action_to_c2w("i-400", "v2")
    pitch = np.degrees(np.arcsin(-c2w[:, 1, 2].astype(np.float64)))
    assert pitch.max() == pytest.approx(lim, abs=1e-3)
    c2w = action_to_c2w("i-400", "v1")
    pitch = np.degrees(np.arcsin(-c2w[:, 1, 2].astype(np.float64)))
    assert pitch.max() <= keymap_params("v1").pitch_limit_deg + 1e-4


segment = st.tuples(
    st.one_of(st.just("none"), st.text(alphabet=DSL_KEYS + DSL_KEYS.upper(), min_size=1, max_size=5)),
    st.integers(min_value=1, max_value=40),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(segment, min_size=1, max_size=8), st.sampled_from(["v1", "v2"]), st.booleans())
def test_random_valid_dsl_gives_orthonormal_poses(segments, keymap, comma):
    action = ("，" if comma else ",").join(f"{k}-{n}" for k, n in segments)
    c2w = action_to_c2w(action, keymap)
    n = sum(n for _, n in segments)
    assert c2w.shape == (n + 1, 4, 4) and c2w.dtype == np.float32
    r = c2w[:, :3, :3].astype(np.float64)
    np.testing.assert_allclose(r @ r.transpose(0, 2, 1), np.broadcast_to(np.eye(3), r.shape), atol=1e-5)
    np.testing.assert_allclose(np.linalg.det(r), 1.0, atol=1e-5)
    assert np.all(c2w[:, 1, 3] == 0)  # the camera never moves vertically
    assert np.array_equal(c2w[:, 3], np.broadcast_to(np.array([0, 0, 0, 1], np.float32), (n + 1, 4)))


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=30))
def test_arbitrary_text_parses_or_raises_input_error(text):
    try:
        frames = parse_action(text)
    except InputError:
        return
    assert frames and all(set(f) <= set(DSL_KEYS) for f in frames)


@settings(max_examples=100, deadline=None)
@given(st.lists(segment, min_size=1, max_size=4), st.sampled_from(["x", "-", "0", "w-", ",", "q"]),
       st.integers(min_value=0, max_value=3))
def test_invalid_dsl_always_raises_input_error(segments, junk, where):
    good = [f"{k}-{n}" for k, n in segments]
    good.insert(min(where, len(good)), junk)
    with pytest.raises(InputError):
        parse_action(",".join(good))


def test_sample_action_strings_parse():
    from pathlib import Path

    samples = sorted((Path(__file__).resolve().parents[1] / "recordings" / "samples").glob("*.dsl"))
    assert samples
    for path in samples:
        c2w = action_to_c2w(path.read_text(), "v2")
        assert len(c2w) > 24, path.name  # at least one chunk
