"""`torch.compile` of the stage-1 block (the plain path: `engine.stage1.model.call_block`, eager).

The steady streaming forward of a release chunk runs ~7,000 small kernels (norms, modulation, RoPE, casts, gates),
each a full pass over its tensors. Inductor fuses those elementwise chains into a few Triton kernels per block and
leaves the GEMMs, SDPA and the scans as library calls.

One compiled function serves every block: `call_block` takes the block as an argument, so dynamo guards on the
block's type and its attribute values (softmax or GDN), the cache's type and `ctx.write_cache`, not on which
instance it is. The live loop therefore compiles four graphs (GDN / softmax x read / cache-write); the recompile
limit is raised to leave room for the first chunks' shapes. Compilation happens on the first steady-state call of
each kind, outside any CUDA-graph capture (engine/fast/stage1_graph.py runs that first call eagerly); `warm(pipe)`
triggers it ahead of a session.
"""

from __future__ import annotations

import functools

from engine.stage1.model import call_block

RECOMPILE_LIMIT = 64


def raise_recompile_limit() -> None:
    """Dynamo's per-function recompile limit to at least RECOMPILE_LIMIT (its name differs across torch versions)."""
    import torch._dynamo

    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), RECOMPILE_LIMIT))


@functools.cache
def compiled_block_fn():
    """The process-wide compiled `call_block` (inductor, static shapes)."""
    import torch

    raise_recompile_limit()
    return torch.compile(call_block, dynamic=False)


def use_compiled_blocks(pipe) -> str:
    """Route the stage-1 blocks of `pipe` (a `WorldPipeline`) through the compiled `call_block`: in the CUDA-graph
    runner's steady state when `stage1-graph` is on (its start-up chunks stay plain), else in every forward."""
    from engine.fast.stage1_graph import GraphedStage1Stream

    fn = compiled_block_fn()
    if isinstance(pipe.stream, GraphedStage1Stream):
        pipe.stream.runner.block_fn = fn
        pipe.stream.runner.seen.clear()  # a kind seen before must run (and compile) eagerly before its capture
        return "Stage1GraphRunner.block_fn -> torch.compile(call_block) (steady state)"
    pipe.stream.block_fn = fn
    return "Stage1Stream.block_fn -> torch.compile(call_block)"
