"""Fast paths (engine.fast) against their plain paths: the same live loop, chunk by chunk (GPU), and the pieces
that also run on a CPU (reflect pad)."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from engine.bench import build_bench_world, first_image, scripted_controls
from engine.errors import InputError
from engine.fast import ALL, apply_fast_paths, expand
from engine.fast.frames import pixels_to_frames_fast, restore_plain_frames
from engine.fast.refiner_rope import restore_plain_rope
from engine.fast.stage1_gemms import conv_major_tconv, unfuse_in_projections
from engine.fast.stage1_rope import restore_plain_rope as restore_plain_stage1_rope
from engine.fast.vae_pad import reflect_pad_hw1, restore_plain_pad, use_fast_reflect_pad
from engine.presets import get_preset
from engine.rollout import Rollout
from engine.vae.pixels import pixels_to_frames
from engine.vae.stream import StreamingDecoder
from engine.world import WorldPipeline
from kernels.frames import reflect_pad_hw1_triton, to_uint8_frames_reference, to_uint8_frames_triton
from kernels.rope import rope_split_reference, rope_split_triton

CHUNKS = 7  # stage-1 graphs from chunk 2 (steady window), refiner graphs from chunk 4 (history full)
GRAPHS = ("stage1-graph", "refiner-graph", "refiner-rope", "vae-pad", "frames")


def tiny_split_rope():
    """The tiny preset with the release's "split" refiner RoPE (so the Triton RoPE is on the path)."""
    p = get_preset("tiny")
    return dataclasses.replace(p, refiner=dataclasses.replace(p.refiner, rope_type="split"))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def rollout(world, fast, quality, chunks=CHUNKS, before_start=None, prompt_after=None):
    """A live loop of `chunks` chunks with the fast paths `fast`; returns (pipeline, what was switched on, the
    chunks, a snapshot after them). `prompt_after`: the prompt changes after that chunk (the prompt objects it
    replaces are kept in `pipe.old_texts`)."""
    pipe = WorldPipeline(world)
    applied = apply_fast_paths(pipe, fast)
    if before_start is not None:
        before_start(pipe)
    pipe.start(first_image(world.preset, 0), "a street", quality)
    ro = Rollout(pipe, scripted_controls(chunks), intrinsics_px=world.preset.default_intrinsics, seed=3,
                 quality=quality)
    out = []
    for chunk in ro.chunks(chunks):
        out.append(chunk)
        if chunk.index == prompt_after:
            pipe.old_texts = (pipe.stream.text, None if pipe.refiner is None else pipe.refiner.text)
            pipe.set_prompt("a forest path in the rain")
    return pipe, applied, out, pipe.snapshot()


def compare(fast, plain, snap_fast, snap_plain, quality) -> float:
    errs = []
    for a, b in zip(fast, plain, strict=True):
        assert torch.isfinite(a.latents).all()
        errs.append(rel(a.latents, b.latents))
        if quality == "full":
            errs.append(rel(a.refined, b.refined))
        errs.append(rel(torch.from_numpy(a.frames).float(), torch.from_numpy(b.frames).float()))
    keys = [k for k in snap_plain if snap_plain[k].is_floating_point() and k.split(".")[0] in ("stage1", "refiner")]
    assert keys
    for k in keys:  # the caches the graphs wrote in place equal the eager caches
        if snap_plain[k].abs().max() > 0 and torch.isfinite(snap_plain[k]).all():
            errs.append(rel(snap_fast[k], snap_plain[k]))
    assert snap_fast["stage1.frames_written"] == snap_plain["stage1.frames_written"]
    return max(errs)


