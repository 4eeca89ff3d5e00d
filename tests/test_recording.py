"""engine/recording.py: atomic manifest, crash-safe action log, bit-exact latents and snapshots,
a progressive mp4 that survives a kill, branch truncation."""

import dataclasses
import datetime as dt
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import recording as R
from engine.errors import InputError

ROOT = Path(__file__).resolve().parent.parent


def make_manifest(**kw) -> R.Manifest:
    base = dict(
        session_id=R.new_session_id(),
        created="2026-11-27T01:00:00+00:00",
        engine_version="0.1.0",
        preset="tiny",
        weights={"stage1": "sha256:00"},
        seed=3,
        fps=16.0,
        width=64,
        height=48,
        prompt="a lake",
        intrinsics=[50.0, 50.0, 32.0, 24.0],
        keymap="v2",
        controls={"translation_speed": 0.025},
        quality="preview",
        first_image_sha256="ab",
    )
    return R.Manifest(**{**base, **kw})


@pytest.fixture
def session(tmp_path) -> R.SessionDir:
    return R.SessionDir.create(tmp_path, make_manifest())


# ---- session ids ------------------------------------------------------------------------------


def test_session_ids_sort_by_time_and_are_strict():
    t0 = dt.datetime(2026, 11, 27, 1, 2, 3, 4000, tzinfo=dt.UTC)
    ids = [R.new_session_id(t0 + dt.timedelta(milliseconds=ms)) for ms in (0, 1, 999, 1000, 86_400_000)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert ids[0].startswith("20261127-010203-004-")
    for i in ids:
        assert R.check_session_id(i) == i
    for bad in ("../x", ids[0] + "/..", ids[0].upper().replace("-", "_"), "", ids[0][:-1] + "G"):
        with pytest.raises(InputError):
            R.check_session_id(bad)


# ---- manifest ---------------------------------------------------------------------------------


def test_manifest_round_trip(session):
    m = session.read_manifest()
    assert m.prompt == "a lake" and m.format_version == R.FORMAT_VERSION
    m2 = dataclasses.replace(m, status="stopped", extra={"chunks": 4})
    session.write_manifest(m2)
    assert R.SessionDir.open(session.path).read_manifest() == m2


def test_manifest_crash_between_tmp_write_and_rename_keeps_the_old_one(session, monkeypatch):
    old = session.read_manifest()
    new = dataclasses.replace(old, status="stopped", prompt="a different lake")

    def crash(*a, **k):
        raise OSError("simulated power cut before rename")

    with monkeypatch.context() as mp:
        mp.setattr(R.os, "replace", crash)
        with pytest.raises(OSError, match="simulated"):
            session.write_manifest(new)
    assert session.read_manifest() == old
    # A real crash would leave the tmp file behind: it must not be mistaken for the manifest.
    (session.path / ".manifest.json.tmp999").write_bytes(b'{"torn": ')
    assert session.read_manifest() == old
    session.write_manifest(new)
    assert session.read_manifest() == new


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: {**m, "format_version": R.FORMAT_VERSION + 1}, "newer"),
        (lambda m: {**m, "format_version": "1"}, "format_version"),
        (lambda m: {k: v for k, v in m.items() if k != "format_version"}, "format_version"),
        (lambda m: {**m, "colour": "red"}, "colour"),
        (lambda m: {**m, "status": "exploded"}, "status"),
        (lambda m: {**m, "seed": "3"}, "seed"),
        (lambda m: {**m, "intrinsics": 5}, "intrinsics"),
        (lambda m: {**m, "fps": True}, "fps"),
        (lambda m: {**m, "session_id": "../../etc"}, "session id"),
        (lambda m: [m], "JSON object"),
    ],
)
def test_manifest_refusals(session, edit, match):
    obj = json.loads(session.manifest_path.read_text())
    session.manifest_path.write_text(json.dumps(edit(obj)))
    with pytest.raises(InputError, match=match):
        session.read_manifest()


def test_manifest_not_json(session):
    session.manifest_path.write_bytes(b"\x00{")
    with pytest.raises(InputError, match="not valid JSON"):
        session.read_manifest()


