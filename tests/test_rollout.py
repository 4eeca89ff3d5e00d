"""The rollout generator on the tiny world: frames and poses, live == scripted, resume == uninterrupted."""

import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from engine.controls import action_to_c2w
from engine.errors import InputError
from engine.rollout import LiveControls, PoseControls, Rollout, ScriptedControls, chunk_noise, chunk_plan
from engine.world import WorldPipeline, build_world

ACTION = "w-20,jw-30,ik-10,l-12"  # 72 frames = 3 chunks


@pytest.fixture(scope="module")
def world():
    return build_world("tiny", seed=0)


def first_image(world, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, *world.preset.pixel_hw, generator=g) * 2 - 1


def run(world, controls, quality="preview", n=None, seed=3, prompt="a street"):
    pipe = WorldPipeline(world)
    pipe.start(first_image(world), prompt, quality)
    ro = Rollout(pipe, controls, intrinsics_px=world.preset.default_intrinsics, seed=seed, quality=quality)
    return ro, list(ro.chunks(n))


def test_chunk_plan():
    p0, p1, p2 = chunk_plan(0), chunk_plan(1), chunk_plan(2)
    assert (p0.latent_start, p0.latent_count, p0.pixel_start, p0.pixel_count) == (0, 4, 1, 24)
    assert (p1.latent_start, p1.latent_count, p1.pixel_start) == (4, 3, 25)
    assert (p2.latent_start, p2.pixel_start) == (7, 49)
    with pytest.raises(InputError):
        chunk_plan(-1)


@pytest.mark.parametrize("quality", ["preview", "full"])
def test_frames_and_poses_follow_the_action(world, quality):
    _, chunks = run(world, ScriptedControls.from_action(ACTION), quality)
    assert len(chunks) == 3
    h, w = world.preset.pixel_hw
    frames = np.concatenate([c.frames for c in chunks])
    poses = np.concatenate([c.poses for c in chunks])
    ref = action_to_c2w(ACTION, "v2")
    if quality == "full":  # the refiner path drops the anchor frame (camera.md §10)
        assert frames.shape == (72, h, w, 3) and chunks[0].frame_start == 1
        assert np.array_equal(poses, ref[1:])
    else:
        assert frames.shape == (73, h, w, 3) and chunks[0].frame_start == 0
        assert np.array_equal(poses, ref)
    assert frames.dtype == np.uint8 and frames.std() > 1  # not a constant image
    for c in chunks:
        assert set(c.timings) >= {"stage1", "decode", "total"}


def test_live_controls_equal_scripted(world):
    _, scripted = run(world, ScriptedControls.from_action("w-24,jw-24"), n=2)
    live = LiveControls("v2")
    pipe = WorldPipeline(world)
    pipe.start(first_image(world), "a street", "preview")
    ro = Rollout(pipe, live, intrinsics_px=world.preset.default_intrinsics, seed=3)
    gen = ro.chunks()
    live.set_held({"forward"}, seq=1)
    a = next(gen)
    live.set_held({"forward", "strafe_left"}, seq=2)
    live.set_held({"back"}, seq=1)  # an overtaken older message is ignored
    b = next(gen)
    assert (a.key_seq, b.key_seq) == (1, 2)
    for x, y in zip([a, b], scripted, strict=True):
        assert np.array_equal(x.frames, y.frames) and np.array_equal(x.poses, y.poses)


def test_pose_controls_use_explicit_poses(world):
    c2w = action_to_c2w("w-48", "v1")
    world_pose = np.eye(4, dtype=np.float32)
    world_pose[:3, 3] = [1.0, 2.0, 3.0]
    _, chunks = run(world, PoseControls(world_pose @ c2w))
    assert len(chunks) == 2
    assert np.allclose(np.concatenate([c.poses for c in chunks]), c2w, atol=1e-5)


def run_then_restore(world, quality):
    """Chunk 0, then its snapshot restored into a fresh pipeline and control source, as after a restart."""
    ro, first = run(world, ScriptedControls.from_action(ACTION), quality, n=1)
    tensors, meta = ro.snapshot()
    resumed = Rollout(WorldPipeline(world), ScriptedControls.from_action(ACTION),
                      intrinsics_px=world.preset.default_intrinsics, quality=quality)
    resumed.restore(tensors, meta)
    return first, resumed


