"""Decoded pixels -> uint8 frames in one pass (plain torch reference and a Triton kernel), and reflect padding.

`to_uint8_frames`: pixels `[3, F, H, W]` (any float dtype, any strides) -> `[F, H, W, 3]` uint8 on the same device,
`rint(clamp(x/2 + 0.5, 0, 1) * 255)` in fp32 (round half to even, as `torch.round`): bit-equal to the reference.
The reference makes ~7 full passes (upcast, 4 arithmetic ops, the downcast, the channel-last copy).

`reflect_pad_hw1`: `[P, H, W]` -> `[P, H+2, W+2]` reflecting one pixel on each side of H and W (edge not
repeated); P = all leading dims flattened. One read and one write per element in the Triton version.
Each picks Triton on a CUDA tensor when Triton is importable, else its reference. Knows nothing of models.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # CPU-only installs
    triton = None


def to_uint8_frames_reference(pixels: torch.Tensor) -> torch.Tensor:
    x = (pixels.float() / 2 + 0.5).clamp(0, 1) * 255
    return x.round().to(torch.uint8).permute(1, 2, 3, 0).contiguous()


def reflect_pad_hw1_reference(x: torch.Tensor) -> torch.Tensor:
    x = torch.cat([x[..., 1:2], x, x[..., -2:-1]], dim=-1)
    return torch.cat([x[..., 1:2, :], x, x[..., -2:-1, :]], dim=-2)


if triton is not None:

    @triton.jit
    def _frames_kernel(x_ptr, out_ptr, H, W, sc, sf, sh, sw, BLOCK_W: tl.constexpr):
        fh = tl.program_id(0)
        f = fh // H
        h = fh % H
        w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
        mask = w < W
        base = x_ptr + f.to(tl.int64) * sf + h.to(tl.int64) * sh + w * sw
        obase = out_ptr + (fh.to(tl.int64) * W + w) * 3
        for c in tl.static_range(3):
            v = tl.load(base + c * sc, mask=mask, other=0.0).to(tl.float32)
            v = tl.minimum(tl.maximum(v / 2 + 0.5, 0.0), 1.0) * 255
            tl.store(obase + c, libdevice.rint(v).to(tl.uint8), mask=mask)

    @triton.jit
    def _pad_kernel(x_ptr, out_ptr, H, W, BLOCK_W: tl.constexpr):
        row = tl.program_id(0)  # output row over P * (H + 2)
        p = row // (H + 2)
        ho = row % (H + 2)
        hi = ho - 1
        hi = tl.where(hi < 0, 1, hi)
        hi = tl.where(hi >= H, H - 2, hi)
        wo = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
        wi = wo - 1
        wi = tl.where(wi < 0, 1, wi)
        wi = tl.where(wi >= W, W - 2, wi)
        mask = wo < W + 2
        v = tl.load(x_ptr + (p.to(tl.int64) * H + hi) * W + wi, mask=mask)
        tl.store(out_ptr + row.to(tl.int64) * (W + 2) + wo, v, mask=mask)


def to_uint8_frames_triton(pixels: torch.Tensor, block_w: int = 256) -> torch.Tensor:
    if triton is None or not pixels.is_cuda:
        raise RuntimeError("to_uint8_frames_triton needs Triton and a CUDA tensor")
    if pixels.ndim != 4 or pixels.shape[0] != 3:
        raise ValueError(f"pixels {tuple(pixels.shape)}; expected [3, F, H, W]")
    _, F, H, W = pixels.shape
    out = torch.empty(F, H, W, 3, dtype=torch.uint8, device=pixels.device)
    grid = (F * H, triton.cdiv(W, block_w))
    _frames_kernel[grid](pixels, out, H, W, *pixels.stride(), BLOCK_W=block_w)
    return out


def reflect_pad_hw1_triton(x: torch.Tensor, block_w: int = 512) -> torch.Tensor:
    if triton is None or not x.is_cuda:
        raise RuntimeError("reflect_pad_hw1_triton needs Triton and a CUDA tensor")
    H, W = x.shape[-2:]
    if H < 2 or W < 2:
        raise ValueError(f"reflect padding needs H, W >= 2; got {H}x{W}")
    x = x.contiguous()
    out = torch.empty(*x.shape[:-2], H + 2, W + 2, dtype=x.dtype, device=x.device)
    P = x.numel() // (H * W)
    grid = (P * (H + 2), triton.cdiv(W + 2, block_w))
    _pad_kernel[grid](x, out, H, W, BLOCK_W=block_w)
    return out


def to_uint8_frames(pixels: torch.Tensor) -> torch.Tensor:
    if triton is not None and pixels.is_cuda:
        return to_uint8_frames_triton(pixels)
    return to_uint8_frames_reference(pixels)


def reflect_pad_hw1(x: torch.Tensor) -> torch.Tensor:
    if triton is not None and x.is_cuda:
        return reflect_pad_hw1_triton(x)
    return reflect_pad_hw1_reference(x)
