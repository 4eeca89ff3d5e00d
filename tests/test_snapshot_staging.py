"""Snapshots off the engine thread: the pipeline stages its caches into host buffers it keeps (page-locked on
CUDA), the session's writer thread writes the file. Staged bytes and files equal the plain copy's; a session
with a snapshot after every chunk resumes identically; the next snapshot, `close()` and resume wait for the
write in flight; a failed write is raised, not lost; the buffers are reused, so host memory stays flat.

On a CPU the staging runs with pageable buffers (`SnapshotStaging(pin=False)`, what a CUDA pipeline does with
pinned ones); the GPU tests run the pinned path itself and print its timings."""

import json
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from engine.bench import build_bench_world, first_image, scripted_controls
from engine.recording import FORMAT_VERSION, SessionDir, new_session_id
from engine.rollout import Rollout, ScriptedControls
from engine.session import Session, SnapshotWriter
from engine.world import SnapshotStaging, WorldPipeline
from tests.test_session import ACTION, create, generate, uninterrupted, world  # noqa: F401 - fixtures


def plain_snapshot(pipe) -> dict[str, torch.Tensor]:
    """`WorldPipeline.snapshot` as it was before staging: a pageable copy of every tensor (the reference)."""
    out = {"anchor": pipe.anchor.detach().cpu().clone(),
           "prompt": torch.tensor(list(pipe.prompt.encode("utf-8")), dtype=torch.uint8)}
    out.update({f"stage1.{k}": v.detach().cpu().clone() for k, v in pipe.stream.snapshot().items()})
    out.update({f"vae.{k}": v.detach().cpu().clone() for k, v in pipe.decoder.snapshot().items()})
    if pipe.quality == "full":
        out.update({f"refiner.{k}": v.detach().cpu().clone() for k, v in pipe.refiner.snapshot().items()})
    return out


def plain_file(path: Path, tensors: dict[str, torch.Tensor], chunk: int) -> bytes:
    """The file the recording wrote for `tensors` before staging (a private copy of each, then safetensors)."""
    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, str(path),
              {"format_version": str(FORMAT_VERSION), "chunk": str(chunk)})
    return path.read_bytes()


