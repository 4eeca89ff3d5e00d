"""One live world: a rollout plus its recording on disk, resumable and branchable.

`Session.create` starts a world from a first image and a prompt; `step()` generates the next chunk and
commits it to the session directory (latents, the controls actually applied per frame, the video, and a
full snapshot every `snapshot_every` chunks: the engine thread copies it to host memory, the session's
`SnapshotWriter` thread writes the file). `Session.resume` continues a recorded session exactly where it
stopped, also after a crash: it restores the nearest snapshot and replays the cache-write passes of the
later committed chunks from their stored latents (no denoising). `Session.branch` forks a new session
from chunk k. `replay_controls` gives the per-frame controls a recorded session applied (and
`manifest_params` its integrator settings), so a headless replay drives the same integrator the live
session did.

Knows nothing about sockets or pygame; the server and the CLI drivers sit on top of it.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import hashlib
import io
import logging
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from pathlib import Path

import numpy as np
from PIL import Image

from engine import __version__
from engine.camera import prepare_image
from engine.controls import CameraIntegrator, keymap_params
from engine.errors import InputError
from engine.recording import (
    Manifest,
    SessionDir,
    VideoWriter,
    atomic_write_bytes,
    branch_session,
    committed_chunks,
    frame_controls,
    new_session_id,
    resume_video,
)
from engine.rollout import (
    Chunk,
    ControlSource,
    LiveControls,
    PoseControls,
    Rollout,
    ScriptedControls,
    chunk_plan,
)
from engine.world import World, WorldPipeline

log = logging.getLogger("sana_wm.engine")


def load_image(image) -> Image.Image:
    """A first image from a PIL image, uint8 `[H, W, 3]` array, encoded bytes or a path."""
    try:
        if isinstance(image, Image.Image):
            return image.convert("RGB")
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise InputError(f"first image array must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
            return Image.fromarray(image)
        if isinstance(image, (bytes, bytearray)):
            return Image.open(io.BytesIO(image)).convert("RGB")
        return Image.open(image).convert("RGB")
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read the first image ({e}); give a PNG/JPEG file, bytes or a uint8 array") from e


def check_prompt(prompt) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError(f"prompt {prompt!r} is not accepted; give a non-empty text")
    return prompt


def image_digest(image: Image.Image) -> str:
    """Hex SHA-256 of the image's RGB pixels (uint8, row-major), whatever file format carried them."""
    return hashlib.sha256(np.ascontiguousarray(np.asarray(image.convert("RGB"))).tobytes()).hexdigest()


def default_intrinsics(world: World, image: Image.Image) -> list[float]:
    """The preset's default field of view, expressed in the image's own pixels (centred principal point)."""
    fx, fy, _, _ = world.preset.default_intrinsics
    th, tw = world.preset.pixel_hw
    w, h = image.size
    scale = max(th / h, tw / w)  # the crop's resize factor (camera.md §7)
    return [fx / scale, fy / scale, w / 2.0, h / 2.0]


def manifest_params(manifest: Manifest):
    """The integrator settings a session was recorded with (key map, speeds, smoothing)."""
    c = manifest.controls
    return keymap_params(manifest.keymap, translation_speed=c.get("translation_speed"),
                         rotation_speed_deg=c.get("rotation_speed_deg"), pitch_limit_deg=c.get("pitch_limit_deg"),
                         smooth=c.get("smooth"))


def prompt_schedule(records) -> dict[int, str]:
    """Pixel frame index -> prompt set from that frame on (prompt changes in an action log)."""
    return {int(r["i"]): r["prompt"] for r in records if r["t"] == "prompt"}