# ---- actions.log ------------------------------------------------------------------------------

CONTROL_SETS = [set(), {"forward"}, {"forward", "yaw_left"}, {"back", "pitch_up", "strafe_right"}]


def write_log(path: Path, chunks: int = 3, frames_per_chunk: int = 5) -> list[dict]:
    """A log of `chunks` committed chunks with a prompt change and a pause; returns the records written."""
    with R.ActionLog(path) as log:
        frame = 0
        for c in range(chunks):
            if c == 1:
                log.append_prompt(frame, "dusk " * 3)
                log.append_pause(frame)
                log.append_resume(frame)
            for _ in range(frames_per_chunk):
                log.append_frame(frame, CONTROL_SETS[frame % len(CONTROL_SETS)], keys_seq=frame * 2)
                frame += 1
            log.flush_chunk(c, frame - frames_per_chunk, frame)
    return R.scan_actions(path).records


def record_offsets(path: Path) -> list[tuple[int, int]]:
    """(start, end) byte range of every record, found independently of the scanner."""
    data = path.read_bytes()
    out, pos = [], len(R.LOG_HEADER)
    while pos < len(data):
        n = int.from_bytes(data[pos : pos + 4], "little")
        out.append((pos, pos + 8 + n))
        pos += 8 + n
    return out


def test_action_log_round_trip(tmp_path):
    path = tmp_path / "actions.log"
    records = write_log(path)
    assert len(records) == 3 * 5 + 3 + 3
    frames = [r for r in records if r["t"] == "frame"]
    assert [r["i"] for r in frames] == list(range(15))
    assert [set(r["held"]) for r in frames] == [CONTROL_SETS[i % 4] for i in range(15)]
    assert frames[3]["seq"] == 6
    assert R.committed_chunks(records) == [0, 1, 2]
    assert R.frame_controls(records) == [frozenset(CONTROL_SETS[i % 4]) for i in range(15)]
    assert {"t": "prompt", "i": 5, "prompt": "dusk dusk dusk "} in records
    # reopening appends after what is there
    with R.ActionLog(path) as log:
        assert log.records == records and log.dropped_bytes == 0
        log.append_frame(15, {"back"})
        log.flush_chunk(3, 15, 16)
    assert R.scan_actions(path).records[: len(records)] == records
    assert R.committed_chunks(R.scan_actions(path).records) == [0, 1, 2, 3]


def test_torn_tail_at_every_byte_of_the_last_record(tmp_path):
    path = tmp_path / "actions.log"
    records = write_log(path)
    data = path.read_bytes()
    start, end = record_offsets(path)[-1]
    assert end == len(data)
    for cut in range(start, end):
        torn = tmp_path / "torn.log"
        torn.write_bytes(data[:cut])
        scan = R.scan_actions(torn)
        assert scan.records == records[:-1], cut
        assert (scan.good_bytes, scan.dropped_bytes) == (start, cut - start)
        with R.ActionLog(torn) as log:
            assert log.records == records[:-1] and log.dropped_bytes == cut - start
        assert torn.read_bytes() == data[:start]  # truncated to the last good record, nothing before lost


def test_chop_at_random_offsets_and_garbage_tails(tmp_path):
    path = tmp_path / "actions.log"
    records = write_log(path, chunks=4)
    data = path.read_bytes()
    ends = [e for _, e in record_offsets(path)]
    rng = random.Random(0)
    for _ in range(200):
        cut = rng.randrange(0, len(data) + 1)
        torn = tmp_path / "torn.log"
        torn.write_bytes(data[:cut])
        complete = sum(e <= cut for e in ends)
        with R.ActionLog(torn) as log:
            assert log.records == records[:complete], cut
        assert R.scan_actions(torn).records == records[:complete]
        assert torn.stat().st_size == (ends[complete - 1] if complete else len(R.LOG_HEADER))
    for _ in range(50):  # a crash can also leave junk (zeros, stale blocks) after the last record
        garbage = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
        torn.write_bytes(data + garbage)
        with R.ActionLog(torn) as log:
            assert log.records == records and log.dropped_bytes == len(garbage)
        assert torn.read_bytes() == data


