"""The models behind a rollout: build them from a preset, and run one chunk through them.

`build_world(preset, ...)` makes stage-1, the refiner with its text connectors, the LTX-2 VAE and both
text stacks, with deterministic seeded weights (or weights from a directory). `WorldPipeline` is the
`engine.rollout.Pipeline` the rollout drives: per chunk it runs the distilled stage-1 sampler and its
cache-write pass, the AR refiner block in `full` quality, and the streaming causal VAE decode.

Knows nothing of controls, sockets or files (weights apart).
"""

from __future__ import annotations

import itertools
import math
import os
import time
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine.errors import InputError
from engine.presets import Preset, get_preset
from engine.refiner.ar import ARRefiner
from engine.refiner.connectors import TextConnectors
from engine.refiner.model import RefinerTransformer
from engine.rollout import ChunkInputs, ChunkOutputs, ChunkPlan
from engine.stage1.model import Stage1Transformer
from engine.stage1.stream import Stage1Stream
from engine.vae.model import VideoVAE
from engine.vae.pixels import pixels_to_frames
from engine.vae.stream import StreamingDecoder

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(name: str | None, device: str | torch.device) -> torch.dtype:
    """A model dtype by name; None = bf16 on CUDA, fp32 elsewhere."""
    if name is None:
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise InputError(f"dtype {name!r} is not accepted; use one of {sorted(DTYPES)}")
    return DTYPES[name]


