"""Argument parsers of the headless driver subcommands (demo, replay, resume, export).

Kept apart from `engine.drivers` so that `sana-wm --help` and the client commands do not import torch;
the drivers are imported only when one of these commands runs.
"""

from __future__ import annotations

DEMO_PROMPT = "a sunny city street with colourful buildings, photorealistic"
DEMO_ACTION = "w-24,jw-24,l-24,ik-12,w-12,dw-24,s-24"  # 144 frames = 6 chunks = 9 s


def demo_image_bytes() -> bytes:
    """The bundled first frame (a synthetic street, drawn once and shipped with the package), as PNG bytes."""
    from importlib import resources

    return resources.files("engine").joinpath("assets/first_frame.png").read_bytes()

# --------------------------------------------------------------------------------------------- CLI

DRIVER_COMMANDS = ("demo", "replay", "resume", "export", "generate")


def add_model_args(p) -> None:
    """Which models a command builds: preset, weights, dtype, fast paths, device (engine and drivers alike)."""
    p.add_argument("--preset", default="tiny", help="model preset (default tiny)")
    p.add_argument("--weights", default=None, help="weights directory (layout in engine/world.py); default: the "
                                                   "preset's seeded random weights")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                   help="model dtype (default bf16 on cuda, fp32 on cpu)")
    p.add_argument("--fast", default="", help="comma-separated fast paths (engine/fast: stage1-graph, ... or all)")
    p.add_argument("--device", default="cpu", help="torch device: cpu or cuda")