class SnapshotWriter:
    """The one thread that writes a session's snapshots, so the engine thread never waits on the disk.

    `submit` hands over one snapshot's tensors (the pipeline's staging buffers: untouched until written,
    which is why the next snapshot, `close()` and every reader of the directory wait first) and returns at
    once; at most one write is in flight. A failed write is logged when it fails and raised by the next
    `wait()`. Each write's seconds go to `stats["snapshot_write_s"]`.
    """

    def __init__(self, sdir: SessionDir, stats: dict[str, float]) -> None:
        self.sdir = sdir
        self.stats = stats
        self._pool: ThreadPoolExecutor | None = None  # started on the first snapshot
        self._pending: Future | None = None
        self.last_written = -1  # the last chunk whose snapshot is on disk (written by this writer)
        _WRITERS[sdir.path.resolve()] = self

    def submit(self, chunk: int, tensors: dict, meta: dict) -> None:
        self.wait()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"snapshot-{self.sdir.session_id}")
        self._pending = self._pool.submit(self._write, chunk, tensors, meta)

    def _write(self, chunk: int, tensors: dict, meta: dict) -> None:
        t0 = time.perf_counter()
        try:
            self.sdir.save_snapshot(chunk, tensors, meta)
        except Exception:
            log.exception("session %s: writing the snapshot after chunk %d failed", self.sdir.session_id, chunk)
            raise
        self.last_written = chunk
        self.stats["snapshot_write_s"] = time.perf_counter() - t0

    def wait(self) -> None:
        """Until no write is in flight; raises the error of a failed write (once)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    @property
    def pending(self) -> Future | None:
        return self._pending

    def idle(self) -> None:
        """Until no write is in flight, leaving a failure to be raised by `wait()` (for readers)."""
        pending = self._pending
        if pending is not None:
            wait_futures([pending])

    def close(self) -> None:
        """Wait for the write in flight (raising its error) and stop the thread. Safe to call twice."""
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None


_WRITERS: weakref.WeakValueDictionary[Path, SnapshotWriter] = weakref.WeakValueDictionary()  # by session dir


def wait_for_snapshot_writes(path: str | Path) -> None:
    """Until no snapshot of the session directory `path` is being written by this process (a reader's
    first step: resume, branch). A write's failure is left to its session to raise."""
    writer = _WRITERS.get(Path(path).resolve())
    if writer is not None:
        writer.idle()


