"""fp8 (e4m3) GEMMs for the refiner's transformer blocks: opt-in, never a default (plain path: bf16 `nn.Linear`).

`use_fp8_linears(model)` swaps the block linears of a `RefinerTransformer` (attn1/attn2 q, k, v, out and the two
FFN projections: ~99% of the refiner's GEMM FLOPs and weight bytes) for `Fp8Linear` in place and drops their
bf16 weights, so the refiner's weights take about half the memory. `Fp8Linear` holds the weight as e4m3 with one
fp32 scale per output channel (quantised once); each call quantises the activation per token (rowwise amax ->
scale, on the GPU: no host sync, CUDA-graph capturable) and runs `torch._scaled_mm` with rowwise scales, the bias
fused and a bf16 (the model's dtype) output. On a device without fp8 GEMMs (the CPU) the same module emulates the
maths (e4m3 values, fp32 products and sums), so the quantisation is testable anywhere.

Quantisation, per row r of an `[M, K]` operand (activation rows are tokens, weight rows output channels):

    amax_r = max(max_k |x_rk|, 1e-12),   q_rk = e4m3(clamp(x_rk · (448 / amax_r), ±448)),   scale_r = amax_r / 448

so x ≈ q · scale with a relative rounding error of at most 2^-4 per element (3 mantissa bits) in e4m3's normal
range (|q| >= 2^-6) and an absolute one of at most 2^-10 · scale below it.

The FFN's GELU moves into the down projection's quantiser (`Fp8Linear(act="gelu_tanh")`, the up projection's
module becomes `PreActivation`): the quantiser reads the up projection's bf16 output once, applies the GELU in fp32
and quantises, where the plain order would write the GELU's output and read it again (on the H100, ~60 us a
block). Self-attention's q, k and v become one `Fp8Linear` over their concatenated weights (`attn1.to_qkv`, used by
`Attention.qkv`; the three keep their names as views of its buffers): the input is quantised once, not three times.
`fp8_quality_delta` swaps and fuses the same way, so it measures what runs.

What stays in the model's dtype, and why: `proj_in` (K = 128 latent channels) and `proj_out` (writes the velocity
itself, N = 128), the timestep embedder and adaLN (one token per sample: no GEMM to speed up, and their outputs
scale and gate every block's residual branches), `caption_projection` (once per prompt), the attention gates
(`to_gate_logits`: N = heads, a per-head sigmoid) and every norm. Together they are < 1% of a forward's FLOPs.
Linears whose K or N is not a multiple of 16 (`_scaled_mm`'s alignment) also stay.

`fp8_quality_delta` / `refiner_fp8_quality` measure what the swap costs in accuracy (relative error of each block
output and of a whole forward vs the unswapped model, same inputs) without changing the model, block by block, so
a release-size refiner needs memory for one extra block only. Knows nothing of sessions or the bench's report.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn

from engine.errors import InputError
from engine.refiner.ar import quantize_text_layer, text_attends_in_fp8
from engine.refiner.model import ExplicitKV, GELUProj, RefinerTransformer, SelfAttentionKV
from kernels.fp8_attention import AMAX_FLOOR, E4M3, E4M3_MAX, SCALE_UNIT, quantize_kv, quantize_rows_e4m3

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch quantiser serves
    triton = None

ALIGN = 16  # _scaled_mm needs K and N multiples of 16
ONE_PASS_MAX_K = 16384  # rows up to this many columns are quantised from registers, loaded once (16 warps: 32 each)
# _scaled_mm's use_fast_accum: Hopper's fp8 tensor-core sums are never promoted to fp32. Default on: it adds ~3e-3
# relative error at K = 16384 against ~3.7e-2 from the e4m3 rounding itself, and makes the GEMMs ~15% faster
# (H100, release shapes; see tests/test_refiner_fp8.py).
FAST_ACCUM = True

# Linears of a RefinerBlock that may run in fp8, by their name inside the block (checkpoint layout).
# attn2.to_k / to_v run once per prompt (prepare_text) but hold 1/8 of the block weights: swapped for the memory.
BLOCK_LINEARS = (
    "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
    "ff.net.0.proj", "ff.net.2",
)


# ------------------------------------------------------------------------------------------ quantisation


ACTIVATIONS = (None, "gelu_tanh")  # what a quantiser may apply to its input first (fp32, before the amax)


def _activate(x: Tensor, act: str | None) -> Tensor:
    if act not in ACTIVATIONS:
        raise InputError(f"quantiser activation {act!r}; accepted: {list(ACTIVATIONS)}")
    return x if act is None else torch.nn.functional.gelu(x.float(), approximate="tanh")


def quantize_rows_reference(x: Tensor, act: str | None = None) -> tuple[Tensor, Tensor]:
    """`x [M, K]` (any float dtype) -> (`q [M, K]` e4m3, `scale [M, 1]` fp32), x ≈ q·scale, in plain torch (fp32).
    `act="gelu_tanh"`: quantise gelu_tanh(x) computed in fp32 (no rounding to x's dtype between). A NaN in a row
    makes that row's q NaN (it is not hidden)."""
    # reciprocal then products, each rounded once in fp32: the Triton kernel does exactly these ops (bit-equal)
    return quantize_rows_e4m3(_activate(x, act))


if triton is not None:

    @triton.jit
    def _max_keep_nan(a, b):
        return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)

    @triton.jit
    def _gelu_tanh(x):
        # torch's tanh-approximated GELU, in fp32 (libdevice tanh, as torch's CUDA kernel uses tanhf)
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        return 0.5 * x * (1.0 + tl.extra.cuda.libdevice.tanh(inner))

    @triton.jit
    def _load_row(xr, cols, K, GELU: tl.constexpr):
        x = tl.load(xr + cols, mask=cols < K, other=0.0).to(tl.float32)
        return _gelu_tanh(x) if GELU else x

    @triton.jit
    def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, BLOCK_K: tl.constexpr, FP8_MAX: tl.constexpr,
                              FLOOR: tl.constexpr, UNIT: tl.constexpr, GELU: tl.constexpr, ONE_PASS: tl.constexpr):
        # One program per row. ONE_PASS (the row fits one block): loaded once, held in registers. Otherwise pass 1
        # takes the row's amax, pass 2 (the row is in L1/L2 by then) scales and casts. GELU applies to the loaded
        # values (gelu(0) = 0 for the masked tail).
        row = tl.program_id(0).to(tl.int64)
        xr = x_ptr + row * stride_xm
        qr = q_ptr + row * K
        if ONE_PASS:
            cols = tl.arange(0, BLOCK_K)
            x = _load_row(xr, cols, K, GELU)
            amax = tl.maximum(tl.reduce(tl.abs(x), 0, _max_keep_nan), FLOOR, propagate_nan=tl.PropagateNan.ALL)
            inv = tl.math.div_rn(tl.full([], 1.0, tl.float32), amax) * FP8_MAX  # IEEE reciprocal, as torch's
            q = tl.clamp(x * inv, -FP8_MAX, FP8_MAX, propagate_nan=tl.PropagateNan.ALL)
            tl.store(qr + cols, q.to(q_ptr.dtype.element_ty), mask=cols < K)
            tl.store(s_ptr + row, amax * UNIT)
            return
        acc = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            x = _load_row(xr, cols, K, GELU)
            acc = tl.maximum(acc, tl.abs(x), propagate_nan=tl.PropagateNan.ALL)
        amax = tl.maximum(tl.reduce(acc, 0, _max_keep_nan), FLOOR, propagate_nan=tl.PropagateNan.ALL)
        inv = tl.math.div_rn(tl.full([], 1.0, tl.float32), amax) * FP8_MAX  # IEEE reciprocal, as torch's
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            x = _load_row(xr, cols, K, GELU)
            q = tl.clamp(x * inv, -FP8_MAX, FP8_MAX, propagate_nan=tl.PropagateNan.ALL)
            tl.store(qr + cols, q.to(q_ptr.dtype.element_ty), mask=cols < K)
        tl.store(s_ptr + row, amax * UNIT)