def undo_fast_paths(world) -> None:
    """Undo what fast paths change beyond one pipeline, so the next test starts plain: the process-wide swaps (both
    RoPE kernels, the frames conversion) and the world-wide ones (VAE padding, fused projections, tap-major t_conv).
    Each is a no-op where its path was not on."""
    restore_plain_rope()
    restore_plain_stage1_rope()
    unfuse_in_projections(world.stage1)
    conv_major_tconv(world.stage1)
    restore_plain_pad(world.vae)
    restore_plain_frames()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol,quality,compiled,extra", [
    (torch.float32, 1e-4, "preview", False, ()), (torch.float32, 1e-4, "full", False, ()),
    (torch.bfloat16, 2e-2, "preview", False, ()), (torch.bfloat16, 2e-2, "full", False, ()),
    (torch.float32, 1e-4, "preview", True, ()), (torch.bfloat16, 3e-2, "full", True, ()),
    (torch.float32, 1e-4, "full", True, ("stage1-ffn", "refiner-gelu")),
    (torch.bfloat16, 3e-2, "full", True, ("stage1-ffn", "refiner-gelu")),
    (torch.float32, 1e-4, "preview", True, ("stage1-rope",)), (torch.bfloat16, 3e-2, "preview", True, ("stage1-rope",)),
    (torch.float32, 1e-4, "preview", True, ("stage1-fused-proj", "stage1-tconv")),
    (torch.bfloat16, 3e-2, "full", True, ("stage1-fused-proj", "stage1-tconv")),
    (torch.float32, 1e-4, "preview", True, ("stage1-real-rope",)),
    (torch.bfloat16, 3e-2, "full", True, ("stage1-real-rope", "stage1-fused-proj", "stage1-tconv", "stage1-ffn")),
    (torch.float32, 1e-4, "preview", True, ("stage1-lean-pass",)),
])
def test_graphs_equal_eager(dtype, tol, quality, compiled, extra):
    """The CUDA graphs (and, `compiled`, `stage1-compile` / `refiner-compile` inside them; `extra` fast paths with
    them): same chunks as the plain eager path, the same replay counts (first sight of a steady kind runs eagerly,
    compiled blocks included)."""
    names = GRAPHS + (("stage1-compile", "refiner-compile") if compiled else ()) + extra
    world = build_bench_world(tiny_split_rope(), device="cuda", dtype=dtype, seed=1)
    _, _, plain, snap_plain = rollout(world, (), quality)
    try:
        pipe, applied, fast, snap_fast = rollout(world, names, quality)
    finally:
        undo_fast_paths(world)
    assert set(applied) == set(names)
    runner = pipe.stream.runner
    assert (runner.block_fn is not None) == compiled
    # chunk 2: first read pass eager, 3 reads replayed, write eager (first sight); chunks 3..: all 5 replayed
    assert runner.replays == 3 + 5 * (CHUNKS - 3) and len(runner.graphs) == 2
    if quality == "full":  # chunk 4: first step eager, 2 steps replayed, the capture pass (K/V only: a graph of its
        # own) eager at its first sight; chunks 5..: all 4 replayed (the capture pass captured in chunk 5)
        assert (pipe.refiner.model.parts is not None) == compiled
        assert pipe.refiner.model.replays == 2 + 4 * (CHUNKS - 5) and len(pipe.refiner.model.graphs) == 2
    err = compare(fast, plain, snap_fast, snap_plain, quality)
    print(f"graphs{' compiled' if compiled else ''}{' + ' + ','.join(extra) if extra else ''} {dtype} {quality}: "
          f"max rel err {err:.2e} (tol {tol})")
    assert err <= tol


def stream_spy(streams: dict[str, set]):
    """`spy(obj, name)` wraps `obj.name` to record in `streams[name]` the id of the CUDA stream each call runs on."""

    def spy(obj, name):
        fn = getattr(obj, name)

        def wrapped(*args, **kwargs):
            streams[name].add(torch.cuda.current_stream().stream_id)
            return fn(*args, **kwargs)

        setattr(obj, name, wrapped)

    return spy


def latents_and_caches_rel(fast, ref, snap_fast, snap_ref) -> float:
    """`compare` without the uint8 frames (a rounding flip of one pixel there says nothing about the model)."""
    errs = [rel(a.latents, b.latents) for a, b in zip(fast, ref, strict=True)]
    for k, v in snap_ref.items():
        if k.startswith("stage1.") and v.is_floating_point() and v.abs().max() > 0:
            errs.append(rel(snap_fast[k], v))
    return max(errs)


