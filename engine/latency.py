"""`sana-wm latency`: keypress -> generated frame latency through the real engine server, measured by a client.

    report = run_latency(LatencyConfig(preset="release", quality="preview", fast=("all",), presses=30))

Builds a random-weight world of the preset (`engine.bench.build_bench_world`: the cost of a chunk does not
depend on the weights), serves it with the real `EngineServer` on a loopback port (in a child process, as
deployed, or in this process's threads), and connects a client that does what `sana-wm play` does, minus
pygame: `EngineLink` (client/net.py) says hello, starts a session (live delivery), sends the held set every
tick and on every change with the last frame shown; frames go into a `JitterBuffer` (client/jitter.py) that
plays them at the session fps and reports what it showed, which drives the engine's just-in-time scheduler.
Key changes are paired with frames by `HudModel` (client/hud.py), the HUD's own logic.

The client holds no key at first. After `warmup_chunks` chunks have arrived (the scheduler's chunk-time
estimate has settled, CUDA graphs are captured) it changes the held set (W, J+W, release, ...; seeded) and,
once the change has shown up in a received frame, waits a part of one chunk of video before the next change. The
parts are stratified (`change_phases`): change i of n waits a random point of the i-th n-th of the cycle, in a
seeded shuffled order, so the changes fall evenly over every phase of the engine's chunk cycle. (Independent
uniform draws, as before session 5, left the median wait of a 60-change run at the mercy of the draws: session 5's
seed put 3 of 62 draws where 7 were due and gave a median wait of 865 ms for an expected 750.) Per change:

- generated = change handed to the network thread (it goes out on its next pass, <= 4 ms) -> the first frame
  received whose `keys_seq` is the change's or later (the engine applied that key state);
- photon = change -> that frame leaving the jitter buffer for the screen (no display flip is measured);
- the engine's part, from the frame header: wait = change -> keys sampled (chunk start), chunk = sampled ->
  ready, delivery = ready -> received. The engine clock is mapped onto the client's by the smallest
  (receipt time - engine time) over status messages and frames, so wait and delivery are estimates
  (good to a few ms on loopback); generated and photon use the client's clock only.

The first `warmup_presses` changes are reported but left out of the statistics. A change whose frame does
not carry exactly its held set (never expected: the next change waits for the previous one) is reported
as unmatched and left out too.

The session is not recorded unless `record` is set (then into a temporary directory; that needs PyAV, and
the recording's video encode, latents and periodic snapshots sit in the chunk path, as they do for
`sana-wm play`, which records by default). Without recording nothing here imports PyAV.

`main(argv)` is the CLI; `--serve-only` serves the random-weight world and waits (what the child process
runs; also handy for driving it by hand with `sana-wm play --connect`).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

from engine import __version__
from engine.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
ADDRESS_MARK = "sana-wm latency: engine listening on "
ENV_MARK = "sana-wm latency: engine env "
# Held sets the client changes between (v2 key map: W forward, S back, A/D yaw, J/L strafe, I/K pitch).
HELD_SETS = (
    frozenset(),
    frozenset({"forward"}),
    frozenset({"forward", "strafe_left"}),
    frozenset({"yaw_right"}),
    frozenset({"back"}),
    frozenset({"strafe_right", "pitch_up"}),
    frozenset({"forward", "yaw_left"}),
)
PROMPT = "a quiet street at dusk, wet cobblestones"


class LatencyError(RuntimeError):
    """The measurement could not run to the end (engine refused, went away, or timed out)."""


@dataclass
class LatencyConfig:
    preset: str = "release"
    device: str = "cuda"
    dtype: str | None = None  # None: bf16 on cuda, fp32 on cpu
    quality: str = "preview"
    fast: tuple[str, ...] = ()  # engine.fast path names ('all' for every one)
    presses: int = 20  # measured key changes
    warmup_presses: int = 2  # leading key changes reported but left out of the statistics
    warmup_chunks: int = 8  # chunks received before the first change
    seed: int = 0  # random weights and the change schedule
    server: str = "process"  # 'process': the engine in a child process (as deployed); 'thread': in this one
    encodings: tuple[str, ...] = ("rgb24", "jpeg")  # offered in hello, as `sana-wm play` does (loopback: rgb24)
    record: bool = False  # record the session into a temporary directory (needs PyAV)
    gap_s: float | None = None  # next change comes U(0, gap_s) after the last one showed up; None: one chunk
    refresh_hz: float = 250.0  # client loop rate: the resolution of receipt and playout times
    tick_s: float = 1 / 30  # keys heartbeat
    start_timeout_s: float = 900.0  # world build + session start + warmup chunks
    press_timeout_s: float = 120.0  # a change not seen in a frame within this ends the run with an error
    out: str | None = None  # JSON report


# ------------------------------------------------------------------------------------------ the engine


def check_config(cfg: LatencyConfig) -> None:
    from engine.fast import check_fast_paths

    if cfg.quality not in ("preview", "full"):
        raise InputError(f"quality {cfg.quality!r} is not accepted; choose preview or full")
    if cfg.server not in ("process", "thread"):
        raise InputError(f"server {cfg.server!r} is not accepted; choose process or thread")
    if cfg.presses < 1 or cfg.warmup_presses < 0 or cfg.warmup_chunks < 1:
        raise InputError(f"presses={cfg.presses}, warmup_presses={cfg.warmup_presses}, warmup_chunks="
                         f"{cfg.warmup_chunks}: need presses >= 1, warmup_presses >= 0, warmup_chunks >= 1")
    check_fast_paths(cfg.fast, "cuda" if cfg.device.startswith("cuda") else cfg.device)
    if cfg.gap_s is not None and not cfg.gap_s >= 0:
        raise InputError(f"gap_s={cfg.gap_s!r}; it must be >= 0")


def build_served_world(cfg: LatencyConfig):
    """The preset's random-weight world on the device, with the fast paths every session's pipeline switches on."""
    import torch

    from engine.bench import build_bench_world
    from engine.world import resolve_dtype

    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("device 'cuda' asked for, but no CUDA device is available; use --device cpu --preset tiny")
    world = build_bench_world(cfg.preset, device=cfg.device, dtype=resolve_dtype(cfg.dtype, cfg.device),
                              seed=cfg.seed, with_refiner=cfg.quality == "full")
    world.fast = tuple(cfg.fast)
    from engine.fast import warm_compiled

    warm_compiled(world, (cfg.quality,))  # as `sana-wm engine` does: torch.compile fast paths compile before serving
    return world


def server_config(cfg: LatencyConfig, record_root: str | None):
    from engine.server import ServerConfig

    # A generous heartbeat: a busy CPU (tiny preset, tests) must not make the engine think the client left.
    return ServerConfig(bind="tcp://127.0.0.1:0", record_root=record_root, heartbeat_timeout_s=30.0,
                        qualities=("preview",) if cfg.quality == "preview" else ("preview", "full"))


def engine_env(device: str) -> dict:
    import torch

    from engine.bench import environment

    return environment(torch.device(device))


class ThreadEngine:
    """The engine server in this process's threads."""

    def __init__(self, cfg: LatencyConfig, record_root: str | None) -> None:
        from engine.server import EngineServer

        self.env = engine_env(cfg.device)
        self.server = EngineServer(build_served_world(cfg), server_config(cfg, record_root))
        self.address = self.server.start()

    def alive(self) -> bool:
        return all(t.is_alive() for t in self.server._threads)

    def close(self) -> None:
        self.server.stop()