def quantize_rows_triton(x: Tensor, act: str | None = None) -> tuple[Tensor, Tensor]:
    """`quantize_rows_reference` in one Triton pass over `x [M, K]` (CUDA; rows may be strided, columns dense):
    bit-equal without an activation; with "gelu_tanh" equal up to the last ulp of tanh."""
    _activate(x[:0], act)  # checks the name
    if triton is None or not x.is_cuda:
        raise RuntimeError("quantize_rows_triton needs Triton and a CUDA tensor")
    if x.ndim != 2:
        raise ValueError(f"x shape {tuple(x.shape)}; expected [M, K]")
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    q = torch.empty((m, k), dtype=E4M3, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m:
        whole = triton.next_power_of_2(k)
        block = whole if whole <= ONE_PASS_MAX_K else 4096
        warps = 16 if block >= 16384 else 8 if block >= 2048 else 4
        _quantize_rows_kernel[(m,)](x, q, scale, k, x.stride(0), BLOCK_K=block, FP8_MAX=E4M3_MAX, FLOOR=AMAX_FLOOR,
                                    UNIT=SCALE_UNIT, GELU=act == "gelu_tanh", ONE_PASS=block >= k, num_warps=warps)
    return q, scale


def quantize_rows(x: Tensor, act: str | None = None) -> tuple[Tensor, Tensor]:
    """Rowwise e4m3 quantisation of `x [M, K]` (of `act(x)`): Triton on a CUDA tensor when Triton is importable,
    else torch."""
    if triton is not None and x.is_cuda:
        return quantize_rows_triton(x, act)
    return quantize_rows_reference(x, act)


def scaled_mm_emulated(qa: Tensor, sa: Tensor, qw: Tensor, sw: Tensor, bias: Tensor | None,
                       out_dtype: torch.dtype) -> Tensor:
    """What `_scaled_mm(qa, qw.t(), sa, sw, bias)` computes, in fp32 on any device: `qa [M, K]`, `qw [N, K]` e4m3,
    `sa [M, 1]`, `sw [1, N]` fp32, `bias [N]` -> `[M, N]` in `out_dtype`. Products of e4m3 values are exact in fp32."""
    out = (qa.float() @ qw.float().t()) * sa * sw
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


# ------------------------------------------------------------------------------------------ the module


def fp8_eligible(linear: nn.Module) -> bool:
    """An `nn.Linear` whose shape `_scaled_mm` takes (K and N multiples of 16)."""
    return (type(linear) is nn.Linear and linear.in_features % ALIGN == 0 and linear.out_features % ALIGN == 0
            and linear.weight.is_floating_point())


class Fp8Linear(nn.Module):
    """`y = x Wᵀ + b` with W in e4m3 (per-output-channel fp32 scales) and x quantised per token on each call.

    Buffers: `weight [N, K]` e4m3, `weight_scale [1, N]` fp32, `bias [N]` in the output dtype (or None). Input
    `[..., K]` in any float dtype -> `[..., N]` in `out_dtype` (the replaced linear's dtype). CUDA: `_scaled_mm`
    (compute capability 8.9+); elsewhere: `scaled_mm_emulated`. Make it with `Fp8Linear.from_linear`, after the
    model has its final device and dtype (a later `.to(dtype)` would cast the e4m3 buffers; forward refuses that).
    """

    def __init__(self, weight: Tensor, weight_scale: Tensor, bias: Tensor | None, out_dtype: torch.dtype,
                 fast_accum: bool = FAST_ACCUM, act: str | None = None) -> None:
        super().__init__()
        _activate(weight[:0, :0], act)  # checks the name
        self.act = act  # applied to the input inside its quantisation (the FFN's GELU: `PreActivation`)
        n, k = weight.shape
        if weight.dtype != E4M3 or tuple(weight_scale.shape) != (1, n) or weight_scale.dtype != torch.float32:
            raise InputError(f"Fp8Linear wants weight [N, K] e4m3 and weight_scale [1, N] fp32; got "
                             f"{weight.dtype} {tuple(weight.shape)} and {weight_scale.dtype} "
                             f"{tuple(weight_scale.shape)}")
        if k % ALIGN or n % ALIGN:
            raise InputError(f"Fp8Linear shape (out {n}, in {k}): both must be multiples of {ALIGN} for _scaled_mm")
        self.in_features, self.out_features = k, n
        self.out_dtype = out_dtype
        self.fast_accum = fast_accum  # see FAST_ACCUM
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("weight_scale", weight_scale.contiguous())
        self.register_buffer("bias", None if bias is None else bias.to(out_dtype).contiguous())

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, *, fast_accum: bool = FAST_ACCUM, act: str | None = None) -> Fp8Linear:
        if not fp8_eligible(linear):
            shape = (getattr(linear, "out_features", None), getattr(linear, "in_features", None))
            raise InputError(f"cannot make an Fp8Linear from {type(linear).__name__} (out, in) = {shape}: need an "
                             f"nn.Linear with both sizes multiples of {ALIGN}")
        q, scale = quantize_rows_reference(linear.weight)  # once per weight: the exact torch path
        return cls(q, scale.reshape(1, -1), linear.bias, linear.weight.dtype, fast_accum=fast_accum, act=act)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"out_dtype={self.out_dtype}, fast_accum={self.fast_accum}, act={self.act}")

    def forward(self, x: Tensor) -> Tensor:
        if self.weight.dtype != E4M3 or self.weight_scale.dtype != torch.float32:
            raise RuntimeError(f"Fp8Linear buffers were cast (weight {self.weight.dtype}, scale "
                               f"{self.weight_scale.dtype}): the module was moved with .to(dtype) after the fp8 "
                               "swap; swap after the model has its final dtype")
        if x.shape[-1] != self.in_features:
            raise InputError(f"Fp8Linear input {tuple(x.shape)}: last dim must be in_features={self.in_features}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] == 0:
            return x.new_empty((*lead, self.out_features), dtype=self.out_dtype)
        qa, sa = quantize_rows(x2, self.act)
        if not x.is_cuda:
            out = scaled_mm_emulated(qa, sa, self.weight, self.weight_scale, self.bias, self.out_dtype)
        elif self.out_dtype == torch.float32:  # _scaled_mm takes no bias with an fp32 output
            out = torch._scaled_mm(qa, self.weight.t(), scale_a=sa, scale_b=self.weight_scale,
                                   out_dtype=torch.float32, use_fast_accum=self.fast_accum)
            if self.bias is not None:
                out = out + self.bias
        else:
            out = torch._scaled_mm(qa, self.weight.t(), scale_a=sa, scale_b=self.weight_scale, bias=self.bias,
                                   out_dtype=self.out_dtype, use_fast_accum=self.fast_accum)
        return out.reshape(*lead, self.out_features)


# ------------------------------------------------------------------------------------------ swapping


def _check_include(include: Iterable[str]) -> tuple[str, ...]:
    include = tuple(include)
    unknown = [n for n in include if n not in BLOCK_LINEARS]
    if unknown:
        raise InputError(f"unknown refiner block linear {unknown[0]!r}; accepted: {list(BLOCK_LINEARS)}")
    return include


def _check_refiner(model) -> None:
    if not isinstance(model, RefinerTransformer):
        raise InputError(f"the fp8 swap takes a RefinerTransformer (unwrap a GraphedRefinerModel: .model); got "
                         f"{type(model).__name__}")
    dev = model.proj_in.weight.device
    if dev.type == "cuda" and model.proj_in.weight.dtype != torch.bfloat16:
        raise InputError(f"the fp8 refiner runs in a bf16 model on CUDA (rowwise-scaled fp8 GEMMs give bf16); this "
                         f"refiner is {model.proj_in.weight.dtype}: use --dtype bf16")
    if dev.type == "cuda" and torch.cuda.get_device_capability(dev) < (8, 9):
        raise InputError(f"fp8 GEMMs need CUDA compute capability 8.9+; {dev} has "
                         f"{torch.cuda.get_device_capability(dev)}")


class PreActivation(nn.Module):
    """The FFN's up-projection without its GELU (same `proj`, same state-dict names): under fp8 the GELU is applied
    by the down-projection's quantiser (`Fp8Linear(act="gelu_tanh")`), which reads the projection's output once
    instead of a GELU pass writing it again."""

    def __init__(self, proj: nn.Module) -> None:
        super().__init__()
        self.proj = proj

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


def _gelu_moves(block: nn.Module, include: tuple[str, ...]) -> bool:
    """Both FFN projections go fp8 here and the up one is a GELU projection: its GELU can move into the quantiser."""
    from engine.fast.refiner_gelu import FusedGELUProj

    net = block.ff.net
    return ("ff.net.0.proj" in include and "ff.net.2" in include and type(net[0]) in (GELUProj, FusedGELUProj)
            and fp8_eligible(net[0].proj) and fp8_eligible(net[2]))


def _swap_block(block: nn.Module, include: tuple[str, ...], fast_accum: bool) -> list[tuple[nn.Module, str, nn.Module]]:
    """Replace the block's eligible included linears by Fp8Linear (the FFN's GELU moved into the down projection's
    quantiser where both FFN projections swap); returns (parent, name, replaced) per swap."""
    swapped = []
    gelu_moves = _gelu_moves(block, include)
    for name in include:
        parent_name, _, leaf = name.rpartition(".")
        parent = block.get_submodule(parent_name)
        old = getattr(parent, leaf)  # a ModuleList's children are attributes "0", "1", ... too
        if not fp8_eligible(old):  # already fp8, or a shape _scaled_mm does not take: stays as it is
            continue
        act = "gelu_tanh" if gelu_moves and name == "ff.net.2" else None
        setattr(parent, leaf, Fp8Linear.from_linear(old, fast_accum=fast_accum, act=act))
        swapped.append((parent, leaf, old))
    if gelu_moves:
        net = block.ff.net
        swapped.append((net, "0", net[0]))
        net[0] = PreActivation(net[0].proj)
    attn1 = block.attn1
    if attn1.to_qkv is None and all(isinstance(m, Fp8Linear) for m in (attn1.to_q, attn1.to_k, attn1.to_v)):
        swapped.append((attn1, "to_qkv", None))
        fuse_qkv(attn1)
    return swapped


def fuse_qkv(attn: nn.Module) -> None:
    """Self-attention's three fp8 projections as one (`attn.to_qkv`: the input quantised once, one GEMM of three
    times the width); to_q, to_k and to_v become views of its buffers (no second copy of the weights). Each output
    channel keeps its own scale, so the fused GEMM computes what the three do, up to the GEMM's summation order."""
    parts = (attn.to_q, attn.to_k, attn.to_v)
    # `Attention.qkv` splits the fused output in three equal widths
    if len({(p.in_features, p.out_features, p.out_dtype, p.fast_accum, p.act, p.bias is None) for p in parts}) != 1:
        return  # mismatched projections: they stay apart
    bias = None if parts[0].bias is None else torch.cat([p.bias for p in parts])
    fused = Fp8Linear(torch.cat([p.weight for p in parts]), torch.cat([p.weight_scale for p in parts], dim=1), bias,
                      parts[0].out_dtype, fast_accum=parts[0].fast_accum)
    n = parts[0].out_features
    for i, (name, p) in enumerate(zip(("to_q", "to_k", "to_v"), parts, strict=True)):
        cols = slice(i * n, (i + 1) * n)
        setattr(attn, name, Fp8Linear(fused.weight[cols], fused.weight_scale[:, cols],
                                      None if bias is None else fused.bias[cols], p.out_dtype,
                                      fast_accum=p.fast_accum))
    attn.to_qkv = fused


def _linears(swapped: list[tuple[nn.Module, str, nn.Module]]) -> int:
    """How many of `_swap_block`'s swaps made a block linear Fp8Linear (the GELU's move and the q/k/v fusion,
    which keeps the three, are not ones)."""
    return sum(isinstance(getattr(parent, leaf), Fp8Linear) for parent, leaf, _ in swapped if leaf != "to_qkv")


def use_fp8_linears(model: RefinerTransformer, *, include: Iterable[str] = BLOCK_LINEARS,
                    fast_accum: bool = FAST_ACCUM) -> int:
    """Swap the refiner's block linears named in `include` (names inside a block, see `BLOCK_LINEARS`) for
    `Fp8Linear`, in place; their bf16 weights are dropped. Returns how many were swapped (0 when already done).

    Call it once the model has its weights, device and dtype, before the session prepares its prompt (the prompt's
    cross-attention K/V come from `attn2.to_k/to_v`). Not undone: rebuild the model to go back to bf16. The module
    docstring says which layers stay in the model's dtype and why.
    """
    include = _check_include(include)
    _check_refiner(model)
    n = 0
    for block in model.transformer_blocks:
        n += _linears(_swap_block(block, include, fast_accum))
    return n


@contextlib.contextmanager
def _fp8_block(block: nn.Module, include: tuple[str, ...], fast_accum: bool) -> Iterator[int]:
    """The block with fp8 linears inside the `with`, its own linears back after it (even on an error)."""
    swapped = _swap_block(block, include, fast_accum)
    try:
        yield _linears(swapped)
    finally:
        for parent, leaf, old in swapped:
            setattr(parent, leaf, old)


# ------------------------------------------------------------------------------------------ quality


class Fp8AttentionKV:
    """`SelfAttentionKV` whose self-attention runs in fp8 (kernels/fp8_attention.py), as under a K/V window's fp8
    copy: the prefix of an `ExplicitKV` (or none) quantised as one segment, the current tokens as the other."""

    def __init__(self, kv: ExplicitKV | None) -> None:
        if kv is not None and not isinstance(kv, ExplicitKV):
            raise InputError(f"fp8 attention quality takes an ExplicitKV prefix or None; got {type(kv).__name__}")
        self.kv = kv

    def attend(self, layer: int, k_pre: Tensor, k: Tensor, v: Tensor):
        prefix = None if self.kv is None or self.kv.prefix is None else self.kv.prefix[layer]
        if prefix is None:
            seg = quantize_kv(k, v)
            return (seg,), (seg,)
        seg = quantize_kv(prefix[0].to(k.dtype), prefix[1].to(v.dtype))
        return (seg, k), (seg, v)


def rel_err(a: Tensor, b: Tensor) -> float:
    """||a − b|| / ||b|| (Frobenius, float64)."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


@torch.no_grad()
def _compare_forwards(model: RefinerTransformer, latents: Tensor, sigma: float, prompt_embeds: Tensor,
                      mask: Tensor | None, *, fps: float, frame_positions: Tensor | None, kv: SelfAttentionKV | None,
                      include: tuple[str, ...], fast_accum: bool,
                      attention: bool = False) -> tuple[Tensor, Tensor, list[float], int]:
    """`RefinerTransformer.forward` twice over the same inputs, block by block: as the model is (reference) and
    with each block's linears in fp8 (swapped in for that block only) and, with `attention`, its self-attention in
    fp8 (`Fp8AttentionKV` over `kv`, an ExplicitKV or None) and its cross-attention in fp8 where the prompt has no
    masked position (as `engine.refiner.ar.quantize_text` does). Returns (reference velocity, fp8 velocity, per-block
    relative error of the fp8 block on the reference block's input, linears swapped)."""
    m = model
    b, c, n, h, w = latents.shape
    dev, dtype = latents.device, m.proj_in.weight.dtype
    if frame_positions is None:
        frame_positions = torch.arange(n)
    rope = m.video_rope(frame_positions, h, w, fps, device=dev)
    timestep = (torch.full((b,), float(sigma), dtype=torch.float64, device=dev)
                * m.cfg.timestep_scale_multiplier).to(torch.float32).reshape(b, -1)
    emb, temb = m.time_embed(timestep, dtype)
    text = m.prepare_text(prompt_embeds, mask)
    txt = m.caption_projection(prompt_embeds.to(dtype))  # what prepare_text feeds attn2.key_value
    x_ref = x_fp8 = m.proj_in(latents.permute(0, 2, 3, 4, 1).reshape(b, n * h * w, c).to(dtype))
    kv8 = Fp8AttentionKV(kv) if attention else kv
    fp8_text = attention and text_attends_in_fp8(text)
    errs, swapped = [], 0
    for i, blk in enumerate(m.transformer_blocks):
        y_ref = blk(x_ref, temb, rope, text.k[i], text.v[i], text.bias, i, kv)
        with _fp8_block(blk, include, fast_accum) as k:
            swapped += k
            tk, tv = blk.attn2.key_value(txt)
            if fp8_text:  # the prompt's cross-attention in fp8 too, as quantize_text does
                tk, tv = quantize_text_layer(tk, tv)
            errs.append(rel_err(blk(x_ref, temb, rope, tk, tv, text.bias, i, kv8), y_ref))
            x_fp8 = blk(x_fp8, temb, rope, tk, tv, text.bias, i, kv8)
        x_ref = y_ref

    shift = m.scale_shift_table[0] + emb
    scale = m.scale_shift_table[1] + emb

    def head(x: Tensor) -> Tensor:  # the same ops in the same order as RefinerTransformer.forward
        out = m.proj_out(m.norm_out(x) * (1 + scale) + shift)
        return out.reshape(b, n, h, w, -1).permute(0, 4, 1, 2, 3)

    return head(x_ref), head(x_fp8), errs, swapped


def fp8_quality_delta(model: RefinerTransformer, latents: Tensor, sigma: float, prompt_embeds: Tensor,
                      mask: Tensor | None = None, *, fps: float, frame_positions: Tensor | None = None,
                      kv: SelfAttentionKV | None = None, include: Iterable[str] = BLOCK_LINEARS,
                      fast_accum: bool = FAST_ACCUM, attention: bool = False) -> dict:
    """Accuracy cost of `use_fp8_linears(model, include=...)` (and, with `attention`, of the fp8 self-attention of
    fast path `refiner-fp8-attn`) on one forward, without changing `model` (unswapped).

    Inputs are those of `RefinerTransformer.forward` (`latents [B, C, n, h, w]`, a float `sigma`, the connector
    output `prompt_embeds [B, L, C_cap]` + `mask [B, L]`, `frame_positions [n]`, `kv`), except the prompt is given
    raw (the fp8 model's text K/V come from its fp8 attn2.to_k/to_v). `kv.attend` is called three times per layer
    (reference, fp8 on the reference input, fp8 chained), each result used at once: an `ExplicitKV(prefix)` or an
    `RefinerKVWindow` with an open block both serve. Returns relative errors ||fp8 − ref|| / ||ref||:
    `block_rel_err` per block (fp8 block vs reference block on the same input), their max and mean, and
    `forward_rel_err` of the velocity of a whole fp8 forward.
    """
    include = _check_include(include)
    _check_refiner(model)
    if not include and not attention:
        raise InputError("fp8_quality_delta with no linears and no attention in fp8 has nothing to measure")
    if any(isinstance(mod, Fp8Linear) for mod in model.transformer_blocks.modules()):
        raise InputError("fp8_quality_delta needs the model before use_fp8_linears (it compares against it)")
    ref, fp8, errs, swapped = _compare_forwards(model, latents, sigma, prompt_embeds, mask, fps=fps,
                                                frame_positions=frame_positions, kv=kv, include=include,
                                                fast_accum=fast_accum, attention=attention)
    return {"sigma": float(sigma), "tokens": latents.shape[2] * latents.shape[3] * latents.shape[4],
            "linears_fp8": swapped, "attention_fp8": attention, "forward_rel_err": rel_err(fp8, ref),
            "block_rel_err_max": max(errs), "block_rel_err_mean": sum(errs) / len(errs),
            "block_rel_err": [float(f"{e:.4g}") for e in errs]}


class _RecordKV:
    """`SelfAttentionKV` that keeps each layer's post-RoPE K and V (the history a block will attend to)."""

    def __init__(self) -> None:
        self.kv: dict[int, tuple[Tensor, Tensor]] = {}

    def attend(self, layer: int, k_pre: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.kv[layer] = (k, v)
        return k, v


@torch.no_grad()
def refiner_fp8_quality(world, *, seed: int = 0, prompt: str = "a quiet street at dusk, wet cobblestones",
                        include: Iterable[str] = BLOCK_LINEARS, fast_accum: bool = FAST_ACCUM,
                        attention: bool = False) -> dict:
    """`fp8_quality_delta` at the AR refiner's steady shapes, for a world (`engine.world.World`) whose refiner is not
    swapped yet: a block of `ar.block_size` random latent frames attending to `ar.kv_max_frames` frames of K/V
    history (recorded by a sigma = 0 pass of the unswapped model over random latents, as the window's capture
    passes make them), at each sigma of the AR schedule, with the block linears named in `include` in fp8 and, with
    `attention`, the self-attention too (its history quantised as one segment, as a window's fp8 copy is). The
    model is left unchanged.

    Memory: the history K/V (release: 48 layers x 2 x 12320 tokens x 4096 bf16 ≈ 9.7 GB) plus one fp8 block.
    """
    model = world.refiner
    if model is None:
        raise InputError("refiner_fp8_quality needs a world built with the refiner")
    p, dev, dtype = world.preset, world.device, world.dtype
    s = world.vae.config.spatial_scale
    h, w = p.pixel_hw[0] // s, p.pixel_hw[1] // s
    ar, c = p.ar, model.cfg.in_channels
    g = torch.Generator(device=dev).manual_seed(seed)
    remb = world.text.refiner.encode(prompt)
    embeds, mask = remb.embeds.to(dev, dtype), remb.mask.to(dev)
    hist = torch.randn(1, c, ar.kv_max_frames, h, w, device=dev, generator=g).to(dtype)
    block = torch.randn(1, c, ar.block_size, h, w, device=dev, generator=g).to(dtype)
    rec = _RecordKV()
    model(hist, 0.0, model.prepare_text(embeds, mask), fps=ar.fps, frame_positions=torch.arange(ar.kv_max_frames),
          kv=rec)
    kv = ExplicitKV(prefix=[rec.kv[i] for i in range(model.num_layers)])
    del rec
    positions = torch.arange(ar.kv_max_frames, ar.kv_max_frames + ar.block_size)
    steps = [fp8_quality_delta(model, block, sigma, embeds, mask, fps=ar.fps, frame_positions=positions, kv=kv,
                               include=include, fast_accum=fast_accum, attention=attention) for sigma in ar.sigmas]
    return {
        "block_frames": ar.block_size, "history_frames": ar.kv_max_frames, "latent_hw": [h, w],
        "dtype": str(dtype).replace("torch.", ""), "fast_accum": fast_accum, "attention_fp8": attention,
        "linears": list(_check_include(include)),
        "forward_rel_err_max": max(r["forward_rel_err"] for r in steps),
        "block_rel_err_max": max(r["block_rel_err_max"] for r in steps),
        "steps": steps,
    }

