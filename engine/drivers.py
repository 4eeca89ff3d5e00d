"""Headless drivers over `Session`: demo, replay, resume/branch, export. Each is a thin loop with a
progress bar; the CLI (`engine/cli.py`) only parses arguments and calls these.

- `replay`: regenerate a recorded session from its manifest + action log, or run an action DSL string or
  explicit c2w poses; writes a session (mp4 + latents + log) and the per-frame poses (`poses.npy`).
- `resume_headless`: continue a session in place (or a branch of it) with scripted controls.
- `export`: an mp4 from a session's stored latents, optionally refined now (refine-on-export of a preview
  session) and with the applied keys drawn on each frame.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from engine.camera import prepare_image
from engine.driver_cli import DEMO_ACTION, DEMO_PROMPT, demo_image_bytes
from engine.errors import InputError
from engine.recording import SessionDir, VideoWriter, committed_chunks, frame_controls
from engine.rollout import PoseControls, ScriptedControls, chunk_noise, chunk_plan
from engine.session import (
    Session,
    load_image,
    manifest_params,
    new_session_like,
    prompt_schedule,
    recorded_controls,
    replay_controls,
)
from engine.vae.pixels import pixels_to_frames
from engine.world import World, WorldPipeline, build_world


def demo_image() -> Image.Image:
    """The bundled first frame as a PIL image."""
    return load_image(demo_image_bytes())


@dataclass
class RunResult:
    session_dir: Path | None
    frames: int
    chunks: int
    poses: np.ndarray  # [F, 4, 4] of the emitted frames
    chunk_seconds: list[float]
    stats: dict


def run_session(session: Session, *, progress: bool = True, max_chunks: int | None = None,
                total_chunks: int | None = None) -> RunResult:
    """Step a session until its control source is exhausted; close it; write `poses.npy` beside the video."""
    poses, times, n = [], [], 0
    try:
        with tqdm(total=total_chunks, unit="chunk", disable=not progress, desc=f"session {session.id}") as bar:
            while max_chunks is None or n < max_chunks:
                chunk = session.step()
                if chunk is None:
                    break
                poses.append(chunk.poses)
                times.append(chunk.timings.get("total", 0.0))
                n += 1
                bar.update(1)
                bar.set_postfix(frames=session.frames_emitted, s_per_chunk=f"{times[-1]:.2f}")
    finally:  # also on an error or Ctrl-C: what was generated stays committed and playable
        session.close("stopped")
    all_poses = np.concatenate(poses) if poses else np.zeros((0, 4, 4), np.float32)
    if session.dir is not None:
        np.save(session.dir.path / "poses.npy", all_poses)
    return RunResult(session.dir.path if session.dir else None, int(all_poses.shape[0]), n, all_poses, times,
                     dict(session.stats))


def check_preset(world: World, manifest) -> None:
    if manifest.preset != world.preset.name:
        raise InputError(f"session {manifest.session_id} was recorded with preset {manifest.preset!r}; this world "
                         f"is {world.preset.name!r} (pass --preset {manifest.preset})")


def load_poses(c2w) -> np.ndarray:
    """`[N+1, 4, 4]` camera-to-world poses from a .npy path or an array, with a clear error otherwise."""
    if isinstance(c2w, (str, Path)):
        try:
            c2w = np.load(c2w, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise InputError(f"cannot read poses from {str(c2w)!r} ({e}); expected a .npy of [N+1, 4, 4] floats") from e
    poses = np.asarray(c2w, dtype=np.float32)
    if poses.ndim != 3 or poses.shape[1:] != (4, 4) or len(poses) < 2:
        raise InputError(f"poses of shape {poses.shape} are not accepted; expected [N+1, 4, 4] with N >= 1")
    return poses


def _frames_in(action: str) -> int:
    from engine.controls import parse_action

    return len(parse_action(action))


def replay(world: World, *, session: str | Path | None = None, action: str | None = None,
           c2w: str | Path | np.ndarray | None = None, image=None, prompt: str = DEMO_PROMPT, seed: int = 0,
           quality: str = "preview", keymap: str = "v2", intrinsics=None, record_root: str | Path = "recordings",
           progress: bool = True) -> RunResult:
    """Headless generation from exactly one of: a recorded session, an action DSL string, c2w poses."""
    given = [x is not None for x in (session, action, c2w)]
    if sum(given) != 1:
        raise InputError("replay takes exactly one of: a session directory, --action DSL, --c2w FILE")
    if session is not None:
        manifest, frames, prompts, first = replay_controls(session)
        check_preset(world, manifest)
        controls = recorded_controls(SessionDir.open(session), manifest, frames)
        s = new_session_like(world, manifest, first, controls, record_root)
        s.pending_prompts = dict(prompts)
        steps = len(controls.c2w) - 1 if isinstance(controls, PoseControls) else len(frames)
        return run_session(s, progress=progress, total_chunks=steps // chunk_plan(1).pixel_count)
    img = demo_image() if image is None else image
    if action is not None:
        controls = ScriptedControls.from_action(action, keymap)
        total = _frames_in(action) // chunk_plan(1).pixel_count
    else:
        poses = load_poses(c2w)
        controls = PoseControls(poses)
        total = (len(poses) - 1) // chunk_plan(1).pixel_count
    s = Session.create(world, first_image=img, prompt=prompt, intrinsics=intrinsics, seed=seed, quality=quality,
                       keymap=keymap, record_root=record_root, controls=controls)
    return run_session(s, progress=progress, total_chunks=total)


def resume_headless(world: World, path: str | Path, action: str, *, branch_from_chunk: int | None = None,
                    record_root: str | Path | None = None, progress: bool = True) -> RunResult:
    """Continue a session (or a branch from chunk k) with the frames of `action` past what was recorded.

    `action` describes the whole session from frame 1 (its first frames are the recorded ones when the
    continuation keeps the same history, which the integrator state makes irrelevant: only the frames past
    the resume point are applied)."""
    manifest = SessionDir.open(path).read_manifest()
    controls = ScriptedControls.from_action(action, manifest.keymap)
    if branch_from_chunk is not None:
        s = Session.branch(world, path, branch_from_chunk, record_root=record_root, controls=controls)
    else:
        s = Session.resume(world, path, controls=controls)
    return run_session(s, progress=progress)


# ----------------------------------------------------------------------------------------- export

_ARROWS = {"forward": "W", "back": "S", "yaw_left": "yaw<", "yaw_right": "yaw>", "strafe_left": "<<",
           "strafe_right": ">>", "pitch_up": "up", "pitch_down": "dn"}


def overlay_keys(frame: np.ndarray, held, frame_index: int) -> np.ndarray:
    """Draw the held controls and the frame index in the top-left corner."""
    img = Image.fromarray(frame)
    d = ImageDraw.Draw(img)
    text = f"{frame_index:5d}  " + (" ".join(_ARROWS[c] for c in sorted(held)) if held else "-")
    d.rectangle([0, 0, 8 + 7 * len(text), 16], fill=(0, 0, 0))
    d.text((4, 2), text, fill=(255, 255, 255))
    return np.asarray(img)


@torch.no_grad()
def export(world: World, path: str | Path, out: str | Path | None = None, *, refine: bool = False,
           overlay: str | None = None, progress: bool = True) -> Path:
    """An mp4 of a recorded session decoded from its stored latents.

    `refine=True` runs the AR refiner over the stored stage-1 latents now (the same seeded noise a live
    `full` session draws, so a refined export of a preview session equals the live `full` session);
    otherwise stored refined latents are used where present. `overlay="keys"` draws the applied controls.
    """
    if overlay not in (None, "keys"):
        raise InputError(f"overlay {overlay!r} is not accepted; use 'keys' or nothing")
    sdir = SessionDir.open(path)
    m = sdir.read_manifest()
    check_preset(world, m)
    records = sdir.scan_actions().records
    chunks = committed_chunks(records)
    if not chunks:
        raise InputError(f"session {sdir.session_id} has no committed chunk to export")
    controls = frame_controls(records)
    refined_stored = m.quality == "full"
    if refine and world.refiner is None:
        raise InputError("--refine needs the refiner, but this world was built without it")
    pipe = WorldPipeline(world)
    image = Image.fromarray(sdir.load_first_frame())
    pixels, _, _ = prepare_image(image, m.intrinsics, world.preset.pixel_hw)
    quality = "full" if (refine or refined_stored) else "preview"
    pipe.start(pixels, m.prompt, "full" if refine else "preview")
    out = Path(out) if out is not None else sdir.path / ("export_refined.mp4" if refine else "export.mp4")
    h, w = world.preset.pixel_hw
    prompts = prompt_schedule(records)
    with VideoWriter(out, w, h, m.fps) as writer:
        for k in tqdm(chunks, unit="chunk", disable=not progress, desc=f"export {sdir.session_id}"):
            plan = chunk_plan(k)
            for f in sorted(f for f in prompts if f <= plan.pixel_start):
                pipe.set_prompt(prompts.pop(f))
            stage1, refined = sdir.load_latents(k)
            if refine:  # the noise a live `full` session draws for this chunk
                latents = pipe.refine(k, stage1, chunk_noise(m.seed, k, tuple(stage1.shape), stream=1))
            else:
                latents = (refined if refined is not None else stage1).to(world.device, world.dtype)
            frames = pixels_to_frames(pipe.decode(latents)).numpy()
            start = plan.decoded_start
            if quality == "full" and k == 0:
                frames, start = frames[1:], 1
            if overlay == "keys":
                frames = np.stack([overlay_keys(f, held_at(controls, start + j), start + j)
                                   for j, f in enumerate(frames)])
            writer.append(frames)
    poses = recorded_poses(m, controls, sdir)
    first_frame = 1 if quality == "full" else 0
    n_frames = committed_frames_end(records) - first_frame
    meta = {
        "session": sdir.session_id, "refine": refine, "overlay": overlay, "chunks": len(chunks), "fps": m.fps,
        "keymap": m.keymap, "pose_convention": "camera-to-world 4x4 row-major, OpenCV axes, relative to frame 0",
        "frames": [{"i": i, "pose": poses[i].reshape(-1).tolist(),
                    "held": sorted(held_at(controls, i))}
                   for i in range(first_frame, first_frame + n_frames)],
    }
    out.with_suffix(".json").write_text(json.dumps(meta))
    return out


def committed_frames_end(records) -> int:
    """One past the last pixel frame of the last committed chunk."""
    return max(r["end"] for r in records if r["t"] == "chunk")


def held_at(controls: list[frozenset[str]], frame: int) -> frozenset[str]:
    """Controls applied to pixel frame `frame` (frame 0 is the first image; pose-driven sessions have none)."""
    return controls[frame - 1] if 1 <= frame <= len(controls) else frozenset()


def recorded_poses(manifest, controls, sdir: SessionDir) -> np.ndarray:
    """Poses `[N+1, 4, 4]` of a recorded session (pose 0 = the first image): its explicit trajectory, or what
    its recorded per-frame controls integrate to."""
    from engine.controls import CameraIntegrator

    source = recorded_controls(sdir, manifest, controls)
    if isinstance(source, PoseControls):
        return source.c2w
    integrator = CameraIntegrator(manifest_params(manifest))
    return np.stack([integrator.state.c2w()] + [integrator.step_controls(c) for c in controls])


@torch.no_grad()
def generate(world: World, *, image=None, prompt: str = DEMO_PROMPT, action: str | None = None,
             c2w: str | Path | np.ndarray | None = None, intrinsics=None, num_frames: int | None = None,
             keymap: str = "v2", seed: int = 0, steps: int = 60, shift: float = 9.8, guidance: float = 5.0,
             out: str | Path = "generated.mp4", progress: bool = True) -> Path:
    """Offline whole clip with the bidirectional sampler (stage1.md §6): image + prompt + DSL or c2w.

    The trajectory is snapped to a VAE frame count `8k+1` (camera.md §10); the clip is decoded in one go.
    Writes `out` (mp4) and `out` with `.json` (per-frame poses)."""
    from engine.camera import num_latent_frames, prepare_camera, snap_num_frames
    from engine.controls import action_to_c2w
    from engine.session import default_intrinsics
    from engine.stage1.sampler import sample_offline

    if (action is None) == (c2w is None):
        raise InputError("generate takes exactly one of --action DSL or --c2w FILE")
    poses = action_to_c2w(action, keymap) if action is not None else load_poses(c2w)
    f = snap_num_frames(min(num_frames or len(poses), len(poses)), upper=len(poses))
    poses = poses[:f]
    img = load_image(demo_image() if image is None else image)
    k_in = list(map(float, intrinsics)) if intrinsics is not None else default_intrinsics(world, img)
    pixels, k_crop, _ = prepare_image(img, k_in, world.preset.pixel_hw)
    cam = prepare_camera(poses, k_crop, world.preset.pixel_hw)
    dev, dt = world.device, world.dtype
    anchor = world.vae.encode(pixels.to(dev, dt).reshape(1, 3, 1, *world.preset.pixel_hw), causal=True)
    t_lat = num_latent_frames(f)
    g = torch.Generator().manual_seed(int(seed))
    latents = torch.randn((1, anchor.shape[1], t_lat, *anchor.shape[-2:]), generator=g).to(dev, dt)
    latents[:, :, :1] = anchor
    cond = torch.zeros(t_lat, dtype=torch.bool)
    cond[0] = True
    pos, neg = world.text.stage1.encode(prompt), world.text.stage1.negative()
    with tqdm(total=steps, unit="step", disable=not progress, desc="generate") as bar:
        latents = sample_offline(
            world.stage1, latents, cond.to(dev), pos.embeds.to(dev, dt), pos.mask.to(dev), neg.embeds.to(dev, dt),
            neg.mask.to(dev), cam["camera_conditions"][None].to(dev, dt), cam["chunk_plucker"][None].to(dev, dt),
            steps=steps, shift=shift, guidance=guidance, progress=lambda i, n: bar.update(1))
    frames = pixels_to_frames(world.vae.decode(latents)).numpy()
    out = Path(out)
    h, w = world.preset.pixel_hw
    with VideoWriter(out, w, h, world.preset.fps) as writer:
        writer.append(frames)
    out.with_suffix(".json").write_text(json.dumps({
        "prompt": prompt, "seed": seed, "steps": steps, "guidance": guidance, "frames": int(frames.shape[0]),
        "poses": poses.reshape(len(poses), -1).tolist()}))
    return out


def demo_headless(*, record_root: str | Path = "recordings", device: str = "cpu", progress: bool = True,
                  action: str = DEMO_ACTION, quality: str = "preview") -> RunResult:
    """The tiny-preset demo without a window: a scripted drive, recorded, with an mp4."""
    world = build_world("tiny", device=device)
    return replay(world, action=action, prompt=DEMO_PROMPT, quality=quality, record_root=record_root,
                  progress=progress)