def file_parts(data: bytes) -> tuple[dict, bytes]:
    """(header, tensor bytes) of a safetensors file; the header as JSON, since safetensors writes the metadata
    map in no fixed order (two saves of the same tensors can differ there)."""
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def raw(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def assert_same_bytes(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert torch.equal(raw(got[k]), raw(want[k])), k  # bytes: NaN-poisoned cache slots compare too


def staged(session: Session) -> Session:
    """The session's pipeline stages its snapshots as on CUDA, into pageable buffers."""
    session.pipeline.staging = SnapshotStaging(pin=False)
    return session


def new_dir(root: Path) -> SessionDir:
    from engine.recording import Manifest

    return SessionDir.create(root, Manifest(session_id=new_session_id(), created="now", status="recording",
                                            engine_version="test", preset="tiny", seed=0, fps=16.0))


def synthetic_state(device, dtype, scale: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """Cache-like tensors: odd shapes, a non-contiguous view, NaN-poisoned slots, counters, a mask."""
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(2, 1, 3, 37 * scale, 17, generator=g).to(device, dtype)
    kv[:, :, :, -5:] = float("nan")
    conv = torch.randn(1, 13, 2, 11, 19 * scale, generator=g).to(device, dtype)
    return {
        "kv": kv,  # [L, B, H, N, D]
        "sigma": torch.randn(1, 3, 17, 17, generator=g).to(device, torch.float32),
        "conv_t": conv.transpose(-1, -2),  # non-contiguous
        "frames_written": torch.tensor(7 * scale),
        "mask": (torch.rand(1, 29, generator=g) > 0.5).to(device),
    }


# ---------------------------------------------------------------------------------------------- staging


@pytest.mark.parametrize("quality", ["preview", "full"])
def test_staged_snapshot_and_its_file_equal_the_plain_copy(world, tmp_path, quality):  # noqa: F811
    s = staged(create(world, None, quality=quality))
    generate(s, 3)
    want = plain_snapshot(s.pipeline)
    got = s.pipeline.snapshot()
    assert list(got) == list(want)
    assert_same_bytes(got, want)
    staging = s.pipeline.staging
    assert all(any(t.data_ptr() == b.data_ptr() for b in staging.buffers.values())
               for k, t in got.items() if k != "prompt")  # the snapshot is the staging buffers
    sdir = new_dir(tmp_path)
    sdir.save_snapshot(2, got, {"next_index": 3})
    assert file_parts(sdir.snapshot_paths(2)[0].read_bytes()) == file_parts(
        plain_file(tmp_path / "plain.safetensors", want, 2))


def test_staging_reuses_its_buffers_and_reallocates_only_what_no_longer_fits(tmp_path):
    staging = SnapshotStaging(pin=False)
    first = staging.stage(synthetic_state("cpu", torch.float32))
    ptrs = {k: b.data_ptr() for k, b in staging.buffers.items()}
    nbytes = staging.nbytes
    state = synthetic_state("cpu", torch.float32, seed=1)
    again = staging.stage(state)
    assert {k: b.data_ptr() for k, b in staging.buffers.items()} == ptrs and staging.nbytes == nbytes
    assert all(again[k].data_ptr() == first[k].data_ptr() for k in again)  # the same memory, overwritten
    assert_same_bytes(again, {k: v.clone() for k, v in state.items()})

    smaller = dict(state, kv=state["kv"][:, :, :, :20].contiguous())  # fits: a prefix of the same buffer
    out = staging.stage(smaller)
    assert staging.buffers["kv"].data_ptr() == ptrs["kv"] and torch.equal(raw(out["kv"]), raw(smaller["kv"]))
    sdir = new_dir(tmp_path)
    sdir.save_snapshot(0, out, {})  # a prefix view is written as the tensor, not as its buffer
    assert file_parts(sdir.snapshot_paths(0)[0].read_bytes()) == file_parts(
        plain_file(tmp_path / "plain.safetensors", smaller, 0))

    grown = dict(state, kv=torch.randn(2, 1, 3, 80, 17), sigma=state["sigma"].double())
    del grown["mask"]
    out = staging.stage(grown)
    assert set(staging.buffers) == set(grown) | {"mask"}  # a key the snapshot lacks is kept for the next one
    changed = {k for k, b in staging.buffers.items() if b.data_ptr() != ptrs[k]}
    assert changed == {"kv", "sigma"}  # larger, other dtype; the rest kept
    assert set(out) == set(grown)
    assert_same_bytes(out, {k: v.clone() for k, v in grown.items()})


def test_host_memory_stays_flat_over_many_snapshots(tmp_path):
    """40 MB staged and written 12 times: the same buffers every time, and the process does not grow by more
    than one snapshot (a copy kept per snapshot would add ~480 MB)."""
    statm = Path("/proc/self/statm")
    state = synthetic_state("cpu", torch.float32, scale=1100)
    size = sum(t.numel() * t.element_size() for t in state.values())
    assert size > 30e6
    staging, sdir, stats = SnapshotStaging(pin=False), new_dir(tmp_path), {}
    writer = SnapshotWriter(sdir, stats)
    rss, ptrs = [], []
    for k in range(12):
        state["kv"].add_(1.0)
        tensors = staging.stage(state)
        writer.submit(k, tensors, {"k": k})
        ptrs.append({n: b.data_ptr() for n, b in staging.buffers.items()})
        writer.wait()
        if statm.exists():
            rss.append(int(statm.read_text().split()[1]) * 4096)
        if k > 0:
            (sdir.snapshot_paths(k - 1)[0]).unlink()  # keep the disk use small
    writer.close()
    assert all(p == ptrs[0] for p in ptrs)
    assert stats["snapshot_write_s"] > 0
    if rss:
        assert rss[-1] - rss[2] < size, [r / 1e6 for r in rss]


# ---------------------------------------------------------------------------------------------- sessions


@pytest.mark.parametrize("quality", ["preview", "full"])
def test_snapshots_every_chunk_resume_identically(world, tmp_path, uninterrupted, quality):  # noqa: F811
    s = staged(create(world, tmp_path, quality=quality, snapshot_every=1))
    first = generate(s, 2)
    assert s.stats["snapshot_write_s"] > 0 and s.stats["snapshot_s"] > 0
    s.close()
    assert s.dir.snapshot_chunks() == [0, 1]
    r = staged(Session.resume(world, tmp_path / s.id, controls=ScriptedControls.from_action(ACTION),
                              snapshot_every=1))
    assert r.stats["resume_replayed_chunks"] == 0  # straight from the snapshot after chunk 1
    rest = generate(r)
    r.close()
    assert [c.index for c in rest] == [2, 3] and r.dir.snapshot_chunks() == [0, 1, 2, 3]
    for a, b in zip(first + rest, uninterrupted[quality], strict=True):
        assert np.array_equal(a.frames, b.frames) and torch.equal(a.latents, b.latents), a.index
        if quality == "full":
            assert torch.equal(a.refined, b.refined), a.index
    # the last snapshot on disk is the state after chunk 3, as the plain copy of that state would write it
    tensors, _ = SessionDir.open(r.dir.path).load_snapshot(3)
    assert_same_bytes(tensors, {f"pipeline.{k}": v for k, v in plain_snapshot(r.pipeline).items()})


def slow_writes(monkeypatch, seconds: float, events: list[str] | None = None) -> list[bool]:
    """Every snapshot write takes `seconds` longer (and says "written <chunk>" in `events` when done); returns,
    per write, whether its tensors stayed unchanged while it ran (they are the staging buffers the engine
    thread fills)."""
    original = SessionDir.save_snapshot
    unchanged = []

    def save(self, chunk, tensors, meta):
        before = {k: raw(v).clone() for k, v in tensors.items()}
        time.sleep(seconds)
        original(self, chunk, tensors, meta)
        unchanged.append(all(torch.equal(before[k], raw(v)) for k, v in tensors.items()))
        if events is not None:
            events.append(f"written {chunk}")

    monkeypatch.setattr(SessionDir, "save_snapshot", save)
    return unchanged


def watch_reads(monkeypatch, events: list[str]) -> None:
    """Every opening of a session directory (how resume and branch start reading) says "read" in `events`."""
    original = SessionDir.open.__func__
    monkeypatch.setattr(SessionDir, "open", classmethod(lambda cls, path: events.append("read") or original(cls, path)))


def test_the_next_snapshot_waits_for_the_write_in_flight(world, tmp_path, monkeypatch):  # noqa: F811
    """Each write is held until somebody waits for it, so every snapshot after the first overlaps the write
    before it: that write must end before the engine thread stages again, or its bytes would change."""
    cond, submitted, released, unchanged = threading.Condition(), set(), set(), []
    original, submit, wait = SessionDir.save_snapshot, SnapshotWriter.submit, SnapshotWriter.wait

    def submitting(self, chunk, tensors, meta):
        submit(self, chunk, tensors, meta)
        with cond:
            submitted.add(chunk)

    def waiting(self):
        with cond:
            released.update(submitted)
            cond.notify_all()
        wait(self)

    def save(self, chunk, tensors, meta):
        before = {k: raw(v).clone() for k, v in tensors.items()}
        with cond:
            assert cond.wait_for(lambda: chunk in released, 60), f"nothing waited for the write of chunk {chunk}"
        time.sleep(0.05)  # a staging that did not wait would land in here
        original(self, chunk, tensors, meta)
        unchanged.append(all(torch.equal(before[k], raw(v)) for k, v in tensors.items()))

    monkeypatch.setattr(SnapshotWriter, "submit", submitting)
    monkeypatch.setattr(SnapshotWriter, "wait", waiting)
    monkeypatch.setattr(SessionDir, "save_snapshot", save)
    s = staged(create(world, tmp_path, snapshot_every=1))
    s.step()
    assert s.dir.snapshot_chunks() == []  # step() returned while its snapshot is held: not on this thread
    generate(s)
    s.close()
    assert unchanged == [True] * 4 and s.dir.snapshot_chunks() == [0, 1, 2, 3]
    ref = staged(create(world, None))
    generate(ref, 2)
    tensors, _ = SessionDir.open(s.dir.path).load_snapshot(1)
    assert_same_bytes(tensors, {f"pipeline.{k}": v for k, v in plain_snapshot(ref.pipeline).items()})


def test_branch_and_resume_wait_for_the_write_in_flight(world, tmp_path, monkeypatch, uninterrupted):  # noqa: F811
    events = []
    slow_writes(monkeypatch, 0.5, events)
    watch_reads(monkeypatch, events)
    s = staged(create(world, tmp_path, snapshot_every=1))
    first = generate(s, 2)
    assert events == ["written 0"]  # the snapshot after chunk 1 is still being written
    fork = Session.branch(world, tmp_path / s.id, 1, record_root=tmp_path / "fork",
                          controls=ScriptedControls.from_action(ACTION))
    assert events[1:3] == ["written 1", "read"]
    assert fork.dir.snapshot_chunks() == [0, 1]
    fork.close()
    first += generate(s, 1)  # chunk 2, whose snapshot is being written when the process "dies" (no close)
    events.clear()
    r = Session.resume(world, tmp_path / s.id, controls=ScriptedControls.from_action(ACTION))
    assert events[:2] == ["written 2", "read"]
    rest = generate(r)
    r.close()
    for a, b in zip(first + rest, uninterrupted["preview"], strict=True):
        assert np.array_equal(a.frames, b.frames) and torch.equal(a.latents, b.latents), a.index


def test_close_waits_for_the_writer(world, tmp_path, monkeypatch):  # noqa: F811
    original = SessionDir.save_snapshot
    gate, done = threading.Event(), []

    def save(self, chunk, tensors, meta):
        assert gate.wait(60), "close() never came"
        original(self, chunk, tensors, meta)
        done.append(chunk)

    monkeypatch.setattr(SessionDir, "save_snapshot", save)
    s = staged(create(world, tmp_path, snapshot_every=1))
    s.step()  # returns while its snapshot's write is held at the gate
    assert s.dir.snapshot_chunks() == [] and not done
    threading.Timer(0.3, gate.set).start()
    t0 = time.perf_counter()
    s.close()
    assert time.perf_counter() - t0 > 0.2
    assert done == [0] and s.dir.snapshot_chunks() == [0]
    assert SessionDir.open(s.dir.path).read_manifest().status == "stopped"


def failing_writes(monkeypatch, chunks=None) -> None:
    original = SessionDir.save_snapshot

    def save(self, chunk, tensors, meta):
        if chunks is None or chunk in chunks:
            raise OSError(28, "No space left on device")
        original(self, chunk, tensors, meta)

    monkeypatch.setattr(SessionDir, "save_snapshot", save)


def test_a_failed_write_is_logged_and_raised_at_the_next_snapshot(world, tmp_path, monkeypatch, caplog,  # noqa: F811
                                                                   uninterrupted):  # noqa: F811
    failing_writes(monkeypatch, chunks={0})
    s = staged(create(world, tmp_path, snapshot_every=1))
    s.step()
    with pytest.raises(OSError, match="No space"):
        s.step()  # chunk 1 is committed and snapshotted, then chunk 0's failed write is reported
    assert "writing the snapshot after chunk 0 failed" in caplog.text
    assert s.dir.latent_chunks() == [0, 1]  # nothing recorded is lost
    generate(s)  # reported once: the session goes on, snapshotting again
    s.close()
    assert s.dir.snapshot_chunks() == [1, 2, 3]
    r = Session.resume(world, tmp_path / s.id, controls=ScriptedControls.from_action(ACTION))
    assert r.step() is None
    r.close()


def test_sessions_of_one_world_share_the_staging_and_wait_for_each_other(world, tmp_path, monkeypatch):  # noqa: F811
    """One set of (page-locked) buffers per world: a session's snapshot waits until another session's writer is
    done with them, so no write ever sees its bytes change."""
    events = []
    unchanged = slow_writes(monkeypatch, 0.4, events)
    shared = SnapshotStaging(pin=False)
    a = create(world, tmp_path, snapshot_every=1)
    b = create(world, tmp_path, snapshot_every=1)
    a.pipeline.staging = b.pipeline.staging = shared
    a.step()  # a's write of chunk 0 is in flight
    t0 = time.perf_counter()
    b.step()  # b's snapshot waits for it before staging into the same buffers
    assert time.perf_counter() - t0 > 0.2 and events[:1] == ["written 0"]
    a.close()
    b.close()
    assert unchanged and all(unchanged)
    assert a.dir.snapshot_chunks()[:1] == [0] and b.dir.snapshot_chunks()[:1] == [0]


def test_world_staging_is_one_per_world():
    w = build_bench_world("tiny", device="cpu", dtype=torch.float32, seed=1, with_refiner=False)
    assert w.snapshot_staging() is None  # a CPU world copies plainly
    w.device = torch.device("cuda")  # what a CUDA world gets (not allocated until a snapshot)
    assert w.snapshot_staging() is w.snapshot_staging() and w.staging.pin


def failing_once(monkeypatch, chunk: int) -> list:
    original, calls = SessionDir.save_snapshot, []

    def save(self, k, tensors, meta):
        calls.append(k)
        if k == chunk and calls.count(k) == 1:
            raise OSError(28, "No space left on device")
        original(self, k, tensors, meta)

    monkeypatch.setattr(SessionDir, "save_snapshot", save)
    return calls


def test_a_failed_write_does_not_stop_later_snapshots(world, tmp_path, monkeypatch, caplog):  # noqa: F811
    """A snapshot whose write failed is taken again (close), the next one is taken all the same, and a pause
    after a failed write still pauses; the error is raised by close, after the recording is complete."""
    calls = failing_once(monkeypatch, chunk=1)
    s = staged(create(world, tmp_path, snapshot_every=100))
    generate(s, 2)
    s.pause()  # snapshot of chunk 1: its write fails in the background (logged)
    s._writer.idle()
    assert "writing the snapshot after chunk 1 failed" in caplog.text
    s.unpause()
    with pytest.raises(OSError, match="No space"):
        s.close()  # the snapshot of chunk 1 again, written, then the earlier failure reported
    assert calls == [1, 1] and s.dir.snapshot_chunks() == [1]
    assert SessionDir.open(s.dir.path).read_manifest().status == "stopped"

    calls = failing_once(monkeypatch, chunk=0)
    s = staged(create(world, tmp_path, snapshot_every=1))
    s.step()
    s._writer.idle()  # chunk 0's write failed
    s.pause()  # the failure is logged, the pause happens (a snapshot of chunk 0 again)
    assert SessionDir.open(s.dir.path).read_manifest().status == "paused"
    s.unpause()
    generate(s, 1)
    s.close()
    assert s.dir.snapshot_chunks() == [0, 1]


def test_a_failed_final_write_is_raised_by_close(world, tmp_path, monkeypatch, caplog):  # noqa: F811
    failing_writes(monkeypatch)
    s = staged(create(world, tmp_path, snapshot_every=100))
    generate(s, 2)
    with pytest.raises(OSError, match="No space"):
        s.close()
    assert "writing the snapshot after chunk 1 failed" in caplog.text
    assert s._video is None and s._log is None  # closed all the same
    assert SessionDir.open(s.dir.path).read_manifest().status == "stopped"
    s.close()  # safe to call twice
    monkeypatch.undo()
    r = Session.resume(world, tmp_path / s.id, controls=ScriptedControls.from_action(ACTION))
    assert r.stats["resume_replayed_chunks"] == 2  # no snapshot: both chunks from their latents
    r.close()


# -------------------------------------------------------------------------------------------------- GPU


def gb_per_s(nbytes: int, seconds: float) -> str:
    return f"{nbytes / 1e9:.3f} GB in {seconds * 1e3:.1f} ms ({nbytes / 1e9 / max(seconds, 1e-9):.1f} GB/s)"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_pinned_staging_equals_the_plain_copy_on_cuda(dtype):
    """~1 GB of cache-like tensors: pinned staging == `.cpu().clone()` byte for byte, buffers reused; prints the
    plain copy, the first staging (pinned allocation included) and the steady staging times."""
    dev = torch.device("cuda")
    scale = 27000 if dtype == torch.float32 else 54000  # ~1 GB either way
    state = synthetic_state(dev, dtype, scale=scale)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    assert 0.8e9 < nbytes < 1.6e9

    def timed(fn):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        return out, time.perf_counter() - t0

    plain, t_plain = timed(lambda: {k: v.detach().cpu().clone() for k, v in state.items()})
    staging = SnapshotStaging(pin=True)
    first, t_first = timed(lambda: staging.stage(state))
    assert_same_bytes(first, plain)
    assert all(t.is_pinned() for t in first.values())
    ptrs = {k: b.data_ptr() for k, b in staging.buffers.items()}
    for v in state.values():
        if v.is_floating_point():
            v.mul_(-1)
    plain2 = {k: v.detach().cpu().clone() for k, v in state.items()}
    steady = []
    for _ in range(3):
        out, t = timed(lambda: staging.stage(state))
        steady.append(t)
    assert_same_bytes(out, plain2)
    assert {k: b.data_ptr() for k, b in staging.buffers.items()} == ptrs
    host = torch.cuda.host_memory_stats().get("allocated_bytes.current", 0)
    print(f"\n[snapshot staging {dtype}] plain .cpu().clone(): {gb_per_s(nbytes, t_plain)}; "
          f"pinned first (allocates): {gb_per_s(nbytes, t_first)}; pinned steady: {gb_per_s(nbytes, min(steady))}; "
          f"pinned host memory {host / 1e9:.3f} GB for {staging.nbytes / 1e9:.3f} GB of buffers")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("quality", ["preview", "full"])
def test_cuda_pipeline_snapshot_is_pinned_and_equals_the_plain_path(quality, dtype):
    w = build_bench_world("tiny", device="cuda", dtype=dtype, seed=0)
    s = create(w, None, quality=quality, action=ACTION + ",w-48")  # 6 chunks
    assert s.pipeline.staging is not None and s.pipeline.staging.pin
    generate(s, 4)  # the refiner's history is full from here on
    got = s.pipeline.snapshot()
    assert_same_bytes(got, plain_snapshot(s.pipeline))
    assert all(t.is_pinned() for k, t in got.items() if k != "prompt")
    ptrs = {k: b.data_ptr() for k, b in s.pipeline.staging.buffers.items()}
    generate(s, 1)
    again = s.pipeline.snapshot()
    assert_same_bytes(again, plain_snapshot(s.pipeline))
    assert {k: b.data_ptr() for k, b in s.pipeline.staging.buffers.items()} == ptrs


@pytest.mark.gpu
@pytest.mark.parametrize("quality", ["preview", "full"])
def test_cuda_session_snapshots_in_the_background_and_resumes(tmp_path, quality):
    w = build_bench_world("tiny", device="cuda", dtype=torch.float32, seed=0)
    with create(w, None, quality=quality) as ref:
        whole = generate(ref)
    s = create(w, tmp_path, quality=quality, snapshot_every=1)
    first = generate(s, 2)
    s.close()
    r = Session.resume(w, tmp_path / s.id, controls=ScriptedControls.from_action(ACTION))
    assert r.stats["resume_replayed_chunks"] == 0
    rest = generate(r)
    r.close()
    tensors, _ = SessionDir.open(s.dir.path).load_snapshot(3)  # written from the pinned buffers
    assert_same_bytes(tensors, {f"pipeline.{k}": v for k, v in plain_snapshot(r.pipeline).items()})
    print(f"\n[cuda session {quality}] snapshot_s {s.stats['snapshot_s'] * 1e3:.2f} ms (engine thread), "
          f"snapshot_write_s {s.stats['snapshot_write_s'] * 1e3:.2f} ms (writer), "
          f"{s.stats['snapshot_bytes'] / 1e6:.2f} MB")
    for a, b in zip(first + rest, whole, strict=True):
        assert torch.equal(a.latents, b.latents) and np.array_equal(a.frames, b.frames), a.index


@pytest.mark.parametrize("shape,view", [
    ((4, 2, 3, 10, 5), lambda t: t[:, :, :, 2:7]),  # the refiner history: a slice of the window's frame axis
    ((6, 8), lambda t: t[:, 1:5]),
    ((3, 4, 5), lambda t: t.transpose(0, 1)),
    ((70, 70, 2), lambda t: t.transpose(0, 1)),  # > MAX_COPY_PIECES pieces: copied whole
    ((5,), lambda t: t[1:4]),
])
def test_copy_in_pieces_equals_copy(shape, view):
    from engine.world import copy_in_pieces

    src = view(torch.randn(shape))
    dst = torch.empty(src.shape)
    copy_in_pieces(dst, src)
    assert torch.equal(dst, src)


def test_pipeline_snapshot_makes_no_component_copies(monkeypatch):
    """The components hand the staging their live buffers (no device-side copy of the caches per snapshot)."""
    w = build_bench_world("tiny", device="cpu", dtype=torch.float32, seed=1)
    pipe = WorldPipeline(w)
    pipe.start(first_image(w.preset, 0), "a street", "full")
    ro = Rollout(pipe, scripted_controls(3), intrinsics_px=w.preset.default_intrinsics, quality="full")
    list(ro.chunks(3))
    shares = lambda a, b: a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    assert shares(pipe.refiner.snapshot(copy=False)["history_k_slots"], pipe.refiner.window.k)
    assert shares(pipe.stream.snapshot(copy=False)["blocks.0.ffn_tail"], pipe.stream.cache.blocks[0].ffn_tail)
    assert not shares(pipe.refiner.snapshot()["history_k_slots"], pipe.refiner.window.k)
    want = pipe.snapshot()  # CPU world: fresh contiguous copies
    pipe.staging = SnapshotStaging(pin=False)
    staged = pipe.snapshot()
    assert want.keys() == staged.keys()
    for k in want:
        assert torch.equal(want[k], staged[k]), k
        assert staged[k].is_contiguous() and want[k].is_contiguous()


def test_dense_permuted_tensors_are_staged_in_one_copy(monkeypatch):
    from engine.world import is_dense

    cl = torch.randn(1, 8, 2, 6, 8).contiguous(memory_format=torch.channels_last_3d)  # a vae-fast conv cache
    sliced = torch.randn(4, 10, 5)[:, 2:7]
    assert is_dense(cl) and is_dense(cl.contiguous()) and not is_dense(sliced)
    copies = []
    original = torch.Tensor.copy_
    monkeypatch.setattr(torch.Tensor, "copy_", lambda d, s, **kw: (copies.append(s.shape), original(d, s, **kw))[1])
    staging = SnapshotStaging(pin=False)
    out = staging.stage({"cl": cl, "sliced": sliced})
    monkeypatch.undo()
    assert copies[0] == cl.shape and len(copies) == 1 + 4  # the dense one whole, the slice by its 4 rows
    assert all(v.is_contiguous() for v in out.values())
    assert torch.equal(out["cl"], cl) and torch.equal(out["sliced"], sliced)
