"""`torch.compile` of the refiner block's two halves (the plain path: `engine.refiner.model.attention_inputs` /
`attention_outputs`, eager).

A release refiner forward spends ~25 ms of its ~160 ms GPU time in unfused elementwise kernels around the GEMMs and
SDPA: RMS norms, adaLN modulation, RoPE, gated residuals, GELU. Inductor fuses those chains. The block is compiled
as two functions on either side of the K/V window's `attend` (which writes the session's cache in place at
positions the Python side tracks), each taking the block as an argument, so one graph pair serves all 48 blocks.
With `refiner-graph` on, the compiled halves run in the graphs' steady state only; the first steady call of a shape
runs them eagerly (compiling them outside any capture).
"""

from __future__ import annotations

import functools

from engine.fast.stage1_compile import raise_recompile_limit
from engine.refiner.model import attention_inputs, attention_outputs


@functools.cache
def compiled_parts() -> tuple:
    import torch

    raise_recompile_limit()
    return torch.compile(attention_inputs, dynamic=False), torch.compile(attention_outputs, dynamic=False)


def use_compiled_refiner_blocks(pipe) -> str | None:
    """Route the refiner blocks' steady-state forwards of `pipe` through the compiled halves (needs `refiner-graph`)."""
    from engine.errors import InputError
    from engine.fast.refiner_graph import GraphedRefinerModel

    if pipe.refiner is None:
        return None
    if not isinstance(pipe.refiner.model, GraphedRefinerModel):
        raise InputError("fast path 'refiner-compile' needs 'refiner-graph'")
    pipe.refiner.model.parts = compiled_parts()
    pipe.refiner.model.seen.clear()  # a shape seen before must run (and compile) eagerly before its capture
    return "GraphedRefinerModel.parts -> torch.compile(attention_inputs / attention_outputs) (steady state)"
