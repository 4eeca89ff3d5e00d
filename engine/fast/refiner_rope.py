"""The refiner's RoPE through the fused Triton kernel `kernels.rope.rope_split` (plain path:
`engine.refiner.rope.apply_rope`, ~8 full-size fp32 passes per call, 96 calls per release forward).

`use_triton_rope()` points the refiner modules' `apply_rope` at `apply_rope_fast`; `restore_plain_rope()` undoes
it. Process-wide (module attributes), like any kernel switch. Interleaved layouts keep the plain path.
"""

from __future__ import annotations

import engine.refiner.ar as _ar
import engine.refiner.model as _model
from engine.refiner import rope as _rope
from kernels.rope import rope_split

_PLAIN = _rope.apply_rope
_TARGETS = (_ar, _model)


def apply_rope_fast(x, rope: _rope.Rope):
    if rope.layout == "split" and x.is_cuda:
        return rope_split(x, rope.cos, rope.sin)
    return _PLAIN(x, rope)


def use_triton_rope() -> None:
    for mod in _TARGETS:
        mod.apply_rope = apply_rope_fast


def restore_plain_rope() -> None:
    for mod in _TARGETS:
        mod.apply_rope = _PLAIN
