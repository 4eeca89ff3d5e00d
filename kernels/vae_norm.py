"""The VAE decoder's conv-input preparation in one pass: optional residual + bias, per-channel RMS norm, SiLU,
and the spatial reflect pad, written straight into (a view of) the conv's input buffer.

    v = x (+ h) (+ bias[c])                          computed in fp32
    residual <- v                                    (optional; the residual stream, unpadded)
    y = silu(v / sqrt(mean_c(v²) + eps))             (norm=True; else y = v)
    out[b, c, t, ho, wo] = y[b, c, t, hi, wi]        (hi, wi) = reflect(ho − 1, wo − 1) if pad else (ho, wo)

Shapes: x, h, residual `[B, C, T, H, W]`; bias `[C]`; out `[B, C, T, H+2, W+2]` (pad) or `[B, C, T, H, W]`.
Every tensor may have any strides (NCDHW, channels-last, a view into a bigger buffer): the kernel reads and
writes through them, so the plain decoder's ~8 full-size passes (pow, mean, add, sqrt, div, silu, cat, pad)
become one read and one write. Reflect padding needs H, W >= 2. `rms_silu_pad` picks Triton on a CUDA tensor
when Triton is importable, else the reference (same math in fp32). Knows nothing of models or caches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import interpreting

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference path serves
    triton = None

EPS = 1e-8  # engine.vae.model.per_channel_rms_norm's


def _check(x, out, h, bias, residual, pad):
    if x.ndim != 5:
        raise ValueError(f"x {tuple(x.shape)}; expected [B, C, T, H, W]")
    B, C, T, H, W = x.shape
    want = (B, C, T, H + 2, W + 2) if pad else (B, C, T, H, W)
    if tuple(out.shape) != want:
        raise ValueError(f"out {tuple(out.shape)}; expected {want} for x {tuple(x.shape)} (pad={pad})")
    if pad and (H < 2 or W < 2):
        raise ValueError(f"reflect padding needs H, W >= 2; got {H}x{W}")
    for name, t in (("h", h), ("residual", residual)):
        if t is not None and t.shape != x.shape:
            raise ValueError(f"{name} {tuple(t.shape)}; expected x's shape {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (C,):
        raise ValueError(f"bias {tuple(bias.shape)}; expected [{C}]")


def rms_silu_pad_reference(x: torch.Tensor, out: torch.Tensor, *, h: torch.Tensor | None = None,
                           bias: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                           norm: bool = True, pad: bool = True, eps: float = EPS) -> torch.Tensor:
    """Plain torch, fp32 inside; writes `out` (and `residual`) in place and returns `out`."""
    _check(x, out, h, bias, residual, pad)
    v = x.float()
    if h is not None:
        v = v + h.float()
    if bias is not None:
        v = v + bias.float().view(-1, 1, 1, 1)
    if residual is not None:
        residual.copy_(v)
    if norm:
        v = F.silu(v / torch.sqrt(torch.mean(v * v, dim=1, keepdim=True) + eps))
    if pad:
        v = torch.cat([v[..., 1:2], v, v[..., -2:-1]], dim=-1)
        v = torch.cat([v[..., 1:2, :], v, v[..., -2:-1, :]], dim=-2)
    out.copy_(v)
    return out


if triton is not None:

    @triton.jit
    def _input(x_ptr, h_ptr, bias_ptr, xo, ho_, c, m, cmask, sxc, shc, HAS_H: tl.constexpr,
               HAS_BIAS: tl.constexpr):
        """v = x (+ h) (+ bias) in fp32 for positions x channels `c` (offsets xo / ho_ per position)."""
        v = tl.load(x_ptr + xo + c * sxc, mask=m, other=0.0).to(tl.float32)
        if HAS_H:
            v += tl.load(h_ptr + ho_ + c * shc, mask=m, other=0.0).to(tl.float32)
        if HAS_BIAS:
            v += tl.load(bias_ptr + c, mask=cmask[None, :], other=0.0).to(tl.float32)
        return v

    @triton.jit
    def _rms_silu_pad_kernel(
        x_ptr, h_ptr, bias_ptr, res_ptr, out_ptr,
        P, C, T, H, W, Ho, Wo,
        sxb, sxc, sxt, sxh, sxw,
        shb, shc, sht, shh, shw,
        srb, src, srt, srh, srw,
        sob, soc, sot, soh, sow,
        eps,
        HAS_H: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, NORM: tl.constexpr,
        PAD: tl.constexpr, SINGLE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        # one program: BLOCK_P output positions (flattened b, t, ho, wo) x every channel
        p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        pmask = p < P
        wo = p % Wo
        q = p // Wo
        ho = q % Ho
        q = q // Ho
        t = (q % T).to(tl.int64)
        b = (q // T).to(tl.int64)
        if PAD:
            hi = ho - 1
            hi = tl.where(hi < 0, -hi, hi)
            hi = tl.where(hi >= H, 2 * H - 2 - hi, hi)
            wi = wo - 1
            wi = tl.where(wi < 0, -wi, wi)
            wi = tl.where(wi >= W, 2 * W - 2 - wi, wi)
            inner = pmask & (ho >= 1) & (ho <= H) & (wo >= 1) & (wo <= W)  # writes the residual once per pixel
        else:
            hi = ho
            wi = wo
            inner = pmask
        hi = hi.to(tl.int64)
        wi = wi.to(tl.int64)
        xo = (b * sxb + t * sxt + hi * sxh + wi * sxw)[:, None]
        ho_ = (b * shb + t * sht + hi * shh + wi * shw)[:, None]
        ro = (b * srb + t * srt + hi * srh + wi * srw)[:, None]
        oo = (b * sob + t * sot + ho.to(tl.int64) * soh + wo.to(tl.int64) * sow)[:, None]
        c0 = tl.arange(0, BLOCK_C)
        if SINGLE:  # every channel of a position in registers: one read
            cmask = c0 < C
            m = pmask[:, None] & cmask[None, :]
            c = c0[None, :]
            v = _input(x_ptr, h_ptr, bias_ptr, xo, ho_, c, m, cmask, sxc, shc, HAS_H, HAS_BIAS)
            if HAS_RES:
                tl.store(res_ptr + ro + c * src, v.to(res_ptr.dtype.element_ty), mask=inner[:, None] & cmask[None, :])
            if NORM:
                rms = tl.sqrt(tl.sum(v * v, axis=1) / C + eps)
                v = v / rms[:, None]
                v = v / (1.0 + tl.exp(-v))
            tl.store(out_ptr + oo + c * soc, v.to(out_ptr.dtype.element_ty), mask=m)
        else:  # channel chunks: sum of squares first, then a second read (mostly from L2)
            ss = tl.zeros([BLOCK_P], dtype=tl.float32)
            if NORM or HAS_RES:
                for c_start in range(0, C, BLOCK_C):
                    cmask = (c0 + c_start) < C
                    m = pmask[:, None] & cmask[None, :]
                    c = (c0 + c_start)[None, :]
                    v = _input(x_ptr, h_ptr, bias_ptr, xo, ho_, c, m, cmask, sxc, shc, HAS_H, HAS_BIAS)
                    if HAS_RES:
                        tl.store(res_ptr + ro + c * src, v.to(res_ptr.dtype.element_ty),
                                 mask=inner[:, None] & cmask[None, :])
                    ss += tl.sum(v * v, axis=1)
            rms = tl.sqrt(ss / C + eps)
            for c_start in range(0, C, BLOCK_C):
                cmask = (c0 + c_start) < C
                m = pmask[:, None] & cmask[None, :]
                c = (c0 + c_start)[None, :]
                v = _input(x_ptr, h_ptr, bias_ptr, xo, ho_, c, m, cmask, sxc, shc, HAS_H, HAS_BIAS)
                if NORM:
                    v = v / rms[:, None]
                    v = v / (1.0 + tl.exp(-v))
                tl.store(out_ptr + oo + c * soc, v.to(out_ptr.dtype.element_ty), mask=m)


SINGLE_MAX_C = 256  # up to this many channels a position's channels stay in registers (one read of x)
TILE = 4096  # elements per program (BLOCK_P x BLOCK_C)


def rms_silu_pad_triton(x: torch.Tensor, out: torch.Tensor, *, h: torch.Tensor | None = None,
                        bias: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                        norm: bool = True, pad: bool = True, eps: float = EPS) -> torch.Tensor:
    if triton is None or not (x.is_cuda or interpreting()):
        raise RuntimeError("rms_silu_pad_triton needs Triton and a CUDA tensor (or TRITON_INTERPRET=1 for CPU "
                           "tensors)")
    _check(x, out, h, bias, residual, pad)
    B, C, T, H, W = x.shape
    Ho, Wo = out.shape[3:]
    P = B * T * Ho * Wo
    if P == 0 or C == 0:
        return out
    cp2 = triton.next_power_of_2(C)
    single = cp2 <= SINGLE_MAX_C
    block_c = cp2 if single else 128
    block_p = max(TILE // block_c, 1)
    zeros = (0,) * 5
    grid = (triton.cdiv(P, block_p),)
    _rms_silu_pad_kernel[grid](
        x, x if h is None else h, x if bias is None else bias, x if residual is None else residual, out,
        P, C, T, H, W, Ho, Wo,
        *x.stride(), *(zeros if h is None else h.stride()), *(zeros if residual is None else residual.stride()),
        *out.stride(), eps,
        HAS_H=h is not None, HAS_BIAS=bias is not None, HAS_RES=residual is not None, NORM=norm, PAD=pad,
        SINGLE=single, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=4,
    )
    return out


def rms_silu_pad(x: torch.Tensor, out: torch.Tensor, **kw) -> torch.Tensor:
    """See the module docstring; writes `out` (and `residual`) in place, returns `out`."""
    if triton is not None and x.is_cuda:
        return rms_silu_pad_triton(x, out, **kw)
    return rms_silu_pad_reference(x, out, **kw)
