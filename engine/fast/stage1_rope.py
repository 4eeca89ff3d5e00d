"""Two fast paths for the stage-1 RoPE (adjacent pairs, complex table; the plain path is
`engine.stage1.geometry.apply_rope`, the complex multiply):

- `stage1-real-rope`: inside torch.compile only, the same products in real arithmetic (`kernels.rope.rope_pairs_real`),
  which inductor fuses into the kernels that produce and consume q / k (eager calls keep the complex multiply).
  `use_real_rope()`; tested against the complex form under the same compiled graphs in tests/test_fast_paths_gpu.py;
- `stage1-rope`: one Triton pass, `kernels.rope.rope_pairs_triton` (below).

Under `torch.compile` inductor has no complex code generation and runs the plain multiply, with the copies around it,
as separate eager kernels (~1.2 ms of a 45 ms release forward on the H100, 120 calls: q, k and the camera branch's
UCPE halves); with `stage1-real-rope` a release forward has 876 launches instead of 1161. The `stage1-rope` kernel
is a custom op, so the compiled block calls it whole. `use_triton_rope()` points the stage-1 modules' `apply_rope` at
`apply_rope_fast` (CUDA 4-D inputs; anything else takes the plain path); `restore_plain_rope()` undoes either.
Process-wide, like `refiner-rope`.

Measured on the H100 (session 4, tests/benchmarks/results/h100_2026-11-27_s4_bench_preview_all_vs_rope_*.json):
correct, but a release preview chunk took 333 ms with it against 293 without (stage-1 276 vs 239), ~60 us more per
call than the complex multiply it replaces; not profiled yet (the custom op's input/output layouts against what
inductor's neighbouring kernels want are the first suspect). So it is not in `all`.
"""

from __future__ import annotations

import engine.stage1.attention as _attention
import engine.stage1.geometry as _geometry
from kernels import rope as _rope
from kernels.rope import rope_pairs_real

_PLAIN = _geometry.apply_rope
_TARGETS = (_geometry, _attention)


def apply_rope_fast(x, table, *, inverse: bool = False):
    if _rope.triton is not None and x.is_cuda and x.dim() == 4 and table.is_complex():
        return _rope.rope_pairs_triton(x, table, inverse)
    return _PLAIN(x, table, inverse=inverse)


def apply_rope_compiled(x, table, *, inverse: bool = False):
    """Real arithmetic while torch.compile traces (`stage1-real-rope`), the plain complex multiply otherwise."""
    import torch

    if torch.compiler.is_compiling():
        return rope_pairs_real(x, table, inverse)
    return _PLAIN(x, table, inverse=inverse)


def use_real_rope() -> None:
    for mod in _TARGETS:
        mod.apply_rope = apply_rope_compiled


def use_triton_rope() -> None:
    for mod in _TARGETS:
        mod.apply_rope = apply_rope_fast


def restore_plain_rope() -> None:
    for mod in _TARGETS:
        mod.apply_rope = _PLAIN
