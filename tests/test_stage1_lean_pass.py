"""`stage1-lean-pass`: the cache-write pass's last block computes only what its caches keep (its attention caches
in full, the FFN tail from the last frame's tokens) and no final layer. The caches it writes, and so every later
chunk, against the whole pass: last block softmax or GDN, with and without its Plücker projection; through
`Stage1Stream`, a world pipeline and the compiled block call on the CPU (the CUDA graphs:
tests/test_fast_paths_gpu.py)."""

import shutil

import pytest
import torch

from engine.bench import build_bench_world
from engine.stage1.stream import Stage1Stream, chunk_frame_counts
from tests.test_stage1_compile import run
from tests.test_stage1_parity import random_camera
from tests.test_stage1_streaming import small_model


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def stream_run(model, lean: bool, frames: int = 13, h: int = 2, w: int = 3):
    g = torch.Generator().manual_seed(7)
    C = model.config.in_channels
    y = torch.randn(1, 3, model.config.caption_channels, generator=g)
    cam = random_camera(1, frames, g)
    pl = torch.randn(1, model.config.chunk_plucker_channels, frames, h, w, generator=g)
    noise = torch.randn(1, C, frames, h, w, generator=g)
    anchor = torch.randn(1, C, 1, h, w, generator=g)
    stream = Stage1Stream(model, height=h, width=w)
    stream.lean_pass = lean
    stream.reset(y)
    latents = []
    for c, T in enumerate(chunk_frame_counts(frames)):
        sl = slice(stream.next_frame, stream.next_frame + T)
        clean = stream.denoise_chunk(noise[:, :, sl], cam[:, sl], pl[:, :, sl], anchor if c == 0 else None)
        stream.write_cache(clean, cam[:, sl], pl[:, :, sl])
        latents.append(clean)
    return torch.cat(latents, dim=2), stream.snapshot()


@pytest.mark.parametrize("overrides,last", [
    (dict(), "softmax"),  # 4 layers, softmax every 2nd: the last block is softmax, without a Plücker projection
    (dict(softmax_every_n=3), "gdn"),
    (dict(chunk_plucker_post_attn_blocks=-1), "softmax"),  # every block has one
])
@torch.no_grad()
def test_lean_pass_writes_the_same_caches(overrides, last):
    model = small_model(**overrides)
    assert model.blocks[-1].attn.softmax == (last == "softmax")
    full, snap_full = stream_run(model, lean=False)
    lean, snap_lean = stream_run(model, lean=True)
    assert rel(lean, full) <= 1e-6
    for k, v in snap_full.items():
        assert snap_lean[k].shape == v.shape
        if v.is_floating_point() and v.abs().max() > 0:
            assert rel(snap_lean[k], v) <= 1e-6, k
        else:
            assert torch.equal(snap_lean[k], v), k


@torch.no_grad()
def test_caches_only_returns_nothing_and_is_refused_off_a_write_pass():
    model = small_model()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 4, 2, 3, generator=g)
    cam, pl = random_camera(1, 4, g), torch.randn(1, 48, 4, 2, 3, generator=g)
    stream = Stage1Stream(model, height=2, width=3)
    stream.reset(torch.randn(1, 3, 16, generator=g))
    t = torch.zeros(1, 1, 4)
    with pytest.raises(ValueError, match="caches_only"):
        model.forward_cached(x, t, stream.text, cam, pl, stream.cache, caches_only=True)
    out = model.forward_cached(x, t, stream.text, cam, pl, stream.cache, write_cache=True, caches_only=True)
    assert out is None and stream.cache.frames_written == 4


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("cc") is None,
                    reason="inductor's CPU backend needs a C++ compiler")
def test_lean_pass_through_the_compiled_blocks_of_a_world():
    world = build_bench_world("tiny", device="cpu", dtype=torch.float32, seed=3, with_refiner=False)
    _, plain, snap_plain = run(world, (), 4)
    applied, fast, snap_fast = run(world, ("stage1-compile", "stage1-lean-pass"), 4)
    assert {"stage1-compile", "stage1-lean-pass"} <= set(applied)
    for a, b in zip(fast, plain, strict=True):
        assert rel(a.latents, b.latents) <= 1e-4
    for k, v in snap_plain.items():
        if k.startswith("stage1.") and v.is_floating_point() and v.abs().max() > 0:
            assert rel(snap_fast[k], v) <= 1e-4, k
