"""The CUDA-graph runners' compile-then-capture protocol, emulated on the CPU.

On a GPU a `torch.compile` recompile inside a capture breaks it (session 2 found one: the first steady call ran on
the prompt's original K/V, the capture on stride-different copies). Here `torch.cuda`'s graph API is replaced by
stand-ins that run the captured body eagerly, so the same Python path runs, compiled blocks included, and any
recompile inside a "capture" raises (the runners capture under `fail_on_recompile`). Replays do nothing, so only
the protocol is checked here, not values (tests/test_fast_paths_gpu.py compares values on a GPU)."""

import contextlib
import shutil

import pytest
import torch
from torch._dynamo.utils import counters

from engine.bench import build_bench_world, first_image, scripted_controls
from engine.fast import refiner_graph, stage1_graph
from engine.fast.stage1_compile import compiled_block_fn
from engine.rollout import Rollout
from engine.world import WorldPipeline

needs_cc = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("cc") is None,
                              reason="inductor's CPU backend needs a C++ compiler")


class FakeGraph:
    def replay(self) -> None:
        pass


class FakeStream:
    def wait_stream(self, other) -> None:
        pass


def fake_cuda(monkeypatch, captures: list):
    class FakeCapture:
        def __init__(self, graph, pool=None, stream=None) -> None:
            pass

        def __enter__(self):
            captures.append(counters["stats"]["unique_graphs"])

        def __exit__(self, *exc) -> None:
            captures.append(counters["stats"]["unique_graphs"])

    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(torch.cuda, "Stream", lambda *a, **k: FakeStream())
    monkeypatch.setattr(torch.cuda, "graph", FakeCapture)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: FakeStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())


class CpuRunner(stage1_graph.Stage1GraphRunner):
    def _require_cuda(self) -> None:  # the emulated graph API runs on the CPU
        pass


class CpuRefinerGraphs(refiner_graph.GraphedRefinerModel):
    def _require_cuda(self) -> None:
        pass


@needs_cc
@pytest.mark.parametrize("lean", [False, True])
def test_compiled_blocks_never_compile_inside_a_capture(monkeypatch, lean):
    """Also with `stage1-lean-pass` (`lean`), whose cache-write pass gives its last block another kind of call."""
    captures = []
    fake_cuda(monkeypatch, captures)
    monkeypatch.setattr(stage1_graph, "Stage1GraphRunner", CpuRunner)
    world = build_bench_world("tiny", device="cpu", dtype=torch.float32, seed=2, with_refiner=False)
    pipe = WorldPipeline(world)
    pipe.stream = stage1_graph.GraphedStage1Stream.from_stream(pipe.stream)
    pipe.stream.lean_pass = lean
    runner = pipe.stream.runner
    runner.block_fn = compiled_block_fn()
    pipe.start(first_image(world.preset, 0), "a street", "preview")
    ro = Rollout(pipe, scripted_controls(5), intrinsics_px=world.preset.default_intrinsics, quality="preview")
    list(ro.chunks(5))
    assert len(runner.graphs) == 2  # the steady read and cache-write passes were captured
    assert runner.replays > 0
    # no capture compiled anything (a recompile inside one would also have raised: fail_on_recompile)
    assert captures and all(a == b for a, b in zip(captures[::2], captures[1::2], strict=True))


def test_each_steady_pass_runs_eagerly_once_then_replays(monkeypatch):
    """Without compiled blocks: per graph kind, the first steady pass runs eagerly, the next one is captured and
    replayed, every later one replayed. (Session 3 found one pass too many run eagerly: the first copy of the
    prompt's K/V cleared the record of the first sight that had just run, so the next pass ran eagerly again.)"""
    fake_cuda(monkeypatch, [])
    monkeypatch.setattr(stage1_graph, "Stage1GraphRunner", CpuRunner)
    chunks = 7
    world = build_bench_world("tiny", device="cpu", dtype=torch.float32, seed=2)
    pipe = WorldPipeline(world)
    pipe.stream = stage1_graph.GraphedStage1Stream.from_stream(pipe.stream)
    pipe.refiner.model = CpuRefinerGraphs(pipe.refiner.model)
    pipe.start(first_image(world.preset, 0), "a street", "full")
    ro = Rollout(pipe, scripted_controls(chunks), intrinsics_px=world.preset.default_intrinsics, quality="full")
    list(ro.chunks(chunks))
    ro.finish_chunk()  # the last chunk's deferred cache pass
    # stage-1 steady from chunk 2: its first read pass eager, 3 reads replayed, the write eager (first sight);
    # chunks 3..: all 5 passes replayed
    assert pipe.stream.runner.replays == 3 + 5 * (chunks - 3) and len(pipe.stream.runner.graphs) == 2
    # refiner history full from chunk 4: first step eager, 2 steps replayed, the capture pass (K/V only: a graph of
    # its own) eager at its first sight; from chunk 5 all 4 replayed (the capture pass captured there)
    assert pipe.refiner.model.replays == 2 + 4 * (chunks - 5) and len(pipe.refiner.model.graphs) == 2


def test_frame_context_is_rebuilt_for_a_new_or_modified_camera_tensor(monkeypatch):
    """The runner builds a chunk's frame context once, on the first forward that sees its camera tensor; the
    same object unmodified reuses it (no host copy), anything else rebuilds it."""
    fake_cuda(monkeypatch, [])
    world = build_bench_world("tiny", device="cpu", dtype=torch.float32, seed=2, with_refiner=False)
    stream = WorldPipeline(world).stream
    runner = CpuRunner(stream.model, stream.cache, stream.mode)
    h, w = 4, 6
    cams = torch.zeros(1, 3, 20)
    cams[0, :, :16] = torch.eye(4).reshape(16)
    cams[0, :, 16:] = torch.tensor([5.0, 5.0, 3.0, 2.0])
    first = runner._context(cams, 3, h, w)
    assert first is not None
    assert runner._context(cams, 3, h, w) is None  # same object, same version: the statics hold its context
    cams[0, 1, 3] = 0.5  # moved in place: rebuilt, and the new context differs where the camera did
    moved = runner._context(cams, 3, h, w)
    assert moved is not None and not torch.equal(moved.P, first.P)
    assert runner._context(cams, 3, h, w) is None
    assert runner._context(cams.clone(), 3, h, w) is not None  # another tensor: rebuilt
    assert runner._context(cams, 2, h, w) is not None  # another frame count: rebuilt
