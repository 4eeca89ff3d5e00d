"""Probe for `stage1-ffn`: the stage-1 FFN (`GLUMBConvTemp`, one block) at the release shape, plain vs the fused
depthwise 3x3 conv + bias + GLU kernel (kernels/dwconv_glu.py).

Release FFN: `--frames` latent frames (3; 4 for a stream's first chunk) of 22 x 40 tokens, C = 2240, Hd = 6720
(2Hd = 13440 channels: the depthwise conv's input is 71 MB in bf16 at 3 frames), random weights (the module's init),
bf16. Timed, each replayed from a CUDA graph (`--iters` replays one by one with CUDA events; median, min):

- the FFN module as a block calls it (the 1x1 conv + SiLU, cudnn's depthwise conv, the GLU, the 1x1 conv, then the
  temporal conv every variant shares), plain, plain under torch.compile, fused (`ffn_ops`: F.linear, the kernel
  with SiLU on load, F.linear), fused under torch.compile, fused with the SiLU as its own pass before the kernel;
- the temporal conv alone (the shared tail, to subtract);
- the middle alone: cudnn's depthwise conv on the NHWC-strided GEMM output; the plain middle (SiLU, depthwise conv,
  GLU: what the kernel replaces); the kernel with SiLU on load; the kernel on silu(y) (SiLU off);
- the kernel with SiLU on load and the fused module under torch.compile with each of the kernel's SiLU maths.

Errors: max |x - ref| / max |ref| against fp32 evaluations of the same function from the same bf16 inputs (the
module: a float32 copy of it, TF32 off). `--sweep` also times the kernel alone over tile configs (each checked
against the reference), also with the cheaper SiLU maths; the best ones are printed. Prints a table last; writes
JSON with `--out`.

    PYTHONPATH=. python3 tests/benchmarks/ffn_probe.py --iters 50 --out ffn_probe.json [--sweep]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json

import torch
import torch.nn.functional as F
from graph_timing import time_graph  # this directory is on sys.path when run as a script

from engine.stage1.config import Stage1Config
from engine.stage1.model import GLUMBConvTemp
from engine.stage1.temporal import FrameContext, streaming_mode, temporal_conv
from kernels import dwconv_glu as dg

H, W = 22, 40  # release latent grid (704 x 1280 pixels / 32)
DEVICE = "cuda"


def max_rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return ((out.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def frame_ctx(T: int, ffn) -> FrameContext:
    """What the FFN reads of a frame context (the attention parts are empty)."""
    empty = torch.empty(0, device=DEVICE)
    return FrameContext(frames=T, height=H, width=W, segments=((0, T),), rope=empty, cam_rope=empty, P=empty,
                        P_inv=empty, mode=streaming_mode(112), ffn=ffn)


def silu_outside(y, weight, bias, *, silu_input):
    """The fused path with the SiLU as its own pass: the kernel's SiLU-on-load cost, measured by difference."""
    assert silu_input
    return dg.dwconv_glu_triton(F.silu(y), weight, bias, silu_input=False)


def plain_middle(u: torch.Tensor, depth_conv: torch.nn.Conv2d) -> torch.Tensor:
    """GLUMBConvTemp's plain middle on the NCHW view u of the GEMM output: SiLU, depthwise conv, GLU."""
    val, gate = depth_conv(F.silu(u)).chunk(2, dim=1)
    return val * F.silu(gate)


def with_math(math: str, fn, *args):
    """fn(*args) with the op's default SILU_MATH set to math (the op reads DEFAULT_CONFIG at each launch; a graph
    captures the launch it saw)."""
    prev = dg.DEFAULT_CONFIG["SILU_MATH"]
    dg.DEFAULT_CONFIG["SILU_MATH"] = math
    try:
        return fn(*args)
    finally:
        dg.DEFAULT_CONFIG["SILU_MATH"] = prev