def test_crc_corruption_is_detected_at_every_byte(tmp_path):
    path = tmp_path / "actions.log"
    records = write_log(path)
    data = path.read_bytes()
    j = 7
    start, end = record_offsets(path)[j]
    for pos in range(start, end):
        bad = bytearray(data)
        bad[pos] ^= 0x5A
        (tmp_path / "bad.log").write_bytes(bytes(bad))
        scan = R.scan_actions(tmp_path / "bad.log")
        assert scan.records == records[:j], pos
        assert scan.good_bytes == start


def test_discard_uncommitted_before_resuming_in_place(tmp_path):
    path = tmp_path / "actions.log"
    records = write_log(path, chunks=2)
    with R.ActionLog(path) as log:  # a crash in chunk 2: frame records without their commit
        for i in range(10, 13):
            log.append_frame(i, {"forward"})
    with R.ActionLog(path) as log:
        assert len(log.records) == len(records) + 3
        assert log.discard_uncommitted() == 3
        assert log.records == records
        assert log.discard_uncommitted() == 0
        log.append_frame(10, {"back"})
        log.flush_chunk(2, 10, 11)
        with pytest.raises(RuntimeError):
            log.discard_uncommitted()
    after = R.scan_actions(path).records
    assert after[: len(records)] == records and R.committed_chunks(after) == [0, 1, 2]
    assert R.frame_controls(after)[10] == {"back"} and len(R.frame_controls(after)) == 11
    empty = tmp_path / "empty.log"
    with R.ActionLog(empty) as log:
        log.append_frame(0, {"forward"})
    with R.ActionLog(empty) as log:
        assert log.discard_uncommitted() == 1 and log.records == []
    assert empty.read_bytes() == R.LOG_HEADER


def test_discard_uncommitted_keeps_what_the_user_did_after_the_last_commit(tmp_path):
    path = tmp_path / "actions.log"
    records = write_log(path, chunks=2)
    with R.ActionLog(path) as log:  # after chunk 1: a prompt change, a pause, then frames of a chunk in flight
        log.append_prompt(10, "a snowy forest")
        log.append_frame(10, {"forward"})
        log.append_pause(10)
        log.append_frame(11, {"forward"})
    with R.ActionLog(path) as log:
        assert log.discard_uncommitted() == 2
        tail = [{"t": "prompt", "i": 10, "prompt": "a snowy forest"}, {"t": "pause", "i": 10}]
        assert log.records == records + tail
        log.append_frame(10, {"back"})
        log.flush_chunk(2, 10, 11)
    after = R.scan_actions(path).records
    assert after[: len(records) + 2] == records + tail and R.committed_chunks(after) == [0, 1, 2]


def test_action_log_header_checks(tmp_path):
    path = tmp_path / "actions.log"
    path.write_bytes(R.LOG_HEADER[:3])  # torn while creating
    with R.ActionLog(path) as log:
        assert log.records == [] and log.dropped_bytes == 3
        log.append_frame(0, {"forward"})
        log.flush_chunk(0, 0, 1)
    assert len(R.scan_actions(path).records) == 2
    path.write_bytes(R.LOG_MAGIC + bytes([R.FORMAT_VERSION + 1]))
    with pytest.raises(InputError, match="newer"):
        R.ActionLog(path)
    path.write_bytes(b"PK\x03\x04 not a log at all")
    with pytest.raises(InputError, match="not an actions.log"):
        R.ActionLog(path)
    assert path.read_bytes() == b"PK\x03\x04 not a log at all"  # refused, not clobbered


def test_bad_records_are_refused(tmp_path):
    with R.ActionLog(tmp_path / "actions.log") as log:
        with pytest.raises(Exception, match="jump"):
            log.append_frame(0, {"jump"})
        with pytest.raises(InputError):
            log.append({"no": "kind"})
    gap = [{"t": "frame", "i": 0, "held": []}, {"t": "frame", "i": 2, "held": []}]
    with pytest.raises(InputError, match="jump from 0 to 2"):
        R.frame_controls(gap)