@pytest.mark.gpu
@pytest.mark.parametrize("scans", [(), ("stage1-block-phases",)])
def test_real_rope_equals_complex_inside_the_compiled_graphs(scans):
    """`stage1-real-rope` against the complex multiply under the very same compiled graphs (fp32), with the torch
    scans and with the Triton ones of `all`: only the RoPE's own rounding differs. (The unflatten / stack real form
    was 0.23 off here with the torch scans, tests/benchmarks/rope_probe.py.)"""
    names = GRAPHS + ("stage1-compile",) + scans
    world = build_bench_world(tiny_split_rope(), device="cuda", dtype=torch.float32, seed=1)
    try:
        _, _, cplx, snap_cplx = rollout(world, names, "preview")
        _, applied, real, snap_real = rollout(world, names + ("stage1-real-rope",), "preview")
    finally:
        undo_fast_paths(world)
    err = latents_and_caches_rel(real, cplx, snap_real, snap_cplx)
    print(f"real vs complex RoPE, compiled, scans {scans or 'torch'}: latents and caches {err:.2e}")
    assert "stage1-real-rope" in applied and err <= 1e-4  # the fp32 tolerance of the graphs-vs-eager tests


@pytest.mark.gpu
@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("quality", ["preview", "full"])
def test_cache_overlap_equals_in_line(graphs, quality):
    """`cache-overlap`: the cache-write pass on its own stream, beside the refiner and the decode, gives the same
    chunks and caches as the pass in line (same kernels in the same order per stream), eagerly and from graphs;
    each chunk reports the pass's time."""
    names = GRAPHS if graphs else ()
    world = build_bench_world(tiny_split_rope(), device="cuda", dtype=torch.float32, seed=4)
    streams = {"write_cache": set(), "refine": set(), "decode_block": set()}
    spy = stream_spy(streams)
    try:
        pipe_in_line, _, in_line, snap_in_line = rollout(world, names, quality)
        pipe, applied, overlapped, snap_overlapped = rollout(world, names + ("cache-overlap",), quality,
                                                             before_start=lambda p: [
                                                                 spy(p.stream, "write_cache"), spy(p, "refine"),
                                                                 spy(p.decoder, "decode_block")])
    finally:
        undo_fast_paths(world)
    assert "cache-overlap" in applied and pipe.cache_stream is not None
    assert pipe.main_stream.priority < pipe.cache_stream.priority  # the chunk's own work goes first
    assert streams["write_cache"] == {pipe.cache_stream.stream_id}  # the pass ran beside, the rest on main
    assert streams["decode_block"] == {pipe.main_stream.stream_id}
    assert streams["refine"] == ({pipe.main_stream.stream_id} if quality == "full" else set())
    if graphs:  # the same passes replayed from the same graphs
        print(f"stage-1 replays: overlapped {pipe.stream.runner.replays}, in line {pipe_in_line.stream.runner.replays}")
        assert pipe.stream.runner.replays == pipe_in_line.stream.runner.replays > 0
    for c in overlapped:
        assert c.timings["stage1_cache"] > 0 and c.timings["stage1"] - c.timings["stage1_cache"] > 0
    err = compare(overlapped, in_line, snap_overlapped, snap_in_line, quality)
    print(f"cache-overlap graphs={graphs} {quality}: max rel err vs in line {err:.2e}")
    assert err <= 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("quality", ["preview", "full"])
def test_chunk_async_equals_in_line(graphs, quality):
    """`chunk-async`: no host sync inside a chunk, the cache-write pass on its own stream from the end of the decode:
    the same chunks and caches as the plain path, the pass on the pass stream and nothing else there, a prompt change
    and a snapshot after it ordered behind it; the stage times are event spans (the previous pass's from chunk 1)."""
    names = GRAPHS if graphs else ()
    world = build_bench_world(tiny_split_rope(), device="cuda", dtype=torch.float32, seed=4)
    streams = {"write_cache": set(), "decode_block": set()}
    spy = stream_spy(streams)
    try:
        pipe_plain, _, plain, snap_plain = rollout(world, names, quality, prompt_after=4)
        pipe, applied, fast, snap_fast = rollout(world, names + ("chunk-async",), quality, prompt_after=4,
                                                 before_start=lambda p: [spy(p.stream, "write_cache"),
                                                                         spy(p.decoder, "decode_block")])
    finally:
        undo_fast_paths(world)
    assert "chunk-async" in applied and pipe.pass_stream is not None
    assert streams["write_cache"] == {pipe.pass_stream.stream_id}
    assert pipe.pass_stream.stream_id not in streams["decode_block"]
    if graphs:
        assert pipe.stream.runner.replays == pipe_plain.stream.runner.replays > 0
    for c in fast:
        assert c.timings["stage1"] > 0 and c.timings["decode"] > 0
        assert (c.timings.get("stage1_prev_cache", 0) > 0) == (c.index > 0)
        assert (c.timings.get("refiner", 0) > 0) == (quality == "full")
    err = compare(fast, plain, snap_fast, snap_plain, quality)
    print(f"chunk-async graphs={graphs} {quality}: max rel err vs the plain path {err:.2e}")
    assert err == 0


