"""`sana-wm bench`: speed of the live loop at a preset's size, with random weights (cost does not depend on them).

Builds the preset's models straight on the target device (meta-device construction, `to_empty`, then in-place
random fill: a release-size world never exists on the CPU), gives the pipeline a stand-in text stack (seeded
random prompt embeddings of the real shapes: text encoding happens once per prompt, not per chunk), then drives
the real live loop (`Rollout` + `WorldPipeline` + `ScriptedControls`) for N chunks in each quality and reports:

- per-stage milliseconds (median, p90) over the steady chunks (all but the first `warmup` chunks), with two host
  values per chunk: `stage1_enqueue` (`chunk-async`: the host's time to queue the denoising, a GPU gap when it nears
  `stage1`) and `host_gc` (the garbage collector's pauses since the chunk before);
- realtime factor (video seconds per chunk / chunk wall time), time to first frame;
- peak GPU memory, allocated-memory growth between an early chunk and the last one;
- snapshot size, snapshot (device -> host) and write times, cache-replay time per chunk (the resume cost);
- the measured bf16 GEMM ceiling of the same process (TFLOP/s), and optionally a profile of one stage-1
  forward (top kernels by GPU time).

`run_bench(BenchConfig(...))` returns the report dict; `main(argv)` is the CLI. `--preset tiny --device cpu` runs
the same code path on a CPU (the test does). Fast paths (engine.fast) are switched on by name with `--fast`.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from engine.errors import InputError
from engine.presets import Preset, get_preset
from engine.refiner.model import RefinerTransformer
from engine.rollout import QUALITIES, Rollout, ScriptedControls
from engine.stage1.model import Stage1Transformer
from engine.text import PromptEmbeds
from engine.vae.model import VideoVAE
from engine.world import DTYPES, World, WorldPipeline

ACTION_UNIT = "w-24,jw-24,wd-24,ik-24,s-24,l-24"  # repeated as needed: 24 control steps per chunk


@dataclass
class BenchConfig:
    preset: str = "release"
    chunks: int = 8  # chunks per quality
    qualities: tuple[str, ...] = QUALITIES
    device: str = "cuda"
    dtype: str = "bf16"
    seed: int = 0
    warmup: int = 2  # leading chunks left out of the steady-state statistics
    replay_chunks: int = 3  # chunks replayed from stored latents (resume cost)
    snapshot: bool = True
    gemm_size: int = 8192  # n of the n^3 GEMM ceiling (0 = skip)
    profile: bool = False  # profile one stage-1 forward (CUDA only)
    profile_top: int = 25  # kernels listed per profile (by GPU time)
    fast: tuple[str, ...] = ()  # engine.fast path names
    out: str | None = None  # JSON path
    snapshot_dir: str | None = None  # where the snapshot file is written (default: a temp dir)
    in_line_chunks: int = 3  # with cache-overlap: chunks run after the steady ones with the cache pass in line
    extra: dict = field(default_factory=dict)


class GcPauses:
    """The host's garbage-collector pauses while installed (`gc.callbacks`): total seconds and passes per generation.
    A pass that lands while the host enqueues a chunk leaves the GPU idle inside that chunk's stage spans."""

    def __init__(self) -> None:
        self.seconds, self.passes, self._t0 = 0.0, [0, 0, 0], None

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        elif self._t0 is not None:
            self.seconds += time.perf_counter() - self._t0
            self.passes[info["generation"]] += 1
            self._t0 = None

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._callback)


# ------------------------------------------------------------------------------------------ random world


@torch.no_grad()
def random_init_(module: torch.nn.Module, seed: int) -> None:
    """In-place random weights on the module's own device, following `engine.world.seeded_init_`'s recipe
    (every tensor gets a value; >=2-D `N(0, 1/fan_in)`; norm weights `1 + 0.2 N`; ...), drawn on that device."""
    tensors = dict(module.named_parameters())
    tensors.update(dict(module.named_buffers()))
    for i, (name, t) in enumerate(sorted(tensors.items())):
        if not t.is_floating_point():
            t.zero_()
            continue
        g = torch.Generator(device=t.device).manual_seed(seed * 100_003 + i)
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "latents_mean":
            t.zero_()
        elif leaf == "latents_std":
            t.fill_(1.0)
        elif leaf == "A_log":
            t.uniform_(0.5, 2.5, generator=g).log_()
        elif leaf == "dt_bias":
            t.normal_(-2.0, 0.5, generator=g)
        elif "scale_shift_table" in leaf:
            t.normal_(0.0, 0.2, generator=g)
        elif t.ndim >= 2:
            t.normal_(0.0, 1.0 / math.sqrt(max(1, t[0].numel())), generator=g)
        elif "norm" in name and leaf == "weight":
            t.normal_(1.0, 0.2, generator=g)
        else:
            t.normal_(0.0, 0.1, generator=g)


