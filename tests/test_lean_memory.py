"""`lean-memory` (engine/fast/lean_memory.py) against the plain path: the same chunks, prompt changes included, with
the prompt- and image-only weights kept on the host between uses, the VAE decoding one latent frame per call and the
refiner's K/V window without the active block's slots.

CPU: the tiny world (the host residency moves nothing there, so the stage-1 latents are bit-equal; the refiner's
two-segment attention and the decode split round differently, so refined latents and frames are compared within
tolerances). GPU: the same with page-locked host weights, the graphs and the compiled blocks, and the device memory
the weights no longer take."""

import numpy as np
import pytest
import torch

from engine.bench import build_bench_world
from engine.fast import apply_fast_paths
from engine.fast.lean_memory import host_resident_bytes, prompt_and_image_modules
from engine.world import WorldPipeline
from tests.test_fast_paths_gpu import rollout as live_loop

CHUNKS = 6


def rollout(world, fast, quality):
    """Chunks of a live loop; the prompt changes before chunk 3."""
    pipe, applied, out, _ = live_loop(world, fast, quality, chunks=CHUNKS, prompt_after=2)
    return pipe, applied, out


def frames_close(a: np.ndarray, b: np.ndarray, max_levels: int) -> None:
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    print(f"frames: max |diff| {diff.max()} levels, mean {diff.mean():.2e}")
    assert diff.max() <= max_levels


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def owned(module):
    return list(module._parameters.values()) + list(module._buffers.values())


@pytest.mark.parametrize("quality", ["preview", "full"])
def test_lean_memory_equals_plain_on_cpu(quality):
    world = build_bench_world("tiny", device="cpu", dtype=torch.float32, seed=1)
    _, _, plain = rollout(world, (), quality)
    pipe, applied, lean = rollout(world, ("lean-memory",), quality)
    assert "lean-memory" in applied and pipe.decode_frames_per_call == 1
    assert host_resident_bytes(world) > 0
    if quality == "full":
        assert not pipe.refiner.window.active_slots
    for a, b in zip(lean, plain, strict=True):
        assert torch.equal(a.latents, b.latents)
        if quality == "full":
            assert rel(a.refined, b.refined) <= 1e-5
        frames_close(a.frames, b.frames, max_levels=1)


def test_lean_memory_covers_the_prompt_and_image_weights_once():
    world = build_bench_world("tiny", device="cpu", dtype=torch.float32, seed=1)
    pipe = WorldPipeline(world)
    apply_fast_paths(pipe, ("lean-memory",))
    modules = prompt_and_image_modules(world)
    names = {n for n, m in world.refiner.named_modules() if m in modules}
    assert {f"transformer_blocks.{i}.attn2.to_k" for i in range(len(world.refiner.transformer_blocks))} <= names
    assert not any(".attn1." in n or ".ff." in n for n in names)  # what a chunk reads stays where it was
    assert any(m is world.vae.encoder.conv_in.conv for m in modules)
    assert not any(m in modules for m in world.vae.decoder.modules())
    held = host_resident_bytes(world)
    expected = sum(t.numel() * t.element_size() for m in modules for t in owned(m) if t is not None)
    assert held == expected
    apply_fast_paths(WorldPipeline(world), ("lean-memory",))  # a second pipeline: nothing moved twice
    assert host_resident_bytes(world) == held
    m = world.refiner.transformer_blocks[0].attn2.to_k
    assert len(m._forward_pre_hooks) == 1 and len(m._forward_hooks) == 1


def test_decode_split_equals_one_call_on_cpu():
    world = build_bench_world("tiny", device="cpu", dtype=torch.float32, seed=4)
    pipe = WorldPipeline(world)
    h, w = pipe.latent_hw
    g = torch.Generator().manual_seed(0)
    blocks = [torch.randn(1, world.preset.stage1.in_channels, n, h, w, generator=g) for n in (4, 3, 2)]
    pipe.decoder.reset()
    whole = [pipe.decode(b) for b in blocks]
    pipe.decoder.reset()
    pipe.decode_frames_per_call = 1
    split = [pipe.decode(b) for b in blocks]
    for a, b in zip(split, whole, strict=True):
        assert a.shape == b.shape
        err = ((a - b).norm() / b.norm()).item()
        print(f"decode split: rel err {err:.2e}")
        assert err < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,quality", [(torch.float32, "full"), (torch.bfloat16, "full"),
                                           (torch.bfloat16, "preview")])
def test_lean_memory_equals_plain_on_gpu(dtype, quality):
    """With the graphs, the compiled blocks and the other fast paths of `all`: the same chunks (the stage-1 latents
    bit-equal: the same bytes are multiplied; the refined ones within rounding), the weights on the host, pinned,
    between uses, and the device holding that much less."""
    names = ("all",)
    world = build_bench_world("tiny", device="cuda", dtype=dtype, seed=1)
    _, _, plain = rollout(world, names, quality)
    probe = WorldPipeline(world)  # the weights leave the device when the path is switched on
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    apply_fast_paths(probe, ("lean-memory",))
    torch.cuda.synchronize()
    held = host_resident_bytes(world)
    print(f"host-resident {held} B; device allocated {before} -> {torch.cuda.memory_allocated()} B")
    assert held > 0 and torch.cuda.memory_allocated() <= before - held
    pipe, applied, lean = rollout(world, names + ("lean-memory",), quality)
    for m in prompt_and_image_modules(world):  # back on the host after every use
        for t in owned(m):
            if t is not None:
                assert t.device.type == "cpu" and t.is_pinned()
    if quality == "full":
        assert not pipe.refiner.window.active_slots
    for a, b in zip(lean, plain, strict=True):
        assert torch.equal(a.latents, b.latents)
        if quality == "full":  # the two-segment attention (cuDNN's, with its log-sum-exp, in bf16)
            err = rel(a.refined, b.refined)
            print(f"refined: rel err {err:.2e}")
            assert err <= (1e-5 if dtype == torch.float32 else 2e-2)
        if dtype == torch.float32:
            frames_close(a.frames, b.frames, max_levels=1)
        else:  # bf16: the refined latents' rounding goes through the decoder
            assert rel(torch.from_numpy(a.frames).float(), torch.from_numpy(b.frames).float()) <= 2e-2