class Session:
    """A world being generated, and where it is recorded (`dir` is None when not recording)."""

    def __init__(self, world: World, rollout: Rollout, manifest: Manifest, sdir: SessionDir | None,
                 snapshot_every: int) -> None:
        if snapshot_every < 1:
            raise InputError(f"snapshot_every={snapshot_every} is not accepted; it must be >= 1 chunk")
        self.world = world
        self.rollout = rollout
        self.pipeline: WorldPipeline = rollout.pipeline
        self.manifest = manifest
        self.dir = sdir
        self.snapshot_every = snapshot_every
        self.frames_emitted = 0  # frames handed out so far (in the video)
        self.pending_prompts: dict[int, str] = {}  # pixel frame -> prompt (scripted prompt changes)
        self.stats: dict[str, float] = {}
        self._log = sdir.open_actions() if sdir is not None else None
        self._writer = SnapshotWriter(sdir, self.stats) if sdir is not None else None
        self._video: VideoWriter | None = None
        self._last_snapshot = -1
        self._snapshot_due = False  # the last committed chunk's periodic snapshot is still to be taken
        self._last_committed = -1  # the last chunk whose commit record is in the action log

    # ------------------------------------------------------------------------------ properties
    id = property(lambda self: self.manifest.session_id)
    quality = property(lambda self: self.rollout.quality)
    fps = property(lambda self: float(self.manifest.fps))
    pixel_hw = property(lambda self: tuple(self.world.preset.pixel_hw))
    controls = property(lambda self: self.rollout.controls)
    next_chunk_index = property(lambda self: self.rollout.next_index)

    # --------------------------------------------------------------------------------- create
    @classmethod
    def create(cls, world: World, *, first_image, prompt: str, intrinsics=None, seed: int = 0,
               quality: str = "preview", keymap: str = "v2", translation_speed=None, rotation_speed_deg=None,
               pitch_limit_deg=None, smooth=None, record_root: str | Path | None = "recordings",
               snapshot_every: int = 8, controls: ControlSource | None = None) -> Session:
        check_prompt(prompt)
        image = load_image(first_image)
        params = keymap_params(keymap, translation_speed=translation_speed, rotation_speed_deg=rotation_speed_deg,
                               pitch_limit_deg=pitch_limit_deg, smooth=smooth)
        k_in = list(map(float, intrinsics)) if intrinsics is not None else default_intrinsics(world, image)
        pixels, k_crop, _ = prepare_image(image, k_in, world.preset.pixel_hw)
        h, w = world.preset.pixel_hw
        manifest = Manifest(
            session_id=new_session_id(), created=dt.datetime.now(dt.UTC).isoformat(), status="recording",
            engine_version=__version__, preset=world.preset.name, seed=int(seed), fps=float(world.preset.fps),
            width=w, height=h, prompt=prompt, intrinsics=[float(x) for x in k_in], keymap=params.name,
            controls={"translation_speed": params.translation_speed, "rotation_speed_deg": params.rotation_speed_deg,
                      "pitch_limit_deg": params.pitch_limit_deg, "smooth": params.smooth},
            quality=quality, first_image_sha256=image_digest(image),
            extra={"control_source": "c2w"} if isinstance(controls, PoseControls) else {},
        )
        if controls is None:
            controls = LiveControls(params)
        elif hasattr(controls, "integrator"):  # the session's integrator settings are the ones recorded
            if controls.integrator.params.name != params.name:
                raise InputError(f"the control source reads keys with key map {controls.integrator.params.name!r}, "
                                 f"the session says {params.name!r}; build both with the same key map")
            controls.integrator = CameraIntegrator(params)
        pipeline = WorldPipeline(world)
        pipeline.start(pixels, prompt, quality)
        rollout = Rollout(pipeline, controls,
                          intrinsics_px=k_crop, seed=seed, quality=quality)
        sdir = None
        if record_root is not None:
            sdir = SessionDir.create(record_root, manifest)
            sdir.save_first_frame(np.asarray(image))
            if isinstance(controls, PoseControls):  # explicit poses: the trajectory is the session's controls
                buf = io.BytesIO()
                np.save(buf, controls.c2w)
                atomic_write_bytes(sdir.path / C2W_NAME, buf.getvalue())
        session = cls(world, rollout, manifest, sdir, snapshot_every)
        if sdir is not None:
            session._video = VideoWriter(sdir.video_path, w, h, manifest.fps)
        return session

    # ------------------------------------------------------------------------------ per chunk
    def step(self, finish: bool = True) -> Chunk | None:
        """Generate the next chunk and commit it to the recording. None when the control source is done.
        With `finish` the chunk's deferred work (`finish_chunk`: the stage-1 cache pass, a due snapshot) runs before
        this returns; the live server passes False and calls `finish_chunk` once the frames are queued, so that work
        is off the path from keys to frames. A step runs what the last one left first."""
        self.finish_chunk()
        plan = chunk_plan(self.rollout.next_index)
        for frame in sorted(self.pending_prompts):
            if frame <= plan.pixel_start:
                self.set_prompt(self.pending_prompts.pop(frame))
        chunk = next(self.rollout.chunks(1), None)
        if chunk is None:
            return None
        self.frames_emitted = chunk.frame_start + chunk.frames.shape[0]
        if self.dir is not None:
            self._commit(plan, chunk)
        if finish:
            self.finish_chunk()
        return chunk

    def _commit(self, plan, chunk: Chunk) -> None:
        t0 = time.perf_counter()
        self.dir.save_latents(chunk.index, chunk.latents, chunk.refined)
        if chunk.controls is not None:
            for j, held in enumerate(chunk.controls):
                self._log.append_frame(plan.pixel_start + j, held, -1 if chunk.key_seq is None else chunk.key_seq)
        self._video.append(chunk.frames)
        self._log.flush_chunk(chunk.index, chunk.frame_start, chunk.frame_start + chunk.frames.shape[0])
        self._last_committed = chunk.index
        self.stats["record_s"] = time.perf_counter() - t0
        self._snapshot_due = (chunk.index + 1) % self.snapshot_every == 0  # taken by `finish_chunk`

    def finish_chunk(self) -> None:
        """After a chunk's frames are handed on: the pipeline's deferred work of that chunk (the stage-1 cache
        pass) and, every `snapshot_every` chunks, the snapshot, so neither sits between the chunk's keys and its
        frames. `step()` calls it before it returns, unless told not to (the live server, which calls it right
        after queueing the frames). Idempotent."""
        self.rollout.finish_chunk()
        if self._snapshot_due:
            self._snapshot_due = False
            self.save_snapshot()

    def save_snapshot(self) -> None:
        """A full snapshot of the state after the last committed chunk (atomic on disk). A chunk whose
        commit failed is never snapshotted: a resume regenerates it.

        The engine thread waits for the previous snapshot's write and copies the state to host memory; the
        writer thread writes the file. If the previous write failed, this snapshot is taken all the same (also
        of the same chunk again: only a written snapshot counts) and that failure is raised afterwards.
        `stats["snapshot_s"]` is the time the engine thread was held, `snapshot_wait_s` the part of it spent
        waiting for the previous write."""
        k = self.rollout.next_index - 1
        if self.dir is None or k < 0 or k != self._last_committed:
            return
        t0 = time.perf_counter()
        error = None
        try:
            self._writer.wait()  # the staging buffers are free again
        except Exception as e:  # noqa: BLE001 - the previous write failed: this snapshot supersedes it; raised below
            error = e
            self._last_snapshot = self._writer.last_written
        t1 = time.perf_counter()
        if k != self._last_snapshot:
            staging = self.pipeline.staging  # shared by the world's sessions: staging waits until it is free
            tensors, meta = self.rollout.snapshot()
            self._writer.submit(k, tensors, copy.deepcopy(meta))
            if staging is not None:
                staging.in_use = self._writer.pending
            self._last_snapshot = k
            self.stats["snapshot_s"] = time.perf_counter() - t0
            self.stats["snapshot_wait_s"] = t1 - t0
            self.stats["snapshot_bytes"] = float(sum(t.numel() * t.element_size() for t in tensors.values()))
        if error is not None:
            raise error

    def set_prompt(self, prompt: str) -> None:
        """Change the prompt from the next chunk on (recorded in the action log)."""
        check_prompt(prompt)
        self.pipeline.set_prompt(prompt)
        if self._log is not None:
            self._log.append_prompt(chunk_plan(self.rollout.next_index).pixel_start, prompt)

    def pause(self) -> None:
        """Snapshot now (a paused or vanished client); `step()` may continue afterwards."""
        if self._log is not None:
            self._log.append_pause(self.frames_emitted)
        try:
            self.save_snapshot()
        except Exception:  # noqa: BLE001 - a failed snapshot write (already logged) must not stop the pause
            log.exception("session %s: snapshot at pause", self.manifest.session_id)
        self._set_status("paused")

    def unpause(self) -> None:
        """Continue after `pause()`: a resume record in the action log, status back to recording."""
        if self._log is not None:
            self._log.append_resume(self.frames_emitted)
        self._set_status("recording")

    def close(self, status: str = "stopped") -> None:
        """Final snapshot, written before this returns (or its error raised), status in the manifest, video and
        log closed. Safe to call twice."""
        if self.dir is None:
            return
        try:
            try:
                if self._video is not None:
                    self.save_snapshot()
            finally:
                self._writer.close()
        finally:
            if self._video is not None:
                self._video.close()
                self._video = None
            if self._log is not None:
                self._log.close()
                self._log = None
            self._set_status(status)

    def _set_status(self, status: str) -> None:
        if self.dir is not None:
            self.manifest = dataclasses.replace(self.manifest, status=status)
            self.dir.write_manifest(self.manifest)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close("stopped")

    # --------------------------------------------------------------------------- resume/branch
    @classmethod
    def resume(cls, world: World, path: str | Path, *, controls: ControlSource | None = None,
               snapshot_every: int = 8) -> Session:
        """Continue the recorded session at `path` in place, after its last committed chunk.

        State = the nearest snapshot + the cache-write replay of every later committed chunk from its
        stored latents, so the continuation equals an uninterrupted run (also after a crash, which leaves
        the chunk in flight uncommitted: it is discarded and generated again)."""
        wait_for_snapshot_writes(path)
        sdir = SessionDir.open(path)
        for tmp in sdir.sweep_stale_tmp():
            logging.getLogger("sana_wm.engine").info("session %s: removed %s, left by an interrupted write",
                                                     sdir.session_id, tmp.name)
        manifest = sdir.read_manifest()
        if manifest.preset != world.preset.name:
            raise InputError(f"session {sdir.session_id} was recorded with preset {manifest.preset!r}; "
                             f"this engine runs {world.preset.name!r}")
        log = sdir.open_actions()
        log.discard_uncommitted()
        records = log.records
        log.close()
        done = committed_chunks(records)
        params = manifest_params(manifest)
        image = Image.fromarray(sdir.load_first_frame())
        pixels, k_crop, _ = prepare_image(image, manifest.intrinsics, world.preset.pixel_hw)
        pipeline = WorldPipeline(world)
        recorded = recorded_controls(sdir, manifest, frame_controls(records))
        if isinstance(recorded, PoseControls) and controls is not None:
            raise InputError(f"session {sdir.session_id} follows recorded camera poses; it takes no other controls")
        rollout = Rollout(pipeline, recorded, intrinsics_px=k_crop, seed=manifest.seed, quality=manifest.quality)
        # The video first: a killed engine's mp4 may lack its last frame(s). Those chunks are replayed (their
        # decode gives the very frames they showed) and the frames go back into the video.
        commits = [r for r in records if r["t"] == "chunk"]
        kept = commits[-1]["end"] - commits[0]["start"] if commits else 0
        video = resume_video(sdir.video_path, manifest.width, manifest.height, manifest.fps, kept)
        first_missing = commits[0]["start"] + video.frames_written if video.frames_written < kept else None
        t0 = time.perf_counter()
        last = done[-1] if done else -1
        replay_from = last if first_missing is None else min(
            r["chunk"] for r in commits if r["end"] > first_missing)
        snap = sdir.nearest_snapshot(replay_from - 1 if first_missing is not None else last) if last >= 0 else None
        prompts = prompt_schedule(records)
        if snap is not None:
            tensors, meta = sdir.load_snapshot(snap)
            rollout.restore(tensors, meta)
        else:
            pipeline.start(pixels, manifest.prompt, manifest.quality)
        replayed = 0
        for k in range(rollout.next_index, last + 1):
            plan = chunk_plan(k)
            for frame in sorted(f for f in prompts if f <= plan.pixel_start):
                pipeline.set_prompt(prompts.pop(frame))
            latents, refined = sdir.load_latents(k)
            start, frames = rollout.replay(latents, refined)
            if first_missing is not None and start + len(frames) > first_missing:
                video.append(frames[max(0, first_missing - start):])
                first_missing = start + len(frames)
            replayed += 1
        replay_s = time.perf_counter() - t0
        # The prompt in effect for the next chunk (a snapshot holds the one of its own chunk).
        upcoming = chunk_plan(rollout.next_index).pixel_start
        due = sorted(f for f in prompts if f <= upcoming)
        if due:
            pipeline.set_prompt(prompts[due[-1]])
            for f in due:
                prompts.pop(f)
        # From here on the integrator continues from the recorded state under the live (or given) source;
        # a session driven by explicit poses continues along its recorded trajectory.
        if not isinstance(recorded, PoseControls):
            live = controls if controls is not None else LiveControls(params)
            live.restore(recorded.snapshot())
            rollout.controls = live
        session = cls(world, rollout, manifest, sdir, snapshot_every)
        session._last_snapshot = snap if snap is not None else -1
        session._last_committed = last
        session.pending_prompts = {f: p for f, p in prompts.items()}
        session.frames_emitted = commits[-1]["end"] if commits else 0
        session._video = video
        session.stats.update({"resume_replayed_chunks": float(replayed), "resume_s": replay_s,
                              "resume_replay_s_per_chunk": replay_s / replayed if replayed else 0.0})
        session._set_status("recording")
        return session

    @classmethod
    def branch(cls, world: World, path: str | Path, chunk: int, *, record_root: str | Path | None = None,
               controls: ControlSource | None = None, snapshot_every: int = 8) -> Session:
        """A new session sharing `path`'s history through chunk `chunk`, continued from there."""
        wait_for_snapshot_writes(path)
        new = branch_session(path, chunk, root=record_root)
        return cls.resume(world, new.path, controls=controls, snapshot_every=snapshot_every)


