"""The refiner FFN's up-projection with its GELU (tanh) in the GEMM's epilogue (fast path `refiner-gelu`).

Plain path: `GELUProj.forward` = `F.gelu(F.linear(x, W, b), approximate="tanh")`, a GEMM that writes the
`[N, 4C]` bf16 hidden state, then a full pass that reads and rewrites it (at the release block, 2640 tokens x 16384
channels: 62 us a call, 48 calls a forward on the H100, also under torch.compile, which leaves the GEMM to cuBLAS).
Here the same function is one `torch._addmm_activation(b, x, W^T, use_gelu=True)`: on CUDA, cuBLASLt's
GELU_BIAS epilogue applies the bias and the tanh-approximated GELU to the fp32 accumulator before the one bf16
rounding (the plain path rounds the GEMM output to bf16 first, then the GELU's), so the two differ at the bf16
rounding level. On the CPU the op is the plain computation (torch's CPU `_addmm_activation` uses the erf GELU, not
the tanh one). It is a torch custom op (`sana_wm::linear_gelu_tanh`, with a fake implementation), so torch.compile
calls it as one opaque op instead of splitting it again.

`use_fused_gelu(model)` swaps each block's `ff.net[0]` (a `GELUProj`) for a `FusedGELUProj` that holds the same
`proj` Linear (same parameters, same state-dict names) and falls back to the plain computation where the fused one
does not apply: a projection without bias, or one another fast path replaced (`refiner-fp8`'s `Fp8Linear`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.refiner.model import GELUProj, RefinerTransformer


@torch.library.custom_op("sana_wm::linear_gelu_tanh", mutates_args=())
def linear_gelu_tanh(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """`gelu_tanh(x W^T + b)` for x `[..., K]`, weight `[N, K]`, bias `[N]` -> `[..., N]`."""
    if not x.is_cuda:  # torch's CPU `_addmm_activation` applies the erf GELU: the plain computation instead
        return F.gelu(F.linear(x, weight, bias), approximate="tanh")
    out = torch._addmm_activation(bias, x.reshape(-1, x.shape[-1]), weight.t(), use_gelu=True)
    return out.reshape(*x.shape[:-1], weight.shape[0])


@linear_gelu_tanh.register_fake
def _linear_gelu_tanh_fake(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


class FusedGELUProj(nn.Module):
    """`GELUProj` whose GEMM applies bias and GELU in its epilogue (same `proj`, same parameters)."""

    def __init__(self, proj: nn.Linear) -> None:
        super().__init__()
        self.proj = proj

    def forward(self, x: Tensor) -> Tensor:
        p = self.proj
        if type(p) is nn.Linear and p.bias is not None:
            return linear_gelu_tanh(x, p.weight, p.bias)
        return F.gelu(p(x), approximate="tanh")  # the plain path (no bias, or a replaced projection)


def use_fused_gelu(model: RefinerTransformer) -> int:
    """Swap every block's FFN up-projection for `FusedGELUProj`, in place; returns how many were swapped (0 when
    already done)."""
    n = 0
    for blk in model.transformer_blocks:
        up = blk.ff.net[0]
        if type(up) is GELUProj:
            blk.ff.net[0] = FusedGELUProj(up.proj)
            n += 1
    return n
