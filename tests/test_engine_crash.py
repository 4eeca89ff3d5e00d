"""The engine killed with SIGKILL mid-session, restarted, and the session resumed over the wire: the continued
frames equal an uninterrupted run, at most the chunk in flight is lost, the partial mp4 decodes. Also
`sana-wm replay --connect` of the recorded session through a running engine."""

import io
import os
import signal
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from client.headless import run_headless
from engine.cli import main
from engine.recording import SessionDir, committed_chunks, iter_video
from engine.rollout import ScriptedControls
from engine.session import Session
from engine.spawn import spawn_engine
from engine.world import build_world

PROMPT = "a harbour at noon"
ACTION = "w-24,jw-24,ik-24,l-24,s-24"  # 5 chunks, keys change on chunk boundaries


def png() -> bytes:
    img = np.random.default_rng(1).integers(0, 256, (160, 240, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def start_engine(record_root: Path):
    return spawn_engine(["--bind", "tcp://127.0.0.1:0", "--record-root", str(record_root), "--quality", "preview",
                         "--snapshot-every", "2"])


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def reference():
    world = build_world("tiny", with_refiner=False)
    s = Session.create(world, first_image=png(), prompt=PROMPT, seed=4, record_root=None,
                       controls=ScriptedControls.from_action(ACTION))
    frames = {}
    while (c := s.step()) is not None:
        for j, f in enumerate(c.frames):
            frames[c.frame_start + j] = f
    return frames


def test_kill_restart_resume_equals_uninterrupted(tmp_path, reference):
    proc, address = start_engine(tmp_path)
    killed_at = {}

    def kill_midway(header, frame):
        if header.index >= 60 and not killed_at:  # chunk 2 (frames 49..72) is being delivered
            killed_at["frame"] = header.index
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
            raise Killed

    with pytest.raises(Killed):
        run_headless(address, png(), PROMPT, ACTION, seed=4, lossless=True, on_frame=kill_midway, timeout=120)
    (sdir,) = [SessionDir.open(p) for p in tmp_path.iterdir() if p.is_dir()]
    done = committed_chunks(sdir.scan_actions().records)
    assert done and done[-1] >= 1  # chunks 0 and 1 were committed before the kill
    committed_frames = 1 + 24 * (done[-1] + 1)  # preview: chunk 0 has 25 frames, later chunks 24
    partial = list(iter_video(sdir.video_path))  # the mp4 of a killed engine decodes ...
    assert len(partial) >= committed_frames - 1  # ... up to at most the last frame written

    proc, address = start_engine(tmp_path)
    try:
        result = run_headless(address, None, PROMPT, ACTION, seed=4, lossless=True, resume=sdir.session_id,
                              timeout=120)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert result.indices and result.indices[0] == 24 * (done[-1] + 1) + 1  # continues after the last commit
    assert result.indices[-1] == 120
    for i, f in zip(result.indices, result.frames, strict=True):
        assert np.array_equal(f, reference[i]), i
    assert committed_chunks(sdir.scan_actions().records) == [0, 1, 2, 3, 4]
    video = list(iter_video(sdir.video_path))  # the resume put back any frame the kill cost the mp4
    assert len(video) == 121


def test_replay_connect_drives_a_running_engine(tmp_path, reference):
    rec = tmp_path / "rec"
    assert main(["replay", "--quiet", "--action", ACTION, "--seed", "4", "--prompt", PROMPT,
                 "--record-root", str(rec), "--image", str(_write_png(tmp_path))]) == 0
    (session,) = [p for p in rec.iterdir() if p.is_dir()]
    proc, address = start_engine(tmp_path / "engine_rec")
    try:
        out = tmp_path / "replayed.mp4"
        assert main(["replay", str(session), "--connect", address, "--out", str(out)]) == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    poses = np.load(out.with_suffix(".poses.npy"))
    assert np.allclose(poses, np.load(session / "poses.npy"), atol=1e-6)
    assert sum(1 for _ in iter_video(out)) == poses.shape[0] == 121


def _write_png(tmp_path) -> Path:
    p = tmp_path / "first.png"
    p.write_bytes(png())
    return p