def _materialise(make, device: torch.device, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    """Construct on the meta device, allocate (uninitialised) on `device` in `dtype`, fill randomly there."""
    with torch.device("meta"):
        m = make()
    m = m.to(dtype=dtype).to_empty(device=device)
    random_init_(m, seed)
    return m.eval().requires_grad_(False)


class _StandInEncoder:
    """`encode(prompt) -> PromptEmbeds` with seeded random embeddings of a fixed shape (per prompt, cached)."""

    def __init__(self, length: int, channels: int, tokens: int, seed: int, four_d: bool) -> None:
        self.length, self.channels, self.tokens, self.seed, self.four_d = length, channels, tokens, seed, four_d
        self._cache: dict[str, PromptEmbeds] = {}

    def encode(self, prompt: str) -> PromptEmbeds:
        if prompt not in self._cache:
            g = torch.Generator().manual_seed(self.seed * 7919 + zlib.crc32(prompt.encode("utf-8")))
            e = torch.randn(1, self.length, self.channels, generator=g)
            mask = torch.zeros(1, self.length, dtype=torch.int64)
            mask[:, : self.tokens] = 1
            self._cache[prompt] = PromptEmbeds(e[:, None] if self.four_d else e, mask)
        return self._cache[prompt]


@dataclass
class StandInText:
    """Stand-in for `engine.text.TextStack`: stage-1 `[1, 1, L1, Cc]` + mask, refiner connector output
    `[1, L2, caption_channels]` + mask (all ones: the connectors' registers fill the padding)."""

    stage1: _StandInEncoder
    refiner: _StandInEncoder


def stand_in_text(p: Preset, seed: int) -> StandInText:
    L1, L2 = p.text.stage1_max_length, p.text.refiner_max_length
    return StandInText(
        stage1=_StandInEncoder(L1, p.stage1.caption_channels, min(L1, 40), seed, four_d=True),
        refiner=_StandInEncoder(L2, p.refiner.caption_channels, L2, seed + 1, four_d=False),
    )


def build_bench_world(preset: str | Preset, *, device="cuda", dtype=torch.bfloat16, seed: int = 0,
                      with_refiner: bool = True) -> World:
    """The preset's stage-1, refiner and VAE with random weights made on `device`, and the stand-in text."""
    p = get_preset(preset) if isinstance(preset, str) else preset
    device = torch.device(device)
    stage1 = _materialise(lambda: Stage1Transformer(p.stage1), device, dtype, seed)
    vae = _materialise(lambda: VideoVAE(p.vae), device, dtype, seed + 1)
    refiner = _materialise(lambda: RefinerTransformer(p.refiner), device, dtype, seed + 2) if with_refiner else None
    return World(p, stage1, refiner, None, vae, stand_in_text(p, seed), device, dtype)


# ------------------------------------------------------------------------------------------ measuring


def _sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def stats_ms(values_s: list[float]) -> dict[str, float | int | None]:
    """median / p90 / min / max in milliseconds of a list of seconds."""
    if not values_s:
        return {"n": 0, "median_ms": None, "p90_ms": None, "min_ms": None, "max_ms": None}
    ms = sorted(v * 1e3 for v in values_s)
    p90 = float(np.percentile(ms, 90))
    return {"n": len(ms), "median_ms": round(statistics.median(ms), 3), "p90_ms": round(p90, 3),
            "min_ms": round(ms[0], 3), "max_ms": round(ms[-1], 3)}


def gemm_ceiling(device: torch.device, dtype: torch.dtype, n: int, iters: int = 10) -> dict | None:
    """Measured TFLOP/s of an n x n x n matmul on random data (device events on CUDA)."""
    if n <= 0:
        return None
    g = torch.Generator(device=device).manual_seed(1)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    for _ in range(3):
        a @ b
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(iters):
            a @ b
        end.record()
        end.synchronize()
        sec = start.elapsed_time(end) / 1e3 / iters
    else:
        t0 = time.perf_counter()
        for _ in range(iters):
            a @ b
        sec = (time.perf_counter() - t0) / iters
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "ms": round(sec * 1e3, 4),
            "tflops": float(f"{2 * n**3 / sec / 1e12:.4g}")}