@pytest.mark.parametrize("quality", ["preview", "full"])
def test_snapshot_restore_equals_uninterrupted(world, quality):
    _, whole = run(world, ScriptedControls.from_action(ACTION), quality)
    first, resumed = run_then_restore(world, quality)
    rest = list(resumed.chunks())
    assert [c.index for c in rest] == [1, 2]
    for x, y in zip(first + rest, whole, strict=True):
        assert np.array_equal(x.frames, y.frames), x.index
        assert torch.equal(x.latents, y.latents)


@pytest.mark.parametrize("quality", ["preview", "full"])
def test_replaying_stored_latents_rebuilds_the_caches(world, quality):
    """Resume = snapshot at chunk 0 + cache-write replay of chunk 1 from its stored latents."""
    _, whole = run(world, ScriptedControls.from_action(ACTION), quality)
    _, resumed = run_then_restore(world, quality)
    resumed.replay(whole[1].latents, whole[1].refined)
    (last,) = list(resumed.chunks())
    assert last.index == 2
    assert np.array_equal(last.frames, whole[2].frames)


def test_noise_is_a_function_of_seed_and_chunk():
    a = chunk_noise(1, 5, (1, 2, 3, 4, 5))
    assert torch.equal(a, chunk_noise(1, 5, (1, 2, 3, 4, 5)))
    assert not torch.equal(a, chunk_noise(1, 6, (1, 2, 3, 4, 5)))
    assert not torch.equal(a, chunk_noise(2, 5, (1, 2, 3, 4, 5)))
    assert not torch.equal(a, chunk_noise(1, 5, (1, 2, 3, 4, 5), stream=1))


class NoiseRecorder:
    """A pipeline stand-in that records the noise each chunk gets (no model)."""

    pixel_hw, latent_hw, latent_channels = (64, 96), (2, 3), 4

    def __init__(self) -> None:
        self.noise = []

    def run_chunk(self, inputs, quality):
        self.noise.append((inputs.plan.index, inputs.noise, inputs.refiner_noise))
        n = 1 + 24 if inputs.plan.index == 0 else 24
        return SimpleNamespace(frames=np.zeros((n, 64, 96, 3), np.uint8), latents=None, refined=None, timings={})

    def finish_chunk(self) -> bool:
        return False

    def restore(self, state) -> None:
        pass


@pytest.mark.parametrize("quality", ["preview", "full"])
def test_prefetched_noise_is_chunk_noise_whatever_the_rollout_does(quality, monkeypatch):
    """The next chunk's noise is drawn in the background; what each chunk gets is still `chunk_noise` of its own
    (seed, index, streams), also after a restore moved the rollout back and changed its seed. Only the first chunk
    and the first one after each restore draw on the rollout's own thread."""
    import engine.rollout as rollout_mod

    draws = []
    real_draw = rollout_mod.draw_chunk_noise

    def recording_draw(seed, index, shape, refiner):
        draws.append((seed, index, threading.current_thread() is threading.main_thread()))
        return real_draw(seed, index, shape, refiner)

    monkeypatch.setattr(rollout_mod, "draw_chunk_noise", recording_draw)
    rec = NoiseRecorder()
    ro = Rollout(rec, ScriptedControls.from_action("w-200"), intrinsics_px=(80, 80, 48, 32), seed=3,
                 quality=quality)
    list(ro.chunks(1))
    after_first = ro.controls.snapshot()
    list(ro.chunks(2))  # chunk 3's draw (seed 3) is now pending
    ro.restore({}, {"next_index": 3, "seed": 4, "quality": quality, "controls": ro.controls.snapshot()})
    list(ro.chunks(1))  # same index, other seed: the pending draw must not be used
    ro.restore({}, {"next_index": 1, "seed": 4, "quality": quality, "controls": after_first})
    list(ro.chunks(2))
    seeds = [3, 3, 3, 4, 4, 4]
    assert [i for i, _, _ in rec.noise] == [0, 1, 2, 3, 1, 2]
    inline = sorted((seed, i) for seed, i, main in draws if main)
    assert inline == [(3, 0), (4, 1), (4, 3)]  # the rest were drawn ahead, on the worker
    for (i, noise, ref), seed in zip(rec.noise, seeds, strict=True):
        shape = (1, 4, chunk_plan(i).latent_count, 2, 3)
        assert torch.equal(noise, chunk_noise(seed, i, shape))
        if quality == "full":
            assert torch.equal(ref, chunk_noise(seed, i, shape, stream=1))
        else:
            assert ref is None


def test_bad_quality_is_rejected(world):
    with pytest.raises(InputError, match="quality"):
        Rollout(WorldPipeline(world), LiveControls(), intrinsics_px=world.preset.default_intrinsics, quality="max")