@pytest.mark.gpu
def test_tf32_scans_close_to_fp32():
    world = build_bench_world("tiny", device="cuda", dtype=torch.float32, seed=2)
    _, _, plain, snap_plain = rollout(world, (), "preview", chunks=3)
    _, applied, fast, snap_fast = rollout(world, ("stage1-tf32-scans",), "preview", chunks=3)
    assert "stage1-tf32-scans" in applied
    err = compare(fast, plain, snap_fast, snap_plain, "preview")
    print(f"tf32 scans: max rel err {err:.2e} (tol 1e-2)")
    assert 0 < err <= 1e-2  # not bit-equal (TF32 really used), but close


@pytest.mark.gpu
def test_graphs_follow_a_prompt_change_holding_the_text_once():
    """A prompt change after the graphs are captured: the same chunks as the eager path; the pipeline's prompt K/V
    are the graph runners' static copies (one copy on the device), and the previous prompt's objects are emptied."""
    world = build_bench_world(tiny_split_rope(), device="cuda", dtype=torch.float32, seed=1)
    _, _, plain, snap_plain = rollout(world, (), "full", prompt_after=4)
    pipe, _, fast, snap_fast = rollout(world, ("stage1-graph", "refiner-graph"), "full", prompt_after=4)
    err = compare(fast, plain, snap_fast, snap_plain, "full")
    print(f"graphs across a prompt change: max rel err {err:.2e} (tol 1e-4)")
    assert err <= 1e-4
    runner, graphed = pipe.stream.runner, pipe.refiner.model
    assert pipe.stream.text.kv is runner.text.kv and pipe.stream.text.bias is runner.text.bias
    assert pipe.refiner.text.k is graphed.text.k and pipe.refiner.text.v is graphed.text.v
    old_stage1, old_refiner = pipe.old_texts  # their values are gone from the static copies
    assert old_stage1.kv is None and old_refiner.k is None

@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol,tol_plain", [(torch.float32, 1e-4, 1e-2), (torch.bfloat16, 3e-2, 3e-2)])
def test_prompt_trim_inside_the_compiled_graphs_equals_the_whole_prompt(dtype, tol, tol_plain):
    """`stage1-prompt-trim` with every other path of `all` (the graphs and compiled blocks among them), a prompt of 3
    tokens then one of 9 (of 16 positions, cut to multiples of 4): the same chunks as those paths over the whole
    prompt, and near the plain eager path (`all`'s Triton scans use TF32 dots: fp32 within 1e-2, as
    `stage1-tf32-scans`). The new length is captured again without a recompile (one inside a capture raises)."""
    from tests.test_stage1_prompt_trim import Encoder

    world = build_bench_world(tiny_split_rope(), device="cuda", dtype=dtype, seed=1)
    world.text.stage1 = Encoder(world.preset.text.stage1_max_length, world.preset.stage1.caption_channels)
    _, _, plain, snap_plain = rollout(world, (), "full", prompt_after=4)
    others = tuple(n for n in ALL if n != "stage1-prompt-trim")
    try:
        whole_pipe, _, whole, snap_whole = rollout(world, others, "full", prompt_after=4)
    finally:
        undo_fast_paths(world)
    assert whole_pipe.stream.text.bias.shape[-1] == world.preset.text.stage1_max_length
    try:
        pipe, applied, fast, snap_fast = rollout(world, others + ("stage1-prompt-trim",), "full", prompt_after=4,
                                                 before_start=lambda p: setattr(p.stream, "prompt_trim", 4))
    finally:
        undo_fast_paths(world)
    assert "stage1-prompt-trim" in applied
    assert pipe.stream.text.bias.shape[-1] == 12 and pipe.stream.runner.text.dynamic_length
    err = compare(fast, whole, snap_fast, snap_whole, "full")
    err_plain = compare(fast, plain, snap_fast, snap_plain, "full")
    print(f"stage1-prompt-trim in the compiled graphs {dtype}: max rel err {err:.2e} against the whole prompt "
          f"(tol {tol}), {err_plain:.2e} against the plain eager path (tol {tol_plain})")
    assert err <= tol and err_plain <= tol_plain


