"""Rotary embedding, "split" layout (pairs `(r, r + D/2)`): plain torch reference and a fused Triton kernel.

    out[..., :D/2] = a cos - b sin,   out[..., D/2:] = b cos + a sin,   a = x[..., :D/2], b = x[..., D/2:]

computed in fp32, returned in x's dtype. Shapes: x `[..., H, N, D]` (any leading dims, any strides), cos / sin
`[H, N, D/2]` fp32 (shared by the leading dims). The plain version makes ~8 full-size passes (upcast, four
products, two sums, a concatenation, the downcast); the Triton one reads x and the table once and writes once.
`rope_split` picks Triton on a CUDA tensor when Triton is importable, else the reference. Knows nothing of models.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference path serves
    triton = None


def rope_split_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    a, b = xf.chunk(2, dim=-1)
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1).to(x.dtype)


if triton is not None:

    @triton.jit
    def _rope_split_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, H, N, sx_m, sx_h, sx_n, so_m, so_h, so_n, sc_h, sc_n,
                           HALF: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_mh = tl.program_id(0)  # (leading index, head)
        pid_n = tl.program_id(1)
        m = (pid_mh // H).to(tl.int64)
        h = pid_mh % H
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.arange(0, HALF)
        mask = rows[:, None] < N
        xb = x_ptr + m * sx_m + h * sx_h + rows[:, None] * sx_n + cols[None, :]
        a = tl.load(xb, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(xb + HALF, mask=mask, other=0.0).to(tl.float32)
        tb = h * sc_h + rows[:, None] * sc_n + cols[None, :]
        c = tl.load(cos_ptr + tb, mask=mask, other=0.0)
        s = tl.load(sin_ptr + tb, mask=mask, other=0.0)
        ob = out_ptr + m * so_m + h * so_h + rows[:, None] * so_n + cols[None, :]
        tl.store(ob, (a * c - b * s).to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(ob + HALF, (b * c + a * s).to(out_ptr.dtype.element_ty), mask=mask)


def rope_split_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, block_n: int = 64) -> torch.Tensor:
    H, N, half = cos.shape
    D = x.shape[-1]
    if triton is None or not x.is_cuda:
        raise RuntimeError("rope_split_triton needs Triton and a CUDA tensor")
    if tuple(x.shape[-3:]) != (H, N, 2 * half) or D & (D - 1) or sin.shape != cos.shape:
        raise ValueError(f"x {tuple(x.shape)} / table {tuple(cos.shape)}: need x [..., H, N, 2*half], D a power of 2")
    x4 = x.reshape(-1, H, N, D)
    if x4.stride(-1) != 1:
        x4 = x4.contiguous()
    cos, sin = cos.float(), sin.float()
    if cos.stride() != sin.stride() or cos.stride(-1) != 1:
        cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty(x4.shape, dtype=x.dtype, device=x.device)
    grid = (x4.shape[0] * H, triton.cdiv(N, block_n))
    _rope_split_kernel[grid](x4, cos, sin, out, H, N, x4.stride(0), x4.stride(1), x4.stride(2),
                             out.stride(0), out.stride(1), out.stride(2), cos.stride(0), cos.stride(1),
                             HALF=half, BLOCK_N=block_n)
    return out.reshape(x.shape)


def rope_split(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    D = x.shape[-1]
    if triton is not None and x.is_cuda and D & (D - 1) == 0 and D >= 16:
        return rope_split_triton(x, cos, sin)
    return rope_split_reference(x, cos, sin)