# ---- latents and snapshots --------------------------------------------------------------------


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_latents_round_trip_bit_exact(session, dtype):
    g = torch.Generator().manual_seed(0)
    stage1 = torch.randn(1, 8, 3, 4, 6, generator=g).to(dtype)
    stage1[0, 0, 0, 0, 0] = float("nan")
    refined = torch.randn(1, 8, 3, 4, 6, generator=g).to(dtype).transpose(3, 4)  # not contiguous
    session.save_latents(0, stage1)
    session.save_latents(12, stage1, refined)
    s, r = session.load_latents(0)
    assert r is None and s.dtype == dtype and torch.equal(bits(s), bits(stage1))
    s, r = session.load_latents(12)
    assert torch.equal(bits(s), bits(stage1)) and torch.equal(bits(r), bits(refined))
    assert r.shape == refined.shape
    assert session.latent_chunks() == [0, 12]
    assert session.latents_path(12).name == "chunk_000012.safetensors"
    with pytest.raises(InputError, match="no latents for chunk 5"):
        session.load_latents(5)
    assert not [p for p in (session.path / "latents").iterdir() if p.name.startswith(".")]  # no tmp left


def test_snapshot_round_trip_and_nearest(session):
    g = torch.Generator().manual_seed(1)
    kv = torch.randn(1, 2, 16, 4, generator=g, dtype=torch.float32)
    tensors = {
        "stage1.kv": kv,
        "stage1.kv_view": kv[:, :, :8],  # shares storage with kv
        "vae.cache": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "rng.cpu": torch.get_rng_state(),
        "counter": torch.tensor([7], dtype=torch.int64),
    }
    meta = {"next_index": 6, "rng_bytes": b"\x00\xffseed", "controls": {"v": [0.1, 1 / 3, -2.5e-300], "prev": []}}
    for chunk in (0, 5, 10):
        session.save_snapshot(chunk, tensors, {**meta, "next_index": chunk + 1})
    loaded, m = session.load_snapshot(5)
    assert set(loaded) == set(tensors)
    for k, t in tensors.items():
        assert loaded[k].dtype == t.dtype and torch.equal(bits(loaded[k]), bits(t)), k
    assert m == {**meta, "next_index": 6}
    assert session.snapshot_chunks() == [0, 5, 10]
    assert [session.nearest_snapshot(k) for k in (0, 4, 5, 9, 10, 1000)] == [0, 0, 5, 5, 10, 10]
    # incomplete snapshots are not listed: tensors without sidecar, or a tensors file cut short
    t15, _ = session.snapshot_paths(15)
    t15.write_bytes(b"partial")
    t10, _ = session.snapshot_paths(10)
    t10.write_bytes(t10.read_bytes()[:-1])
    assert session.snapshot_chunks() == [0, 5]
    assert session.nearest_snapshot(1000) == 5
    with pytest.raises(InputError, match="no complete snapshot after chunk 10"):
        session.load_snapshot(10)
    empty = R.SessionDir.create(session.path.parent, make_manifest())
    assert empty.nearest_snapshot(3) is None


def test_first_frame_png(session):
    img = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    session.save_first_frame(img)
    assert np.array_equal(session.load_first_frame(), img)
    with pytest.raises(InputError):
        session.save_first_frame(img.astype(np.float32))


# ---- video ------------------------------------------------------------------------------------


def gradient_frames(n: int, h: int = 48, w: int = 64, offset: int = 0) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack(
        [
            np.stack([(x * 3 + 5 * i) % 256, (y * 4 + 2 * i) % 256, np.full_like(x, (9 * i) % 256)], -1)
            for i in range(offset, offset + n)
        ]
    ).astype(np.uint8)