@pytest.mark.gpu
def test_triton_scans_close_to_fp32_and_block_launch_equals_four():
    """`stage1-triton-scans` (TF32 dots) near the plain fp32 scans over a live loop, its GDN blocks' scans going
    out as one launch each; the same loop with four launches per block is bit-equal to it."""
    world = build_bench_world("tiny", device="cuda", dtype=torch.float32, seed=2)
    _, _, plain, snap_plain = rollout(world, (), "preview", chunks=3)
    calls = []

    def counted(pipe):
        ops = pipe.world.stage1.scan_ops
        block = ops.gdn_block
        ops.gdn_block = lambda *a: calls.append(1) or block(*a)

    _, applied, fast, snap_fast = rollout(world, ("stage1-triton-scans",), "preview", chunks=3, before_start=counted)
    assert "stage1-triton-scans" in applied and calls
    err = compare(fast, plain, snap_fast, snap_plain, "preview")
    print(f"triton scans (one launch a block, {len(calls)} launches): max rel err {err:.2e} (tol 1e-2)")
    assert 0 < err <= 1e-2

    def four(pipe):
        pipe.world.stage1.scan_ops.gdn_block = None

    _, _, separate, snap_separate = rollout(world, ("stage1-triton-scans",), "preview", chunks=3, before_start=four)
    assert compare(separate, fast, snap_separate, snap_fast, "preview") == 0

