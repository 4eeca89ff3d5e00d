"""Rotary embedding, "split" layout (pairs `(r, r + D/2)`): plain torch reference and a fused Triton kernel.

    out[..., :D/2] = a cos - b sin,   out[..., D/2:] = b cos + a sin,   a = x[..., :D/2], b = x[..., D/2:]

computed in fp32, returned in x's dtype. Shapes: x `[..., H, N, D]` (any leading dims, any strides), cos / sin
`[H, N, D/2]` fp32 (shared by the leading dims). The plain version makes ~8 full-size passes (upcast, four
products, two sums, a concatenation, the downcast); the Triton one reads x and the table once and writes once.
`rope_split` picks Triton on a CUDA tensor when Triton is importable, else the reference.

Rotary embedding, "pairs" layout (adjacent pairs `(2k, 2k + 1)`, the stage-1 model's): the complex product
`(x[2k] + i x[2k+1]) e^{i phi_k}` with a complex64 table `[N, D/2]` shared by the leading dims (`inverse`: by
`e^{-i phi_k}`), computed in fp32, returned in x's dtype. `rope_pairs_reference` is the plain form (the complex
multiply, as engine/stage1/geometry.py computes it); `rope_pairs_triton` reads x and the table once and writes once
(D/2 need not be a power of two: 56 and 28 at the release size). It is a torch custom op (`sana_wm::rope_pairs`, with
a fake implementation), so torch.compile calls it whole and never generates code over the complex table (inductor's
real-arithmetic forms of this product compiled to wrong values on the H100, see geometry.apply_rope). Knows nothing of
models.
"""

from __future__ import annotations

import torch

from kernels import interpreting

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


# ------------------------------------------------------------------------------------------------- "pairs" layout


def rope_pairs_reference(x: torch.Tensor, table: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """x `[..., N, D]`, table complex `[N, D/2]` -> x rotated pairwise, in x's dtype."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(xc * (table.conj() if inverse else table)).flatten(-2).to(x.dtype)


def rope_pairs_real(x: torch.Tensor, table: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """`rope_pairs_reference` in real arithmetic, for code generators without complex numbers (torch.compile), over
    the last dim as it lies: x cos + x[pair-swapped] (-sin, +sin), i.e. (a cos - b sin, b cos + a sin) per pair (a, b),
    the same fp32 products; x `[..., N, D]`.

    Not the unflatten / stack form (a, b = x[..., 0::2], x[..., 1::2] as a new last axis, stacked back): that one
    compiled to wrong values on an H100 inside the stage-1 block with the torch scans (tests/benchmarks/rope_probe.py,
    relative error 0.23; this form 1.1e-3, the complex multiply's own figure in the same run)."""
    tab = torch.view_as_real(table)  # [N, D/2, 2]: cos, sin
    D = x.shape[-1]
    lane = torch.arange(D, device=x.device)
    sign = (lane % 2) * 2 - 1  # -1 on the pair's first element, +1 on its second
    cos = tab[..., 0].repeat_interleave(2, dim=-1)
    sin = tab[..., 1].repeat_interleave(2, dim=-1) * (-sign if inverse else sign)
    xf = x.float()
    return (xf * cos + xf[..., lane ^ 1] * sin).to(x.dtype)


if triton is not None:

    @triton.jit
    def _rope_pairs_kernel(x_ptr, t_ptr, out_ptr, H, N, sx_b, sx_h, sx_n, so_b, so_h, so_n, st_n, SIGN,
                           HALF: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_bh = tl.program_id(0)  # (batch, head)
        pid_n = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = pid_bh % H
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        k = tl.arange(0, BLOCK_K)
        mask = (rows[:, None] < N) & (k[None, :] < HALF)
        xb = x_ptr + b * sx_b + h * sx_h + rows[:, None] * sx_n + 2 * k[None, :]
        a = tl.load(xb, mask=mask, other=0.0).to(tl.float32)
        c = tl.load(xb + 1, mask=mask, other=0.0).to(tl.float32)
        tb = t_ptr + rows[:, None] * st_n + 2 * k[None, :]  # the table's real view [N, D/2, 2]: cos, sin
        cos = tl.load(tb, mask=mask, other=0.0)
        sin = tl.load(tb + 1, mask=mask, other=0.0) * SIGN
        ob = out_ptr + b * so_b + h * so_h + rows[:, None] * so_n + 2 * k[None, :]
        tl.store(ob, (a * cos - c * sin).to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(ob + 1, (a * sin + c * cos).to(out_ptr.dtype.element_ty), mask=mask)


def _rope_pairs_launch(x: torch.Tensor, table: torch.Tensor, inverse: bool, block_n: int = 32) -> torch.Tensor:
    B, H, N, D = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    tab = torch.view_as_real(table.to(torch.complex64)).reshape(N, D)  # [N, D/2, 2] -> rows of (cos, sin) pairs
    if tab.stride(-1) != 1:
        tab = tab.contiguous()
    out = torch.empty((B, H, N, D), dtype=x.dtype, device=x.device)
    half = D // 2
    grid = (B * H, triton.cdiv(N, block_n))
    _rope_pairs_kernel[grid](x, tab, out, H, N, x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1),
                             out.stride(2), tab.stride(0), -1.0 if inverse else 1.0, HALF=half,
                             BLOCK_K=triton.next_power_of_2(half), BLOCK_N=block_n)
    return out


@torch.library.custom_op("sana_wm::rope_pairs", mutates_args=())
def _rope_pairs_op(x: torch.Tensor, table: torch.Tensor, inverse: bool) -> torch.Tensor:
    return _rope_pairs_launch(x, table, inverse)


@_rope_pairs_op.register_fake
def _rope_pairs_fake(x: torch.Tensor, table: torch.Tensor, inverse: bool) -> torch.Tensor:
    return x.new_empty(x.shape)


def rope_pairs_triton(x: torch.Tensor, table: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """`rope_pairs_reference` as one Triton pass, for x `[B, H, N, D]` (any strides) on CUDA (or CPU tensors under
    TRITON_INTERPRET=1); raises with the reason where it cannot run."""
    if triton is None or not (x.is_cuda or interpreting()):
        raise RuntimeError("rope_pairs_triton needs Triton and a CUDA tensor (or TRITON_INTERPRET=1)")
    if x.dim() != 4 or x.shape[-1] % 2 or tuple(table.shape) != (x.shape[2], x.shape[3] // 2) \
            or not table.is_complex():
        raise ValueError(f"x {tuple(x.shape)} / table {tuple(table.shape)} {table.dtype}: need x [B, H, N, D] with "
                         f"D even and a complex table [N, D/2]")
    return _rope_pairs_op(x, table, bool(inverse))