def test_video_written_and_read_back(tmp_path):
    path = tmp_path / "video.mp4"
    frames = gradient_frames(48)
    with R.VideoWriter(path, width=64, height=48, fps=16) as w:
        w.append(frames[:24])
        w.flush()
        w.append(torch.from_numpy(frames[24:]))
        assert w.frames_written == 48
    back = np.stack(list(R.iter_video(path)))
    assert back.shape == (48, 48, 64, 3)
    err = np.abs(back.astype(np.int16) - frames.astype(np.int16)).mean()
    assert err < 4.0, err  # lossy (crf 18, yuv420p) but the same pictures in the same order
    assert len(list(R.iter_video(path, limit=10))) == 10
    with pytest.raises(InputError):
        R.VideoWriter(tmp_path / "odd.mp4", width=63, height=48)
    with R.VideoWriter(tmp_path / "x.mp4", width=64, height=48) as w, pytest.raises(InputError):
        w.append(frames[:, :, :32])


def test_video_survives_kill_9(tmp_path):
    """A writer killed without closing (no trailer, no flush) leaves a file that decodes."""
    path = tmp_path / "video.mp4"
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(ROOT)!r})
        import numpy as np
        from engine.recording import VideoWriter
        from tests.test_recording import gradient_frames
        w = VideoWriter({str(path)!r}, width=64, height=48, fps=16)
        w.append(gradient_frames(24))
        w.append(gradient_frames(24, offset=24))
        w.append(gradient_frames(7, offset=48))
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == -signal.SIGKILL, out.stderr
    back = np.stack(list(R.iter_video(path)))
    assert back.shape[1:] == (48, 64, 3)
    assert 55 - 1 <= back.shape[0] <= 55  # every frame but at most the last one appended
    err = np.abs(back.astype(np.int16) - gradient_frames(back.shape[0]).astype(np.int16)).mean()
    assert err < 4.0


def test_resume_video_keeps_a_prefix_and_continues(tmp_path):
    path = tmp_path / "video.mp4"
    with R.VideoWriter(path, 64, 48, 16) as w:
        w.append(gradient_frames(48))
    with R.resume_video(path, 64, 48, 16, keep_frames=30) as w:
        assert w.frames_written == 30
        w.append(gradient_frames(10, offset=100))
    back = np.stack(list(R.iter_video(path))).astype(np.int16)
    want = np.concatenate([gradient_frames(30), gradient_frames(10, offset=100)]).astype(np.int16)
    assert back.shape == want.shape
    assert np.abs(back - want).mean() < 5.0  # re-encoded once more: still the same pictures in order
    assert not (tmp_path / "video.prev.mp4").exists()
    # a crash during an earlier resume left .prev.mp4 and a partial video.mp4: .prev is the truth
    (tmp_path / "video.prev.mp4").write_bytes(path.read_bytes())
    path.write_bytes(b"partial junk")
    with R.resume_video(path, 64, 48, 16, keep_frames=100) as w:
        assert w.frames_written == 40
    # nothing to resume from: an empty new video
    with R.resume_video(tmp_path / "new.mp4", 64, 48, 16, keep_frames=5) as w:
        assert w.frames_written == 0


# ---- branch -----------------------------------------------------------------------------------


def record_session(session: R.SessionDir, chunks: int = 4, frames_per_chunk: int = 24) -> None:
    """A fake recorded session: per chunk, latents, frame records, a commit, video; snapshots after 1 and 3."""
    writer = R.VideoWriter(session.video_path, 64, 48, 16)
    session.save_first_frame(gradient_frames(1)[0])
    with session.open_actions() as log:
        for c in range(chunks):
            start = c * frames_per_chunk
            session.save_latents(
                c, torch.full((1, 4, 3, 2, 2), float(c)), torch.full((1, 4, 3, 2, 2), -float(c)) if c % 2 else None
            )
            for i in range(start, start + frames_per_chunk):
                log.append_frame(i, CONTROL_SETS[c % 4], keys_seq=i)
            if c == 2:
                log.append_prompt(start + frames_per_chunk, "snow")
            log.flush_chunk(c, start, start + frames_per_chunk)
            writer.append(gradient_frames(frames_per_chunk, offset=start))
            if c in (1, 3):
                session.save_snapshot(c, {"kv": torch.full((2,), float(c))}, {"chunk": c})
    writer.close()
    m = session.read_manifest()
    session.write_manifest(dataclasses.replace(m, status="stopped"))


