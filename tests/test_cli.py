"""The command line: help lists the plan, errors are clear and exit non-zero, poses round-trip."""

import subprocess
import sys

import numpy as np

from engine.cli import PLANNED, main
from engine.controls import action_to_c2w


def test_help_lists_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "engine.cli", "--help"], capture_output=True, text=True, check=True)
    for name in ["demo", "poses", *PLANNED]:
        assert name in out.stdout


def test_poses_writes_the_rollout(tmp_path, capsys):
    path = tmp_path / "poses.npy"
    assert main(["poses", "--action", "w-4,jw-3", "--keymap", "v1", "--out", str(path)]) == 0
    assert np.array_equal(np.load(path), action_to_c2w("w-4,jw-3", "v1"))


def test_bad_action_is_a_clear_error(capsys):
    assert main(["poses", "--action", "w-3,q-2"]) == 2
    err = capsys.readouterr().err
    assert "'q-2'" in err and "accepted keys" in err
