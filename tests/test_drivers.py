"""Headless drivers through the CLI: demo, replay == live, refine-on-export == live full, resume/branch."""

import numpy as np
import pytest
import torch

from engine.cli import main
from engine.recording import SessionDir, iter_video


def sessions(root):
    return sorted(p for p in root.iterdir() if p.is_dir())


def frames_of(path):
    return np.stack(list(iter_video(path)))


def test_demo_headless_writes_session_video_and_poses(tmp_path):
    assert main(["demo", "--headless", "--quiet", "--record-root", str(tmp_path), "--action", "w-24,jw-24"]) == 0
    (s,) = sessions(tmp_path)
    video = frames_of(s / "video.mp4")
    poses = np.load(s / "poses.npy")
    assert video.shape[0] == poses.shape[0] == 49 and video.shape[1:] == (192, 320, 3)
    assert SessionDir.open(s).read_manifest().status == "stopped"


def test_replay_of_a_session_equals_the_live_run(tmp_path):
    live_root, replay_root = tmp_path / "live", tmp_path / "replay"
    assert main(["replay", "--quiet", "--action", "w-24,ik-24,l-24", "--seed", "5",
                 "--record-root", str(live_root)]) == 0
    (live,) = sessions(live_root)
    assert main(["replay", str(live), "--quiet", "--record-root", str(replay_root)]) == 0
    (again,) = sessions(replay_root)
    a, b = SessionDir.open(live), SessionDir.open(again)
    assert a.latent_chunks() == b.latent_chunks() == [0, 1, 2]
    for k in a.latent_chunks():
        assert torch.equal(a.load_latents(k)[0], b.load_latents(k)[0]), k
    assert np.array_equal(np.load(live / "poses.npy"), np.load(again / "poses.npy"))


def test_refine_on_export_equals_live_full_quality(tmp_path):
    action = ["--action", "w-24,jw-24", "--seed", "2", "--quiet"]
    assert main(["replay", *action, "--quality", "preview", "--record-root", str(tmp_path / "p")]) == 0
    assert main(["replay", *action, "--quality", "full", "--record-root", str(tmp_path / "f")]) == 0
    (preview,), (full,) = sessions(tmp_path / "p"), sessions(tmp_path / "f")
    out = tmp_path / "refined.mp4"
    assert main(["export", str(preview), "--refine", "--quiet", "--out", str(out)]) == 0
    exported, live_full = frames_of(out), frames_of(full / "video.mp4")
    assert exported.shape == live_full.shape == (48, 192, 320, 3)
    assert np.array_equal(exported, live_full)
    plain = tmp_path / "plain.mp4"
    assert main(["export", str(preview), "--overlay", "keys", "--quiet", "--out", str(plain)]) == 0
    assert frames_of(plain).shape == (49, 192, 320, 3)


def test_resume_and_branch_from_the_cli(tmp_path):
    assert main(["replay", "--quiet", "--action", "w-48", "--record-root", str(tmp_path)]) == 0
    (s,) = sessions(tmp_path)
    assert main(["resume", str(s), "--quiet", "--action", "w-48,jw-24"]) == 0
    assert SessionDir.open(s).latent_chunks() == [0, 1, 2]
    assert main(["resume", str(s), "--quiet", "--action", "w-48,s-24", "--branch-from-chunk", "1",
                 "--record-root", str(tmp_path)]) == 0
    branch = [p for p in sessions(tmp_path) if p != s]
    assert len(branch) == 1 and SessionDir.open(branch[0]).latent_chunks() == [0, 1, 2]
    a, b = SessionDir.open(s).load_latents(2)[0], SessionDir.open(branch[0]).load_latents(2)[0]
    assert not torch.equal(a, b)  # the branch took other keys after chunk 1


def test_replay_needs_exactly_one_source(tmp_path, capsys):
    assert main(["replay", "--quiet", "--record-root", str(tmp_path)]) == 2
    assert "exactly one" in capsys.readouterr().err


@pytest.mark.parametrize("bad", [["export", "/nonexistent/20261127-000000-000-abcdef"]])
def test_missing_session_is_a_clear_error(bad, capsys):
    assert main([*bad, "--quiet"]) == 2


def test_export_sidecar_has_per_frame_poses_and_keys(tmp_path):
    import json

    from engine.controls import action_to_c2w

    assert main(["replay", "--quiet", "--action", "w-24,jw-24", "--record-root", str(tmp_path)]) == 0
    (s,) = sessions(tmp_path)
    out = tmp_path / "e.mp4"
    assert main(["export", str(s), "--quiet", "--out", str(out)]) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    ref = action_to_c2w("w-24,jw-24", "v2")
    assert len(meta["frames"]) == frames_of(out).shape[0] == 49
    assert np.allclose(np.array([f["pose"] for f in meta["frames"]]).reshape(-1, 4, 4), ref)
    assert meta["frames"][0]["held"] == [] and meta["frames"][30]["held"] == ["forward", "strafe_left"]


def test_generate_offline_clip(tmp_path):
    import json

    out = tmp_path / "clip.mp4"
    assert main(["generate", "--quiet", "--action", "w-10,jw-10", "--steps", "3", "--out", str(out)]) == 0
    video = frames_of(out)
    assert video.shape == (17, 192, 320, 3)  # 21 poses snap to 8k+1 = 17
    assert len(json.loads(out.with_suffix(".json").read_text())["poses"]) == 17


def test_sessions_driven_by_explicit_poses_export_resume_and_replay(tmp_path):
    from engine.controls import action_to_c2w

    c2w = action_to_c2w("w-30,jw-30,l-36", "v1")  # 97 poses = 4 chunks
    offset = np.eye(4, dtype=np.float32)
    offset[:3, 3] = [0.5, 0.0, -1.0]
    np.save(tmp_path / "traj.npy", offset @ c2w)
    rec = tmp_path / "rec"
    assert main(["replay", "--quiet", "--c2w", str(tmp_path / "traj.npy"), "--record-root", str(rec)]) == 0
    (s,) = sessions(rec)
    assert np.allclose(np.load(s / "poses.npy"), c2w, atol=1e-5)
    out = tmp_path / "e.mp4"
    assert main(["export", str(s), "--quiet", "--overlay", "keys", "--out", str(out)]) == 0
    import json

    meta = json.loads(out.with_suffix(".json").read_text())
    assert np.allclose(np.array([f["pose"] for f in meta["frames"]]).reshape(-1, 4, 4), c2w, atol=1e-5)
    again = tmp_path / "again"
    assert main(["replay", str(s), "--quiet", "--record-root", str(again)]) == 0
    (s2,) = sessions(again)
    for k in range(4):
        assert torch.equal(SessionDir.open(s).load_latents(k)[0], SessionDir.open(s2).load_latents(k)[0])


def test_bad_files_are_clear_errors(tmp_path, capsys):
    assert main(["replay", "--quiet", "--action", "w-24", "--image", str(tmp_path / "no.png"),
                 "--record-root", str(tmp_path)]) == 2
    assert "cannot read the first image" in capsys.readouterr().err
    assert main(["replay", "--quiet", "--c2w", str(tmp_path / "no.npy"), "--record-root", str(tmp_path)]) == 2
    assert "cannot read poses" in capsys.readouterr().err