def run(args) -> dict:
    T, dtype = args.frames, getattr(torch, args.dtype)
    torch.manual_seed(0)
    mlp32 = GLUMBConvTemp(Stage1Config()).to(DEVICE)
    mlp = copy.deepcopy(mlp32).to(dtype)
    C, Hd = mlp.t_conv.in_channels, mlp.point_conv.conv.in_channels
    N = T * H * W
    m = torch.randn(1, N, C, device=DEVICE).to(dtype)
    dw = mlp.depth_conv.conv
    y = F.linear(m[0], mlp.inverted_conv.conv.weight.view(2 * Hd, C), mlp.inverted_conv.conv.bias)  # [N, 2Hd]
    y4 = y.view(T, H, W, 2 * Hd)
    u = y4.permute(0, 3, 1, 2)  # the plain path's NCHW view of NHWC memory (cudnn runs it channels-last)
    sy = F.silu(y4)
    w32, b32 = dw.weight.float(), dw.bias.float()
    with torch.no_grad():
        prev = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        ref_module = mlp32(m.float(), frame_ctx(T, None))
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev
        ref_mid = dg.dwconv_glu_reference(y4.float(), w32, b32, silu_input=True)
        ref_mid_silu = dg.dwconv_glu_reference(sy.float(), w32, b32, silu_input=False)
        ref_dw = F.conv2d(u.float(), w32, b32, padding=1, groups=2 * Hd)
        s_tokens = torch.randn(1, T, H * W, C, device=DEVICE).to(dtype)
        ref_t = temporal_conv(s_tokens.float(), mlp32.t_conv.weight, ((0, T),))
    compiled = torch.compile(mlp)
    fused = frame_ctx(T, dg.dwconv_glu_triton)
    cases = {  # name -> (fn, its fp32 reference)
        "module plain": (lambda: mlp(m, frame_ctx(T, None)), ref_module),
        "module plain, torch.compile": (lambda: compiled(m, frame_ctx(T, None)), ref_module),
        "module fused (stage1-ffn)": (lambda: mlp(m, fused), ref_module),
        "module fused, torch.compile": (lambda: compiled(m, fused), ref_module),
        "module fused, SiLU outside": (lambda: mlp(m, frame_ctx(T, silu_outside)), ref_module),
        "temporal conv alone (shared)": (lambda: temporal_conv(s_tokens, mlp.t_conv.weight, ((0, T),)), ref_t),
        "cudnn depthwise conv alone": (lambda: dw(u), ref_dw),
        "plain middle: SiLU, dwconv, GLU": (lambda: plain_middle(u, dw), ref_mid.permute(0, 3, 1, 2)),
        "kernel, SiLU on load": (lambda: dg.dwconv_glu_triton(y4, dw.weight, dw.bias, silu_input=True), ref_mid),
        "kernel on silu(y)": (lambda: dg.dwconv_glu_triton(sy, dw.weight, dw.bias, silu_input=False),
                              ref_mid_silu),
    }
    for math in dg.SILU_MATHS:  # the default config but for how SiLU is computed (the kernel's `_silu`)
        cases[f"kernel, SiLU on load, {math}"] = (
            lambda math=math: dg.launch_with_config(y4, dw.weight, dw.bias, silu_input=True, SILU_MATH=math), ref_mid)
        cases[f"module fused, torch.compile, {math}"] = (lambda math=math: with_math(math, compiled, m, fused),
                                                          ref_module)
    rows = []
    with torch.no_grad():
        for name, (fn, ref) in cases.items():
            r = time_graph(fn, args.iters)
            out = r.pop("out")
            rows.append({"name": name, **r, "max_rel_err": max_rel(out, ref)})
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                  triton=getattr(dg.triton, "__version__", None), dtype=args.dtype,
                  shape=dict(frames=T, h=H, w=W, C=C, Hd=Hd), default_config=dg.DEFAULT_CONFIG, rows=rows)
    if args.sweep:
        result["sweep"] = sweep(y4, dw.weight, dw.bias, ref_mid, args.iters)
    return result


def sweep_configs():
    """(label, config): the shift modes x column tiles x channel blocks x warps, then rows per program (fewer rows:
    more programs in flight, more halo rows read twice) x stages x channel blocks for each shift mode's default
    column tile."""
    for shift, bw, bc, warps in itertools.product(dg.SHIFTS, (None, 16, 32), (32, 64, 128), (4, 8)):
        if shift == "gather" or bw != 32:
            yield "tiles", dict(SHIFT=shift, BLOCK_W=bw, BLOCK_C=bc, num_warps=warps)
    for shift, rows, stages, bc in itertools.product(dg.SHIFTS, (None, 6, 3), (1, 2), (64, 128)):
        yield "rows/stages", dict(SHIFT=shift, ROWS=rows, num_stages=stages, BLOCK_C=bc)
    for math, shift, bc, warps in itertools.product(dg.SILU_MATHS[1:], dg.SHIFTS, (32, 64, 128), (4, 8)):
        yield "silu math", dict(SILU_MATH=math, SHIFT=shift, BLOCK_C=bc, num_warps=warps)


def sweep(y4, weight, bias, ref, iters) -> list[dict]:
    out = []
    with torch.no_grad():
        for label, cfg in sweep_configs():
            row = dict(varied=label, **dict(dg.DEFAULT_CONFIG, **cfg))
            try:
                r = time_graph(lambda cfg=cfg: dg.launch_with_config(y4, weight, bias, silu_input=True, **cfg),
                               iters)
                row.update(median_ms=r["median_ms"], max_rel_err=max_rel(r["out"], ref))
            except Exception as e:  # noqa: BLE001 - a config that does not compile (resources) is skipped
                row.update(median_ms=float("inf"), max_rel_err=float("nan"), error=type(e).__name__)
            print(f"sweep {row['median_ms']:8.4f} ms  err {row['max_rel_err']:.1e}  {cfg}")
            out.append(row)
    for shift, math in itertools.product(dg.SHIFTS, dg.SILU_MATHS):
        mine = (r for r in out if r["SHIFT"] == shift and r["SILU_MATH"] == math)
        for r in sorted(mine, key=lambda r: r["median_ms"])[:2]:
            shown = {k: r[k] for k in dg.CONFIG}
            print(f"best {shift:6s} {math:4s} {r['median_ms']:.4f} ms (err {r['max_rel_err']:.1e}): {shown}")
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=3, help="latent frames (3; a stream's first chunk has 4)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--sweep", action="store_true", help="also time the kernel alone over tile configs")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("ffn_probe needs a CUDA device")
    result = run(args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    s = result["shape"]
    print(f"{result['device']}  torch {result['torch']}  triton {result['triton']}  {args.dtype}  "
          f"frames {s['frames']} x {s['h']}x{s['w']}, C {s['C']}, Hd {s['Hd']}")
    print(f"{'stage-1 FFN, one block':36s} {'median ms':>10s} {'min ms':>8s} {'max rel err':>12s}")
    for r in result["rows"]:
        print(f"{r['name']:36s} {r['median_ms']:>10.4f} {r['min_ms']:>8.4f} {r['max_rel_err']:>12.2e}")
    return result


if __name__ == "__main__":
    main()
