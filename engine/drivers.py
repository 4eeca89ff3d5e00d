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
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from engine.camera import prepare_image
from engine.driver_cli import DEMO_ACTION, DEMO_PROMPT
from engine.errors import InputError
from engine.recording import SessionDir, VideoWriter, committed_chunks, frame_controls
from engine.rollout import PoseControls, ScriptedControls, chunk_noise, chunk_plan
from engine.session import Session, new_session_like, replay_controls
from engine.vae.pixels import pixels_to_frames
from engine.world import World, WorldPipeline, build_world


def demo_image() -> Image.Image:
    """The bundled first frame (a synthetic street, drawn once and shipped with the package)."""
    with resources.files("engine").joinpath("assets/first_frame.png").open("rb") as f:
        return Image.open(f).convert("RGB")


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
    session.close("stopped")
    all_poses = np.concatenate(poses) if poses else np.zeros((0, 4, 4), np.float32)
    if session.dir is not None:
        np.save(session.dir.path / "poses.npy", all_poses)
    return RunResult(session.dir.path if session.dir else None, int(all_poses.shape[0]), n, all_poses, times,
                     dict(session.stats))


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
        controls = ScriptedControls(frames, manifest.keymap)
        s = new_session_like(world, manifest, first, controls, record_root)
        s.pending_prompts = dict(prompts)
        return run_session(s, progress=progress, total_chunks=len(frames) // chunk_plan(1).pixel_count)
    img = demo_image() if image is None else image
    if action is not None:
        controls = ScriptedControls.from_action(action, keymap)
        total = _frames_in(action) // chunk_plan(1).pixel_count
    else:
        poses = np.load(c2w) if isinstance(c2w, (str, Path)) else np.asarray(c2w)
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
    prompts = {int(r["i"]): r["prompt"] for r in records if r["t"] == "prompt"}
    with VideoWriter(out, w, h, m.fps) as writer:
        for k in tqdm(chunks, unit="chunk", disable=not progress, desc=f"export {sdir.session_id}"):
            plan = chunk_plan(k)
            for f in sorted(f for f in prompts if f <= plan.pixel_start):
                pipe.set_prompt(prompts.pop(f))
            stage1, refined = sdir.load_latents(k)
            if refine:
                shape = tuple(stage1.shape)
                noise = chunk_noise(m.seed, k, shape, stream=1).to(world.device, world.dtype)
                block = stage1.to(world.device, world.dtype)
                if k == 0:  # the anchor frame is the refiner's sink and stays as it is
                    ref = pipe.refiner.refine_block(block[:, :, 1:], noise[:, :, 1:])
                    latents = torch.cat([pipe.anchor, ref], dim=2)
                else:
                    latents = pipe.refiner.refine_block(block, noise)
            else:
                latents = (refined if refined is not None else stage1).to(world.device, world.dtype)
            frames = pixels_to_frames(pipe.decoder.decode_block(latents)).numpy()
            start = plan.decoded_start
            if quality == "full" and k == 0:
                frames, start = frames[1:], 1
            if overlay == "keys":
                frames = np.stack([overlay_keys(f, controls[start + j - 1] if start + j >= 1 else frozenset(),
                                                start + j) for j, f in enumerate(frames)])
            writer.append(frames)
    meta = {"session": sdir.session_id, "refine": refine, "overlay": overlay, "chunks": len(chunks)}
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    return out


def demo_headless(*, record_root: str | Path = "recordings", device: str = "cpu", progress: bool = True,
                  action: str = DEMO_ACTION, quality: str = "preview") -> RunResult:
    """The tiny-preset demo without a window: a scripted drive, recorded, with an mp4."""
    world = build_world("tiny", device=device)
    return replay(world, action=action, prompt=DEMO_PROMPT, quality=quality, record_root=record_root,
                  progress=progress)
