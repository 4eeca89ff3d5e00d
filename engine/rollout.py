"""The chunk loop: one IO-free generator that turns controls into frames, chunk by chunk.

`rollout(pipeline, controls, ...)` yields one `Chunk` at a time. Before each chunk it asks its control
source for the chunk's per-frame controls (as late as possible, so live keys are fresh), integrates them
into poses, packs the chunk's camera tensors from those poses only, and hands everything to the
pipeline (stage-1, optional refiner, streaming VAE decode). The ZeroMQ server, headless replay, export and
the benchmark are thin drivers over this generator, so each of them exercises the live path.

Frame bookkeeping (camera.md §10, stage1.md §7.1): latent frame 0 is the first image; chunk 0 covers
latent frames [0, 4) = pixel frames 0..24, chunk k >= 1 covers latent frames [3k+1, 3k+4) = pixel
frames 24k+1 .. 24k+24. Each chunk consumes 24 control steps (pose 0 is the identity anchor).

This module knows nothing about sockets, files or pygame.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from engine.camera import VAE_STRIDE, pack_camera_range, pixel_span
from engine.controls import CameraIntegrator, KeymapParams, parse_action
from engine.errors import InputError

CHUNK_LATENTS = 3  # latent frames per chunk after the first
FIRST_CHUNK_LATENTS = 4  # the anchor (first image) + 3
QUALITIES = ("preview", "full")


@dataclass(frozen=True)
class ChunkPlan:
    """Which latent and pixel frames chunk `index` covers."""

    index: int
    latent_start: int
    latent_count: int
    pixel_start: int  # first pixel frame whose pose this chunk integrates (1 for chunk 0: pose 0 is fixed)
    pixel_count: int  # control steps this chunk consumes

    @property
    def latent_stop(self) -> int:
        return self.latent_start + self.latent_count

    @property
    def decoded_start(self) -> int:
        """First pixel frame the VAE decodes for this chunk (chunk 0 also decodes the anchor, frame 0)."""
        return 0 if self.index == 0 else self.pixel_start


def chunk_plan(index: int, temporal_stride: int = VAE_STRIDE[0]) -> ChunkPlan:
    if index < 0:
        raise InputError(f"chunk index {index} is not accepted; chunks count from 0")
    per_chunk = CHUNK_LATENTS * temporal_stride
    if index == 0:
        return ChunkPlan(0, 0, FIRST_CHUNK_LATENTS, 1, per_chunk)
    latent_start = FIRST_CHUNK_LATENTS + CHUNK_LATENTS * (index - 1)
    return ChunkPlan(index, latent_start, CHUNK_LATENTS, per_chunk * index + 1, per_chunk)


# ------------------------------------------------------------------------------ control sources


@dataclass
class ChunkControls:
    """What a control source decided for one chunk."""

    poses: np.ndarray  # [pixel_count, 4, 4] float32 c2w of pixel frames pixel_start .. pixel_start+pixel_count-1
    controls: list[frozenset[str]] | None  # per frame, the held controls applied (None for explicit poses)
    key_seq: int | None = None  # the client's sequence number of the key state applied (live only)


class ControlSource(Protocol):
    def next_chunk(self, plan: ChunkPlan) -> ChunkControls | None:
        """Controls for the chunk's pixel frames, or None when the source has nothing more."""

    def snapshot(self) -> dict: ...

    def restore(self, snap: dict) -> None: ...


class _IntegratingSource:
    """Base for sources that produce held controls; poses come from one `CameraIntegrator`."""

    def __init__(self, params: KeymapParams | str = "v2") -> None:
        self.integrator = CameraIntegrator(params)

    def _controls_for(self, plan: ChunkPlan) -> tuple[list[frozenset[str]], int | None] | None:
        raise NotImplementedError

    def next_chunk(self, plan: ChunkPlan) -> ChunkControls | None:
        if self.integrator.state.frame != plan.pixel_start - 1:
            raise RuntimeError(
                f"control source is at frame {self.integrator.state.frame}, chunk {plan.index} starts after "
                f"frame {plan.pixel_start - 1}: snapshot and chunk index disagree"
            )
        got = self._controls_for(plan)
        if got is None:
            return None
        controls, seq = got
        poses = np.stack([self.integrator.step_controls(c) for c in controls])
        return ChunkControls(poses, controls, seq)

    def snapshot(self) -> dict:
        return {"integrator": self.integrator.snapshot()}

    def restore(self, snap: dict) -> None:
        self.integrator.restore(snap["integrator"])