def first_image(p: Preset, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, *p.pixel_hw, generator=g) * 2 - 1


def scripted_controls(chunks: int) -> ScriptedControls:
    frames_needed = 24 * chunks
    reps = frames_needed // (24 * 6) + 1
    return ScriptedControls.from_action(",".join([ACTION_UNIT] * reps))


def _mem(device: torch.device) -> int | None:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


def run_quality(pipe: WorldPipeline, world: World, cfg: BenchConfig, quality: str) -> dict:
    """N chunks of the live loop in one quality, then snapshot and replay; returns this quality's report."""
    dev, p = world.device, world.preset
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    prompt = "a quiet street at dusk, wet cobblestones"
    t_start = _sync(dev)
    pipe.start(first_image(p, cfg.seed), prompt, quality)
    t_started = _sync(dev)
    in_line = cfg.in_line_chunks if pipe.cache_stream is not None else 0
    ro = Rollout(pipe, scripted_controls(cfg.chunks + in_line), intrinsics_px=p.default_intrinsics, seed=cfg.seed,
                 quality=quality)
    per_chunk, stored, mem_after = [], [], []
    ttff = None
    with GcPauses() as gc_pauses:
        gc_before = 0.0
        for chunk, t_done, wall in timed_chunks(ro, cfg.chunks, dev):
            if ttff is None:
                ttff = t_done - t_start
            video_s = chunk.frames.shape[0] / p.fps
            per_chunk.append({"index": chunk.index, "chunk_wall": wall, "video_s": video_s, **chunk.timings,
                              "host_gc": gc_pauses.seconds - gc_before})  # collector pauses since the last chunk
            gc_before = gc_pauses.seconds
            mem_after.append(_mem(dev))
            if chunk.index < cfg.replay_chunks:
                stored.append((chunk.latents, chunk.refined))
    for r in per_chunk:  # the chunk's 5 stage-1 forwards: its denoising and (deferred, after the previous chunk's
        # frames were out) a cache pass; in the steady state every pass costs the same
        if "stage1_prev_cache" in r and "stage1" in r:
            r["stage1_chunk"] = r["stage1"] + r["stage1_prev_cache"]
    steady = per_chunk[cfg.warmup:] if len(per_chunk) > cfg.warmup else per_chunk
    report = {
        "quality": quality,
        "chunks": len(per_chunk),
        "start_s": round(t_started - t_start, 4),
        "time_to_first_frame_s": None if ttff is None else round(ttff, 4),
        "stages": stage_stats(steady, skip=("index", "video_s")),
        "per_chunk": [{k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()} for r in per_chunk],
        "gc_passes": {f"gen{g}": n for g, n in enumerate(gc_pauses.passes)},
    }
    walls = [r["chunk_wall"] for r in steady]
    med = statistics.median(walls) if walls else float("nan")
    report["realtime_factor"] = round(steady[0]["video_s"] / med, 4) if walls else None
    report["chunk_ms_median"] = round(med * 1e3, 3) if walls else None
    if dev.type == "cuda":
        # growth from chunk 10 (graphs and caches settled) to the last; short runs: from the first steady chunk
        early = 10 if len(mem_after) > 20 else min(cfg.warmup + 1, len(mem_after) - 1)
        report["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(dev) / 1e9, 3)
        report["peak_reserved_gb"] = round(torch.cuda.max_memory_reserved(dev) / 1e9, 3)
        report["memory_after_chunk_gb"] = [round(m / 1e9, 4) for m in mem_after]
        report["memory_growth_bytes"] = mem_after[-1] - mem_after[early]
        report["memory_growth_between"] = [early, len(mem_after) - 1]
    if in_line:
        report["in_line"] = in_line_cost(ro, pipe, dev, in_line)
    if cfg.snapshot:
        report["snapshot"] = snapshot_cost(ro, dev, cfg)
    if cfg.replay_chunks > 0 and stored:
        report["replay"] = replay_cost(pipe, world, cfg, quality, prompt, stored)
    return report


def in_line_cost(ro: Rollout, pipe: WorldPipeline, dev: torch.device, chunks: int) -> dict:
    """The same session's next `chunks` chunks with `cache-overlap` (and `chunk-async`) switched off (the stage-1
    cache pass in line, before the refiner and the decode): the stage-1 chunk cost undisturbed by the work beside it,
    and the chunk time the overlap is compared with. Same compiled code and graphs, on the default stream (the
    high-priority stream is only used beside an overlapped pass); medians over these chunks (few: read them as a
    spot check)."""
    (side, pipe.cache_stream), (passes, pipe.pass_stream) = (pipe.cache_stream, None), (pipe.pass_stream, None)
    try:  # `chunk-async` off too: the plain path
        per_chunk = [{"chunk_wall": wall, **chunk.timings} for chunk, _, wall in timed_chunks(ro, chunks, dev)]
    finally:
        pipe.cache_stream, pipe.pass_stream = side, passes
    return {"chunks": len(per_chunk), "stages": stage_stats(per_chunk)}


def timed_chunks(ro: Rollout, chunks: int, dev: torch.device):
    """Yields (chunk, time it was handed out, its wall time) for the rollout's next `chunks` chunks. The wall time runs
    from the moment the caller asked for the chunk to the moment its frames are on the host, as a live consumer sees
    it: no device synchronisation between chunks, so work a chunk leaves on the GPU (`chunk-async`'s cache pass, a
    deferred one's launch) overlaps the next chunk's host work as it does live, and lands in the next chunk's wall
    time; what the caller does with a chunk before asking for the next is not counted."""
    t_prev = _sync(dev)  # the start: nothing of an earlier phase left running
    for chunk in ro.chunks(chunks):
        t_done = time.perf_counter()  # the frames are host arrays: the chunk is out
        yield chunk, t_done, t_done - t_prev
        t_prev = time.perf_counter()


def stage_stats(records: list[dict], skip: tuple[str, ...] = ()) -> dict:
    """`stats_ms` of every stage the per-chunk records name (each over the records that have it)."""
    stages = sorted({k for r in records for k in r if k not in skip})
    return {k: stats_ms([r[k] for r in records if k in r]) for k in stages}


def snapshot_cost(ro: Rollout, dev: torch.device, cfg: BenchConfig) -> dict:
    """What a session snapshot costs: the engine thread's device -> host copy (a first one, which allocates the
    pipeline's staging buffers, then a steady one; and the old plain `.cpu().clone()` copy for comparison), and the
    file write (done by the session's writer thread, off the engine thread)."""
    from safetensors.torch import save_file

    t0 = _sync(dev)
    ro.snapshot()  # first: allocates the staging buffers (page-locked on CUDA)
    t1 = _sync(dev)
    tensors, meta = ro.snapshot()  # steady: what the engine thread blocks on per snapshot
    t2 = _sync(dev)
    staging, ro.pipeline.staging = ro.pipeline.staging, None
    try:
        t3 = _sync(dev)
        ro.snapshot()  # the plain path, for comparison
        t4 = _sync(dev)
    finally:
        ro.pipeline.staging = staging
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    with tempfile.TemporaryDirectory(dir=cfg.snapshot_dir) as d:
        path = Path(d) / "snapshot.safetensors"
        t5 = time.perf_counter()
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"meta": json.dumps(meta)})
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        t6 = time.perf_counter()
        size = path.stat().st_size
    return {"tensor_bytes": nbytes, "file_bytes": size, "tensors": len(tensors),
            "device_to_host_s": round(t2 - t1, 4), "stage_first_s": round(t1 - t0, 4),
            "plain_d2h_s": round(t4 - t3, 4), "write_s": round(t6 - t5, 4), "write_on": "writer thread"}