def seeded_init_(module: torch.nn.Module, seed: int) -> None:
    """Deterministic random weights for a preset without released weights (the fixtures' recipe).

    Every tensor gets a value, including the ones training zero-initialises, so every branch moves the
    output: >=2-D `N(0,1)/sqrt(fan_in)`; norm weights `1 + 0.2 N`; `scale_shift_table`s `0.2 N`;
    `A_log = log U(0.5, 2.5)`; `dt_bias ~ N(-2, 0.5^2)`; other 1-D `0.1 N`. VAE latent statistics are 0/1.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "latents_mean":
                v = torch.zeros(t.shape)
            elif leaf == "latents_std":
                v = torch.ones(t.shape)
            elif leaf == "A_log":
                v = torch.log(0.5 + 2.0 * torch.rand(t.shape, generator=g))
            elif leaf == "dt_bias":
                v = -2.0 + 0.5 * torch.randn(t.shape, generator=g)
            elif "scale_shift_table" in leaf:
                v = 0.2 * torch.randn(t.shape, generator=g)
            elif t.ndim >= 2:
                v = torch.randn(t.shape, generator=g) / math.sqrt(max(1, t[0].numel()))
            elif "norm" in name and leaf == "weight":
                v = 1.0 + 0.2 * torch.randn(t.shape, generator=g)
            elif not t.is_floating_point():
                continue
            else:
                v = 0.1 * torch.randn(t.shape, generator=g)
            t.copy_(v.to(t.dtype))


@dataclass
class World:
    """Every model a session needs, built once per engine process. A CUDA world caps torch's CPU thread pool
    (`limit_host_threads`)."""

    preset: Preset
    stage1: Stage1Transformer
    refiner: RefinerTransformer | None
    connectors: TextConnectors | None
    vae: VideoVAE
    text: object  # engine.text.TextStack
    device: torch.device
    dtype: torch.dtype
    fast: tuple[str, ...] = ()  # fast paths (engine.fast) every pipeline of this world switches on
    staging: SnapshotStaging | None = None  # page-locked snapshot buffers shared by its pipelines (CUDA; made lazily)

    def __post_init__(self) -> None:
        if self.device.type == "cuda":
            limit_host_threads()

    def snapshot_staging(self) -> SnapshotStaging | None:
        """The world's one set of page-locked snapshot buffers (None on a CPU world). One per world, not per
        session: page-locked memory is never handed back to the OS, and the engine thread takes one snapshot at
        a time (a session waits until another session's writer is done with the buffers: `wait_free`)."""
        if self.device.type != "cuda":
            return None
        if self.staging is None:
            self.staging = SnapshotStaging(pin=True)
        return self.staging


HOST_THREADS = 4  # torch's intra-op CPU threads in a process that drives a GPU world


def limit_host_threads() -> int:
    """Cap torch's intra-op CPU thread pool at `HOST_THREADS` (unless OMP_NUM_THREADS is set: then it is left as
    set); returns the pool's size. A GPU world's host work is small tensor ops, and with a pool as wide as the machine
    (16 threads on the lent H100) their fork/join stalls the thread that queues the GPU work. Session 11 (H100): in a
    100-chunk full-quality bench, 12 of 94 chunks had their denoising queued 24-64 ms late (the GPU idle meanwhile,
    the stage-1 span that much longer); in 40-chunk preview runs, 3 of 34 with 16 threads and none with 4."""
    if "OMP_NUM_THREADS" not in os.environ and torch.get_num_threads() > HOST_THREADS:
        torch.set_num_threads(HOST_THREADS)
    return torch.get_num_threads()


def build_world(
    preset: str | Preset = "tiny",
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    with_refiner: bool = True,
    weights: str | Path | None = None,
) -> World:
    """Build the models of `preset` with seeded random weights, or from `weights` (a directory with
    `transformer/`, `refiner/transformer/`, `refiner/connectors/`, `vae/`, `text_encoder/`...)."""
    from engine.text import build_tiny_text_stack

    p = get_preset(preset) if isinstance(preset, str) else preset
    device = torch.device(device)
    if weights is not None:
        return load_world(weights, p, device=device, dtype=dtype, with_refiner=with_refiner)
    stage1 = Stage1Transformer(p.stage1)
    seeded_init_(stage1, seed)
    vae = VideoVAE(p.vae)
    seeded_init_(vae, seed + 1)
    refiner = connectors = None
    if with_refiner:
        refiner = RefinerTransformer(p.refiner)
        seeded_init_(refiner, seed + 2)
        connectors = TextConnectors(p.connectors)
        seeded_init_(connectors, seed + 3)
    if p.text.kind != "tiny":
        raise InputError(f"preset {p.name!r} needs text encoder weights; only the tiny text stack builds without")
    text = build_tiny_text_stack(
        seed,
        stage1_dim=p.stage1.caption_channels,
        stage1_max_length=p.text.stage1_max_length,
        refiner_dim=p.connectors.caption_channels,
        refiner_layers=p.text.refiner_layers,
        refiner_max_length=p.text.refiner_max_length,
        connectors=connectors,
    )
    for m in (stage1, vae, refiner, connectors):
        if m is not None:
            m.to(device=device, dtype=dtype).eval()
    return World(p, stage1, refiner, connectors, vae, text, device, dtype)


MAX_COPY_PIECES = 4096


def is_dense(t: torch.Tensor) -> bool:
    """True when `t`'s elements fill exactly `t.numel()` consecutive places in some dim order (contiguous,
    channels-last, any permutation)."""
    expected = 1
    for d in sorted(range(t.dim()), key=lambda d: t.stride(d)):
        if t.shape[d] != 1 and t.stride(d) != expected:
            return False
        expected *= t.shape[d]
    return True


def copy_in_pieces(dst: torch.Tensor, src: torch.Tensor, non_blocking: bool = False) -> None:
    """`dst.copy_(src)` for a contiguous `dst`, without the contiguous temporary a device -> host copy of a strided
    `src` makes on the device: a strided view (the refiner's history K/V, a slice of its window) is copied as its
    contiguous pieces (the trailing dims that are contiguous, one copy per index of the leading ones). A source
    whose contiguous pieces would number more than MAX_COPY_PIECES is copied whole."""
    if src.is_contiguous() or src.dim() == 0 or is_dense(src):  # a dense permutation (channels-last): one copy,
        dst.copy_(src, non_blocking=non_blocking)  # through one temporary of its size, not element by element
        return
    lead = next(k for k in range(1, src.dim() + 1) if src[(0,) * k].is_contiguous())
    if math.prod(src.shape[:lead]) > MAX_COPY_PIECES:
        dst.copy_(src, non_blocking=non_blocking)
        return
    for idx in itertools.product(*map(range, src.shape[:lead])):
        dst[idx].copy_(src[idx], non_blocking=non_blocking)


class SnapshotStaging:
    """Host buffers a snapshot is copied into, one per key, kept from snapshot to snapshot.

    `stage(state)` copies each tensor of `state` into its buffer (non-blocking copies, then one
    synchronisation) and returns the buffers shaped like the tensors. A key's buffer is allocated on first
    use and again only when its tensor no longer fits (other dtype, more elements); buffers of keys a snapshot
    lacks (a preview session after a full one) are kept for the next full one. So host memory is the largest
    snapshot's worth however long the sessions run, and with `pin`
    (page-locked memory, CUDA only) the device -> host copies run at full PCIe speed without a bounce
    through pageable memory. Pageable buffers (`pin=False`) run the same logic on a CPU.

    The returned tensors ARE the buffers: the next `stage()` overwrites them.
    """

    def __init__(self, pin: bool) -> None:
        self.pin = pin
        self.buffers: dict[str, torch.Tensor] = {}  # key -> flat [capacity] of the key's dtype
        self.in_use: Future | None = None  # the write that still reads the buffers (set by its session)

    def wait_free(self) -> None:
        """Until the write that reads the buffers (if any) is done, whatever its outcome (its session reports it)."""
        pending, self.in_use = self.in_use, None
        if pending is not None:
            wait_futures([pending])

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())

    def stage(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.wait_free()
        out, devices = {}, set()
        for k, t in state.items():
            t = t.detach()
            buf = self.buffers.get(k)
            if buf is None or buf.dtype != t.dtype or buf.numel() < t.numel():
                self.buffers.pop(k, None)  # freed before its replacement is allocated
                buf = self.buffers[k] = torch.empty(t.numel(), dtype=t.dtype, pin_memory=self.pin)
            out[k] = buf[: t.numel()].view(t.shape)  # contiguous: ready for the file
            copy_in_pieces(out[k], t, non_blocking=self.pin)
            devices.add(t.device)
        for d in devices:
            if d.type == "cuda":
                torch.cuda.current_stream(d).synchronize()
        return out


class WorldPipeline:
    """`engine.rollout.Pipeline` over a `World`: the per-chunk work of stage1.md §7 and refiner_vae.md §4-5."""

    def __init__(self, world: World) -> None:
        self.world = world
        p = world.preset
        s = world.vae.config.spatial_scale
        self.pixel_hw = p.pixel_hw
        self.latent_hw = (p.pixel_hw[0] // s, p.pixel_hw[1] // s)
        self.latent_channels = p.stage1.in_channels
        self.stream = Stage1Stream(world.stage1, height=self.latent_hw[0], width=self.latent_hw[1],
                                   camera_renorm=p.camera_renorm)
        self.refiner = ARRefiner(world.refiner, p.ar) if world.refiner is not None else None
        self.decoder = StreamingDecoder(world.vae, 1, *self.latent_hw)
        self.anchor: torch.Tensor | None = None  # [1, C, 1, h, w] clean latent of the first image
        self.quality = "preview"
        # fast path `cache-overlap` (CUDA): the stage-1 cache-write pass runs on this stream beside the refiner and
        # the decode of the same chunk; None: in line, before them (the plain path)
        self.cache_stream: torch.cuda.Stream | None = None
        # with it, the chunk's own work runs on a high-priority stream, so the pass beside it only takes what the
        # refiner and the decode leave idle
        self.main_stream: torch.cuda.Stream | None = None
        # fast path `chunk-async` (CUDA; `cache-overlap` takes precedence): no host synchronisation inside a chunk
        # but the wait for its frames; stage times from CUDA events; the cache-write pass on this stream from the end
        # of the decode (beside the frames' conversion and copy), the current stream ordered after it. None: the
        # plain path (synchronised stage by stage, the pass deferred to `finish_chunk`)
        self.pass_stream: torch.cuda.Stream | None = None
        # latent frames per VAE decoder call (fast path `lean-memory`: 1, a third of the decoder's activations held at
        # once); None: a chunk in one call. The streaming decoder gives the same pixels for any split.
        self.decode_frames_per_call: int | None = None
        # the stage-1 cache-write pass of the last chunk when it has not run yet: (clean latents, camera tensors).
        # A chunk's pass is needed by the next chunk only, so it runs after the chunk's frames are handed out
        # (`finish_chunk`, which the session's consumer calls while the frames are encoded and sent) instead of
        # between its denoising and its decode: off the path from sampled keys to frames. Anything that reads the
        # stage-1 caches or changes what the pass reads (the prompt) runs it first; start/restore drop it.
        self._pending_cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        # timing of the last deferred pass, for the next chunk's timings: (start, end) CUDA events (the pass is
        # enqueued, not waited for: the next chunk's host work overlaps it) or seconds on a CPU world
        self._cache_pass_timing: tuple | float | None = None
        # page-locked host copies of the caches for snapshots (pinned memory needs CUDA)
        self.staging = world.snapshot_staging()
        if world.fast:
            from engine.fast import apply_fast_paths

            apply_fast_paths(self, world.fast)

    def _sync(self) -> float:
        if self.world.device.type == "cuda":
            torch.cuda.synchronize(self.world.device)
        return time.perf_counter()

    def _sync_stream(self) -> float:
        """Like `_sync`, but waits for the current stream only (work on `cache_stream` goes on)."""
        if self.world.device.type == "cuda":
            torch.cuda.current_stream(self.world.device).synchronize()
        return time.perf_counter()

    def _need_refiner(self, quality: str) -> None:
        if quality == "full" and self.refiner is None:
            raise InputError("quality 'full' needs the refiner, but this world was built without it; use 'preview'")

    @torch.no_grad()
    def start(self, first_image: torch.Tensor, prompt: str, quality: str) -> None:
        self._need_refiner(quality)
        w = self.world
        if tuple(first_image.shape[-2:]) != tuple(self.pixel_hw):
            raise InputError(f"first image is {tuple(first_image.shape[-2:])}, the world generates {self.pixel_hw}")
        pixels = first_image.to(w.device, w.dtype).reshape(1, 3, 1, *self.pixel_hw)
        self._pending_cache = self._cache_pass_timing = None
        self.anchor = w.vae.encode(pixels, causal=True)
        self.quality = quality
        self.prompt = prompt
        emb = w.text.stage1.encode(prompt)
        self.stream.reset(emb.embeds.to(w.device, w.dtype), emb.mask.to(w.device))
        if quality == "full":
            remb = w.text.refiner.encode(prompt)
            self.refiner.start(self.anchor, remb.embeds.to(w.device, w.dtype), remb.mask.to(w.device))
        self.decoder.reset()

    @torch.no_grad()
    def set_prompt(self, prompt: str) -> None:
        self.finish_chunk()  # the last chunk's pass reads the prompt it was generated with
        w = self.world
        emb = w.text.stage1.encode(prompt)
        self.stream.set_prompt(emb.embeds.to(w.device, w.dtype), emb.mask.to(w.device))
        if self.quality == "full":
            remb = w.text.refiner.encode(prompt)
            self.refiner.set_prompt(remb.embeds.to(w.device, w.dtype), remb.mask.to(w.device))
        self.prompt = prompt

    @torch.no_grad()
    def finish_chunk(self) -> bool:
        """Run the last chunk's deferred stage-1 cache-write pass, if it has not run: on CUDA it is enqueued on the
        current stream and not waited for (whatever comes next on the stream runs after it). Returns whether a
        pass ran. Idempotent."""
        if self._pending_cache is None:
            return False
        clean, cc, cp = self._pending_cache
        self._pending_cache = None
        if self.world.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            self.stream.write_cache(clean, cc, cp)
            end.record()
            self._cache_pass_timing = (start, end)
        else:
            t0 = time.perf_counter()
            self.stream.write_cache(clean, cc, cp)
            self._cache_pass_timing = time.perf_counter() - t0
        return True

    def _take_cache_pass_s(self) -> float | None:
        """Seconds of the last deferred pass (GPU time on CUDA, waiting for it), once; None when none ran since."""
        timing, self._cache_pass_timing = self._cache_pass_timing, None
        if isinstance(timing, tuple):
            timing[1].synchronize()
            return timing[0].elapsed_time(timing[1]) / 1e3
        return timing

    def _to_model(self, *xs):
        w = self.world
        return [x.to(w.device, w.dtype) for x in xs]

    @torch.no_grad()
    def run_chunk(self, inputs: ChunkInputs, quality: str) -> ChunkOutputs:
        main = self.main_stream if self.cache_stream is not None else None
        if main is None:
            if self.pass_stream is not None:
                return self._run_chunk_async(inputs, quality)
            return self._run_chunk(inputs, quality)
        outer = torch.cuda.current_stream(self.world.device)
        main.wait_stream(outer)
        try:
            with torch.cuda.stream(main):
                return self._run_chunk(inputs, quality)  # hands back host tensors only, after syncing main
        finally:  # also when the chunk failed: whatever comes next on the outer stream runs after it
            outer.wait_stream(main)
            outer.wait_stream(self.cache_stream)

    def _run_chunk(self, inputs: ChunkInputs, quality: str) -> ChunkOutputs:
        self._check_chunk(quality)
        first = inputs.plan.index == 0
        self.finish_chunk()  # the previous chunk's pass, if its consumer did not run it
        cc, cp, noise = self._to_model(inputs.camera_conditions, inputs.chunk_plucker, inputs.noise)
        t0 = self._sync()
        clean = self.stream.denoise_chunk(noise, cc, cp, anchor=self.anchor if first else None)
        side = self.cache_stream
        timings = {}
        if (cache_s := self._take_cache_pass_s()) is not None:  # the previous chunk's pass (after its frames)
            timings["stage1_prev_cache"] = cache_s
        if side is None:  # the cache pass is deferred (`finish_chunk`); "stage1" here is the denoising
            self._pending_cache = (clean, cc, cp)
            t1 = self._sync()
            timings["stage1"] = t1 - t0
        else:
            timings["stage1"] = self._sync_stream() - t0
            side.wait_stream(torch.cuda.current_stream(self.world.device))
            marks = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t_enqueue = time.perf_counter()
            with torch.cuda.stream(side):
                marks[0].record()
                self.stream.write_cache(clean, cc, cp)  # clean, cc, cp stay referenced until side.synchronize()
                marks[1].record()
            t1 = time.perf_counter()
            timings["cache_enqueue"] = t1 - t_enqueue  # host time launching the pass (a capture, the first time)
        try:
            refined = self.refine(inputs.plan.index, clean, inputs.refiner_noise) if quality == "full" else None
            t2 = self._sync_stream()
            frames = pixels_to_frames(self.decode(refined if refined is not None else clean))
            t3 = time.perf_counter()
        finally:
            if side is not None:
                # the chunk is done when its cache pass is: the next chunk's stage-1 reads what it wrote
                torch.cuda.current_stream(self.world.device).wait_stream(side)
                side.synchronize()
        timings["decode"] = t3 - t2
        if side is not None:
            # with the overlap, stages run side by side and do not add up to the chunk's wall time: stage1 is the
            # denoising wall time plus the pass's GPU time (stretched by what ran beside it), refiner and decode
            # their wall times after the pass was launched
            cache_s = marks[0].elapsed_time(marks[1]) / 1e3
            timings["stage1_cache"] = cache_s
            timings["stage1"] += cache_s
            timings["cache_wait"] = time.perf_counter() - t3
        if refined is not None:
            timings["refiner"] = t2 - t1
        return ChunkOutputs(clean.float().cpu(), None if refined is None else refined.float().cpu(),
                            frames.numpy(), timings)

    def _check_chunk(self, quality: str) -> None:
        if self.anchor is None:
            raise RuntimeError("WorldPipeline.start() must come before chunks")
        if quality != self.quality:
            raise InputError(f"quality {quality!r} differs from the session's {self.quality!r}; start a new session")

    def _run_chunk_async(self, inputs: ChunkInputs, quality: str) -> ChunkOutputs:
        """`_run_chunk` without host synchronisation but the wait for the chunk's outputs (fast path `chunk-async`):
        the host enqueues the denoising, the refiner and the decode back to back (each launch while the GPU runs
        the one before), then this chunk's cache-write pass on `pass_stream` from the end of the decode, beside the
        frames' conversion and copy; the current stream waits for the pass before anything after the chunk (the next
        chunk, a snapshot, a prompt's copies). The next chunk's host work (keys, camera, noise, launches) overlaps the
        pass. Same kernels on the same data in the same order as the plain path. Stage times are CUDA event spans
        on the GPU: stage1 (the denoising), refiner, decode (with the frames' conversion and copy) and, from the
        previous chunk, stage1_prev_cache (the pass)."""
        self._check_chunk(quality)
        first = inputs.plan.index == 0
        self.finish_chunk()  # a pass a plain-path chunk left (in line: this stream)
        prev_pass, self._cache_pass_timing = self._cache_pass_timing, None
        dev = self.world.device
        main, side = torch.cuda.current_stream(dev), self.pass_stream
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        cc, cp, noise = self._to_model(inputs.camera_conditions, inputs.chunk_plucker, inputs.noise)
        marks[0].record(main)
        t_enqueue = time.perf_counter()
        clean = self.stream.denoise_chunk(noise, cc, cp, anchor=self.anchor if first else None)
        marks[1].record(main)
        t_enqueue = time.perf_counter() - t_enqueue
        self._pending_cache = (clean, cc, cp)  # until it is enqueued below (a failed refine / decode leaves it pending)
        refined = self.refine(inputs.plan.index, clean, inputs.refiner_noise) if quality == "full" else None
        marks[2].record(main)
        pixels = self.decode(refined if refined is not None else clean)
        side.wait_stream(main)  # the pass reads the caches and buffers this chunk's work wrote
        pass_marks = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self._pending_cache = None
        try:
            with torch.cuda.stream(side):
                pass_marks[0].record(side)
                self.stream.write_cache(clean, cc, cp)
                pass_marks[1].record(side)
                if refined is not None:  # the next block's sink and fp8 copy (refiner-fp8-attn) beside the decode
                    self.refiner.prepare_next_block()
            frames = pixels_to_frames(pixels)  # the frames on the host (waits for this stream only)
            latents = clean.float().cpu()
            refined_host = None if refined is None else refined.float().cpu()
            marks[3].record(main)
        finally:  # also when something failed: whatever comes next on this stream runs after the pass
            main.wait_stream(side)
        self._cache_pass_timing = pass_marks
        marks[3].synchronize()
        timings = {"stage1": marks[0].elapsed_time(marks[1]) / 1e3,
                   "decode": marks[2].elapsed_time(marks[3]) / 1e3,
                   "stage1_enqueue": t_enqueue}  # host seconds to queue the denoising (a GPU gap if near `stage1`)
        if refined is not None:
            timings["refiner"] = marks[1].elapsed_time(marks[2]) / 1e3
        if prev_pass is not None:  # the previous chunk's pass, long done (this stream waited for it)
            timings["stage1_prev_cache"] = prev_pass[0].elapsed_time(prev_pass[1]) / 1e3
        return ChunkOutputs(latents, refined_host, frames.numpy(), timings)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The streaming VAE decode of a chunk's latents `[1, C, n, h, w]`, `decode_frames_per_call` latent frames per
        decoder call (all n when None); the pixels of the calls joined on the device."""
        n = latents.shape[2]
        step = self.decode_frames_per_call or n
        if step >= n:
            return self.decoder.decode_block(latents)
        return torch.cat([self.decoder.decode_block(latents[:, :, i:i + step]) for i in range(0, n, step)], dim=2)

    @torch.no_grad()
    def refine(self, chunk_index: int, clean: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The AR refiner on one chunk's stage-1 latents `[1, C, n, h, w]` from its seeded noise (same shape).
        Chunk 0's first frame is the anchor, the refiner's sink: it is returned as it is, not refined."""
        clean, noise = self._to_model(clean, noise)
        if chunk_index == 0:
            return torch.cat([self.anchor, self.refiner.refine_block(clean[:, :, 1:], noise[:, :, 1:])], dim=2)
        return self.refiner.refine_block(clean, noise)

    @torch.no_grad()
    def replay_chunk(self, plan: ChunkPlan, latents: torch.Tensor, refined: torch.Tensor | None,
                     camera_conditions: torch.Tensor, chunk_plucker: torch.Tensor, quality: str) -> np.ndarray:
        """Caches after `plan` from its stored latents: stage-1 t=0 pass, refiner capture pass, VAE decode.
        Returns the decoded frames `[F, H, W, 3]` uint8 (the decode is needed for the VAE's conv cache anyway)."""
        first = plan.index == 0
        self.finish_chunk()
        clean, cc, cp = self._to_model(latents, camera_conditions, chunk_plucker)
        self.stream.write_cache(clean, cc, cp)
        decode_input = clean
        if quality == "full":
            if refined is None:
                raise InputError(f"chunk {plan.index} has no refined latents stored; cannot replay a 'full' session")
            (ref,) = self._to_model(refined)
            self.refiner.replay_capture(ref[:, :, 1:] if first else ref)
            decode_input = ref
        return pixels_to_frames(self.decode(decode_input)).numpy()

    def snapshot(self) -> dict[str, torch.Tensor]:
        """Host copies of every cache and counter, keyed as `restore` reads them.

        On CUDA the copies are the pipeline's page-locked staging buffers (`SnapshotStaging`), valid until
        the next `snapshot()`: whoever keeps or writes them past that (the session's writer thread) must be
        done first. On a CPU world they are fresh copies."""
        if self.anchor is None:
            raise RuntimeError("nothing to snapshot before start()")
        self.finish_chunk()
        # the components hand out their live buffers (no device-side copy: 9 GB at the release size in full
        # quality); they are copied to the host below, before anything runs on them again
        state = {"anchor": self.anchor}
        state.update({f"stage1.{k}": v for k, v in self.stream.snapshot(copy=False).items()})
        state.update({f"vae.{k}": v for k, v in self.decoder.snapshot(copy=False).items()})
        if self.quality == "full":
            state.update({f"refiner.{k}": v for k, v in self.refiner.snapshot(copy=False).items()})
        if self.staging is not None:
            state = self.staging.stage(state)
        else:
            state = {k: v.detach().cpu().clone(memory_format=torch.contiguous_format) for k, v in state.items()}
        prompt = torch.tensor(list(self.prompt.encode("utf-8")), dtype=torch.uint8)
        return {"anchor": state.pop("anchor"), "prompt": prompt, **state}

    def restore(self, state: dict[str, torch.Tensor]) -> None:
        w = self.world
        self._pending_cache = self._cache_pass_timing = None
        self.anchor = state["anchor"].to(w.device, w.dtype)

        def part(prefix: str) -> dict[str, torch.Tensor]:
            # host tensors as they are: each component copies them into its own buffers (no device-side copy of
            # the whole snapshot first: 9 GB at the release size in full quality)
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

        self.stream.restore(part("stage1."))
        self.decoder.restore(part("vae."))
        ref = part("refiner.")
        self.quality = "full" if ref else "preview"
        if ref:
            self._need_refiner("full")
            self.refiner.restore(ref)
        self.set_prompt(bytes(state["prompt"].tolist()).decode("utf-8"))


# ------------------------------------------------------------------------------- weights directory
#
#   <dir>/transformer/            stage-1 DiT: release or diffusers layout, single or sharded safetensors
#   <dir>/vae/                    LTX-2 VAE, diffusers layout (+ config.json)
#   <dir>/text_encoder/           Gemma-2 (transformers layout), tokenizer in it or in <dir>/tokenizer/
#   <dir>/refiner/transformer/    LTX-2 video transformer, diffusers layout (audio keys skipped by name)
#   <dir>/refiner/connectors/     LTX-2 text connectors, diffusers layout
#   <dir>/refiner/text_encoder/   Gemma-3 (transformers layout), tokenizer in it or in <dir>/refiner/tokenizer/
#
# Each component's config.json, when present, decides its architecture; otherwise the preset's does.


def _config(cls, directory: Path, default):
    import json

    f = directory / "config.json"
    if not f.is_file():
        return default
    try:
        return cls.from_dict(json.loads(f.read_text()))
    except json.JSONDecodeError as e:
        raise InputError(f"{str(f)!r} is not valid JSON: {e}") from e


def _require(directory: Path, what: str) -> Path:
    if not directory.is_dir():
        raise InputError(f"weights directory has no {what} at {str(directory)!r}")
    return directory


def load_world(weights: str | Path, preset: Preset, *, device: torch.device, dtype: torch.dtype,
               with_refiner: bool = True) -> World:
    """A `World` whose every model is read (and checked key by key) from a weights directory."""
    import dataclasses

    from engine.refiner.config import ConnectorsConfig, RefinerConfig
    from engine.refiner.connectors import load_connector_weights
    from engine.refiner.model import load_refiner_weights
    from engine.stage1.config import Stage1Config
    from engine.stage1.loading import load_stage1_weights
    from engine.text import (
        RefinerPromptEncoder,
        RefinerTextConfig,
        Stage1PromptEncoder,
        Stage1TextConfig,
        TextStack,
    )
    from engine.vae.config import VAEConfig
    from engine.vae.model import load_vae
    from engine.weights import read_state_dict

    root = Path(weights)
    if not root.is_dir():
        raise InputError(f"weights {str(root)!r} is not a directory; expected the layout in engine/world.py")
    d = _require(root / "transformer", "stage-1 transformer/")
    s1cfg = _config(Stage1Config, d, preset.stage1)
    stage1 = Stage1Transformer(s1cfg)
    load_stage1_weights(stage1, d)
    d = _require(root / "vae", "vae/")
    vae = load_vae(d, _config(VAEConfig, d, preset.vae))
    refiner = connectors = None
    if with_refiner:
        d = _require(root / "refiner" / "transformer", "refiner/transformer/")
        refiner = RefinerTransformer(_config(RefinerConfig, d, preset.refiner))
        load_refiner_weights(refiner, read_state_dict(d))
        d = _require(root / "refiner" / "connectors", "refiner/connectors/")
        connectors = TextConnectors(_config(ConnectorsConfig, d, preset.connectors))
        load_connector_weights(connectors, read_state_dict(d))
        connectors.to(device=device, dtype=dtype).eval()
    stage1_text = Stage1PromptEncoder.from_pretrained(
        _require(root / "text_encoder", "text_encoder/"),
        config=Stage1TextConfig(max_length=preset.text.stage1_max_length), device=device)
    refiner_text = None
    if with_refiner:
        refiner_text = RefinerPromptEncoder.from_pretrained(
            _require(root / "refiner" / "text_encoder", "refiner/text_encoder/"), connectors=connectors,
            config=RefinerTextConfig(max_length=preset.text.refiner_max_length), device=device)
    p = dataclasses.replace(preset, stage1=s1cfg, vae=vae.config,
                            refiner=refiner.cfg if refiner is not None else preset.refiner,
                            connectors=connectors.cfg if connectors is not None else preset.connectors)
    for m in (stage1, vae, refiner):
        if m is not None:
            m.to(device=device, dtype=dtype).eval()
    return World(p, stage1, refiner, connectors, vae, TextStack(stage1_text, refiner_text), device, dtype)


def save_world(world: World, directory: str | Path) -> Path:
    """Write a world's weights in the layout `load_world` reads (release-layout stage-1 keys)."""
    import json

    from safetensors.torch import save_file

    root = Path(directory)

    def dump(module: torch.nn.Module, sub: str, config: dict) -> None:
        d = root / sub
        d.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
        save_file(state, str(d / "diffusion_pytorch_model.safetensors"))
        (d / "config.json").write_text(json.dumps(config, indent=1, default=list))

    dump(world.stage1, "transformer", world.stage1.config.to_dict())
    dump(world.vae, "vae", dataclasses_dict(world.vae.config))
    if world.refiner is not None:
        dump(world.refiner, "refiner/transformer", dataclasses_dict(world.refiner.cfg))
        dump(world.connectors, "refiner/connectors", dataclasses_dict(world.connectors.cfg))
    for sub, enc in (("text_encoder", world.text.stage1), ("refiner/text_encoder", world.text.refiner)):
        if enc is None:
            continue
        enc.model.save_pretrained(root / sub)
        enc.tokenizer.save_pretrained(root / sub)
    return root


def dataclasses_dict(cfg) -> dict:
    import dataclasses

    return dataclasses.asdict(cfg)