class ScriptedControls(_IntegratingSource):
    """Per-frame held controls known in advance: an action DSL string or a recorded action log.

    Frame i of `frames` is applied to pixel frame i + 1. A chunk that would run past the end is not
    generated (a partial chunk would need controls nobody gave).
    """

    def __init__(self, frames: Sequence[frozenset[str]], params: KeymapParams | str = "v2") -> None:
        super().__init__(params)
        self.frames = [frozenset(f) for f in frames]

    @classmethod
    def from_action(cls, action: str, params: KeymapParams | str = "v2") -> ScriptedControls:
        src = cls([], params)
        src.frames = [src.integrator.controls_of(f) for f in parse_action(action)]
        return src

    def _controls_for(self, plan: ChunkPlan):
        lo = plan.pixel_start - 1
        if lo + plan.pixel_count > len(self.frames):
            return None
        return self.frames[lo:lo + plan.pixel_count], None


class LiveControls(_IntegratingSource):
    """The latest held-control set from a live client; sampled once, just before each chunk starts.

    `set_held` may be called from any thread (the server's socket thread). The whole chunk applies the
    state sampled at its start: a key change shows up in the next chunk to start (stage1.md §7).
    """

    def __init__(self, params: KeymapParams | str = "v2") -> None:
        super().__init__(params)
        self._lock = threading.Lock()
        self._held: frozenset[str] = frozenset()
        self._seq: int | None = None
        self._stopped = False

    def set_held(self, controls, seq: int | None = None) -> None:
        controls = self.integrator.check_controls(controls)
        with self._lock:
            if seq is not None and self._seq is not None and seq < self._seq:
                return  # an older message overtaken by a newer one: the newer state wins
            self._held, self._seq = controls, seq

    def stop(self) -> None:
        with self._lock:
            self._stopped = True

    def _controls_for(self, plan: ChunkPlan):
        with self._lock:
            if self._stopped:
                return None
            held, seq = self._held, self._seq
        return [held] * plan.pixel_count, seq


class PoseControls:
    """Explicit camera-to-world poses `[N+1, 4, 4]` (pose 0 = the first image); no integrator."""

    def __init__(self, c2w) -> None:
        from engine.camera import relative_to_first

        self.c2w = relative_to_first(c2w).numpy()
        self.frame = 0

    def next_chunk(self, plan: ChunkPlan) -> ChunkControls | None:
        lo, hi = plan.pixel_start, plan.pixel_start + plan.pixel_count
        if hi > len(self.c2w):
            return None
        self.frame = hi - 1
        return ChunkControls(self.c2w[lo:hi].copy(), None, None)

    def snapshot(self) -> dict:
        return {"frame": self.frame}

    def restore(self, snap: dict) -> None:
        self.frame = int(snap["frame"])


# ------------------------------------------------------------------------------------ pipeline


@dataclass
class ChunkInputs:
    """Everything the models need for one chunk."""

    plan: ChunkPlan
    camera_conditions: torch.Tensor  # [1, n, 20]
    chunk_plucker: torch.Tensor  # [1, 48, n, h, w]
    noise: torch.Tensor  # [1, C, n, h, w] standard normal, seeded by (session seed, chunk index)
    refiner_noise: torch.Tensor | None  # [1, C, n', h, w] for the refiner's SDEdit start (full quality)


@dataclass
class ChunkOutputs:
    latents: torch.Tensor  # [1, C, n, h, w] clean stage-1 latents of the chunk
    refined: torch.Tensor | None  # [1, C, n, h, w] refined latents (full quality)
    frames: np.ndarray  # [F, H, W, 3] uint8 decoded pixel frames of the chunk
    timings: dict[str, float]  # seconds per stage


class Pipeline(Protocol):
    """The models behind the rollout (engine/world.py builds one from a preset or weights)."""

    latent_channels: int
    latent_hw: tuple[int, int]
    pixel_hw: tuple[int, int]

    def start(self, first_image: torch.Tensor, prompt: str, quality: str) -> None:
        """Encode the first image `[1, 3, H, W]` in [-1, 1] and the prompt; empty every cache."""

    def run_chunk(self, inputs: ChunkInputs, quality: str) -> ChunkOutputs: ...

    def finish_chunk(self) -> bool:
        """Work the last chunk left for later (its frames are out): done (or enqueued on the device) before
        anything reads the caches. Returns whether there was any. Idempotent."""

    def replay_chunk(self, plan: ChunkPlan, latents: torch.Tensor, refined: torch.Tensor | None,
                     camera_conditions: torch.Tensor, chunk_plucker: torch.Tensor, quality: str) -> np.ndarray:
        """Rebuild the caches after a chunk from its stored latents: cache-write passes only, no denoising.
        Returns the chunk's decoded frames `[F, H, W, 3]` uint8."""

    def set_prompt(self, prompt: str) -> None: ...

    def snapshot(self) -> dict[str, torch.Tensor]: ...

    def restore(self, state: dict[str, torch.Tensor]) -> None: ...