class ProcessEngine:
    """`python -m engine.latency --serve-only ...` in a child process; its output is drained in a thread."""

    def __init__(self, cfg: LatencyConfig, record_root: str | None) -> None:
        cmd = [sys.executable, "-m", "engine.latency", "--serve-only", *cli_args(cfg)]
        if record_root is not None:
            cmd += ["--record-root", record_root]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, cwd=ROOT)
        self.tail: deque[str] = deque(maxlen=40)
        self.env: dict = {}
        self.address = None
        timer = threading.Timer(cfg.start_timeout_s, self.proc.kill)
        timer.start()
        try:
            for line in self.proc.stdout:
                self.tail.append(line)
                if line.startswith(ENV_MARK):
                    self.env = json.loads(line[len(ENV_MARK):])
                elif line.startswith(ADDRESS_MARK):
                    self.address = line[len(ADDRESS_MARK):].split()[0]
                    break
        except BaseException:  # Ctrl-C, a bad line: never leave the child running
            self.proc.kill()
            self.proc.wait()
            raise
        finally:
            timer.cancel()
        if self.address is None:
            self.proc.wait()
            raise LatencyError(f"the engine process exited ({self.proc.returncode}) before listening:\n"
                               + "".join(self.tail))
        threading.Thread(target=self._drain, daemon=True).start()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.tail.append(line)

    def close(self, timeout_s: float = 60.0) -> None:
        """Closing its stdin stops the child (it ends its sessions and exits); SIGTERM, SIGKILL if it hangs."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def serve_only(cfg: LatencyConfig, record_root: str | None, announce=print) -> None:
    """Serve the random-weight world until stdin closes or SIGINT/SIGTERM (the child of ProcessEngine)."""
    import logging

    from engine.server import EngineServer

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    announce(ENV_MARK + json.dumps(engine_env(cfg.device)))
    server = EngineServer(build_served_world(cfg), server_config(cfg, record_root))
    address = server.start()
    stop = threading.Event()
    try:
        announce(f"{ADDRESS_MARK}{address} (preset {cfg.preset}, {cfg.device}, quality {cfg.quality}, "
                 f"fast {','.join(cfg.fast) or '-'}; close stdin or press Ctrl-C to stop)")
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
        while not stop.wait(0.2):
            if not all(t.is_alive() for t in server._threads):
                raise RuntimeError("an engine thread died; see the traceback above")
    finally:
        server.stop()


# ------------------------------------------------------------------------------------------ the client


@dataclass
class Press:
    """One key change and what the client saw of it."""

    sample: object  # client.hud.LatencySample (seq, held, t_change, t_received, t_shown)
    warmup: bool
    received: object | None = None  # FrameHeader of the first frame received that reflects the change
    shown: object | None = None  # ... of the first one shown

    def record(self, t0: float, offset: float) -> dict:
        s, h = self.sample, self.received
        out = {"seq": s.seq, "held": sorted(s.held), "warmup": self.warmup, "t_change_s": round(s.t_change - t0, 4),
               "generated_s": None if s.t_received is None else round(s.t_received - s.t_change, 4),
               "photon_s": None if s.t_shown is None else round(s.t_shown - s.t_change, 4)}
        if h is not None:
            out.update(matched=self.matched, frame_index=h.index, chunk=h.chunk, frame_held=sorted(h.held),
                       frame_keys_seq=h.keys_seq, chunk_s=round(h.t_ready - h.t_sampled, 4))
            if math.isfinite(offset):
                out.update(wait_s=round(h.t_sampled + offset - s.t_change, 4),
                           delivery_s=round(s.t_received - (h.t_ready + offset), 4))
        if self.shown is not None:
            out["shown_index"] = self.shown.index
        return out

    @property
    def matched(self) -> bool:
        return self.received is not None and frozenset(self.received.held) == self.sample.held


def _watch(presses: list[Press], attr: str):
    """Presses whose `t_<attr>` is not set yet; after the HUD's pairing, `_caught` says which it just set."""
    return [p for p in presses if getattr(p.sample, f"t_{attr}") is None]