@pytest.mark.gpu
@pytest.mark.parametrize("dtype,compiled", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)])
def test_block_phases_close_to_one_launch_over_a_live_loop(dtype, compiled):
    """`stage1-block-phases` over a live loop (the GDN blocks' scans combined in three launches each) near the one
    launch combined in torch, and both near the plain fp32 scans; with graphs (and compile, as in `all`)."""
    from kernels import gdn_triton

    world = build_bench_world("tiny", device="cuda", dtype=dtype, seed=2)
    calls = []
    launch = gdn_triton._launch_block_phases  # counted inside the custom op, where torch.compile does not look

    base = ("stage1-graph",) + (("stage1-compile",) if compiled else ())
    _, _, plain, snap_plain = rollout(world, base, "preview", chunks=3)
    _, _, one, snap_one = rollout(world, base + ("stage1-triton-scans",), "preview", chunks=3)
    gdn_triton._launch_block_phases = lambda *a: calls.append(1) or launch(*a)
    try:
        _, applied, phases, snap_phases = rollout(world, base + ("stage1-block-phases",), "preview", chunks=3)
    finally:
        gdn_triton._launch_block_phases = launch
    tol = 1e-2 if dtype == torch.float32 else 3e-2
    err_one = compare(phases, one, snap_phases, snap_one, "preview")
    err_plain = compare(phases, plain, snap_phases, snap_plain, "preview")
    print(f"block phases {dtype} compiled={compiled}: {len(calls)} calls; vs one launch {err_one:.2e}, vs plain "
          f"scans {err_plain:.2e} (tol {tol})")
    assert "stage1-block-phases" in applied and calls
    assert 0 < err_one <= tol and err_plain <= tol


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("lead,H,N,D", [((1,), 32, 2640, 128), ((3, 2), 5, 77, 32), ((), 1, 1, 16)])
def test_triton_rope_equals_reference(dtype, tol, lead, H, N, D):
    g = torch.Generator(device="cuda").manual_seed(H * N)
    ang = torch.randn(N, H, D // 2, device="cuda", generator=g).transpose(0, 1) * 3  # the refiner's strided table
    cos, sin = ang.cos(), ang.sin()
    x = torch.randn(*lead, H, N, D, device="cuda", generator=g).to(dtype)
    want = rope_split_reference(x, cos, sin)
    assert rel(rope_split_triton(x, cos, sin), want) <= tol
    if lead:  # a transposed view (the refiner's query layout [B, H, N, D] over [B, N, H, D] memory)
        xt = torch.randn(*lead, N, H, D, device="cuda", generator=g).to(dtype).transpose(-2, -3)
        out = rope_split_triton(xt, cos, sin)
        assert out.shape == xt.shape and rel(out, rope_split_reference(xt, cos, sin)) <= tol


def tie_pixels(shape, dtype, device, seed):
    """Random pixels in [-1.3, 1.3] with every 7th value on a rounding tie or an exact edge value."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = (torch.rand(shape, device=device, generator=g) * 2.6 - 1.3).to(dtype)
    k = torch.randint(0, 255, shape, device=device, generator=g).float()
    ties = ((k + 0.5) / 255 * 2 - 1).to(dtype)
    sel = torch.arange(x.numel(), device=device).reshape(shape) % 7 == 0
    x = torch.where(sel, ties, x)
    x.view(-1)[:3] = torch.tensor([-1.0, 0.0, 1.0], device=device, dtype=dtype)
    return x


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 24, 704, 1280), (3, 1, 5, 7), (3, 9, 33, 300)])
def test_triton_frames_bit_equal(dtype, shape):
    x = tie_pixels(shape, dtype, "cuda", seed=shape[1])
    want = to_uint8_frames_reference(x)
    assert torch.equal(to_uint8_frames_triton(x), want)
    xt = x.transpose(2, 3).contiguous().transpose(2, 3)  # other strides
    assert torch.equal(to_uint8_frames_triton(xt), want)
    fast = pixels_to_frames_fast(x[None])
    assert fast.is_pinned() and not fast.is_cuda  # page-locked host memory: one DMA, not a bounce-buffer copy
    assert torch.equal(fast, pixels_to_frames(x[None]))


@pytest.mark.gpu
def test_pinned_frames_are_capped():
    """At most MAX_PINNED_CHUNKS chunks of frames sit in page-locked memory; past the cap frames take the pageable
    copy (same values), and the count falls as the frames (or arrays made from them) are dropped."""
    import gc

    from engine.fast import frames as fr

    gc.collect()
    base = fr.pinned_chunks_alive()
    x = tie_pixels((3, 4, 16, 24), torch.bfloat16, "cuda", seed=3)
    want = pixels_to_frames(x[None])
    held = [pixels_to_frames_fast(x[None]) for _ in range(fr.MAX_PINNED_CHUNKS - base + 1)]
    assert fr.pinned_chunks_alive() == fr.MAX_PINNED_CHUNKS
    assert all(h.is_pinned() for h in held[:-1]) and not held[-1].is_pinned()
    assert all(torch.equal(h, want) for h in held)
    arrays = [h.numpy() for h in held]
    del held
    gc.collect()
    assert fr.pinned_chunks_alive() == fr.MAX_PINNED_CHUNKS  # the arrays keep their blocks
    del arrays
    gc.collect()
    assert fr.pinned_chunks_alive() == base


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 3, 2, 2, 2), (2, 5, 3, 7, 11), (1, 128, 26, 176, 320)])
def test_triton_reflect_pad_equals_f_pad(dtype, shape):
    g = torch.Generator(device="cuda").manual_seed(sum(shape))
    x = torch.randn(shape, device="cuda", generator=g).to(dtype)
    want = F.pad(x, (1, 1, 1, 1, 0, 0), mode="reflect")
    assert torch.equal(reflect_pad_hw1_triton(x), want)


def test_frames_reference_equals_pixels_to_frames():
    x = tie_pixels((3, 2, 9, 13), torch.float32, "cpu", seed=1)
    assert torch.equal(to_uint8_frames_reference(x), pixels_to_frames(x))


@pytest.mark.parametrize("shape", [(1, 3, 2, 2, 2), (2, 5, 3, 7, 11), (1, 4, 1, 22, 40)])
def test_reflect_pad_equals_f_pad(shape):
    x = torch.randn(shape)
    want = F.pad(x, (1, 1, 1, 1, 0, 0), mode="reflect")
    assert torch.equal(reflect_pad_hw1(x), want)


def test_vae_pad_decoder_equals_plain():
    world = build_bench_world("tiny", device="cpu", dtype=torch.float32, seed=4, with_refiner=False)
    h, w = world.preset.pixel_hw[0] // 32, world.preset.pixel_hw[1] // 32
    blocks = [torch.randn(1, world.preset.stage1.in_channels, n, h, w) for n in (4, 3)]
    plain = StreamingDecoder(world.vae, 1, h, w)
    want = [plain.decode_block(b) for b in blocks]
    assert use_fast_reflect_pad(world.vae) > 0
    fast = StreamingDecoder(world.vae, 1, h, w)
    got = [fast.decode_block(b) for b in blocks]
    restore_plain_pad(world.vae)
    for a, b in zip(got, want, strict=True):
        assert rel(a, b) <= 1e-6


def test_pinned_frames_count_lives_as_long_as_any_array_of_them():
    """The cap's bookkeeping (CPU: plain host tensors stand in for pinned ones): a chunk counts while the tensor,
    an array made from it, or a view of that array lives; the count is refused past MAX_PINNED_CHUNKS."""
    import gc

    from engine.fast import frames as fr

    gc.collect()
    base = fr.pinned_chunks_alive()
    assert fr._take()
    t = fr._counted(torch.arange(24, dtype=torch.uint8).reshape(2, 3, 4))
    assert fr.pinned_chunks_alive() == base + 1 and t[1, 2].tolist() == [20, 21, 22, 23]
    view = t.numpy()[1:]
    del t
    gc.collect()
    assert fr.pinned_chunks_alive() == base + 1 and view[0, 0].tolist() == [12, 13, 14, 15]
    del view
    gc.collect()
    assert fr.pinned_chunks_alive() == base
    taken = 0
    while fr._take():
        taken += 1
    assert base + taken == fr.MAX_PINNED_CHUNKS
    for _ in range(taken):
        fr._release()
    assert fr.pinned_chunks_alive() == base


def test_fast_path_names_checked_before_anything_changes():
    world = build_bench_world("tiny", device="cpu", dtype=torch.float32, with_refiner=False)
    pipe = WorldPipeline(world)
    forward = world.vae.decoder.forward
    with pytest.raises(InputError, match="'frames' needs a CUDA device"):
        apply_fast_paths(pipe, ["vae-fast", "frames"])  # vae-fast runs on a CPU, frames does not: neither applied
    assert world.vae.decoder.forward == forward and not hasattr(world.vae.decoder, "_vae_fast")
    with pytest.raises(InputError, match="list of names"):
        apply_fast_paths(pipe, "all")
    assert expand(["frames", "all", "stage1-graph"]) == list(ALL)  # once each, in FAST_PATHS order
    assert expand(["refiner-fp8", "stage1-graph"]) == ["stage1-graph", "refiner-fp8"]


def test_cuda_only_paths_refused_on_cpu():
    world = build_bench_world("tiny", device="cpu", dtype=torch.float32, with_refiner=False)
    with pytest.raises(InputError, match="CUDA"):
        apply_fast_paths(WorldPipeline(world), ["stage1-graph"])
    with pytest.raises(InputError, match="unknown fast path"):
        apply_fast_paths(WorldPipeline(world), ["warp-drive"])


@pytest.mark.gpu
def test_world_fast_paths_reach_every_session_pipeline():
    """`sana-wm engine --fast all`: a world's `fast` names are switched on in each session's pipeline."""
    import numpy as np

    from engine.rollout import ScriptedControls
    from engine.session import Session

    worlds = []

    def frames(fast):
        world = build_bench_world(tiny_split_rope(), device="cuda", dtype=torch.float32, seed=1)
        world.fast = fast
        worlds.append(world)
        s = Session.create(world, first_image=np.full((96, 160, 3), 90, np.uint8), prompt="a street", seed=2,
                           record_root=None, controls=ScriptedControls.from_action("w-48,jw-48,l-72"))
        graphed = type(s.pipeline.stream).__name__
        out = [c.latents for c in iter(s.step, None)]
        return graphed, torch.cat(out, dim=2)

    try:
        name_fast, fast = frames(GRAPHS)
        name_plain, plain = frames(())
    finally:
        undo_fast_paths(worlds[0])
    assert name_fast == "GraphedStage1Stream" and name_plain == "Stage1Stream"
    assert rel(fast, plain) <= 1e-4
