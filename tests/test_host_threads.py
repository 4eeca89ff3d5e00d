"""A GPU world caps torch's CPU thread pool (engine.world.limit_host_threads); an explicit OMP_NUM_THREADS wins."""

import torch

from engine.world import HOST_THREADS, limit_host_threads


def test_host_threads_capped_unless_the_environment_says(monkeypatch):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(HOST_THREADS + 2)
        monkeypatch.setenv("OMP_NUM_THREADS", str(HOST_THREADS + 2))
        assert limit_host_threads() == HOST_THREADS + 2  # set by the user: left as set
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert limit_host_threads() == HOST_THREADS
        torch.set_num_threads(1)
        assert limit_host_threads() == 1  # never raised
    finally:
        torch.set_num_threads(before)