def _caught(pending: list[Press], attr: str, header) -> None:
    for p in pending:
        if getattr(p.sample, f"t_{attr}") is not None:
            setattr(p, attr, header)


def change_phases(n: int, rng: random.Random) -> list[float]:
    """n fractions of a cycle, one uniformly in each n-th of [0, 1), in a shuffled order (stratified sampling: every
    phase bin gets exactly one change, so a median over them has no sampling error from clumped draws)."""
    phases = [(i + rng.random()) / n for i in range(n)]
    rng.shuffle(phases)
    return phases


def drive(address: str, cfg: LatencyConfig, image: bytes, alive=None) -> dict:
    """Play one live session against the engine at `address`, changing keys as the module docstring says.
    `alive()` (optional) says whether the engine still runs: a dead engine ends the run at once.

    Returns the client's side of the report (presses, chunk times, drops, underruns)."""
    from client.hud import HudModel
    from client.jitter import JitterBuffer
    from client.net import EngineLink
    from protocol import Control, Dropped, Ended, Error, FrameHeader, Hello, ProtocolError, Start, Status, Welcome

    rng = random.Random(cfg.seed)
    hud = HudModel()
    link = EngineLink(address, Hello(client=f"sana-wm-latency/{__version__}", encodings=tuple(cfg.encodings)),
                      tick_s=cfg.tick_s).start()
    t0 = time.monotonic()
    deadline = t0 + cfg.start_timeout_s
    welcome = session_id = jitter = ended = None
    presses: list[Press] = []
    chunk_s: dict[int, float] = {}
    chunk_start: dict[int, float] = {}  # engine time each chunk sampled its keys
    offset = math.inf  # client clock at engine time 0 (upper bound, tightened by every message)
    dropped, errors = 0, []
    next_change = None  # client time of the next change, once the last one has shown up
    total = cfg.warmup_presses + cfg.presses
    phases = change_phases(cfg.warmup_presses, rng) + change_phases(cfg.presses, rng)
    period = cfg.gap_s
    step = 1.0 / cfg.refresh_hz
    try:
        while True:
            now = time.monotonic()
            for msg, _frame in link.poll():
                if isinstance(msg, Welcome):
                    welcome = msg
                    hud.fps, hud.chunk_frames = msg.fps, msg.chunk_frames
                    jitter = JitterBuffer(msg.fps, max_depth=max(72, 2 * msg.chunk_frames))
                    period = msg.chunk_frames / msg.fps if cfg.gap_s is None else cfg.gap_s
                    link.send(Start(image=image, prompt=PROMPT, seed=cfg.seed, quality=cfg.quality,
                                    record=cfg.record))
                    link.keys_on()
                elif isinstance(msg, Status):
                    offset = min(offset, now - msg.engine_time)
                    if session_id is None and msg.session_id is not None and msg.state == "running":
                        session_id = msg.session_id
                        hud.new_session(session_id)
                elif isinstance(msg, FrameHeader):
                    if msg.session_id != session_id:
                        continue
                    offset = min(offset, now - msg.t_ready)
                    chunk_s[msg.chunk] = msg.t_ready - msg.t_sampled
                    chunk_start[msg.chunk] = msg.t_sampled
                    pending = _watch(presses, "received")
                    hud.on_frame_received(msg, now)
                    _caught(pending, "received", msg)
                    jitter.push(msg.index, msg, now)
                elif isinstance(msg, Dropped):
                    dropped = msg.total
                elif isinstance(msg, Error):
                    if session_id is None:
                        raise LatencyError(f"the engine refused: {msg.code} ({msg.field}): {msg.message}")
                    errors.append(f"{msg.code} ({msg.field}): {msg.message}")
                elif isinstance(msg, Ended):
                    ended = msg
                    raise LatencyError(f"the session ended early ({msg.reason}): {msg.message}")
                elif isinstance(msg, (ProtocolError, BaseException)):
                    raise LatencyError(f"network: {type(msg).__name__}: {msg}")
            if jitter is not None:
                shown = jitter.pop_due(now)
                if shown is not None:
                    link.keys.set_last_shown(shown.index)
                    pending = _watch(presses, "shown")
                    hud.on_frame_shown(shown, now)
                    _caught(pending, "shown", shown)
            if alive is not None and not alive():
                raise LatencyError("the engine stopped (see its output above)")
            # --- the change schedule
            last = presses[-1] if presses else None
            if last is None and len(chunk_s) < cfg.warmup_chunks:
                if now > deadline:
                    raise LatencyError(f"{len(chunk_s)}/{cfg.warmup_chunks} warmup chunks after "
                                       f"{cfg.start_timeout_s:g} s (welcome {'yes' if welcome else 'no'}, "
                                       f"session {session_id})")
            elif last is not None and last.sample.t_received is None:
                if now - last.sample.t_change > cfg.press_timeout_s:
                    raise LatencyError(f"key change seq {last.sample.seq} ({sorted(last.sample.held)}) was not in "
                                       f"any frame after {cfg.press_timeout_s:g} s")
            elif len(presses) < total:
                if next_change is None:  # uniform over one key-sampling cycle: a chunk of video, or longer when
                    starts = sorted(chunk_start.values())[-7:]  # the engine is slower than real time
                    cycle = statistics.median(b - a for a, b in zip(starts[:-1], starts[1:], strict=True)) \
                        if len(starts) > 2 else 0.0
                    next_change = now + phases[len(presses)] * max(period, cycle)
                elif now >= next_change:
                    held = rng.choice([h for h in HELD_SETS if h != hud.held])
                    seq = link.keys.set(held, now)
                    hud.on_key_change(seq, held, now)
                    presses.append(Press(hud.samples[-1], warmup=len(presses) < cfg.warmup_presses))
                    next_change = None
            elif last.sample.t_shown is not None or now - last.sample.t_received > cfg.press_timeout_s:
                break
            time.sleep(max(0.0, now + step - time.monotonic()))
        link.send(Control(action="stop"))
        end = time.monotonic() + 30.0
        while ended is None and time.monotonic() < end:
            for msg, _frame in link.poll():
                if isinstance(msg, Ended):
                    ended = msg
            time.sleep(0.01)
    finally:
        link.close()
    return {"welcome": welcome, "session_id": session_id, "presses": presses, "chunk_s": chunk_s, "t0": t0,
            "offset": offset, "dropped": dropped, "errors": errors, "jitter": jitter.stats if jitter else None,
            "ended": ended.reason if ended is not None else None}


