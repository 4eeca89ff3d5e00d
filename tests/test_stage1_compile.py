"""The compiled stage-1 block call (engine/fast/stage1_compile.py) against the plain eager path, on the CPU (inductor's
C++ backend; the GPU comparison inside the CUDA graphs is in tests/test_fast_paths_gpu.py)."""

import shutil

import pytest
import torch
from torch._dynamo.utils import counters

from engine.bench import build_bench_world, first_image, scripted_controls
from engine.fast import apply_fast_paths, warm_compiled
from engine.rollout import Rollout
from engine.world import WorldPipeline

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("cc") is None,
                                reason="inductor's CPU backend needs a C++ compiler")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def run(world, fast, chunks, graphs_after=None):
    """Roll `chunks` chunks; with `graphs_after`, also the number of dynamo graphs made up to each chunk."""
    pipe = WorldPipeline(world)
    applied = apply_fast_paths(pipe, fast)
    pipe.start(first_image(world.preset, 0), "a street", "preview")
    ro = Rollout(pipe, scripted_controls(chunks), intrinsics_px=world.preset.default_intrinsics, seed=5,
                 quality="preview")
    out = []
    for chunk in ro.chunks(chunks):
        out.append(chunk)
        if graphs_after is not None:
            graphs_after.append(counters["stats"]["unique_graphs"])
    return applied, out, pipe.snapshot()


def test_compiled_blocks_equal_plain_and_share_graphs():
    world = build_bench_world("tiny", device="cpu", dtype=torch.float32, seed=3, with_refiner=False)
    _, plain, snap_plain = run(world, (), 5)
    before = counters["stats"]["unique_graphs"]
    assert warm_compiled(world, ("preview",), chunks=3, names=("stage1-compile",)) == ["preview"]
    # one compiled function for all blocks: (GDN, softmax) x (read, write) per cache state of the first three
    # chunks (4 frames, no sink; 3 frames, sink only; the full window), not one graph per block instance
    warmed = counters["stats"]["unique_graphs"] - before
    assert 0 < warmed <= 12, warmed
    graphs = [counters["stats"]["unique_graphs"]]
    applied, fast, snap_fast = run(world, ("stage1-compile",), 5, graphs)
    assert "stage1-compile" in applied
    assert graphs[-1] == graphs[0]  # the warm-up compiled every kind a session meets
    for a, b in zip(fast, plain, strict=True):
        assert a.frame_start == b.frame_start
        assert rel(a.latents, b.latents) <= 1e-4
    for k, v in snap_plain.items():
        if k.startswith("stage1.") and v.is_floating_point() and v.abs().max() > 0:
            assert rel(snap_fast[k], v) <= 1e-4, k


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_compiled_form_of_ucpe_equals_the_eager_one(dtype, tol, monkeypatch):
    """Under torch.compile the UCPE 4x4 products are elementwise (inductor fuses them); eagerly an einsum. Same
    values. (RoPE keeps its complex form under compile unless `stage1-real-rope` is on: tests/test_stage1_rope.py.)"""
    from engine.stage1.geometry import apply_4x4

    def eager_only(*args, **kwargs):
        raise AssertionError("the eager form was traced")

    g = torch.Generator().manual_seed(0)
    m = torch.randn(2, 50, 4, 4, generator=g).to(dtype)
    groups = torch.randn(2, 3, 50, 14, 4, generator=g).to(dtype)
    want = apply_4x4(m, groups)
    torch._dynamo.reset()
    with monkeypatch.context() as patch:  # tracing must not reach the eager form
        patch.setattr(torch, "einsum", eager_only)
        got = torch.compile(apply_4x4, dynamic=False)(m, groups)
    assert rel(got, want) <= tol
