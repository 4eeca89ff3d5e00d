"""Depthwise 3x3 conv + bias + GLU in one pass: the middle of the stage-1 FFN (spec stage1.md §3.12) as a Triton
kernel beside its plain torch reference.

    x = silu(y) if silu_input else y                       y `[F, h, w, 2Hd]`, any strides
    u[f, r, c, k] = bias[k] + sum_{dy, dx} weight[k, dy, dx] x[f, r + dy - 1, c + dx - 1, k]   (zero outside the frame)
    out = u[..., :Hd] * silu(u[..., Hd:])                  `[F, h, w, Hd]` contiguous, y's dtype

Everything is computed in fp32 (for 16-bit y, SiLU by default through tanh.approx: `SILU_MATH` below) and
rounded once, to y's dtype, on the store. weight `[2Hd, 3, 3]` (or the conv's
`[2Hd, 1, 3, 3]`), bias `[2Hd]`. Frames are independent (no cross-frame taps).

Kernel design. The plain path makes four full passes over the 2Hd-channel tensor (SiLU, cudnn's depthwise conv,
the gate's SiLU, the product); this kernel reads y once (from DRAM; the neighbouring taps come from L1/L2) and
writes the Hd-channel output once. One program owns a (frame, block of BLOCK_C "val" channels c and their "gate"
channels c + Hd, block of BLOCK_W columns, block of ROWS output rows). It streams the input rows from the row above
its block to the row below it; for each input row it gets the three dx-shifted `[BLOCK_W, BLOCK_C]` tiles of the val
and the gate channels, SiLU applied once per tile, and adds them with the row's taps into three rolling fp32
accumulators per half (output rows r+1, r, r-1 read input row r with the kernel rows dy = 0, 1, 2). After input row
r, output row r-1 is complete: bias, SiLU(gate) and the product are applied and it is stored; the accumulators
shift down by one row.

SiLU is the expensive part: exp and the reciprocal run on the SFUs (16 results per clock per SM on Hopper, 1/8 of
the FMA rate). Recomputing silu(y) for each of the nine taps would cost more than the memory traffic; per input row
the taps share their row, so the work is the dx shifts. `SHIFT` picks how the shifted tiles are made:

- "load": three loads at column offsets -1, 0, +1 (the shifted ones hit L1), SiLU on each: 3 SiLUs per input
  element. BLOCK_W defaults to a power of two dividing w (8 at the release w = 40), so no lanes are padding.
- "gather": one load of BLOCK_W columns x0-1 .. x0+BLOCK_W-2, SiLU once, the +-1 shifts by `tl.gather` (through
  shared memory); the two edge lanes are halo and store nothing, so a program covers BLOCK_W - 2 output columns.
  1 SiLU per loaded element, plus the padding lanes when w + 2 is not a multiple of BLOCK_W.

`SILU_MATH` picks how each SiLU is computed (`_silu`): "div" (exp, then Triton's division: two SFU ops and the
division's range fix-ups), "rcp" (the same without the fix-ups) or "tanh" (one tanh.approx: one SFU op and two
FMAs, with an error of ~2^-12 |x| that only 16-bit outputs can afford). Which is faster on a given GPU is for
tests/benchmarks/ffn_probe.py --sweep; the default is DEFAULT_CONFIG. With silu_input=False no SiLU is applied on
load (the caller did it).

The wrapper allocates only the output (torch.empty) and never synchronises, so it can be captured in a CUDA graph;
it is the torch custom op `sana_wm::dwconv_glu` with a fake implementation, so torch.compile treats it as one opaque
call. Triton is optional: without it, or off CUDA (unless TRITON_INTERPRET=1 runs it on CPU tensors), the wrapper
raises `DwConvGluError`. Knows nothing of models.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import interpreting

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference serves
    triton = None

SHIFTS = ("load", "gather")
SILU_MATHS = ("div", "rcp", "tanh")  # how the kernel computes SiLU: `_silu`'s docstring (None: by the dtype)
CONFIG = ("SHIFT", "SILU_MATH", "BLOCK_W", "BLOCK_C", "ROWS", "num_warps", "num_stages")  # launch_with_config's
# The best of ffn_probe.py --sweep on an H100 (sessions 7 and 9): 64 bf16 channels are one 128-byte line per pixel;
# a program holds 6 accumulators + 6 input tiles of BLOCK_W x BLOCK_C fp32 (12 x 512 / 128 threads = 48 registers
# each). ROWS = None: a program runs down the whole frame height (no halo rows read twice); at the release shape
# that is 3 frames x 105 channel blocks x 5 column blocks = 1,575 programs. SILU_MATH = None: "tanh" for 16-bit
# outputs (its error is below their rounding: session 9's probe measured the same max error against fp32 as "div",
# 2.4e-3, and 0.095 ms against 0.130 at the release shape), "div" for fp32 outputs.
DEFAULT_CONFIG = dict(SHIFT="load", SILU_MATH=None, BLOCK_W=None, BLOCK_C=64, ROWS=None, num_warps=4,
                      num_stages=2)


class DwConvGluError(RuntimeError):
    """dwconv_glu was called where it cannot run (no Triton, tensors not on CUDA) or with bad inputs."""


def _taps(weight: torch.Tensor) -> torch.Tensor:
    """weight `[2Hd, 3, 3]` or `[2Hd, 1, 3, 3]` -> `[2Hd, 9]` (a view when the conv weight is contiguous)."""
    return weight.reshape(weight.shape[0], 9)


def _check(y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, name: str) -> None:
    if y.ndim != 4 or y.shape[-1] % 2 or not y.is_floating_point():
        raise DwConvGluError(f"{name}: y {tuple(y.shape)} {y.dtype}; need a floating-point [F, h, w, 2Hd] tensor "
                             "(an even channel count: val channels, then gate channels)")
    C2 = y.shape[-1]
    if tuple(weight.shape) not in ((C2, 3, 3), (C2, 1, 3, 3)):
        raise DwConvGluError(f"{name}: weight {tuple(weight.shape)}; need {(C2, 3, 3)} or {(C2, 1, 3, 3)} for y "
                             f"{tuple(y.shape)}")
    if tuple(bias.shape) != (C2,):
        raise DwConvGluError(f"{name}: bias {tuple(bias.shape)}; need {(C2,)} for y {tuple(y.shape)}")
    if weight.device != y.device or bias.device != y.device:
        raise DwConvGluError(f"{name}: y on {y.device}, weight on {weight.device}, bias on {bias.device}; need one "
                             "device")


def dwconv_glu_reference(y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *,
                         silu_input: bool) -> torch.Tensor:
    """Plain torch (the module docstring's formula), fp32 inside. y `[F, h, w, 2Hd]` -> `[F, h, w, Hd]`."""
    _check(y, weight, bias, "dwconv_glu_reference")
    x = y.float().permute(0, 3, 1, 2)  # [F, 2Hd, h, w]
    if silu_input:
        x = F.silu(x)
    u = F.conv2d(x, _taps(weight).float().view(-1, 1, 3, 3), bias.float(), padding=1, groups=x.shape[1])
    val, gate = u.chunk(2, dim=1)
    return (val * F.silu(gate)).permute(0, 2, 3, 1).to(y.dtype)


if triton is not None:

    @triton.jit
    def _silu(x, MATH: tl.constexpr):
        """x * sigmoid(x) in fp32. MATH (SILU_MATHS): 0 "div", x / (1 + exp(-x)) (Triton's division is
        div.full.f32: a reciprocal on the SFU, range fix-ups and a multiply); 1 "rcp", x * rcp.approx(1 + exp(-x))
        (the same two SFU ops without the fix-ups; |1 + exp(-x)| never needs them: it is >= 1 or inf, and
        rcp(inf) = 0 gives silu(-large) = -0; measured no faster than "div" on an H100); 2 "tanh",
        x * (0.5 + 0.5 tanh.approx(x / 2)): one SFU op, but tanh.approx's error (2^-11 relative) leaves up to
        2.4e-4 absolute in sigmoid, 2^-12 |x| in silu: for 16-bit outputs only."""
        if MATH == 1:
            r = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [1.0 + tl.exp(-x)],
                                          dtype=tl.float32, is_pure=True, pack=1)
            return x * r
        elif MATH == 2:
            t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [0.5 * x], dtype=tl.float32,
                                          is_pure=True, pack=1)
            return x * (0.5 + 0.5 * t)
        else:
            return x / (1.0 + tl.exp(-x))

    @triton.jit
    def _load(row_ptr, cols, ch, cmask, row_ok, W, s_w, s_c, SILU: tl.constexpr, MATH: tl.constexpr):
        """Columns `cols` x channels `ch` of one input row, fp32, zero outside the frame (silu(0) = 0)."""
        m = (row_ok & (cols >= 0) & (cols < W))[:, None] & cmask[None, :]
        x = tl.load(row_ptr + cols[:, None] * s_w + ch[None, :] * s_c, mask=m, other=0.0).to(tl.float32)
        if SILU:
            x = _silu(x, MATH)
        return x

    @triton.jit
    def _shifted(row_ptr, cols, ch, cmask, row_ok, W, s_w, s_c, SILU: tl.constexpr, MATH: tl.constexpr,
                 GATHER: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
        """The input row at columns cols - 1, cols, cols + 1 (three `[BLOCK_W, BLOCK_C]` tiles)."""
        mid = _load(row_ptr, cols, ch, cmask, row_ok, W, s_w, s_c, SILU, MATH)
        if GATHER:  # lane j's neighbours are lanes j -+ 1; the edge lanes get a wrong one but store nothing
            lane = tl.arange(0, BLOCK_W)[:, None] + tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.int32)
            left = tl.gather(mid, tl.maximum(lane - 1, 0), 0)
            right = tl.gather(mid, tl.minimum(lane + 1, BLOCK_W - 1), 0)
        else:
            left = _load(row_ptr, cols - 1, ch, cmask, row_ok, W, s_w, s_c, SILU, MATH)
            right = _load(row_ptr, cols + 1, ch, cmask, row_ok, W, s_w, s_c, SILU, MATH)
        return left, mid, right

    @triton.jit
    def _kernel_row(w_ptr, ch, cmask, s_wc, s_wk, dy: tl.constexpr):
        """Kernel row dy of channels ch: three `[1, BLOCK_C]` fp32 taps (dx = 0, 1, 2)."""
        base = w_ptr + ch * s_wc + (3 * dy) * s_wk
        w0 = tl.load(base, mask=cmask, other=0.0).to(tl.float32)[None, :]
        w1 = tl.load(base + s_wk, mask=cmask, other=0.0).to(tl.float32)[None, :]
        w2 = tl.load(base + 2 * s_wk, mask=cmask, other=0.0).to(tl.float32)[None, :]
        return w0, w1, w2

    @triton.jit(do_not_specialize=["ROWS", "NRB", "NXB"])
    def _dwconv_glu_kernel(
        y_ptr, w_ptr, b_ptr, out_ptr,
        H, W, HD, ROWS, NRB, NXB, X_STEP,
        s_f, s_h, s_w, s_c, s_wc, s_wk, s_b,
        SILU: tl.constexpr, MATH: tl.constexpr, GATHER: tl.constexpr, BLOCK_W: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        """Grid (column blocks * channel blocks, frames * row blocks), column blocks varying fastest. A program's
        lanes are columns x0 + j (j < BLOCK_W); output lanes: all of them ("load"), j = 1 .. BLOCK_W-2 ("gather",
        x0 = block * X_STEP - 1)."""
        pid_xc = tl.program_id(0)
        pid_fr = tl.program_id(1)
        xb = pid_xc % NXB
        cb = pid_xc // NXB
        f = pid_fr // NRB
        r0 = (pid_fr % NRB) * ROWS
        r1 = tl.minimum(r0 + ROWS, H)
        lane = tl.arange(0, BLOCK_W)
        if GATHER:
            cols = xb * X_STEP - 1 + lane
            out_lane = (lane >= 1) & (lane <= BLOCK_W - 2) & (cols < W)
        else:
            cols = xb * X_STEP + lane
            out_lane = cols < W
        ch = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = ch < HD
        gch = ch + HD
        # the nine taps of the val and the gate channels, and their biases
        va0, va1, va2 = _kernel_row(w_ptr, ch, cmask, s_wc, s_wk, 0)
        vb0, vb1, vb2 = _kernel_row(w_ptr, ch, cmask, s_wc, s_wk, 1)
        vc0, vc1, vc2 = _kernel_row(w_ptr, ch, cmask, s_wc, s_wk, 2)
        ga0, ga1, ga2 = _kernel_row(w_ptr, gch, cmask, s_wc, s_wk, 0)
        gb0, gb1, gb2 = _kernel_row(w_ptr, gch, cmask, s_wc, s_wk, 1)
        gc0, gc1, gc2 = _kernel_row(w_ptr, gch, cmask, s_wc, s_wk, 2)
        bias_v = tl.load(b_ptr + ch * s_b, mask=cmask, other=0.0).to(tl.float32)[None, :]
        bias_g = tl.load(b_ptr + gch * s_b, mask=cmask, other=0.0).to(tl.float32)[None, :]

        y_f = y_ptr + f.to(tl.int64) * s_f
        o_mask = out_lane[:, None] & cmask[None, :]
        o_tile = cols[:, None] * HD + ch[None, :]
        # output rows r-1, r, r+1 of input row r (val and gate halves)
        v_up = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
        v_mid = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
        g_up = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
        g_mid = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
        for r in range(r0 - 1, r1 + 1):
            row_ok = (r >= 0) & (r < H)
            row_ptr = y_f + r * s_h
            vl, vm, vr = _shifted(row_ptr, cols, ch, cmask, row_ok, W, s_w, s_c, SILU, MATH, GATHER, BLOCK_W,
                                  BLOCK_C)
            gl, gm, gr = _shifted(row_ptr, cols, gch, cmask, row_ok, W, s_w, s_c, SILU, MATH, GATHER, BLOCK_W,
                                  BLOCK_C)
            v_up += vc0 * vl + vc1 * vm + vc2 * vr  # dy = 2: output row r-1, now complete
            g_up += gc0 * gl + gc1 * gm + gc2 * gr
            v_mid += vb0 * vl + vb1 * vm + vb2 * vr  # dy = 1: output row r
            g_mid += gb0 * gl + gb1 * gm + gb2 * gr
            v_down = va0 * vl + va1 * vm + va2 * vr  # dy = 0: output row r+1
            g_down = ga0 * gl + ga1 * gm + ga2 * gr
            done = r - 1
            out = (v_up + bias_v) * _silu(g_up + bias_g, MATH)
            tl.store(out_ptr + ((f * H + done).to(tl.int64) * W) * HD + o_tile, out.to(out_ptr.dtype.element_ty),
                     mask=o_mask & (done >= r0))
            v_up, v_mid = v_mid, v_down
            g_up, g_mid = g_mid, g_down


def _block_w(w: int, shift: str) -> int:
    """The column tile with the fewest padding lanes over a row of w columns (ties: the larger tile, fewer
    programs): "load" covers BLOCK_W columns per tile, "gather" BLOCK_W - 2."""
    step = (lambda b: b) if shift == "load" else (lambda b: b - 2)
    return min((8, 16, 32, 64), key=lambda b: (-(-w // step(b)) * b, -b))


def default_silu_math(dtype: torch.dtype) -> str:
    """SILU_MATH = None's choice for outputs of this dtype (DEFAULT_CONFIG's comment says why)."""
    return "div" if dtype == torch.float32 else "tanh"


def _config(w: int, h: int, dtype: torch.dtype, config: dict | None) -> dict:
    unknown = sorted(set(config or {}) - set(CONFIG))
    if unknown:
        raise DwConvGluError(f"launch_with_config: {unknown} are not settings; accepted: {CONFIG}")
    cfg = dict(DEFAULT_CONFIG, **(config or {}))
    if cfg["SHIFT"] not in SHIFTS:
        raise DwConvGluError(f"SHIFT {cfg['SHIFT']!r}; accepted: {SHIFTS}")
    if cfg["SILU_MATH"] is None:
        cfg["SILU_MATH"] = default_silu_math(dtype)
    if cfg["SILU_MATH"] not in SILU_MATHS:
        raise DwConvGluError(f"SILU_MATH {cfg['SILU_MATH']!r}; accepted: {SILU_MATHS}")
    cfg["BLOCK_W"] = cfg["BLOCK_W"] or _block_w(w, cfg["SHIFT"])
    cfg["ROWS"] = cfg["ROWS"] or max(h, 1)
    for key, low in (("BLOCK_W", 4 if cfg["SHIFT"] == "gather" else 1), ("BLOCK_C", 1)):
        v = cfg[key]
        if not isinstance(v, int) or v < low or v & (v - 1):
            raise DwConvGluError(f"{key} {v!r}; need a power of two >= {low} (SHIFT {cfg['SHIFT']!r})")
    if not isinstance(cfg["ROWS"], int) or cfg["ROWS"] < 1:
        raise DwConvGluError(f"ROWS {cfg['ROWS']!r}; need a positive int (rows of output per program)")
    return cfg


def _launch(y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, silu_input: bool,
            config: dict | None) -> torch.Tensor:
    Fr, h, w, C2 = y.shape
    Hd = C2 // 2
    cfg = _config(w, h, y.dtype, config)
    out = torch.empty(Fr, h, w, Hd, device=y.device, dtype=y.dtype)
    if out.numel() == 0:
        return out
    taps = _taps(weight)
    gather = cfg["SHIFT"] == "gather"
    x_step = cfg["BLOCK_W"] - 2 if gather else cfg["BLOCK_W"]
    nrb = triton.cdiv(h, cfg["ROWS"])
    nxb = triton.cdiv(w, x_step)
    grid = (nxb * triton.cdiv(Hd, cfg["BLOCK_C"]), Fr * nrb)
    math = 0 if interpreting() else SILU_MATHS.index(cfg["SILU_MATH"])  # the interpreter runs no PTX: "div"
    _dwconv_glu_kernel[grid](
        y, taps, bias, out, h, w, Hd, cfg["ROWS"], nrb, nxb, x_step, *y.stride(), *taps.stride(), bias.stride(0),
        SILU=silu_input, MATH=math, GATHER=gather, BLOCK_W=cfg["BLOCK_W"], BLOCK_C=cfg["BLOCK_C"],
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return out


def _check_runnable(y: torch.Tensor, name: str) -> None:
    if triton is None:
        raise DwConvGluError(f"{name}: Triton is not installed; use dwconv_glu_reference instead")
    if not y.is_cuda and not interpreting():
        raise DwConvGluError(f"{name}: tensors are on {y.device}; the Triton kernel needs CUDA tensors (or "
                             "TRITON_INTERPRET=1 to run it on CPU tensors)")


# the torch custom op: opaque to dynamo, CUDA-graph friendly (torch.empty + one launch, no sync) ------------------


@torch.library.custom_op("sana_wm::dwconv_glu", mutates_args=())
def _dwconv_glu_op(y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, silu_input: bool) -> torch.Tensor:
    _check_runnable(y, "dwconv_glu_triton")
    return _launch(y, weight, bias, silu_input, None)


@_dwconv_glu_op.register_fake
def _(y, weight, bias, silu_input):
    Fr, h, w, C2 = y.shape
    return y.new_empty(Fr, h, w, C2 // 2)


def dwconv_glu_triton(y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *,
                      silu_input: bool) -> torch.Tensor:
    """`dwconv_glu_reference` in one Triton launch (DEFAULT_CONFIG). y `[F, h, w, 2Hd]` (any strides) ->
    `[F, h, w, Hd]` contiguous, y's dtype."""
    _check(y, weight, bias, "dwconv_glu_triton")
    return _dwconv_glu_op(y, weight, bias, bool(silu_input))


def launch_with_config(y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *, silu_input: bool,
                       **config) -> torch.Tensor:
    """The raw launch with explicit settings (CONFIG's keywords over DEFAULT_CONFIG; others raise), for
    tests/benchmarks/ffn_probe.py --sweep and the tests. Not a custom op."""
    _check(y, weight, bias, "launch_with_config")
    _check_runnable(y, "launch_with_config")
    return _launch(y, weight, bias, bool(silu_input), config)
