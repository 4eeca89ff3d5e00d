"""Sessions on disk: record, resume == uninterrupted (after a stop and after a crash), branch, replay == live."""

import numpy as np
import pytest
import torch

from engine.errors import InputError
from engine.recording import SessionDir, committed_chunks, iter_video
from engine.rollout import ScriptedControls
from engine.session import Session, new_session_like, replay_controls
from engine.world import build_world

ACTION = "w-30,jw-20,ik-10,l-12,s-24"  # 96 frames = 4 chunks
OTHER = "w-30,jw-20,ik-10,l-12,d-24"  # same first 72 frames (3 chunks)


@pytest.fixture(scope="module")
def world():
    return build_world("tiny", seed=0)


def image(world):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (240, 360, 3), dtype=np.uint8)  # not the preset's size: the crop runs


def create(world, root, action=ACTION, quality="preview", **kw):
    return Session.create(world, first_image=image(world), prompt="a quiet street", seed=7, quality=quality,
                          record_root=root, controls=ScriptedControls.from_action(action), **kw)


def generate(session, n=None):
    out = []
    while n is None or len(out) < n:
        c = session.step()
        if c is None:
            break
        out.append(c)
    return out


@pytest.fixture(scope="module")
def uninterrupted(world, tmp_path_factory):
    runs = {}
    for quality in ("preview", "full"):
        with create(world, None, quality=quality) as s:
            runs[quality] = generate(s)
    return runs


def test_recording_layout(world, tmp_path):
    with create(world, tmp_path, snapshot_every=2) as s:
        chunks = generate(s)
        sid = s.id
    sdir = SessionDir.open(tmp_path / sid)
    m = sdir.read_manifest()
    assert m.status == "stopped" and m.preset == "tiny" and m.seed == 7 and m.prompt == "a quiet street"
    records = sdir.scan_actions().records
    assert committed_chunks(records) == [0, 1, 2, 3]
    frames = [r for r in records if r["t"] == "frame"]
    assert [r["i"] for r in frames] == list(range(1, 97))
    assert sdir.latent_chunks() == [0, 1, 2, 3] and sdir.snapshot_chunks() == [1, 3]
    assert sum(1 for _ in iter_video(sdir.video_path)) == sum(c.frames.shape[0] for c in chunks) == 97
    assert s.stats["snapshot_bytes"] > 0


@pytest.mark.parametrize("quality", ["preview", "full"])
def test_resume_after_stop_equals_uninterrupted(world, tmp_path, uninterrupted, quality):
    s = create(world, tmp_path, quality=quality, snapshot_every=100)
    first = generate(s, 2)
    s.close()
    r = Session.resume(world, tmp_path / s.id, controls=ScriptedControls.from_action(ACTION))
    rest = generate(r)
    r.close()
    assert [c.index for c in rest] == [2, 3]
    for a, b in zip(first + rest, uninterrupted[quality], strict=True):
        assert np.array_equal(a.frames, b.frames) and torch.equal(a.latents, b.latents), a.index
    assert sum(1 for _ in iter_video(r.dir.video_path)) == sum(c.frames.shape[0] for c in first + rest)


def test_resume_after_crash_replays_from_latents(world, tmp_path, uninterrupted):
    s = create(world, tmp_path, snapshot_every=2)  # snapshot after chunk 1 only
    generate(s, 3)
    s._log._file.write(b"\x07\x00\x00\x00torn")  # a record torn mid-write, then the process dies
    s._log._file.flush()
    sid = s.id  # no close(): the manifest still says "recording"
    r = Session.resume(world, tmp_path / sid, controls=ScriptedControls.from_action(ACTION))
    assert r.stats["resume_replayed_chunks"] == 1  # chunk 2, from its stored latents
    (last,) = generate(r)
    r.close()
    assert last.index == 3
    assert np.array_equal(last.frames, uninterrupted["preview"][3].frames)


def test_branch_forks_history(world, tmp_path, uninterrupted):
    with create(world, tmp_path, snapshot_every=1) as s:
        generate(s)
    b = Session.branch(world, tmp_path / s.id, 1, controls=ScriptedControls.from_action(OTHER))
    assert b.id != s.id and b.manifest.parent == {"session_id": s.id, "chunk": 1}
    rest = generate(b)
    b.close()
    with create(world, None, action=OTHER) as ref:
        other = generate(ref)
    assert [c.index for c in rest] == [2, 3]
    assert np.array_equal(rest[0].frames, uninterrupted["preview"][2].frames)  # keys agree through frame 72
    assert np.array_equal(rest[1].frames, other[3].frames)
    assert not np.array_equal(rest[1].frames, uninterrupted["preview"][3].frames)


def test_replay_equals_live_with_prompt_change(world, tmp_path):
    s = create(world, tmp_path)
    live = generate(s, 2)
    s.set_prompt("a snowy forest")
    live += generate(s)
    s.close()
    manifest, frames, prompts, first = replay_controls(tmp_path / s.id)
    assert len(frames) == 96 and list(prompts.values()) == ["a snowy forest"]
    r = new_session_like(world, manifest, first, ScriptedControls(frames, manifest.keymap), None)
    r.pending_prompts = dict(prompts)
    replayed = generate(r)
    assert len(replayed) == len(live) == 4
    for a, b in zip(replayed, live, strict=True):
        assert torch.equal(a.latents, b.latents), a.index
    with create(world, None) as plain:  # the prompt change really changed the world
        assert not torch.equal(generate(plain)[3].latents, live[3].latents)