# ------------------------------------------------------------------------------------------ the report


def stats_s(values: list[float]) -> dict:
    """count, p50 / p90 / max / min in milliseconds of a list of seconds."""
    from engine.bench import stats_ms

    s = stats_ms(values)
    return {"n": s["n"], "p50_ms": s["median_ms"], "p90_ms": s["p90_ms"], "max_ms": s["max_ms"], "min_ms": s["min_ms"]}


def run_latency(cfg: LatencyConfig) -> dict:
    """Build, serve, drive; returns the report (and writes it to `cfg.out`)."""
    check_config(cfg)
    from engine.driver_cli import demo_image_bytes

    report: dict = {"config": asdict(cfg), "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with tempfile.TemporaryDirectory(prefix="sana-wm-latency-") as tmp:
        record_root = tmp if cfg.record else None
        t_build = time.monotonic()
        engine = (ProcessEngine if cfg.server == "process" else ThreadEngine)(cfg, record_root)
        report["engine_start_s"] = round(time.monotonic() - t_build, 3)
        report["env"] = engine.env
        try:
            seen = drive(engine.address, cfg, demo_image_bytes(), alive=engine.alive)
        finally:
            engine.close()
    w = seen["welcome"]
    report["session"] = {"id": seen["session_id"], "width": w.width, "height": w.height, "fps": w.fps,
                         "chunk_frames": w.chunk_frames, "encoding": w.encoding, "delivery": w.delivery,
                         "ended": seen["ended"]}
    presses, offset = seen["presses"], seen["offset"]
    samples = [p.record(seen["t0"], offset) for p in presses]
    measured = [r for r, p in zip(samples, presses, strict=True) if not p.warmup and p.matched]
    report["generated"] = stats_s([r["generated_s"] for r in measured])
    report["photon"] = stats_s([r["photon_s"] for r in measured if r["photon_s"] is not None])
    report["breakdown"] = {k: stats_s([r[k] for r in measured if k in r]) for k in ("wait_s", "chunk_s", "delivery_s")}
    chunks = seen["chunk_s"]
    steady = [chunks[k] for k in sorted(chunks) if k >= cfg.warmup_chunks // 2]
    report["chunks"] = {"received": len(chunks), "steady": stats_s(steady), "video_s": w.chunk_frames / w.fps}
    report["unmatched"] = sum(1 for p in presses if not p.warmup and not p.matched)
    report["dropped_frames"] = seen["dropped"]
    report["jitter"] = asdict(seen["jitter"]) if seen["jitter"] is not None else None
    report["errors"] = seen["errors"]
    report["samples"] = samples
    from engine.targets import latency_targets

    report["targets"] = latency_targets(report)
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(json.dumps(report, indent=1))
    return report


def format_table(report: dict) -> str:
    c, env = report["config"], report.get("env") or {}
    s = report["session"]
    lines = [f"preset {c['preset']}  quality {c['quality']}  fast {','.join(c['fast']) or '-'}  device "
             f"{env.get('gpu', env.get('device', c['device']))}  server {c['server']}  {s['width']}x{s['height']} "
             f"{s['encoding']}  record {'on' if c['record'] else 'off'}",
             f"{'':<22} {'n':>4} {'p50 ms':>9} {'p90 ms':>9} {'max ms':>9}"]

    def row(name: str, st: dict) -> str:
        f = lambda v: f"{v:>9.1f}" if v is not None else f"{'-':>9}"
        return f"{name:<22} {st['n']:>4} {f(st['p50_ms'])} {f(st['p90_ms'])} {f(st['max_ms'])}"

    lines.append(row("keypress->generated", report["generated"]))
    lines.append(row("keypress->photon", report["photon"]))
    for k, name in (("wait_s", "  wait for chunk start"), ("chunk_s", "  chunk compute"),
                    ("delivery_s", "  encode+deliver")):
        lines.append(row(name, report["breakdown"][k]))
    ch = report["chunks"]
    lines.append(row("chunk (steady)", ch["steady"]) + f"   ({ch['video_s']:.2f} s of video each)")
    j = report["jitter"] or {}
    lines.append(f"unmatched {report['unmatched']}  dropped frames {report['dropped_frames']}  underruns "
                 f"{j.get('underruns', '-')}  engine errors {len(report['errors'])}")
    if "targets" in report:
        from engine.targets import format_targets

        lines.append(format_targets(report["targets"]))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sana-wm latency", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="release", help="preset (release, tiny)")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="default bf16 on cuda, fp32 on cpu")
    p.add_argument("--quality", default="preview", choices=["preview", "full"])
    p.add_argument("--fast", default="", help="comma-separated fast paths (engine/fast) or 'all'")
    p.add_argument("--presses", type=int, default=20, help="measured key changes (default 20)")
    p.add_argument("--warmup-presses", type=int, default=2, help="leading key changes not counted (default 2)")
    p.add_argument("--warmup-chunks", type=int, default=8, help="chunks received before the first change (default 8)")
    p.add_argument("--seed", type=int, default=0, help="weights and change schedule")
    p.add_argument("--server", default="process", choices=["process", "thread"],
                   help="engine in a child process (default) or in this process's threads")
    p.add_argument("--encodings", default="rgb24,jpeg", help="offered in hello, preferred first (default rgb24,jpeg)")
    p.add_argument("--record", action="store_true", help="record the session into a temp dir (needs PyAV)")
    p.add_argument("--gap-s", type=float, default=None,
                   help="next change U(0, this) s after the last showed up (default: one chunk of video)")
    p.add_argument("--refresh-hz", type=float, default=250.0, help="client loop rate (default 250)")
    p.add_argument("--start-timeout", type=float, default=900.0, help="seconds for build, start and warmup")
    p.add_argument("--press-timeout", type=float, default=120.0, help="seconds a change may take to show up")
    p.add_argument("--out", default=None, help="write the JSON report here")
    p.add_argument("--serve-only", action="store_true",
                   help="only serve the random-weight world on a free loopback port (printed) until stdin closes")
    p.add_argument("--record-root", default=None, help=argparse.SUPPRESS)  # --serve-only: where sessions go
    return p


def config_from_args(args) -> LatencyConfig:
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return LatencyConfig(preset=args.preset, device=args.device, dtype=args.dtype, quality=args.quality,
                         fast=tuple(f for f in args.fast.split(",") if f), presses=args.presses,
                         warmup_presses=args.warmup_presses, warmup_chunks=args.warmup_chunks, seed=args.seed,
                         server=args.server, encodings=tuple(e for e in args.encodings.split(",") if e),
                         record=args.record, gap_s=args.gap_s, refresh_hz=args.refresh_hz,
                         start_timeout_s=args.start_timeout, press_timeout_s=args.press_timeout, out=args.out)


def cli_args(cfg: LatencyConfig) -> list[str]:
    """The options that rebuild `cfg`'s world and server (for the child process)."""
    out = ["--preset", cfg.preset, "--device", cfg.device, "--quality", cfg.quality, "--seed", str(cfg.seed)]
    if cfg.dtype is not None:
        out += ["--dtype", cfg.dtype]
    if cfg.fast:
        out += ["--fast", ",".join(cfg.fast)]
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        check_config(cfg)
        if args.serve_only:
            serve_only(cfg, args.record_root, announce=lambda s: print(s, flush=True))
            return 0
        report = run_latency(cfg)
    except InputError as e:
        print(f"sana-wm latency: error: {e}", file=sys.stderr)
        return 2
    except LatencyError as e:
        print(f"sana-wm latency: failed: {e}", file=sys.stderr)
        return 1
    print(format_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
