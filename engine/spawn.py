"""Start `sana-wm engine` in a child process and learn its address (the demo window and the tests use it).

Deliberately light: no torch here, so a process that only runs the client can start an engine.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class EngineStartError(RuntimeError):
    """The engine process exited or never announced its address."""


def spawn_engine(args: list[str], *, cwd: str | Path | None = ROOT,
                 timeout_s: float = 300.0) -> tuple[subprocess.Popen, str]:
    """`python -m engine.cli engine <args>` in a child; returns (process, the address it listens on).

    Pass `--bind tcp://127.0.0.1:0` for a free port. The child's output is drained in a thread so it never
    blocks on a full pipe. The caller ends it (`stop_engine(proc)`). A child that has not announced its
    address within `timeout_s` (model build included) is killed."""
    cmd = [sys.executable, "-m", "engine.cli", "engine", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd)
    timer = threading.Timer(timeout_s, proc.kill)
    timer.start()
    seen: list[str] = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if "listening on" in line:
                threading.Thread(target=proc.stdout.read, daemon=True).start()
                return proc, line.split("listening on ")[1].split()[0]
    finally:
        timer.cancel()
    proc.wait()
    raise EngineStartError(f"the engine exited ({proc.returncode}) before listening:\n{''.join(seen[-20:])}")


def stop_engine(proc: subprocess.Popen, timeout_s: float = 30.0) -> int:
    """SIGTERM, then SIGKILL if the engine has not exited after `timeout_s`; its exit code."""
    proc.terminate()
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()