def _world_args(p, preset: bool = True) -> None:
    if preset:
        add_model_args(p)
    else:
        p.add_argument("--device", default="cpu", help="torch device: cpu or cuda")
    p.add_argument("--record-root", default="recordings", help="where sessions are written (default recordings/)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_driver_commands(sub) -> None:
    """The headless driver subcommands of `sana-wm` (parsers only; `run_driver` runs them)."""
    p = sub.add_parser("demo", help="the tiny-preset demo: a window with --connect, or a scripted drive (--headless)")
    p.add_argument("--headless", action="store_true",
                   help="no window: drive a scripted key sequence, write a session and an mp4")
    p.add_argument("--action", default=DEMO_ACTION, help="the scripted drive of --headless (action DSL)")
    p.add_argument("--quality", default="preview", choices=["preview", "full"])
    p.add_argument("--seconds", type=float, default=None, help="close the window after this many seconds")
    _world_args(p, preset=False)

    p = sub.add_parser("replay", help="headless: regenerate a session, or run an action string or c2w poses")
    p.add_argument("session", nargs="?", help="a recorded session directory to regenerate")
    p.add_argument("--action", help="action DSL string, e.g. 'w-80,jw-40'")
    p.add_argument("--c2w", help=".npy file of [N+1,4,4] camera-to-world poses (OpenCV axes)")
    p.add_argument("--image", help="first image (default: the bundled street)")
    p.add_argument("--prompt", default=DEMO_PROMPT)
    p.add_argument("--intrinsics", type=float, nargs=4, metavar=("FX", "FY", "CX", "CY"),
                   help="pixel intrinsics of the first image (default: the preset's field of view)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quality", default="preview", choices=["preview", "full"])
    p.add_argument("--keymap", default="v2", choices=["v1", "v2"])
    p.add_argument("--connect", default=None, metavar="ADDRESS",
                   help="drive a running engine (e.g. tcp://127.0.0.1:5555) instead of generating in-process")
    p.add_argument("--out", default=None, help="with --connect: where to write the mp4 (default replay.mp4)")
    p.add_argument("--curve-dir", default=None, help="with --connect: CURVE keys from `sana-wm keys`")
    _world_args(p)

    p = sub.add_parser("resume", help="continue a recorded session in place, or branch it, with scripted keys")
    p.add_argument("session", help="the session directory")
    p.add_argument("--action", required=True,
                   help="action DSL for the whole session from frame 1; frames past the recorded ones are applied")
    p.add_argument("--branch-from-chunk", type=int, default=None, help="fork a new session after chunk K")
    _world_args(p)

    p = sub.add_parser("export", help="an mp4 of a session from its stored latents")
    p.add_argument("session", help="the session directory")
    p.add_argument("--refine", action="store_true", help="run the refiner over the stored stage-1 latents now")
    p.add_argument("--overlay", choices=["keys"], default=None, help="draw the applied keys on each frame")
    p.add_argument("--out", default=None, help="output .mp4 (default: inside the session directory)")
    _world_args(p)


    p = sub.add_parser("generate", help="offline whole clip with the bidirectional sampler (image + prompt + camera)")
    p.add_argument("--action", help="action DSL string")
    p.add_argument("--c2w", help=".npy file of [N+1,4,4] camera-to-world poses")
    p.add_argument("--image", help="first image (default: the bundled street)")
    p.add_argument("--prompt", default=DEMO_PROMPT)
    p.add_argument("--intrinsics", type=float, nargs=4, metavar=("FX", "FY", "CX", "CY"))
    p.add_argument("--frames", type=int, default=None, help="clip length (snapped to 8k+1)")
    p.add_argument("--keymap", default="v2", choices=["v1", "v2"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--shift", type=float, default=9.8)
    p.add_argument("--out", default="generated.mp4")
    _world_args(p)


def _summary(result) -> None:
    import numpy as np

    per = np.median(result.chunk_seconds) if result.chunk_seconds else float("nan")
    print(f"frames {result.frames}  chunks {result.chunks}  median {per:.3f} s/chunk "
          f"({1.5 / per if per == per and per > 0 else float('nan'):.2f}x realtime)")
    if result.session_dir is not None:
        print(f"session  {result.session_dir}\nvideo    {result.session_dir / 'video.mp4'}\n"
              f"poses    {result.session_dir / 'poses.npy'}")


def run_driver(args) -> int:
    from engine.drivers import demo_headless, export, generate, replay, resume_headless
    from engine.session import load_image

    progress = not args.quiet
    if args.command == "replay" and args.connect:
        return _replay_connected(args)
    if args.command == "demo":
        if not args.headless and _demo_window(args):
            return 0
        _summary(demo_headless(record_root=args.record_root, device=args.device, progress=progress,
                               action=args.action, quality=args.quality))
        return 0
    world = _build_world(args)
    if args.command == "replay":
        image = load_image(args.image) if args.image else None
        _summary(replay(world, session=args.session, action=args.action, c2w=args.c2w, image=image,
                        prompt=args.prompt, seed=args.seed, quality=args.quality, keymap=args.keymap,
                        intrinsics=args.intrinsics, record_root=args.record_root, progress=progress))
    elif args.command == "resume":
        root = args.record_root if args.branch_from_chunk is not None else None
        _summary(resume_headless(world, args.session, args.action, branch_from_chunk=args.branch_from_chunk,
                                 record_root=root, progress=progress))
    elif args.command == "generate":
        image = load_image(args.image) if args.image else None
        print(generate(world, image=image, prompt=args.prompt, action=args.action, c2w=args.c2w,
                       intrinsics=args.intrinsics, num_frames=args.frames, keymap=args.keymap, seed=args.seed,
                       steps=args.steps, shift=args.shift, guidance=args.guidance, out=args.out, progress=progress))
    elif args.command == "export":
        print(export(world, args.session, args.out, refine=args.refine, overlay=args.overlay, progress=progress))
    return 0


def _replay_connected(args) -> int:
    """`replay --connect`: the same drive through a running engine. With `--action` this side needs no torch;
    reading a recorded session's files does (they hold tensors)."""
    from pathlib import Path

    import numpy as np

    from client.headless import run_headless
    from engine.controls import format_action
    from engine.errors import InputError
    from protocol.keys import controls_to_letters

    if args.c2w:
        raise InputError("replay --connect drives keys; explicit --c2w poses run in-process only")
    if (args.session is None) == (args.action is None):
        raise InputError("replay --connect takes exactly one of: a session directory, --action DSL")
    image, prompt, action, keymap, seed = args.image, args.prompt, args.action, args.keymap, args.seed
    intrinsics, quality = args.intrinsics, args.quality
    speeds = {}
    if args.session is not None:
        from engine.session import manifest_params, replay_controls

        m, held, prompts, first = replay_controls(args.session)  # committed chunks only
        per_chunk = 24
        if m.extra.get("control_source") == "c2w":
            raise InputError("a session driven by explicit poses replays in-process only (drop --connect)")
        if prompts:
            raise InputError("this session changes its prompt; replay it in-process (drop --connect)")
        changes = [i for i in range(len(held)) if i % per_chunk and held[i] != held[i - 1]]
        if changes:
            raise InputError(f"this session changes keys inside a chunk (frame {changes[0] + 1}); an engine applies "
                             "keys per chunk, so replay it in-process (drop --connect)")
        p = manifest_params(m)
        if p.smooth != (p.name == "v2"):
            raise InputError("this session's smoothing setting cannot be sent over the wire; replay it in-process")
        speeds = {"translation_speed": p.translation_speed, "rotation_speed_deg": p.rotation_speed_deg,
                  "pitch_limit_deg": p.pitch_limit_deg}
        letters = (controls_to_letters(h, m.keymap) for h in held)
        action = format_action("" if x == "none" else x for x in letters)
        import io

        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(first).save(buf, format="PNG")
        image, prompt, keymap, seed, intrinsics, quality = (buf.getvalue(), m.prompt, m.keymap, m.seed,
                                                            m.intrinsics, m.quality)
    elif image is None:
        image = demo_image_bytes()
    out = Path(args.out or "replay.mp4")
    result = run_headless(args.connect, image, prompt, action, keymap=keymap, lossless=True, out_mp4=out,
                          seed=seed, quality=quality, intrinsics=intrinsics, curve_dir=args.curve_dir,
                          keep_frames=False, **speeds)
    np.save(out.with_suffix(".poses.npy"), result.pose_array)
    print(f"session  {result.session_id} (on the engine)\nframes   {len(result.indices)}\n"
          f"video    {out}\nposes    {out.with_suffix('.poses.npy')}")
    return 0


def _demo_window(args) -> bool:
    """The windowed demo: an engine subprocess on the tiny preset and the pygame client. False (after saying
    why) when no window can be opened here, so the caller runs the headless drive instead."""
    import os
    import sys

    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
    if (sys.platform.startswith("linux") and not os.environ.get("SDL_VIDEODRIVER")
            and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))):
        print("sana-wm demo: no display here, so no window; running the scripted drive headless instead")
        return False
    try:
        import pygame

        from client.play import WindowError, run_demo_window
    except ModuleNotFoundError as e:
        print(f"sana-wm demo: no window ({e}); running the scripted drive headless instead")
        return False
    if not os.environ.get("SDL_VIDEODRIVER"):  # SDL falls back to an invisible window without a display
        pygame.display.init()
        driver = pygame.display.get_driver()
        pygame.display.quit()
        if driver in ("offscreen", "dummy"):
            print("sana-wm demo: no display here, so no window; running the scripted drive headless instead")
            return False
    from engine.spawn import spawn_engine, stop_engine

    proc, address = spawn_engine(["--preset", "tiny", "--bind", "tcp://127.0.0.1:0", "--device", args.device,
                                  "--record-root", args.record_root, "--quality", args.quality], cwd=None)
    try:
        image = demo_image_bytes()
        print(f"sana-wm demo: engine on {address}; WASD/IJKL/arrows move, H toggles the HUD, Esc quits")
        try:
            log = run_demo_window(address, image_bytes=image, prompt=DEMO_PROMPT, quality=args.quality,
                                  seconds=args.seconds)
        except WindowError as e:
            print(f"sana-wm demo: no window ({e}); running the scripted drive headless instead")
            return False
        for sid in log.sessions:
            print(f"session  {args.record_root}/{sid}")
        return True
    finally:
        stop_engine(proc)


def _build_world(args):
    from engine.world import build_world, resolve_dtype

    world = build_world(args.preset, device=args.device, dtype=resolve_dtype(args.dtype, args.device),
                        weights=args.weights)
    world.fast = tuple(f for f in args.fast.split(",") if f)
    return world