C2W_NAME = "c2w.npy"  # the trajectory of a session driven by explicit poses (`replay --c2w`)


def recorded_controls(sdir: SessionDir, manifest: Manifest, frames: list[frozenset[str]]) -> ControlSource:
    """The control source that reproduces a recorded session: its explicit poses, or its applied keys."""
    if manifest.extra.get("control_source") == "c2w":
        try:
            return PoseControls(np.load(sdir.path / C2W_NAME, allow_pickle=False))
        except (OSError, ValueError) as e:
            raise InputError(f"session {sdir.session_id} was driven by explicit poses but {C2W_NAME} "
                             f"cannot be read: {e}") from e
    return ScriptedControls(frames, manifest_params(manifest))


def replay_controls(path: str | Path) -> tuple[Manifest, list[frozenset[str]], dict[int, str], np.ndarray]:
    """What a headless replay of a recorded session needs: its manifest, the per-frame controls it applied
    (committed chunks only), its prompt changes and its first image."""
    sdir = SessionDir.open(path)
    manifest = sdir.read_manifest()
    records = sdir.scan_actions().records
    done = committed_chunks(records)
    if not done:
        raise InputError(f"session {sdir.session_id} has no committed chunk to replay")
    last = max(i for i, r in enumerate(records) if r["t"] == "chunk")
    records = records[: last + 1]
    return manifest, frame_controls(records), prompt_schedule(records), sdir.load_first_frame()


def new_session_like(world: World, manifest: Manifest, first_image: np.ndarray, controls: ControlSource,
                     record_root: str | Path | None) -> Session:
    """A fresh session with the settings of a recorded one (a replay)."""
    p = manifest_params(manifest)
    return Session.create(world, first_image=first_image, prompt=manifest.prompt, intrinsics=manifest.intrinsics,
                          seed=manifest.seed, quality=manifest.quality, keymap=p.name,
                          translation_speed=p.translation_speed, rotation_speed_deg=p.rotation_speed_deg,
                          pitch_limit_deg=p.pitch_limit_deg, smooth=p.smooth, record_root=record_root,
                          controls=controls)