@dataclass
class Chunk:
    """One generated chunk, as the generator yields it."""

    index: int
    frame_start: int  # index of frames[0] in the session's pixel frames (as shown to the user)
    frames: np.ndarray  # [F, H, W, 3] uint8
    poses: np.ndarray  # [F, 4, 4] float32 c2w of each frame
    controls: list[frozenset[str]] | None  # held controls applied per pixel frame of the plan
    key_seq: int | None
    latents: torch.Tensor  # [1, C, n, h, w]
    refined: torch.Tensor | None
    timings: dict[str, float] = field(default_factory=dict)


def chunk_noise(seed: int, chunk_index: int, shape: tuple[int, ...], stream: int = 0) -> torch.Tensor:
    """Standard normal noise for one chunk, a pure function of (seed, chunk, stream): resume and branch
    regenerate exactly the noise an uninterrupted run drew, with no RNG state to carry."""
    g = torch.Generator(device="cpu")
    g.manual_seed((int(seed) * 1_000_003 + chunk_index * 2 + stream) % (2**63))
    return torch.randn(shape, generator=g, dtype=torch.float32)


_NOISE_WORKER: ThreadPoolExecutor | None = None
_NOISE_WORKER_LOCK = threading.Lock()


def noise_worker() -> ThreadPoolExecutor:
    """The process's one thread that draws the next chunk's noise while the current chunk runs (sessions take
    their chunks one at a time on the engine thread, so one is enough)."""
    global _NOISE_WORKER
    with _NOISE_WORKER_LOCK:
        if _NOISE_WORKER is None:
            _NOISE_WORKER = ThreadPoolExecutor(1, thread_name_prefix="sana-wm-noise")
        return _NOISE_WORKER


def draw_chunk_noise(seed: int, chunk_index: int, shape: tuple[int, ...], refiner: bool):
    """(stage-1 noise, refiner noise or None) of one chunk: `chunk_noise` streams 0 and 1."""
    return (chunk_noise(seed, chunk_index, shape, stream=0),
            chunk_noise(seed, chunk_index, shape, stream=1) if refiner else None)