def replay_cost(pipe: WorldPipeline, world: World, cfg: BenchConfig, quality: str, prompt: str,
                stored: list) -> dict:
    """Resume cost: a fresh session replays the first chunks from their stored latents (cache passes only)."""
    dev = world.device
    pipe.start(first_image(world.preset, cfg.seed), prompt, quality)
    ro = Rollout(pipe, scripted_controls(cfg.chunks), intrinsics_px=world.preset.default_intrinsics,
                 seed=cfg.seed, quality=quality)
    times = []
    for latents, refined in stored:
        t0 = _sync(dev)
        ro.replay(latents, refined)
        times.append(_sync(dev) - t0)
    return {"chunks": len(times), "per_chunk_s": [round(t, 4) for t in times],
            **stats_ms(times[1:] if len(times) > 1 else times)}


def _profile(fn, dev: torch.device, top: int, setup=None) -> dict:
    """Wall time of one synchronised call of `fn`, then a torch.profiler run of it: GPU kernel time, launches
    and the top kernels by GPU time. `setup()`, when given, runs (and is waited for) before each call of `fn`,
    outside the timing and the profile."""
    setup = setup or (lambda: None)
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    kind = "CUDA" if dev.type == "cuda" else "CPU"
    with torch.no_grad():
        setup()
        fn()
        setup()
        t0 = _sync(dev)
        fn()
        wall = _sync(dev) - t0
        setup()
        _sync(dev)
        with profile(activities=acts) as prof:
            fn()
            _sync(dev)
    kernels: dict[str, list[float]] = {}
    host: dict[str, list[float]] = {}  # on CUDA: host ops by self time (what the host did while kernels ran)
    for e in prof.events():
        if str(getattr(e, "device_type", "")).endswith(kind):
            if kind == "CUDA":
                d = getattr(e, "device_time", None) or getattr(e, "cuda_time", 0.0) or 0.0
            else:  # CPU: leaf ops only (self time), so nested ops are not counted twice
                d = getattr(e, "self_cpu_time_total", 0.0) or 0.0
            kernels.setdefault(e.name, []).append(float(d))
        elif kind == "CUDA":
            host.setdefault(e.name, []).append(float(getattr(e, "self_cpu_time_total", 0.0) or 0.0))
    total_us = sum(sum(v) for v in kernels.values())

    def table(d, n):
        rows = sorted(((sum(v), len(v), k) for k, v in d.items()), reverse=True)[:n]
        return [{"name": k[:160], "ms": round(us / 1e3, 3), "calls": c} for us, c, k in rows]

    out = {
        "wall_ms": round(wall * 1e3, 3),
        "gpu_kernel_ms": round(total_us / 1e3, 3),
        "kernel_launches": sum(len(v) for v in kernels.values()),
        "top_kernels": [dict(r, share=round(r["ms"] * 1e3 / max(total_us, 1e-9), 4)) for r in table(kernels, top)],
    }
    if host:
        out["top_host_ops"] = table(host, min(top, 20))
    return out