def test_branch_truncates_at_chunk(session, tmp_path):
    record_session(session)
    before = {p: p.read_bytes() for p in session.path.rglob("*") if p.is_file()}
    branch = R.branch_session(session.path, 2)
    assert branch.path.parent == session.path.parent and branch.session_id != session.session_id
    m = branch.read_manifest()
    assert m.parent == {"session_id": session.session_id, "chunk": 2}
    assert m.status == "paused" and m.prompt == "a lake" and m.seed == 3
    records = branch.scan_actions().records
    assert records == R.records_through_chunk(session.scan_actions().records, 2)
    assert R.committed_chunks(records) == [0, 1, 2]
    assert len(R.frame_controls(records)) == 72 and records[-2] == {"t": "prompt", "i": 72, "prompt": "snow"}
    assert branch.latent_chunks() == [0, 1, 2]
    s, r = branch.load_latents(1)
    assert torch.equal(s, torch.full((1, 4, 3, 2, 2), 1.0)) and torch.equal(r, torch.full((1, 4, 3, 2, 2), -1.0))
    assert branch.snapshot_chunks() == [1] and branch.nearest_snapshot(2) == 1
    assert branch.load_snapshot(1)[1] == {"chunk": 1}
    assert np.array_equal(branch.load_first_frame(), session.load_first_frame())
    assert len(list(R.iter_video(branch.video_path))) == 72
    # the branch continues independently; the source is untouched
    with branch.open_actions() as log:
        log.append_frame(72, {"pitch_down"})
        log.flush_chunk(3, 72, 73)
    branch.save_latents(3, torch.zeros(1, 4, 3, 2, 2))
    assert {p: p.read_bytes() for p in session.path.rglob("*") if p.is_file()} == before
    # branching at a chunk that was never committed names what exists
    with pytest.raises(InputError, match="chunk 9 is not committed.*chunks 0..3"):
        R.branch_session(session, 9)
    other = R.branch_session(session, 0, root=tmp_path / "elsewhere")
    assert other.latent_chunks() == [0] and other.snapshot_chunks() == []
    assert len(list(R.iter_video(other.video_path))) == 24


def test_branch_of_a_crashed_session_ignores_the_chunk_in_flight(session):
    with session.open_actions() as log:
        log.append_frame(0, {"forward"})
        log.flush_chunk(0, 0, 1)
        log.append_frame(1, {"back"})  # chunk 1 in flight: never committed
    session.save_latents(0, torch.zeros(1))
    branch = R.branch_session(session, 0)
    assert R.frame_controls(branch.scan_actions().records) == [frozenset({"forward"})]
    assert not branch.video_path.exists()  # the source had no video


def test_session_dir_checks(tmp_path):
    m = make_manifest()
    s = R.SessionDir.create(tmp_path, m)
    with pytest.raises(FileExistsError):
        R.SessionDir.create(tmp_path, m)
    with pytest.raises(InputError):
        s.write_manifest(make_manifest())  # another id
    with pytest.raises(InputError, match="not a session directory"):
        R.SessionDir.open(tmp_path / R.new_session_id())
    with pytest.raises(InputError):
        R.SessionDir(tmp_path / "not-an-id")
    assert os.listdir(s.path / "latents") == [] and os.listdir(s.path / "state") == []


def test_stale_temporary_files_of_dead_writers_are_swept(tmp_path):
    import subprocess
    import sys

    sdir = R.SessionDir(tmp_path / R.new_session_id())
    (sdir.path / "state").mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # exited: its pid is free (reuse within this test is vanishingly unlikely)
    stale = sdir.path / "state" / f".00000003.safetensors.tmp{dead_pid}"
    mine = sdir.path / "state" / f".00000004.safetensors.tmp{os.getpid()}"
    live = sdir.path / f".manifest.json.tmp{os.getppid()}"
    for p in (stale, mine, live):
        p.write_bytes(b"partial")
    assert sdir.sweep_stale_tmp() == [stale]
    assert not stale.exists() and mine.exists() and live.exists()
