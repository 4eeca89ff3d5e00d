"""Benchmark for issue 7: the stage-1 GDN / camera scans, plain torch (strict fp32 and TF32) vs Triton.

At the release shapes (B=1, H=20, T=3 frames of S=880 tokens, D=112; bf16 inputs laid out as the model's
`[B, H, T, S, D]` views of `[B, N, H*D]`) it times, per scan function, the plain reference with TF32 off, the
same with TF32 on (the `stage1-tf32-scans` path) and kernels/gdn_triton.py in each precision, both eagerly and
replayed from a CUDA graph (as the `stage1-graph` fast path runs them), and the max relative error of each
against the strict fp32 reference. Prints a table; writes JSON with `--out`. `--sweep` also times tile configs
of the Triton kernel.

    PYTHONPATH=. python3 tests/benchmarks/scan_bench.py --out scan_bench.json [--sweep [tf32 ...]]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json

import torch

from kernels import gdn_triton
from kernels.camera_scan import camera_scan_backward, camera_scan_forward
from kernels.gdn import gdn_backward, gdn_forward


@contextlib.contextmanager
def tf32(on: bool):
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


def release_inputs(B, H, T, S, D, dtype, device, seed=0):
    """Scan inputs shaped as SelfAttention._gdn makes them: q, k, v are [B, H, T, S, D] views of [B, N, H*D]
    (non-contiguous), q_rot / k_rot contiguous, beta / gamma as the gates give them."""
    g = torch.Generator(device=device).manual_seed(seed)
    N = T * S

    def heads(scale=1.0, relu=False):
        x = torch.randn(B, N, H * D, generator=g, device=device)
        x = (x.relu() if relu else x) * scale
        return x.to(dtype).reshape(B, N, H, D).transpose(1, 2).reshape(B, H, T, S, D)

    kscale = (D * S) ** -0.5
    q, k, v = heads(relu=True), heads(kscale, relu=True), heads()
    q_rot, k_rot = (torch.randn(B, H, T, S, D, generator=g, device=device).to(dtype) * s for s in (1.0, kscale))
    beta = torch.rand(B, N, H, generator=g, device=device).to(dtype).transpose(1, 2).reshape(B, H, T, S)
    gamma = torch.rand(B, H, T, generator=g, device=device) * 0.5 + 0.5
    sigma = torch.randn(B, H, D, D, generator=g, device=device) * 0.1
    z = torch.rand(B, H, D, generator=g, device=device)
    return dict(q_rot=q_rot, k_rot=k_rot, q=q, k=k, v=v, beta=beta, gamma=gamma, sigma=sigma, z=z)


def scan_calls(x):
    """name -> (reference fn, triton fn, args): the four calls one GDN block makes per forward."""
    gdn = (x["q_rot"], x["k_rot"], x["q"], x["k"], x["v"], x["beta"], x["gamma"])
    cam = (x["q_rot"], x["k_rot"], x["v"], x["beta"], x["gamma"])
    return {
        "gdn_forward": (gdn_forward, gdn_triton.gdn_forward_triton, gdn + ((x["sigma"], x["z"]),)),
        "gdn_backward": (gdn_backward, gdn_triton.gdn_backward_triton, gdn),
        "camera_forward": (camera_scan_forward, gdn_triton.camera_scan_forward_triton, cam + (x["sigma"],)),
        "camera_backward": (camera_scan_backward, gdn_triton.camera_scan_backward_triton, cam),
    }


def flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in flat(o)]


def max_rel(out, ref) -> float:
    return max(((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()
               for a, b in zip(flat(out), flat(ref), strict=True))


def time_eager(fn, iters) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def time_graph(fn, iters) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return time_eager(graph.replay, iters)


def run(args) -> dict:
    device = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    x = release_inputs(args.batch, args.heads, args.frames, args.tokens, args.head_dim, dtype, device)
    impls = {"torch-fp32": None, "torch-tf32": None, **{f"triton-{p}": p for p in gdn_triton.PRECISIONS}}
    rows = []
    totals = {name: {"eager_ms": 0.0, "graph_ms": 0.0} for name in impls}
    for fn_name, (ref_fn, tri_fn, fargs) in scan_calls(x).items():
        with tf32(False):
            ref = ref_fn(*fargs)
        for impl, prec in impls.items():
            if prec is None:
                on = impl == "torch-tf32"

                def call(ref_fn=ref_fn, fargs=fargs, on=on):
                    with tf32(on):
                        return ref_fn(*fargs)
            else:
                call = functools.partial(tri_fn, *fargs, precision=prec)
            err = max_rel(call(), ref)
            eager, graphed = time_eager(call, args.iters), time_graph(call, args.iters)
            totals[impl]["eager_ms"] += eager
            totals[impl]["graph_ms"] += graphed
            rows.append(dict(fn=fn_name, impl=impl, eager_ms=eager, graph_ms=graphed, max_rel_err=err))
    for impl, t in totals.items():
        rows.append(dict(fn="per GDN block (sum)", impl=impl, eager_ms=t["eager_ms"], graph_ms=t["graph_ms"],
                         max_rel_err=float("nan")))
    result = dict(shape=dict(B=args.batch, H=args.heads, T=args.frames, S=args.tokens, D=args.head_dim),
                  dtype=args.dtype, device=torch.cuda.get_device_name(), torch=torch.__version__,
                  triton=getattr(gdn_triton.triton, "__version__", None), rows=rows)
    print(f"{result['device']}  torch {result['torch']}  triton {result['triton']}  shape {result['shape']}  "
          f"inputs {args.dtype}")
    print(f"{'function':22s} {'impl':14s} {'eager ms':>9s} {'graph ms':>9s} {'max rel err':>12s}")
    for r in rows:
        print(f"{r['fn']:22s} {r['impl']:14s} {r['eager_ms']:9.3f} {r['graph_ms']:9.3f} {r['max_rel_err']:12.2e}")
    if args.sweep is not None:
        args.sweep = args.sweep or list(gdn_triton.PRECISIONS)
        result["sweep"] = sweep(x, args)
    return result


SWEEP_GRID = {  # BLOCK_S, BLOCK_V, num_warps, num_stages
    "tf32": ((32, 64, 128), (16, 32, 64), (4, 8), (2,)),
    "tf32x3": ((32, 64, 128), (16, 32, 64), (4, 8), (2,)),
    "ieee": ((16, 32), (16, 32), (4, 8), (2,)),
}


def sweep(x, args) -> list[dict]:
    """Graph-replayed time of the GDN forward (with state) and backward launches (numerator + normaliser) per
    tile config."""
    fa = (x["q_rot"], x["k_rot"], x["v"], x["beta"], x["gamma"])
    out = []
    for prec in args.sweep:
        for bs, bv, warps, stages in itertools.product(*SWEEP_GRID[prec]):
            cfg = dict(BLOCK_S=bs, BLOCK_V=bv, BLOCK_S_NORM=bs, num_warps=warps, num_stages=stages)
            row = dict(precision=prec, **cfg)
            for direction, reverse in (("forward", False), ("backward", True)):
                call = functools.partial(gdn_triton.launch_with_config, *fa, None if reverse else x["sigma"],
                                         reverse=reverse, precision=prec, qn=x["q"], kn=x["k"],
                                         z=None if reverse else x["z"], **cfg)
                try:
                    row[f"{direction}_ms"] = time_graph(call, args.iters)
                except Exception as e:  # noqa: BLE001 - a config that does not compile (resources) is skipped
                    print(f"sweep {prec} {cfg} {direction}: failed ({type(e).__name__})")
                    row[f"{direction}_ms"] = float("inf")
            row["ms"] = row["forward_ms"] + row["backward_ms"]
            print(f"sweep {prec:7s} fwd {row['forward_ms']:.4f} bwd {row['backward_ms']:.4f} ms  BLOCK_S={bs} "
                  f"BLOCK_V={bv} warps={warps} stages={stages}")
            out.append(row)
    for prec in args.sweep:
        for r in sorted((r for r in out if r["precision"] == prec), key=lambda r: r["ms"])[:3]:
            print(f"best {prec:7s} fwd+bwd {r['ms']:.4f} ms  BLOCK_S={r['BLOCK_S']} BLOCK_V={r['BLOCK_V']} "
                  f"warps={r['num_warps']} stages={r['num_stages']}")
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=20)
    ap.add_argument("--frames", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=880, help="tokens per frame (22x40 at release)")
    ap.add_argument("--head-dim", type=int, default=112)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--sweep", nargs="*", default=None, choices=gdn_triton.PRECISIONS,
                    help="also time tile configs of the Triton kernel in these precisions")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("scan_bench needs a CUDA device")
    result = run(args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
