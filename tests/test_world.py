"""Presets and weights: the tiny world is deterministic, and a world round-trips through a weights directory
read by the real loaders (every key checked)."""

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.errors import InputError
from engine.rollout import Rollout, ScriptedControls
from engine.world import WorldPipeline, build_world, save_world


def states(world):
    out = {}
    for name in ("stage1", "vae", "refiner", "connectors"):
        for k, v in getattr(world, name).state_dict().items():
            out[f"{name}.{k}"] = v
    return out


def chunks(world, quality, n=2):
    pipe = WorldPipeline(world)
    g = torch.Generator().manual_seed(0)
    pipe.start(torch.rand(1, 3, *world.preset.pixel_hw, generator=g) * 2 - 1, "a street at night", quality)
    ro = Rollout(pipe, ScriptedControls.from_action("w-24,jw-24,a-24"), intrinsics_px=world.preset.default_intrinsics,
                 seed=1, quality=quality)
    return list(ro.chunks(n))


@pytest.fixture(scope="module")
def world():
    return build_world("tiny", seed=0)


def test_tiny_preset_is_deterministic(world):
    again, other = build_world("tiny", seed=0), build_world("tiny", seed=1)
    a, b, c = states(world), states(again), states(other)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point() and a[k].numel() > 1)
    e1, e2 = world.text.stage1.compute("a dog"), again.text.stage1.compute("a dog")
    assert torch.equal(e1.embeds, e2.embeds)


def test_unknown_preset():
    with pytest.raises(InputError, match="preset"):
        build_world("huge")


@pytest.fixture(scope="module")
def weights_dir(world, tmp_path_factory):
    return save_world(world, tmp_path_factory.mktemp("weights"))


@pytest.mark.parametrize("quality", ["preview", "full"])
def test_world_round_trips_through_a_weights_directory(world, weights_dir, quality):
    loaded = build_world("tiny", weights=weights_dir)
    a, b = states(world), states(loaded)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for x, y in zip(chunks(world, quality), chunks(loaded, quality), strict=True):
        assert np.array_equal(x.frames, y.frames)


def test_bad_weights_directory_names_the_problem(weights_dir, tmp_path):
    with pytest.raises(InputError, match="not a directory"):
        build_world("tiny", weights=tmp_path / "nothing")
    broken = tmp_path / "broken"
    shutil.copytree(weights_dir, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(InputError, match="vae"):
        build_world("tiny", weights=broken)
    shutil.copytree(weights_dir / "vae", broken / "vae")
    f = broken / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(f))
    state["final_layer.linear.weight"] = state["final_layer.linear.weight"][:-1].contiguous()
    save_file(state, str(f))
    with pytest.raises(InputError, match="final_layer.linear.weight"):
        build_world("tiny", weights=broken)


@pytest.mark.parametrize("quality", ["preview", "full"])
def test_stage1_cache_pass_runs_after_the_chunk_is_handed_out(world, quality):
    """A chunk leaves its stage-1 cache pass pending (off the path from its keys to its frames); the consumer's
    `finish_chunk` runs it once, the next chunk runs it otherwise, a snapshot or a prompt change runs it first,
    a restore drops it. Either way the chunks are the same."""
    pipe = WorldPipeline(world)
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, *world.preset.pixel_hw, generator=g) * 2 - 1
    pipe.start(image, "a street at night", quality)
    ro = Rollout(pipe, ScriptedControls.from_action("w-24,jw-24,a-24"), intrinsics_px=world.preset.default_intrinsics,
                 seed=1, quality=quality)
    gen = ro.chunks(3)
    first = next(gen)
    assert pipe.stream.next_frame == 0  # chunk 0's pass has not run yet
    assert ro.finish_chunk() and pipe.stream.next_frame == first.latents.shape[2]
    assert not ro.finish_chunk()  # once
    second = next(gen)  # its consumer does not finish it: the next chunk does, before its keys are sampled
    snap = pipe.snapshot()  # ... or a snapshot, first
    assert int(snap["stage1.frames_written"]) == first.latents.shape[2] + second.latents.shape[2]
    third = next(gen)
    assert "stage1_prev_cache" in second.timings and "stage1_prev_cache" in third.timings
    plain = chunks(world, quality, 3)
    for a, b in zip((first, second, third), plain, strict=True):
        assert torch.equal(a.latents, b.latents) and np.array_equal(a.frames, b.frames)
    pipe.restore(snap)  # a pending pass (the third chunk's) is dropped: the snapshot's state stands
    assert pipe._pending_cache is None and not pipe.finish_chunk()
    assert pipe.stream.next_frame == int(snap["stage1.frames_written"])
