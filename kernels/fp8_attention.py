"""Softmax attention with e4m3 operands: both products (Q·Kᵀ and P·V) on fp8 tensor cores (Hopper), fp32 softmax.

Used by the refiner's self- and cross-attention under fast path `refiner-fp8-attn` (the K/V window's fp8 copy and
`quantize_text` in engine/refiner/ar.py, the dispatch in `engine.refiner.model.Attention.output`); the plain path is
cuDNN's bf16 attention (`F.scaled_dot_product_attention`, `engine.refiner.model.two_segment_attention`).

Keys and values come as one or two *segments* (`QuantizedKV`), quantised with one scale per block of SCALE_BLOCK
(128) tokens, for K and for V (one pass: a block is read once; e4m3 is a floating-point format, so one scale per
128 tokens costs precision only below amax·2^-15, where values become subnormal):

    k_scale_b = max(max |K_jd| over the block's tokens j, 1e-12) / 448,   k_jd = e4m3(K_jd / k_scale_b(j))

The values are stored transposed, `v_t [B, H, D, M]` (tokens innermost), the layout the fp8 P·V product takes as
its second operand. A segment is quantised once and may be read by many forwards (the refiner's sink + history
window is quantised once a block); the block's own K/V are quantised per forward.

Per query row i (queries are quantised per row inside the kernel: `q_scale_i = max_d |q_id| / 448`), in base 2:

    s_ij = (q8_i · k8_j) · k_scale_b(j) · c_i,   c_i = q_scale_i · softmax_scale · log2(e)
    m_i = max_j s_ij,   p_ij = 2^(s_ij − m_i),   l_i = Σ_j p_ij                                     (fp32)
    out_i = r · Σ_j e4m3(256 · p_ij · v_scale_b(j) / r) · v8_jd / (256 · l_i),   r = max_b v_scale_b

Probabilities are quantised as p·256 (so that those down to 2^-14 stay normal numbers), each weighted by its value
block's scale over the largest (<= 1), so the product needs no correction per block; both factors are powers of
two or per-tile scalars taken inside the exponent: one FMA per score gives (q8·k8)·k_scale·c − m + 8 +
log2(v_scale / r). The kernel computes m_i, l_i and r online over key tiles (the flash-attention recurrence; r,
like m, rescales the accumulator when it grows), so it quantises p relative to the running maxima;
`fp8_attention_reference` runs the same recurrence over the same tiles in fp32 torch.

CPU (and any device without Triton): `fp8_attention_reference`, the same quantised maths in fp32 torch.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch reference serves
    triton = None

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
AMAX_FLOOR = 1e-12  # an all-zero row or block quantises to zeros with a finite scale
SCALE_UNIT = 1.0 / E4M3_MAX  # scale = amax · fp32(1/448)
P_SCALE = 256.0  # probabilities are quantised as p · 256 (module docstring)
LOG2_P_SCALE = 8.0
LOG2E = 1.4426950408889634
SCALE_BLOCK = 128  # tokens per K/V scale; kernel key tiles (BLOCK_N) divide it
HEAD_DIMS = (32, 64, 128, 256)  # head dims the Triton kernel takes (tl.dot on fp8 wants K >= 32, powers of two)

# Kernel launch configuration at the release shape (refiner: 2640 queries over 9680 + 2640 keys, 32 heads of 128):
# BLOCK_M query rows and BLOCK_N keys a step, warps, pipeline stages. tests/benchmarks/fp8_attention_probe.py sweeps.
# EXP16: p computed by ex2.approx.f16x2 from the exponent rounded to fp16 (relative error <= ~2^-9, far below the
# e4m3 rounding of p that follows) instead of the fp32 exp2.
# TMA: key/value tiles through tensor descriptors where their layout allows (else pointer loads).
DEFAULT_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3, "EXP16": False, "TMA": True}


def _config(block_m: int, block_n: int, warps: int, stages: int, exp16: bool, tma: bool) -> dict:
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": warps, "num_stages": stages, "EXP16": exp16,
            "TMA": tma}


# what tests/benchmarks/fp8_attention_probe.py times and tests/test_fp8_attention.py checks against the reference
# (session 10, H100: EXP16 was slower in every configuration, its fp16 conversions cost more than the MUFU issues
# saved; BLOCK_M 64 with 4 warps, two CTAs an SM, fastest)
SWEEP = {f"m{m} n{n} w{w} s{st}{' exp16' if e else ''}{' tma' if t else ''}": _config(m, n, w, st, e, t)
         for m, n, w, st, e in ((128, 128, 8, 3, False), (64, 128, 4, 2, False), (64, 128, 4, 3, False),
                                (64, 64, 4, 3, False), (64, 128, 4, 3, True))
         for t in (False, True)}


class QuantizedKV(NamedTuple):
    """One e4m3 K/V segment: `k [B, H, M, D]`, `k_scale [B, H, ceil(M / SCALE_BLOCK)]` fp32 (K ≈ k · k_scale of the
    token's block), `v_t [B, H, D, M]` (values transposed), `v_scale` as `k_scale`. Leading dims may be views into
    a larger (per-layer) buffer."""

    k: Tensor
    k_scale: Tensor
    v_t: Tensor
    v_scale: Tensor

    @property
    def tokens(self) -> int:
        return self.k.shape[-2]


# ------------------------------------------------------------------------------------------ quantisation


def _blocks(m: int) -> int:
    return -(-m // SCALE_BLOCK)


def _block_amax(x: Tensor) -> Tensor:
    """`x [..., M, D]` -> `max(max |x|, floor)` per block of SCALE_BLOCK tokens, fp32 `[..., ceil(M / 128)]` (NaN
    propagates)."""
    m = x.shape[-2]
    pad = _blocks(m) * SCALE_BLOCK - m
    xp = torch.nn.functional.pad(x, (0, 0, 0, pad)) if pad else x
    blocks = xp.unflatten(-2, (-1, SCALE_BLOCK))  # [..., nb, 128, D]
    amax = torch.linalg.vector_norm(blocks, ord=math.inf, dim=(-2, -1), dtype=torch.float32)
    return amax.clamp_min(AMAX_FLOOR)


def _inverse_unit(amax: Tensor) -> Tensor:
    # reciprocal then product, each rounded once in fp32: the Triton quantiser computes exactly this value
    return amax.reciprocal() * E4M3_MAX


def quantize_kv_reference(k: Tensor, v: Tensor) -> QuantizedKV:
    """`k, v [..., M, D]` (any float dtype) -> `QuantizedKV` with one scale per SCALE_BLOCK tokens, plain torch."""
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have one shape [..., M, D]")
    m = k.shape[-2]

    def q(x: Tensor) -> tuple[Tensor, Tensor]:
        amax = _block_amax(x)
        inv = _inverse_unit(amax).repeat_interleave(SCALE_BLOCK, dim=-1)[..., :m]
        return (x.float() * inv[..., None]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), amax * SCALE_UNIT

    (qk, sk), (qv, sv) = q(k), q(v)
    return QuantizedKV(qk, sk, qv.transpose(-1, -2).contiguous(), sv)


if triton is not None:

    @triton.jit
    def _quantize_kv_kernel(x_ptr, q_ptr, sc_ptr, H, M, sx_o, sx_h, sx_m, sq_o, sq_h, sq_m, sq_d, ss_o, ss_h,
                            D: tl.constexpr, BLOCK: tl.constexpr, FP8_MAX: tl.constexpr, FLOOR: tl.constexpr,
                            UNIT: tl.constexpr):
        # One program per (slab, block of BLOCK tokens): x [O, H, M, D] (D dense) -> q at strides (sq_m, sq_d) per
        # element (K as [.., M, D], V transposed as [.., D, M]) and the block's scale at sc [O, H, blocks].
        s = tl.program_id(0)
        blk = tl.program_id(1)
        o, h = (s // H).to(tl.int64), s % H
        rows = blk * BLOCK + tl.arange(0, BLOCK)
        cols = tl.arange(0, D)
        ok = rows[:, None] < M
        x = tl.load(x_ptr + o * sx_o + h * sx_h + rows[:, None] * sx_m + cols[None, :], mask=ok,
                    other=0.0).to(tl.float32)
        amax = tl.maximum(tl.max(tl.max(tl.abs(x), 1), 0), FLOOR, propagate_nan=tl.PropagateNan.ALL)
        inv = tl.math.div_rn(tl.full([], 1.0, tl.float32), amax) * FP8_MAX  # IEEE reciprocal, as torch's
        q = tl.clamp(x * inv, -FP8_MAX, FP8_MAX, propagate_nan=tl.PropagateNan.ALL)
        tl.store(q_ptr + o * sq_o + h * sq_h + rows[:, None] * sq_m + cols[None, :] * sq_d,
                 q.to(q_ptr.dtype.element_ty), mask=ok)
        tl.store(sc_ptr + o * ss_o + h * ss_h + blk, amax * UNIT)


def _as_slabs(x: Tensor, tail: int) -> Tensor:
    """`[..., H, *tail dims]` -> a `[O, H, ...]` view (the leading dims merged; no copy where the strides allow)."""
    if x.ndim < tail + 1:
        raise ValueError(f"K/V shape {tuple(x.shape)}; expected [..., H, M, D]")
    try:
        return x.view(-1, *x.shape[-tail - 1:])
    except RuntimeError:
        return x.reshape(-1, *x.shape[-tail - 1:])


def _launch_quantize(x: Tensor, out: Tensor, scale: Tensor, transposed: bool) -> None:
    xs, os_, ss = _as_slabs(x, 2), _as_slabs(out, 2), _as_slabs(scale, 1)
    if xs.stride(-1) != 1:
        xs = xs.contiguous()
    o, h, m, d = xs.shape
    if m == 0 or o * h == 0:
        return
    if ss.stride(-1) != 1 or ss.data_ptr() != scale.data_ptr() or os_.data_ptr() != out.data_ptr():
        raise ValueError("quantize_kv_into writes through views: the output buffers must merge their leading dims")
    sq = os_.stride()
    sq_m, sq_d = (sq[3], sq[2]) if transposed else (sq[2], sq[3])
    _quantize_kv_kernel[(o * h, _blocks(m))](
        xs, os_, ss, h, m, xs.stride(0), xs.stride(1), xs.stride(2), sq[0], sq[1], sq_m, sq_d, ss.stride(0),
        ss.stride(1), D=d, BLOCK=SCALE_BLOCK, FP8_MAX=E4M3_MAX, FLOOR=AMAX_FLOOR, UNIT=SCALE_UNIT,
        num_warps=8 if d >= 128 else 4)


def quantize_kv_into(k: Tensor, v: Tensor, out: QuantizedKV) -> QuantizedKV:
    """Quantise `k, v [..., M, D]` into the buffers of `out` (same leading dims and M; `out.v_t` `[..., D, M]`,
    scales `[..., ceil(M / SCALE_BLOCK)]`), as `quantize_kv_reference` does: Triton on CUDA (bit-equal to the
    reference), the reference elsewhere. Returns `out`."""
    lead, (m, d) = tuple(k.shape[:-2]), k.shape[-2:]
    nb = _blocks(m)
    if (k.shape != v.shape or out.k.shape != k.shape or out.v_t.shape != (*lead, d, m)
            or out.k_scale.shape != (*lead, nb) or out.v_scale.shape != (*lead, nb)):
        raise ValueError(f"quantize_kv_into: k {tuple(k.shape)}, v {tuple(v.shape)} into k {tuple(out.k.shape)}, "
                         f"v_t {tuple(out.v_t.shape)}, scales {tuple(out.k_scale.shape)} / {tuple(out.v_scale.shape)}")
    if triton is not None and k.is_cuda and d in HEAD_DIMS:
        _launch_quantize(k, out.k, out.k_scale, transposed=False)
        _launch_quantize(v, out.v_t, out.v_scale, transposed=True)
    else:
        ref = quantize_kv_reference(k, v)
        for dst, src in zip(out, ref, strict=True):
            dst.copy_(src)
    return out


def empty_quantized(lead: tuple[int, ...], tokens: int, head_dim: int, device) -> QuantizedKV:
    """Uninitialised `QuantizedKV` buffers: `k [*lead, tokens, D]`, `v_t [*lead, D, tokens]`, scales
    `[*lead, ceil(tokens / SCALE_BLOCK)]`."""
    return QuantizedKV(
        torch.empty((*lead, tokens, head_dim), dtype=E4M3, device=device),
        torch.empty((*lead, _blocks(tokens)), dtype=torch.float32, device=device),
        torch.empty((*lead, head_dim, tokens), dtype=E4M3, device=device),
        torch.empty((*lead, _blocks(tokens)), dtype=torch.float32, device=device),
    )


@torch.library.custom_op("sana_wm::quantize_kv", mutates_args=())
def _quantize_kv_op(k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    out = empty_quantized(tuple(k.shape[:-2]), k.shape[-2], k.shape[-1], k.device)
    return tuple(quantize_kv_into(k, v, out))


@_quantize_kv_op.register_fake
def _(k, v):
    return tuple(empty_quantized(tuple(k.shape[:-2]), k.shape[-2], k.shape[-1], k.device))


def quantize_kv(k: Tensor, v: Tensor) -> QuantizedKV:
    """`quantize_kv_reference`, through the Triton quantiser on CUDA (bit-equal); one opaque op under
    torch.compile."""
    return QuantizedKV(*_quantize_kv_op(k, v))


def segment_view(seg: QuantizedKV, tokens: int) -> QuantizedKV:
    """The first `tokens` keys/values of a segment (views)."""
    nb = _blocks(tokens)
    return QuantizedKV(seg.k[..., :tokens, :], seg.k_scale[..., :nb], seg.v_t[..., :tokens], seg.v_scale[..., :nb])


# ------------------------------------------------------------------------------------------ attention: reference


def quantize_rows_e4m3(x: Tensor) -> tuple[Tensor, Tensor]:
    """`x [..., K]` (any float dtype) -> (`q` e4m3, `scale [..., 1]` fp32), x ≈ q·scale, one scale per row (its amax
    / 448), in plain torch: how the kernel quantises its query tile, and the fp8 linears' activations
    (engine/fast/refiner_fp8.py). A NaN in a row makes that row's q NaN (it is not hidden)."""
    amax = torch.linalg.vector_norm(x, ord=math.inf, dim=-1, keepdim=True, dtype=torch.float32).clamp_min(AMAX_FLOOR)
    q = (x.float() * _inverse_unit(amax)).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q, amax * SCALE_UNIT


def fp8_attention_reference(q: Tensor, segments: list[QuantizedKV] | tuple[QuantizedKV, ...],
                            scale: float | None = None, block_n: int | None = None,
                            exp16: bool | None = None) -> Tensor:
    """What the kernel computes, in fp32 torch (any device): `q [B, H, N, D]` over the keys of all `segments` taken
    as one set -> `[B, H, N, D]` in q's dtype. The same recurrence over key tiles of `block_n` (default: the
    kernel's) restarting at each segment, so p is quantised relative to the same running maxima; only the order of
    the fp32 sums and the last ulp of exp2 differ from the kernel. `exp16` (default: the kernel's): the exponent
    rounded to fp16 and its power of two to fp16, as the kernel's EXP16 computes it (its ex2.approx.f16x2 may
    differ by an ulp)."""
    d = q.shape[-1]
    scale = d ** -0.5 if scale is None else scale
    block_n = DEFAULT_CONFIG["BLOCK_N"] if block_n is None else block_n
    if SCALE_BLOCK % block_n:
        raise ValueError(f"key tiles of {block_n}; they must divide the scale blocks of {SCALE_BLOCK}")
    exp16 = DEFAULT_CONFIG["EXP16"] if exp16 is None else exp16
    q8, qs = quantize_rows_e4m3(q)
    q8 = q8.float()
    unit = qs[..., 0] * (scale * LOG2E)  # [B, H, N]
    m = torch.full(q.shape[:-1], -math.inf, device=q.device)
    l = torch.zeros(q.shape[:-1], device=q.device)
    r = torch.zeros(q.shape[:-2], device=q.device)  # running max of the value scales, per (batch, head)
    acc = torch.zeros(q.shape, device=q.device)
    for seg in segments:
        for start in range(0, seg.tokens, block_n):
            k = seg.k[..., start : start + block_n, :].float()
            v = seg.v_t[..., start : start + block_n].float().transpose(-1, -2)
            ks, vs = seg.k_scale[..., start // SCALE_BLOCK], seg.v_scale[..., start // SCALE_BLOCK]  # [B, H]
            s = q8 @ k.transpose(-1, -2)
            c = unit * ks[..., None]  # [B, H, N]
            m_new = torch.maximum(m, s.amax(dim=-1) * c)
            r_new = torch.maximum(r, vs)
            alpha = torch.exp2(m - m_new)
            w = vs / r_new  # [B, H], <= 1
            x = s * c[..., None] - (m_new - LOG2_P_SCALE - torch.log2(w)[..., None])[..., None]  # 2^x = 256·p·w
            p = torch.exp2(x.half().float()).half().float() if exp16 else torch.exp2(x)
            l = l * alpha + p.sum(dim=-1) / w[..., None]
            acc = acc * (alpha * (r / r_new)[..., None])[..., None] + p.to(E4M3).float() @ v
            m, r = m_new, r_new
    return (acc * (r[..., None, None] / l[..., None])).to(q.dtype)


# ------------------------------------------------------------------------------------------ attention: Triton

if triton is not None:

    @triton.jit
    def _exp2_f16(x):
        # 2^x of an fp16 tensor, two elements per ex2.approx.f16x2 (half the MUFU issues of the fp32 exp2)
        return tl.inline_asm_elementwise("ex2.approx.f16x2 $0, $1;", "=r,r", [x], dtype=tl.float16, is_pure=True,
                                         pack=2)

    @triton.jit
    def _online_step(acc, m_i, l_i, r, s, vt, ks, vs, cols, M, row_scale, MASK: tl.constexpr,
                     LOG2_PSCALE: tl.constexpr, EXP16: tl.constexpr):
        # s: raw products q8·k8 of a key tile [BLOCK_M, BLOCK_N]; vt: its values [D, BLOCK_N] (e4m3); ks, vs: the
        # tile's key and value scales (scalars: a tile lies in one scale block); r: the running max of the value
        # scales (a scalar).
        if MASK:
            s = tl.where(cols[None, :] < M, s, float("-inf"))
        c = row_scale * ks
        m_new = tl.maximum(m_i, tl.max(s, 1) * c)
        r_new = tl.maximum(r, vs)
        w = vs / r_new  # <= 1: the tile's value scale relative to the largest so far
        alpha = tl.math.exp2(m_i - m_new)
        x = tl.fma(s, c[:, None], (LOG2_PSCALE + tl.math.log2(w) - m_new)[:, None])  # 2^x = PSCALE·p·w
        if EXP16:
            p = _exp2_f16(x.to(tl.float16)).to(tl.float32)
        else:
            p = tl.math.exp2(x)
        l_i = l_i * alpha + tl.sum(p, 1) * (1.0 / w)
        acc = acc * (alpha * (r / r_new))[:, None]
        acc = tl.dot(p.to(tl.float8e4nv), tl.trans(vt), acc)
        return acc, m_new, l_i, r_new

    @triton.jit
    def _tile_scales(ks_base, vs_base, start, BLOCK: tl.constexpr):
        return tl.load(ks_base + start // BLOCK), tl.load(vs_base + start // BLOCK)

    @triton.jit
    def _attend_tile(acc, m_i, l_i, r, q8, row_scale, k_base, v_base, ks, vs, start, M, sk_m, sv_d, offs_n, offs_d,
                     MASK: tl.constexpr, LOG2_PSCALE: tl.constexpr, EXP16: tl.constexpr):
        cols = start + offs_n
        if MASK:
            k = tl.load(k_base + cols[:, None] * sk_m + offs_d[None, :], mask=cols[:, None] < M, other=0.0)
            vt = tl.load(v_base + offs_d[:, None] * sv_d + cols[None, :], mask=cols[None, :] < M, other=0.0)
        else:
            k = tl.load(k_base + cols[:, None] * sk_m + offs_d[None, :])
            vt = tl.load(v_base + offs_d[:, None] * sv_d + cols[None, :])
        s = tl.dot(q8, tl.trans(k))
        return _online_step(acc, m_i, l_i, r, s, vt, ks, vs, cols, M, row_scale, MASK, LOG2_PSCALE, EXP16)

    @triton.jit
    def _attend_segment(acc, m_i, l_i, r, q8, row_scale, k_base, v_base, ks_base, vs_base, M, sk_m, sv_d, offs_n,
                        offs_d, BLOCK_N: tl.constexpr, LOG2_PSCALE: tl.constexpr, EXP16: tl.constexpr,
                        SBLOCK: tl.constexpr):
        # the scales of the next tile are loaded one iteration ahead (their latency off the softmax's path)
        full = (M // BLOCK_N) * BLOCK_N
        ks, vs = _tile_scales(ks_base, vs_base, 0, SBLOCK)
        for start in range(0, full, BLOCK_N):
            ks_next, vs_next = _tile_scales(ks_base, vs_base, tl.minimum(start + BLOCK_N, M - 1), SBLOCK)
            acc, m_i, l_i, r = _attend_tile(acc, m_i, l_i, r, q8, row_scale, k_base, v_base, ks, vs, start, M,
                                            sk_m, sv_d, offs_n, offs_d, False, LOG2_PSCALE, EXP16)
            ks, vs = ks_next, vs_next
        if full < M:
            acc, m_i, l_i, r = _attend_tile(acc, m_i, l_i, r, q8, row_scale, k_base, v_base, ks, vs, full, M,
                                            sk_m, sv_d, offs_n, offs_d, True, LOG2_PSCALE, EXP16)
        return acc, m_i, l_i, r

    @triton.jit
    def _attend_segment_tma(acc, m_i, l_i, r, q8, row_scale, k_desc, v_desc, ks_base, vs_base, b, h, M, offs_n,
                            BLOCK_N: tl.constexpr, D: tl.constexpr, LOG2_PSCALE: tl.constexpr,
                            EXP16: tl.constexpr, SBLOCK: tl.constexpr):
        # TMA loads: tiles past M come back as zeros (the descriptors' shape ends at M), so only the scores of the
        # last tile are masked; the scales of the next tile are loaded one iteration ahead
        full = (M // BLOCK_N) * BLOCK_N
        ks, vs = _tile_scales(ks_base, vs_base, 0, SBLOCK)
        for start in range(0, full, BLOCK_N):
            ks_next, vs_next = _tile_scales(ks_base, vs_base, tl.minimum(start + BLOCK_N, M - 1), SBLOCK)
            k = k_desc.load([b, h, start, 0]).reshape(BLOCK_N, D)
            vt = v_desc.load([b, h, 0, start]).reshape(D, BLOCK_N)
            s = tl.dot(q8, tl.trans(k))
            acc, m_i, l_i, r = _online_step(acc, m_i, l_i, r, s, vt, ks, vs, start + offs_n, M, row_scale, False,
                                            LOG2_PSCALE, EXP16)
            ks, vs = ks_next, vs_next
        if full < M:
            k = k_desc.load([b, h, full, 0]).reshape(BLOCK_N, D)
            vt = v_desc.load([b, h, 0, full]).reshape(D, BLOCK_N)
            s = tl.dot(q8, tl.trans(k))
            acc, m_i, l_i, r = _online_step(acc, m_i, l_i, r, s, vt, ks, vs, full + offs_n, M, row_scale, True,
                                            LOG2_PSCALE, EXP16)
        return acc, m_i, l_i, r

    @triton.jit
    def _start(q_ptr, H, N, sq_b, sq_h, sq_n, qk_scale, D: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, FP8_MAX: tl.constexpr, FLOOR: tl.constexpr):
        """A program's (query tile, batch·head), from grid (query tiles, B·H): its indices, the query tile quantised
        per row (q8 [BLOCK_M, D] e4m3, q_scale · softmax scale · log2(e) per row) and the empty online-softmax state
        (row max, row sum, value-scale max r, accumulator)."""
        bh = tl.program_id(1)
        b, h = bh // H, bh % H
        b64 = b.to(tl.int64)
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        q = tl.load(q_ptr + b64 * sq_b + h * sq_h + offs_m[:, None] * sq_n + offs_d[None, :],
                    mask=offs_m[:, None] < N, other=0.0).to(tl.float32)
        amax = tl.maximum(tl.max(tl.abs(q), 1), FLOOR)
        inv = tl.math.div_rn(tl.full(amax.shape, 1.0, tl.float32), amax) * FP8_MAX
        q8 = tl.clamp(q * inv[:, None], -FP8_MAX, FP8_MAX).to(tl.float8e4nv)
        row_scale = amax * (1.0 / FP8_MAX) * qk_scale
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        r = tl.zeros([], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        return b, h, b64, offs_m, offs_n, offs_d, q8, row_scale, m_i, l_i, r, acc

    @triton.jit
    def _finish(o_ptr, acc, l_i, r, b64, h, offs_m, offs_d, N, so_b, so_n, so_h):
        """out = acc · r / l into `[B, N, H, D]` memory."""
        out = acc * (r / l_i)[:, None]
        tl.store(o_ptr + b64 * so_b + offs_m[:, None] * so_n + h * so_h + offs_d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=offs_m[:, None] < N)

    @triton.jit
    def _fp8_attention_kernel(
        q_ptr, k1_ptr, ks1_ptr, v1_ptr, vs1_ptr, k2_ptr, ks2_ptr, v2_ptr, vs2_ptr, o_ptr,
        H, N, M1, M2, qk_scale,
        sq_b, sq_h, sq_n, sk1_b, sk1_h, sk1_m, sv1_b, sv1_h, sv1_d, ss1_b, ss1_h,
        sk2_b, sk2_h, sk2_m, sv2_b, sv2_h, sv2_d, ss2_b, ss2_h, so_b, so_n, so_h,
        D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TWO: tl.constexpr,
        FP8_MAX: tl.constexpr, FLOOR: tl.constexpr, LOG2_PSCALE: tl.constexpr, EXP16: tl.constexpr,
        SBLOCK: tl.constexpr,
    ):
        # grid: (query tiles, B·H); scales [B, H, blocks] with block stride 1
        b, h, b64, offs_m, offs_n, offs_d, q8, row_scale, m_i, l_i, r, acc = _start(
            q_ptr, H, N, sq_b, sq_h, sq_n, qk_scale, D, BLOCK_M, BLOCK_N, FP8_MAX, FLOOR)
        acc, m_i, l_i, r = _attend_segment(acc, m_i, l_i, r, q8, row_scale, k1_ptr + b64 * sk1_b + h * sk1_h,
                                           v1_ptr + b64 * sv1_b + h * sv1_h, ks1_ptr + b64 * ss1_b + h * ss1_h,
                                           vs1_ptr + b64 * ss1_b + h * ss1_h, M1, sk1_m, sv1_d, offs_n, offs_d,
                                           BLOCK_N, LOG2_PSCALE, EXP16, SBLOCK)
        if TWO:
            acc, m_i, l_i, r = _attend_segment(acc, m_i, l_i, r, q8, row_scale, k2_ptr + b64 * sk2_b + h * sk2_h,
                                               v2_ptr + b64 * sv2_b + h * sv2_h, ks2_ptr + b64 * ss2_b + h * ss2_h,
                                               vs2_ptr + b64 * ss2_b + h * ss2_h, M2, sk2_m, sv2_d, offs_n, offs_d,
                                               BLOCK_N, LOG2_PSCALE, EXP16, SBLOCK)
        _finish(o_ptr, acc, l_i, r, b64, h, offs_m, offs_d, N, so_b, so_n, so_h)

    @triton.jit
    def _fp8_attention_tma_kernel(
        q_ptr, k1_desc, ks1_ptr, v1_desc, vs1_ptr, k2_desc, ks2_ptr, v2_desc, vs2_ptr, o_ptr,
        H, N, M1, M2, qk_scale, sq_b, sq_h, sq_n, ss1_b, ss1_h, ss2_b, ss2_h, so_b, so_n, so_h,
        D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TWO: tl.constexpr,
        FP8_MAX: tl.constexpr, FLOOR: tl.constexpr, LOG2_PSCALE: tl.constexpr, EXP16: tl.constexpr,
        SBLOCK: tl.constexpr,
    ):
        # `_fp8_attention_kernel` with the key and value tiles brought by the tensor memory accelerator (4-D
        # descriptors [B, H, M, D] and [B, H, D, M]): no address registers, asynchronous bulk copies
        b, h, b64, offs_m, offs_n, offs_d, q8, row_scale, m_i, l_i, r, acc = _start(
            q_ptr, H, N, sq_b, sq_h, sq_n, qk_scale, D, BLOCK_M, BLOCK_N, FP8_MAX, FLOOR)
        acc, m_i, l_i, r = _attend_segment_tma(acc, m_i, l_i, r, q8, row_scale, k1_desc, v1_desc,
                                               ks1_ptr + b64 * ss1_b + h * ss1_h, vs1_ptr + b64 * ss1_b + h * ss1_h,
                                               b, h, M1, offs_n, BLOCK_N, D, LOG2_PSCALE, EXP16, SBLOCK)
        if TWO:
            acc, m_i, l_i, r = _attend_segment_tma(acc, m_i, l_i, r, q8, row_scale, k2_desc, v2_desc,
                                                   ks2_ptr + b64 * ss2_b + h * ss2_h,
                                                   vs2_ptr + b64 * ss2_b + h * ss2_h, b, h, M2, offs_n, BLOCK_N, D,
                                                   LOG2_PSCALE, EXP16, SBLOCK)
        _finish(o_ptr, acc, l_i, r, b64, h, offs_m, offs_d, N, so_b, so_n, so_h)


def _tma_descriptors(seg: QuantizedKV, block_n: int):
    """Host-side TMA descriptors of a segment's k `[B, H, M, D]` and v_t `[B, H, D, M]`, or None where the layout
    does not allow them (16-byte aligned base and strides)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    k, vt = seg.k, seg.v_t
    d, m = k.shape[-1], k.shape[-2]
    if m == 0:
        return None
    for t in (k, vt):
        if t.data_ptr() % 16 or any(st % 16 for st in t.stride()[:-1]):
            return None
    return (TensorDescriptor(k, list(k.shape), list(k.stride()), [1, 1, block_n, d]),
            TensorDescriptor(vt, list(vt.shape), list(vt.stride()), [1, 1, d, block_n]))


def _check_segment(q: Tensor, seg: QuantizedKV, i: int) -> None:
    b, h, _, d = q.shape
    m = seg.k.shape[-2]
    want = {"k": (b, h, m, d), "v_t": (b, h, d, m), "k_scale": (b, h, _blocks(m)), "v_scale": (b, h, _blocks(m))}
    for name, shape in want.items():
        t = getattr(seg, name)
        if tuple(t.shape) != shape:
            raise ValueError(f"segment {i} {name} shape {tuple(t.shape)}; expected {shape} for q {tuple(q.shape)}")
    if seg.k.dtype != E4M3 or seg.v_t.dtype != E4M3:
        raise ValueError(f"segment {i} is {seg.k.dtype}/{seg.v_t.dtype}; expected {E4M3}")
    if seg.k_scale.dtype != torch.float32 or seg.v_scale.dtype != torch.float32:
        raise ValueError(f"segment {i} scales are {seg.k_scale.dtype}/{seg.v_scale.dtype}; expected fp32")
    dense = [seg.k.stride(-1), seg.v_t.stride(-1), seg.k_scale.stride(-1), seg.v_scale.stride(-1)]
    if dense != [1, 1, 1, 1] or seg.k_scale.stride() != seg.v_scale.stride():
        raise ValueError(f"segment {i}: k, v_t and the scales need a dense last dim, the two scales one layout "
                         f"(strides {seg.k.stride()}, {seg.v_t.stride()}, {seg.k_scale.stride()}, "
                         f"{seg.v_scale.stride()})")


def fp8_attention_triton(q: Tensor, segments, scale: float | None = None, config: dict | None = None) -> Tensor:
    """The kernel on CUDA: `q [B, H, N, D]` (bf16/fp16, any strides with a dense last dim) over 1 or 2 segments ->
    `[B, H, N, D]` in q's dtype (a view of `[B, N, H, D]` memory: `.transpose(1, 2)` of it is contiguous)."""
    if triton is None or not q.is_cuda:
        raise RuntimeError("fp8_attention_triton needs Triton and a CUDA tensor")
    if not 1 <= len(segments) <= 2:
        raise ValueError(f"{len(segments)} segments; the kernel takes 1 or 2")
    b, h, n, d = q.shape
    if d not in HEAD_DIMS:
        raise ValueError(f"head dim {d}; the kernel takes {HEAD_DIMS}")
    for i, seg in enumerate(segments):
        _check_segment(q, seg, i)
    if sum(seg.tokens for seg in segments) == 0:
        raise ValueError("fp8 attention over no keys")
    if q.stride(-1) != 1:
        q = q.contiguous()
    cfg = {**DEFAULT_CONFIG, **(config or {})}
    if SCALE_BLOCK % cfg["BLOCK_N"]:
        raise ValueError(f"BLOCK_N {cfg['BLOCK_N']}; key tiles must divide the scale blocks of {SCALE_BLOCK}")
    segments = [seg for seg in segments if seg.tokens > 0]  # an empty segment adds nothing
    s1 = segments[0]
    s2 = segments[1] if len(segments) == 2 else s1
    out = torch.empty((b, n, h, d), dtype=q.dtype, device=q.device)
    scale = d ** -0.5 if scale is None else scale
    grid = (triton.cdiv(n, cfg["BLOCK_M"]), b * h)
    consts = dict(D=d, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], TWO=len(segments) == 2, FP8_MAX=E4M3_MAX,
                  FLOOR=AMAX_FLOOR, LOG2_PSCALE=LOG2_P_SCALE, EXP16=cfg["EXP16"], SBLOCK=SCALE_BLOCK,
                  num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    scales = (s1.k_scale.stride(0), s1.k_scale.stride(1), s2.k_scale.stride(0), s2.k_scale.stride(1))
    descs = [_tma_descriptors(seg, cfg["BLOCK_N"]) for seg in (s1, s2)] if cfg["TMA"] else [None]
    if all(dd is not None for dd in descs):
        (k1d, v1d), (k2d, v2d) = descs
        _fp8_attention_tma_kernel[grid](
            q, k1d, s1.k_scale, v1d, s1.v_scale, k2d, s2.k_scale, v2d, s2.v_scale, out, h, n, s1.tokens,
            s2.tokens, scale * LOG2E, q.stride(0), q.stride(1), q.stride(2), *scales, out.stride(0), out.stride(1),
            out.stride(2), **consts)
        return out.transpose(1, 2)
    _fp8_attention_kernel[grid](
        q, s1.k, s1.k_scale, s1.v_t, s1.v_scale, s2.k, s2.k_scale, s2.v_t, s2.v_scale, out,
        h, n, s1.tokens, s2.tokens, scale * LOG2E, q.stride(0), q.stride(1), q.stride(2),
        s1.k.stride(0), s1.k.stride(1), s1.k.stride(2), s1.v_t.stride(0), s1.v_t.stride(1), s1.v_t.stride(2),
        scales[0], scales[1],
        s2.k.stride(0), s2.k.stride(1), s2.k.stride(2), s2.v_t.stride(0), s2.v_t.stride(1), s2.v_t.stride(2),
        scales[2], scales[3], out.stride(0), out.stride(1), out.stride(2), **consts)
    return out.transpose(1, 2)


def kernel_applies(q: Tensor) -> bool:
    return triton is not None and q.is_cuda and q.shape[-1] in HEAD_DIMS and q.dtype in (torch.bfloat16,
                                                                                         torch.float16)


# torch custom op: opaque to dynamo (the compiled refiner block calls it whole), CUDA-graph friendly --------------


@torch.library.custom_op("sana_wm::fp8_attention", mutates_args=())
def _fp8_attention_op(q: Tensor, k1: Tensor, ks1: Tensor, v1: Tensor, vs1: Tensor, k2: Tensor | None,
                      ks2: Tensor | None, v2: Tensor | None, vs2: Tensor | None) -> Tensor:
    segs = [QuantizedKV(k1, ks1, v1, vs1)] + ([QuantizedKV(k2, ks2, v2, vs2)] if k2 is not None else [])
    if kernel_applies(q):
        return fp8_attention_triton(q, segs).transpose(1, 2).contiguous()
    return fp8_attention_reference(q, segs).transpose(1, 2).contiguous()


@_fp8_attention_op.register_fake
def _(q, k1, ks1, v1, vs1, k2, ks2, v2, vs2):
    b, h, n, d = q.shape
    return q.new_empty(b, n, h, d)


def fp8_attention(q: Tensor, segments) -> Tensor:
    """Attention of `q [B, H, N, D]` over the keys of 1 or 2 `QuantizedKV` segments as one set, default scale ->
    `[B, H, N, D]` (a view of `[B, N, H, D]` memory). The Triton kernel where it applies (CUDA, bf16/fp16, head dim
    in HEAD_DIMS), else `fp8_attention_reference`."""
    if not 1 <= len(segments) <= 2:
        raise ValueError(f"{len(segments)} segments; fp8 attention takes 1 or 2")
    s1 = segments[0]
    s2 = segments[1] if len(segments) == 2 else QuantizedKV(None, None, None, None)
    return _fp8_attention_op(q, *s1, *s2).transpose(1, 2)


def fp8_segment_attention(q: Tensor, ks: tuple, vs: tuple) -> Tensor:
    """Attention over segments given as `ks`/`vs` tuples where a segment is a `QuantizedKV` in `ks` (its `vs`
    entry, the same object or None, is not read) or a bf16 pair `k, v [B, H, M, D]`, quantised here
    (`quantize_kv`)."""
    segs = [k if isinstance(k, QuantizedKV) else quantize_kv(k, v) for k, v in zip(ks, vs, strict=True)]
    return fp8_attention(q, segs)