class Rollout:
    """The state of one generated world between chunks: the chunk counter, the poses so far, the control
    source and the pipeline's caches. `chunks()` is the generator; `snapshot`/`restore` resume it."""

    def __init__(self, pipeline: Pipeline, controls: ControlSource, *, intrinsics_px, seed: int = 0,
                 quality: str = "preview") -> None:
        if quality not in QUALITIES:
            raise InputError(f"quality {quality!r} is not accepted; choose one of {QUALITIES}")
        self.pipeline = pipeline
        self.controls = controls
        self.seed = int(seed)
        self.quality = quality
        self.intrinsics_px = torch.as_tensor(np.asarray(intrinsics_px, dtype=np.float32)).reshape(4)
        self.next_index = 0
        # the next chunk's noise, drawn on `noise_worker()` while this chunk runs (it does not depend on the
        # controls): (the draw's arguments, its future); used only when the arguments match
        self._prefetch: tuple[tuple, Future] | None = None

    def _camera(self, plan: ChunkPlan, poses: np.ndarray) -> dict[str, torch.Tensor]:
        """Camera tensors of the chunk's latent frames from the chunk's own poses (plus pose 0 for chunk 0)."""
        lo, hi = pixel_span(plan.latent_start, plan.latent_count)
        assert lo == plan.decoded_start and hi == plan.pixel_start + plan.pixel_count - 1
        k = self.intrinsics_px[None].expand(poses.shape[0], 4)
        cam = pack_camera_range(torch.from_numpy(poses), k, self.pipeline.pixel_hw, plan.latent_start,
                                plan.latent_count, pixel_offset=lo)
        return {"camera_conditions": cam["camera_conditions"][None], "chunk_plucker": cam["chunk_plucker"][None]}

    def _noise_args(self, index: int) -> tuple:
        h, w = self.pipeline.latent_hw
        shape = (1, self.pipeline.latent_channels, chunk_plan(index).latent_count, h, w)
        return self.seed, index, shape, self.quality == "full"

    def _noise(self, plan: ChunkPlan) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The chunk's noise (the prefetched draw when it was for these very arguments), then the next chunk's
        draw is started in the background. Either way the values are `chunk_noise`'s: a pure function."""
        args = self._noise_args(plan.index)
        pending, self._prefetch = self._prefetch, None
        if pending is not None and pending[0] == args:
            noise, ref = pending[1].result()
        else:
            noise, ref = draw_chunk_noise(*args)
        nxt = self._noise_args(plan.index + 1)
        self._prefetch = (nxt, noise_worker().submit(draw_chunk_noise, *nxt))
        return noise, ref

    def finish_chunk(self) -> bool:
        """The pipeline's deferred work of the last chunk (the stage-1 cache pass): a consumer calls this once it
        has taken a chunk's frames, so that work runs while they are sent and before the next chunk's keys are
        sampled; the next chunk runs it otherwise. Returns whether there was any."""
        return self.pipeline.finish_chunk()

    def chunks(self, max_chunks: int | None = None) -> Iterator[Chunk]:
        produced = 0
        while max_chunks is None or produced < max_chunks:
            plan = chunk_plan(self.next_index)
            self.finish_chunk()  # before the keys are sampled: not on the path from keys to frames
            t0 = time.perf_counter()
            ctl = self.controls.next_chunk(plan)
            if ctl is None:
                return
            t_controls = time.perf_counter()
            poses = self._plan_poses(plan, ctl)
            cam = self._camera(plan, poses)
            t_camera = time.perf_counter()
            noise, ref_noise = self._noise(plan)
            t1 = time.perf_counter()
            out = self.pipeline.run_chunk(
                ChunkInputs(plan, cam["camera_conditions"], cam["chunk_plucker"], noise, ref_noise), self.quality)
            frame_start, frames, poses = self._emitted(plan, out.frames, poses)
            if frames.shape[0] != poses.shape[0]:
                raise RuntimeError(f"chunk {plan.index}: {frames.shape[0]} frames decoded for {poses.shape[0]} poses")
            self.next_index += 1
            produced += 1
            timings = {"controls": t_controls - t0, "camera": t_camera - t_controls, "noise": t1 - t_camera,
                       **out.timings, "total": time.perf_counter() - t0}
            yield Chunk(plan.index, frame_start, frames, poses, ctl.controls, ctl.key_seq, out.latents,
                        out.refined, timings)

    @staticmethod
    def _plan_poses(plan: ChunkPlan, ctl: ChunkControls) -> np.ndarray:
        """Poses of every pixel frame the chunk decodes: chunk 0 also decodes frame 0, the identity anchor."""
        if plan.index == 0:
            return np.concatenate([np.eye(4, dtype=np.float32)[None], ctl.poses])
        return ctl.poses

    def _emitted(self, plan: ChunkPlan, frames: np.ndarray, poses: np.ndarray):
        """(first frame index, frames, poses) a chunk shows: the refiner path drops the anchor frame (camera.md §10)."""
        if self.quality == "full" and plan.index == 0:
            return 1, frames[1:], poses[1:]
        return plan.decoded_start, frames, poses

    def replay(self, latents: torch.Tensor, refined: torch.Tensor | None = None) -> tuple[int, np.ndarray]:
        """Advance over the next chunk from its stored latents without denoising (resume after a snapshot).

        The control source gives the chunk's controls again (they decide the camera tensors the cache-write
        passes see); the pipeline runs only its cache-write / capture / decode passes. Returns the chunk's
        shown frames as `(index of the first, frames [F, H, W, 3] uint8)`, equal to what it showed live."""
        plan = chunk_plan(self.next_index)
        ctl = self.controls.next_chunk(plan)
        if ctl is None:
            raise InputError(f"cannot replay chunk {plan.index}: the control source has no controls for it")
        poses = self._plan_poses(plan, ctl)
        cam = self._camera(plan, poses)
        frames = self.pipeline.replay_chunk(plan, latents, refined, cam["camera_conditions"], cam["chunk_plucker"],
                                            self.quality)
        self.next_index += 1
        frame_start, frames, _ = self._emitted(plan, frames, poses)
        return frame_start, frames

    def snapshot(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, JSON-safe meta) that `restore` turns back into this exact state."""
        meta = {
            "next_index": self.next_index,
            "seed": self.seed,
            "quality": self.quality,
            "controls": self.controls.snapshot(),
        }
        tensors = {f"pipeline.{k}": v for k, v in self.pipeline.snapshot().items()}
        return tensors, meta

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self.next_index = int(meta["next_index"])
        self.seed = int(meta["seed"])
        self.controls.restore(meta["controls"])
        self.pipeline.restore({k[len("pipeline."):]: v for k, v in tensors.items() if k.startswith("pipeline.")})