def _steady_camera(world: World, pipe: WorldPipeline, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Identity-pose camera conditions `[1, T, 20]` and random Plücker maps `[1, 48, T, h, w]` on the device."""
    p, dev = world.preset, world.device
    h, w = pipe.latent_hw
    cam = torch.zeros(1, T, 20)
    cam[:, :, :16] = torch.eye(4).flatten()
    fx, fy, cx, cy = p.default_intrinsics
    s = p.pixel_hw[1] / w
    cam[:, :, 16:] = torch.tensor([fx / s, fy / s, cx / s, cy / s])
    g = torch.Generator(device=dev).manual_seed(5)
    pl = torch.randn(1, p.stage1.chunk_plucker_channels, T, h, w, device=dev, generator=g)
    return cam.to(dev, world.dtype), pl.to(world.dtype)


def profile_stages(world: World, pipe: WorldPipeline, top: int = 25) -> dict:
    """Profiles of one stage-1 forward (a denoising step of a 3-frame chunk), a whole chunk's stage-1 denoising, one
    refiner forward over an open block, a whole refiner block (which appends to the window, as a live chunk does)
    and one VAE block decode, at the state the last session left (after its written chunks)."""
    dev, p = world.device, world.preset
    h, w = pipe.latent_hw
    stream = pipe.stream
    T = stream.chunk_frames if stream.next_frame > 0 else stream.first_chunk_frames
    g = torch.Generator(device=dev).manual_seed(6)
    lat = lambda n: torch.randn(1, p.stage1.in_channels, n, h, w, device=dev, generator=g).to(world.dtype)
    out = {}
    cam, pl = _steady_camera(world, pipe, T)
    x, t = lat(T), torch.full((1, 1, T), 889.0, device=dev)
    velocity = stream._velocity(cam, pl)
    out["stage1_forward"] = {"frames": T, **_profile(lambda: velocity(x, t), dev, top)}
    # the whole denoising of a chunk (4 forwards and the sampler's steps between them, as the live loop runs
    # them, a new camera tensor each time as each live chunk brings): its wall time less the GPU kernel time is
    # host work (the frame context, syncs) plus the gaps between kernels
    anchor = pipe.anchor if stream.next_frame == 0 else None
    denoise = lambda: stream.denoise_chunk(x, cam.clone(), pl, anchor)
    out["stage1_denoise"] = {"frames": T, **_profile(denoise, dev, top)}
    # the cache-write pass of a chunk (t = 0), each call from the same cache state (restored outside the timing)
    before = [stream.snapshot()]  # a list, emptied after: the copies go back to the allocator
    write = lambda: stream.write_cache(x, cam, pl)
    out["stage1_cache_pass"] = {"frames": T, **_profile(write, dev, top, setup=lambda: stream.restore(before[0]))}
    stream.restore(before.pop())
    if pipe.refiner is not None and pipe.refiner.window is not None and pipe.refiner.text is not None:
        ref = pipe.refiner
        n = ref.cfg.block_size
        positions = ref._open(n)
        xr = lat(n)
        fwd = lambda: ref.model(xr, ref.sigmas[1], ref.text, fps=ref.cfg.fps, frame_positions=positions,
                                kv=ref.window)
        out["refiner_forward"] = {"frames": n, **_profile(fwd, dev, top)}
        ref.window.active_len = 0
        # a whole block as the live loop runs it (3 denoising forwards, the steps, the capture pass); each call
        # appends its block to the window, as a live chunk does
        xb, nb = lat(n), lat(n)
        out["refiner_block"] = {"frames": n, **_profile(lambda: ref.refine_block(xb, nb), dev, top)}
    if pipe.decoder.latent_frames > 0:
        xd = lat(3)
        out["vae_decode_block"] = {"frames": 3, **_profile(lambda: pipe.decoder.decode_block(xd), dev, top)}
    return out


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "python": sys.version.split()[0], "device": str(device)}
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:  # noqa: BLE001 - triton is optional (CPU)
        env["triton"] = None
    if device.type == "cuda":
        prop = torch.cuda.get_device_properties(device)
        env.update(gpu=prop.name, sm_count=prop.multi_processor_count, gpu_memory_gb=round(prop.total_memory / 1e9, 2),
                   cuda=torch.version.cuda)
    return env


def run_bench(cfg: BenchConfig) -> dict:
    for q in cfg.qualities:
        if q not in QUALITIES:
            raise InputError(f"quality {q!r} is not accepted; choose from {QUALITIES}")
    if cfg.dtype not in DTYPES:
        raise InputError(f"dtype {cfg.dtype!r} is not accepted; choose from {sorted(DTYPES)}")
    dev = torch.device(cfg.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' asked for, but no CUDA device is available; use --device cpu --preset tiny")
    dtype = DTYPES[cfg.dtype]
    report: dict = {"config": asdict(cfg), "env": environment(dev),
                    "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    t0 = _sync(dev)
    world = build_bench_world(cfg.preset, device=dev, dtype=dtype, seed=cfg.seed,
                              with_refiner="full" in cfg.qualities)
    report["build_s"] = round(_sync(dev) - t0, 3)
    report["env"]["host_threads"] = torch.get_num_threads()  # a CUDA world caps them (engine.world.limit_host_threads)
    report["params"] = {name: sum(t.numel() for t in m.parameters())
                        for name, m in (("stage1", world.stage1), ("refiner", world.refiner), ("vae", world.vae))
                        if m is not None}
    if dev.type == "cuda":
        report["weights_gb"] = round(torch.cuda.memory_allocated(dev) / 1e9, 3)
    fp8_linears, fp8_attention = "refiner-fp8" in cfg.fast, "refiner-fp8-attn" in cfg.fast
    if (fp8_linears or fp8_attention) and world.refiner is not None:  # the accuracy cost, measured before the swap
        from engine.fast.refiner_fp8 import BLOCK_LINEARS, refiner_fp8_quality

        try:  # what is switched on; with both, the attention's share alone too
            report["fp8_quality"] = refiner_fp8_quality(world, seed=cfg.seed,
                                                        include=BLOCK_LINEARS if fp8_linears else (),
                                                        attention=fp8_attention)
            if fp8_linears and fp8_attention:
                report["fp8_attention_quality"] = refiner_fp8_quality(world, seed=cfg.seed, include=(),
                                                                      attention=True)
        except (RuntimeError, torch.OutOfMemoryError):  # keep going: the speed is still worth measuring
            import traceback

            report.setdefault("errors", {})["fp8_quality"] = traceback.format_exc()[-4000:]
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    pipe = WorldPipeline(world)
    if cfg.fast:
        from engine.fast import apply_fast_paths

        report["fast"] = apply_fast_paths(pipe, cfg.fast)
        if "lean-memory" in cfg.fast:
            from engine.fast.lean_memory import host_resident_bytes

            report["host_resident_gb"] = round(host_resident_bytes(world) / 1e9, 3)
        from engine.fast import warm_compiled

        t0 = _sync(dev)  # as `sana-wm engine` does before serving: torch.compile paths compile ahead of a session
        if warmed := warm_compiled(world, cfg.qualities, names=cfg.fast):
            report["compile_warm"] = {"qualities": warmed, "s": round(_sync(dev) - t0, 1)}
            gc.collect()  # the warm-up pipelines' caches and graphs, before the measured sessions
            if dev.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(dev)
    report["qualities"] = {}
    for q in cfg.qualities:
        try:
            report["qualities"][q] = run_quality(pipe, world, cfg, q)
        except (RuntimeError, torch.OutOfMemoryError) as e:  # keep what was measured; say what failed
            import traceback

            report.setdefault("errors", {})[q] = traceback.format_exc()[-4000:]
            print(f"sana-wm bench: quality {q} failed: {e}", file=sys.stderr)
        _write(cfg, report)
    report["gemm"] = gemm_ceiling(dev, dtype if dev.type == "cuda" else torch.float32,
                                  cfg.gemm_size if dev.type == "cuda" else min(cfg.gemm_size, 256))
    from engine.targets import bench_targets

    report["targets"] = bench_targets(report)
    _write(cfg, report)
    if cfg.profile:
        try:
            report["profile"] = profile_stages(world, pipe, top=cfg.profile_top)
        except Exception:  # noqa: BLE001 - a failed profile must not lose the measurements
            import traceback

            report.setdefault("errors", {})["profile"] = traceback.format_exc()[-4000:]
    _write(cfg, report)
    return report


def _write(cfg: BenchConfig, report: dict) -> None:
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(json.dumps(report, indent=1))


def format_table(report: dict) -> str:
    """The short summary table printed last."""
    env = report["env"]
    lines = [f"device {env.get('gpu', env['device'])}  torch {env['torch']}  triton {env.get('triton')}  "
             f"preset {report['config']['preset']}  dtype {report['config']['dtype']}  "
             f"fast {','.join(report['config']['fast']) or '-'}"]
    head = f"{'quality':<8} {'stage':<16} {'median ms':>10} {'p90 ms':>10}"
    lines.append(head)
    if "fast" in report:
        lines.insert(1, f"fast paths: {report['fast']}")
    for q, r in report["qualities"].items():
        for stage, s in r["stages"].items():
            if s["n"]:
                lines.append(f"{q:<8} {stage:<16} {s['median_ms']:>10.1f} {s['p90_ms']:>10.1f}")
        extra = [f"realtime x{r['realtime_factor']}", f"ttff {r['time_to_first_frame_s']} s"]
        if "peak_memory_gb" in r:
            extra += [f"peak {r['peak_memory_gb']} GB", f"growth {r['memory_growth_bytes']} B"]
        if "snapshot" in r:
            s = r["snapshot"]
            extra.append(f"snapshot {s['file_bytes'] / 1e9:.3f} GB: engine thread {s['device_to_host_s']} s "
                         f"(plain copy {s['plain_d2h_s']} s), write {s['write_s']} s on the writer thread")
        if "replay" in r:
            extra.append(f"replay {r['replay']['median_ms']} ms/chunk")
        if "in_line" in r:
            st = r["in_line"]["stages"]
            extra.append("cache pass in line (" + ", ".join(f"{k} {st[k]['median_ms']:.1f}" for k in
                                                            ("chunk_wall", "stage1", "refiner", "decode") if k in st)
                         + " ms)")
        lines.append(f"{q:<8} " + " | ".join(extra))
    if "compile_warm" in report:
        lines.append(f"torch.compile warm-up before the sessions: {report['compile_warm']['s']} s")
    for key, what in (("fp8_quality", "refiner fp8"), ("fp8_attention_quality", "refiner fp8 attention alone")):
        if key in report:
            f = report[key]
            lines.append(f"{what} vs bf16: forward rel err max {f['forward_rel_err_max']:.3e}, "
                         f"block rel err max {f['block_rel_err_max']:.3e}")
    if report.get("gemm"):
        g = report["gemm"]
        lines.append(f"GEMM {g['n']}^3 {g['dtype']}: {g['tflops']} TFLOP/s")
    for name, pr in report.get("profile", {}).items():
        lines.append(f"{name} ({pr['frames']} frames): wall {pr['wall_ms']} ms, GPU kernels "
                     f"{pr['gpu_kernel_ms']} ms, {pr['kernel_launches']} launches; top:")
        for k in pr["top_kernels"][:8]:
            lines.append(f"  {k['ms']:>8.2f} ms {k['calls']:>5}x {100 * k['share']:5.1f}%  {k['name'][:80]}")
    for q, err in report.get("errors", {}).items():
        lines.append(f"ERROR in {q}: {err.strip().splitlines()[-1]}")
    if "targets" in report:
        from engine.targets import format_targets

        lines.append(format_targets(report["targets"]))
    return "\n".join(lines)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="sana-wm bench", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="release", help="preset to build (release, tiny)")
    p.add_argument("--chunks", type=int, default=8, help="chunks per quality")
    p.add_argument("--quality", default="preview,full", help="comma-separated qualities (preview, full)")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--dtype", default=None, help="bf16 (default on cuda), fp16, fp32 (default on cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=2, help="leading chunks left out of the statistics")
    p.add_argument("--replay-chunks", type=int, default=3, help="chunks replayed from stored latents")
    p.add_argument("--no-snapshot", action="store_true", help="skip the snapshot size/time measurement")
    p.add_argument("--gemm", type=int, default=8192, help="n of the n^3 GEMM ceiling (0 = skip)")
    p.add_argument("--profile", action="store_true", help="profile one forward of each stage")
    p.add_argument("--profile-top", type=int, default=25, help="kernels listed per profile (default 25)")
    p.add_argument("--fast", default="", help="comma-separated fast paths (see engine.fast.FAST_PATHS)")
    p.add_argument("--out", default=None, help="write the JSON report here")
    p.add_argument("--snapshot-dir", default=None, help="directory for the temporary snapshot file")
    p.add_argument("--in-line-chunks", type=int, default=3,
                   help="with cache-overlap: extra chunks timed with the stage-1 cache pass in line (0 = none)")
    return p


def config_from_args(args) -> BenchConfig:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bf16" if device.startswith("cuda") else "fp32")
    if args.chunks < 1:
        raise InputError(f"--chunks {args.chunks}; at least 1")
    if args.profile_top < 1:
        raise InputError(f"--profile-top {args.profile_top}; at least 1")
    return BenchConfig(preset=args.preset, chunks=args.chunks,
                       qualities=tuple(q for q in args.quality.split(",") if q), device=device, dtype=dtype,
                       seed=args.seed, warmup=args.warmup, replay_chunks=args.replay_chunks,
                       snapshot=not args.no_snapshot, gemm_size=args.gemm, profile=args.profile,
                       profile_top=args.profile_top,
                       fast=tuple(f for f in args.fast.split(",") if f), out=args.out,
                       snapshot_dir=args.snapshot_dir, in_line_chunks=args.in_line_chunks)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = run_bench(config_from_args(args))
    except InputError as e:
        print(f"sana-wm bench: error: {e}", file=sys.stderr)
        return 2
    print(format_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
