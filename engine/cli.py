"""`sana-wm`: the command line. Each subcommand is a thin driver; the work lives in the modules it calls."""

from __future__ import annotations

import argparse
import sys

from engine import __version__
from engine.driver_cli import DRIVER_COMMANDS, add_driver_commands, add_model_args, run_driver
from engine.errors import InputError

# Subcommands whose issue has not landed yet: they say so instead of pretending.
PLANNED: dict[str, str] = {}


def _add_rollout_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--action", default="w-16,wd-8,jw-16,ik-8,s-8",
                   help="action DSL string, e.g. 'w-80,jw-40' (segments <keys>-<frames>)")
    p.add_argument("--keymap", default="v2", choices=["v1", "v2"], help="key map (default v2)")
    p.add_argument("--translation-speed", type=float, default=None, help="per-frame translation")
    p.add_argument("--rotation-speed-deg", type=float, default=None, help="per-frame rotation in degrees")
    p.add_argument("--pitch-limit-deg", type=float, default=None, help="pitch limit in degrees")
    p.add_argument("--no-smooth", action="store_true", help="v2: velocity = target every frame")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sana-wm",
        description="Real-time keyboard control of the SANA-WM world model.",
    )
    parser.add_argument("--version", action="version", version=f"sana-wm-live {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    add_driver_commands(sub)

    p = sub.add_parser("poses", help="print the camera poses an action string produces")
    _add_rollout_args(p)
    p.add_argument("--out", default=None, help="write the [N+1,4,4] poses to this .npy file")

    # options parsed by engine.bench (imported only when run, so the CLI stays light)
    p = sub.add_parser("bench", help="release-size speed benchmark of the live loop (GPU; --preset tiny on CPU)",
                       add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options of engine.bench (see `sana-wm bench --help`)")

    # options parsed by engine.latency (imported only when run)
    p = sub.add_parser("latency", help="keypress -> generated frame latency through the real engine server "
                       "(GPU; --preset tiny --device cpu on CPU)", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options of engine.latency (see `sana-wm latency --help`)")

    _add_engine_commands(sub)

    # options parsed by client.play (imported only when run: pygame stays out of the CLI's import)
    p = sub.add_parser("play", help="the pygame window: drive an engine with WASD/IJKL (see `sana-wm play --help`)",
                       add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options of client.play")

    for name, what in PLANNED.items():
        sp = sub.add_parser(name, help=f"{what} (not yet available)")
        sp.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def _add_engine_commands(sub) -> None:
    p = sub.add_parser("engine", help="the engine server: serve sessions over ZeroMQ (loopback by default)")
    add_model_args(p)
    p.add_argument("--bind", default="tcp://127.0.0.1:5555",
                   help="ZeroMQ endpoint (default tcp://127.0.0.1:5555; port 0 picks a free one); a non-loopback "
                        "address needs --curve-dir")
    p.add_argument("--record-root", default="recordings", help="where sessions are recorded ('none': not at all)")
    p.add_argument("--curve-dir", default=None, help="CURVE keys from `sana-wm keys DIR` (encrypts, admits DIR/*.key)")
    p.add_argument("--quality", default="full", choices=["preview", "full"],
                   help="highest quality served: 'preview' skips building the refiner (default full)")
    p.add_argument("--heartbeat-timeout", type=float, default=5.0,
                   help="seconds of client silence before its session is paused and snapshotted (default 5)")
    p.add_argument("--max-sessions", type=int, default=4, help="sessions served at once (default 4)")
    p.add_argument("--snapshot-every", type=int, default=8, help="chunks between periodic snapshots (default 8)")
    p.add_argument("--sndhwm", type=int, default=32, help="messages libzmq queues per client (default 32)")
    p.add_argument("--max-queued-frames", type=int, default=48,
                   help="live delivery: frames queued per client before the oldest are dropped (default 48)")

    p = sub.add_parser("keys", help="generate CURVE keypairs (server, client) for a non-loopback engine bind")
    p.add_argument("dir", help="directory for server.key/.key_secret and client.key/.key_secret (created, 0700)")


def _run_engine_command(args) -> int:
    from engine import server

    if args.command == "keys":
        paths = server.generate_keys(args.dir)
        print(f"sana-wm keys: wrote {', '.join(str(p) for p in paths.values())}; give the client "
              f"client.key_secret and server.key; serve with --curve-dir {args.dir}")
        return 0
    config = server.ServerConfig(
        bind=args.bind, record_root=None if args.record_root.lower() == "none" else args.record_root,
        curve_dir=args.curve_dir, qualities=("preview",) if args.quality == "preview" else ("preview", "full"),
        heartbeat_timeout_s=args.heartbeat_timeout, max_sessions=args.max_sessions,
        snapshot_every=args.snapshot_every, sndhwm=args.sndhwm, max_queued_frames=args.max_queued_frames)
    server.serve(preset=args.preset, device=args.device, config=config, announce=lambda s: print(s, flush=True),
                 weights=args.weights, dtype=args.dtype, fast=tuple(f for f in args.fast.split(",") if f))
    return 0


def _rollout(args) -> object:
    from engine.controls import action_to_c2w

    return action_to_c2w(
        args.action,
        args.keymap,
        translation_speed=args.translation_speed,
        rotation_speed_deg=args.rotation_speed_deg,
        pitch_limit_deg=args.pitch_limit_deg,
        smooth=False if args.no_smooth else None,
    )


def _print_poses(c2w, stride: int) -> None:
    import numpy as np

    print(f"{'frame':>5}  {'x':>8} {'y':>8} {'z':>8}  {'yaw°':>7} {'pitch°':>7}")
    for i in range(0, len(c2w), stride):
        r, t = c2w[i, :3, :3], c2w[i, :3, 3]
        yaw = np.degrees(np.arctan2(r[0, 2], r[2, 2]))
        pitch = np.degrees(np.arcsin(np.clip(-r[1, 2], -1.0, 1.0)))
        print(f"{i:>5}  {t[0]:>8.4f} {t[1]:>8.4f} {t[2]:>8.4f}  {yaw:>7.2f} {pitch:>7.2f}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # its options belong to engine.bench (argparse's REMAINDER drops leading --opts)
        from engine.bench import main as bench_main

        return bench_main(argv[1:])
    if argv[:1] == ["latency"]:
        from engine.latency import main as latency_main

        return latency_main(argv[1:])
    if argv[:1] == ["play"]:  # the client's own options (client/play.py add_arguments)
        try:
            from client.play import main as play_main
        except ModuleNotFoundError as e:
            if e.name != "pygame":
                raise
            print("sana-wm play: error: the window needs pygame-ce: pip install 'sana-wm-live[client]'",
                  file=sys.stderr)
            return 2
        return play_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        if args.command in PLANNED:
            print(f"sana-wm {args.command}: not yet available ({PLANNED[args.command]})", file=sys.stderr)
            return 2
        if args.command in DRIVER_COMMANDS:
            return run_driver(args)
        if args.command in ("engine", "keys"):
            return _run_engine_command(args)
        if args.command == "poses":
            c2w = _rollout(args)
            _print_poses(c2w, stride=1)
            if args.out:
                import numpy as np

                np.save(args.out, c2w)
            return 0
    except InputError as e:
        print(f"sana-wm {args.command}: error: {e}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