def test_resume_refuses_other_preset(world, tmp_path):
    with create(world, tmp_path) as s:
        generate(s, 1)
    m = s.dir.read_manifest()
    import dataclasses

    s.dir.write_manifest(dataclasses.replace(m, preset="release"))
    with pytest.raises(InputError, match="preset"):
        Session.resume(world, tmp_path / s.id)


def test_bad_first_image(world, tmp_path):
    with pytest.raises(InputError, match="first image"):
        Session.create(world, first_image=b"not an image", prompt="x", record_root=None)
    with pytest.raises(InputError, match="prompt"):
        with create(world, None) as s:
            s.set_prompt("   ")


@pytest.mark.slow
def test_long_session_is_bounded_and_resumes_from_an_old_snapshot(world, tmp_path):
    """200 chunks: cache memory constant, disk grows only by latents + log + video; then resume at chunk 150
    from the snapshot after chunk 119 (30 chunks replayed from latents) continues exactly."""
    import os
    import shutil

    from engine.recording import branch_session

    action = "w-600,jw-600,l-600,s-600,ik-600,d-600,none-600,w-1200"  # 4800 frames = 200 chunks
    s = create(world, tmp_path, action=action, snapshot_every=30)
    cache_bytes, disk = [], []
    for k in range(200):
        assert s.step().index == k
        if k in (9, 199):
            cache_bytes.append(sum(t.numel() * t.element_size() for t in s.pipeline.snapshot().values()))
        if k in (99, 199):
            disk.append({sub: sum(f.stat().st_size for f in (s.dir.path / sub).iterdir())
                         for sub in ("latents",)} | {"log": s.dir.actions_path.stat().st_size})
    s.close()
    assert cache_bytes[0] == cache_bytes[1]
    latent_file = os.path.getsize(s.dir.latents_path(150))
    assert disk[1]["latents"] - disk[0]["latents"] == 100 * latent_file
    per_chunk_log = (disk[1]["log"] - disk[0]["log"]) / 100
    assert per_chunk_log == pytest.approx(s.dir.actions_path.stat().st_size / 200, rel=0.05)
    assert sorted(s.dir.snapshot_chunks()) == [29, 59, 89, 119, 149, 179, 199]

    fork = branch_session(s.dir.path, 149, root=tmp_path / "fork")
    for path in fork.snapshot_paths(149):
        path.unlink()
    assert fork.nearest_snapshot(149) == 119
    r = Session.resume(world, fork.path, controls=ScriptedControls.from_action(action))
    assert r.stats["resume_replayed_chunks"] == 30
    nxt = r.step()
    r.close()
    assert nxt.index == 150
    assert torch.equal(nxt.latents, SessionDir.open(s.dir.path).load_latents(150)[0])
    shutil.rmtree(tmp_path / "fork")


def test_manifest_digest_is_of_the_stored_first_image(world, tmp_path):
    import hashlib

    with create(world, tmp_path) as s:
        generate(s, 1)
    sdir = SessionDir.open(s.dir.path)
    pixels = sdir.load_first_frame()
    assert np.array_equal(pixels, image(world))
    assert sdir.read_manifest().first_image_sha256 == hashlib.sha256(pixels.tobytes()).hexdigest()


def test_prompt_change_after_the_last_chunk_survives_a_resume(world, tmp_path):
    with create(world, None) as ref:
        generate(ref, 1)
        ref.set_prompt("a snowy forest")
        want = generate(ref, 1)[0]
    s = create(world, tmp_path)
    generate(s, 1)
    s.set_prompt("a snowy forest")
    s.close()  # stopped before any chunk used the new prompt
    r = Session.resume(world, tmp_path / s.id, controls=ScriptedControls.from_action(ACTION))
    got = r.step()
    r.close()
    assert got.index == 1 and torch.equal(got.latents, want.latents)
    _, _, prompts, _ = replay_controls(tmp_path / s.id)
    assert list(prompts.values()) == ["a snowy forest"]


def test_replay_uses_the_recorded_speeds(world, tmp_path):
    s = create(world, tmp_path, translation_speed=0.1, rotation_speed_deg=2.0)
    live = generate(s)
    s.close()
    manifest, frames, prompts, first = replay_controls(tmp_path / s.id)
    from engine.session import manifest_params

    r = new_session_like(world, manifest, first, ScriptedControls(frames, manifest_params(manifest)), None)
    replayed = generate(r)
    assert np.array_equal(np.concatenate([c.poses for c in replayed]), np.concatenate([c.poses for c in live]))
    assert r.manifest.controls == s.manifest.controls


def test_pose_driven_session_resumes_along_its_trajectory(world, tmp_path):
    from engine.controls import action_to_c2w
    from engine.rollout import PoseControls

    c2w = action_to_c2w("w-30,jw-30,l-36", "v1")  # 4 chunks

    def start(root):
        return Session.create(world, first_image=image(world), prompt="a quiet street", seed=7, record_root=root,
                              controls=PoseControls(c2w))

    with start(None) as ref:
        whole = generate(ref)
    s = start(tmp_path)
    generate(s, 2)
    s.close()
    r = Session.resume(world, tmp_path / s.id)
    rest = generate(r)
    r.close()
    assert [c.index for c in rest] == [2, 3]
    for a, b in zip(rest, whole[2:], strict=True):
        assert torch.equal(a.latents, b.latents)
    with pytest.raises(InputError, match="poses"):
        Session.resume(world, tmp_path / s.id, controls=ScriptedControls.from_action(ACTION))
