"""The probes' shared timing: a callable captured in a CUDA graph and its replays timed one by one.

    from graph_timing import time_graph   # the probes run as scripts, with this directory on sys.path
"""

from __future__ import annotations

import statistics

import torch


def capture(fn):
    """Run `fn` three times on a side stream (compiles Triton / inductor code outside the capture), then capture one
    call in a CUDA graph. Returns (graph, the graph's output buffer)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    return g, out


def time_graph(fn, iters: int) -> dict:
    """`capture(fn)`, then time `iters` replays one by one with CUDA events. Returns {"median_ms", "min_ms", "out"}
    where `out` is the graph's output buffer (what the last replay wrote)."""
    g, out = capture(fn)
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return {"median_ms": round(statistics.median(times), 4), "min_ms": round(min(times), 4), "out": out}
