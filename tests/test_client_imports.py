"""client/ imports protocol (and zmq, numpy, pygame, Pillow), never torch or engine/: a laptop drives a remote GPU."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

MODULES = [
    "client.draw",
    "client",
    "client.bindings",
    "client.hud",
    "client.jitter",
    "client.reproject",
    "client.net",
    "client.play",
    "client.headless",
]


@pytest.mark.parametrize("module", MODULES)
def test_client_module_never_imports_torch_or_engine(module):
    code = (
        "import os, sys; os.environ['SDL_VIDEODRIVER'] = 'dummy'; os.environ['SDL_AUDIODRIVER'] = 'dummy'\n"
        f"import {module}\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'engine', 'kernels', 'diffusers', "
        "'transformers'))\n"
        "print('BAD', bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_check_itself_can_fail():
    code = "import sys, engine.controls; sys.exit(0 if 'engine' in sys.modules else 1)"
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert r.returncode == 0, r.stderr  # engine modules do show up in sys.modules when imported


def test_sana_wm_play_help_and_a_light_cli():
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "SDL_VIDEODRIVER": "dummy", "SDL_AUDIODRIVER": "dummy"}
    r = subprocess.run(
        [sys.executable, "-m", "engine.cli", "play", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=root,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    for opt in ("--connect", "--keymap", "--bindings", "--no-reproject", "--image", "--prompt", "--quality"):
        assert opt in r.stdout
    code = "import sys, engine.cli; sys.exit(1 if {'pygame', 'client.play', 'torch'} & set(sys.modules) else 0)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=root)
    assert r.returncode == 0, "importing the CLI pulled in pygame, the client or torch"


def test_sana_wm_play_reports_a_bad_bindings_file(tmp_path):
    bad = tmp_path / "b.toml"
    bad.write_text('[keys]\nw = "fly"\n')
    env = {**os.environ, "SDL_VIDEODRIVER": "dummy", "SDL_AUDIODRIVER": "dummy"}
    r = subprocess.run(
        [sys.executable, "-m", "engine.cli", "play", "--bindings", str(bad), "--connect", "tcp://127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[1],
        env=env,
    )
    assert r.returncode == 2 and "'fly'" in r.stderr and "error" in r.stderr, r.stderr
