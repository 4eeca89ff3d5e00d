"""Benchmark for issue 7: the stage-1 GDN / camera scans, plain torch (strict fp32 and TF32) vs Triton.

At the release shapes (B=1, H=20, T=3 frames of S=880 tokens, D=112; bf16 inputs laid out as the model's
`[B, H, T, S, D]` views of `[B, N, H*D]`) it times, per scan function, the plain reference with TF32 off, the
same with TF32 on (the `stage1-tf32-scans` path) and kernels/gdn_triton.py in each precision and each
`--strategy` ("stream": one launch walking the frames; "parallel": frame matrices, recurrence, readout in three
launches), both eagerly and replayed from a CUDA graph (as the `stage1-graph` fast path runs them), and the max
relative error of each against the strict fp32 reference. Prints a table; writes JSON with `--out`. `--sweep`
also times tile configs of the Triton kernels (for "parallel" one phase's settings at a time, the others at
their defaults).

    PYTHONPATH=. python3 tests/benchmarks/scan_bench.py --strategy stream parallel --out scan_bench.json \
        [--sweep [tf32 ...]]

`--block tf32 [...]` instead times one GDN block's four scans as the model runs them with `stage1-triton-scans`:
one launch of `gdn_block_triton` against the four "stream" launches (graph replay), their difference (zero
expected: same per-program code); then the combined results a block uses (`ScanOps.block_combined`): the one
launch with the combination in eager torch against `gdn_block_phases_triton` (`stage1-block-phases`), and their
difference; with `--sweep` the block launch's tile configs and the phased block's, one phase at a time.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json

import torch
from graph_timing import capture  # this directory is on sys.path when run as a script

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
    return time_eager(capture(fn)[0].replay, iters)


def run(args) -> dict:
    device = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    x = release_inputs(args.batch, args.heads, args.frames, args.tokens, args.head_dim, dtype, device)
    impls = {"torch-fp32": None, "torch-tf32": None,
             **{f"triton-{st}-{p}": (st, p) for st in args.strategy for p in gdn_triton.PRECISIONS}}
    rows = []
    totals = {name: {"eager_ms": 0.0, "graph_ms": 0.0} for name in impls}
    for fn_name, (ref_fn, tri_fn, fargs) in scan_calls(x).items():
        with tf32(False):
            ref = ref_fn(*fargs)
        for impl, triton_impl in impls.items():
            if triton_impl is None:
                on = impl == "torch-tf32"

                def call(ref_fn=ref_fn, fargs=fargs, on=on):
                    with tf32(on):
                        return ref_fn(*fargs)
            else:
                strategy, prec = triton_impl
                call = functools.partial(tri_fn, *fargs, precision=prec, strategy=strategy)
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
    print(f"{'function':22s} {'impl':24s} {'eager ms':>9s} {'graph ms':>9s} {'max rel err':>12s}")
    for r in rows:
        print(f"{r['fn']:22s} {r['impl']:24s} {r['eager_ms']:9.3f} {r['graph_ms']:9.3f} {r['max_rel_err']:12.2e}")
    if args.sweep is not None:
        args.sweep = args.sweep or list(gdn_triton.PRECISIONS)
        result["sweep"] = sweep(x, args)
    return result


SWEEP_GRID = {  # "stream": BLOCK_S, BLOCK_V, num_warps, num_stages
    "tf32": ((32, 64, 128), (16, 32, 64), (4, 8), (2,)),
    "tf32x3": ((32, 64, 128), (16, 32, 64), (4, 8), (2,)),
    "ieee": ((16, 32), (16, 32), (4, 8), (2,)),
}
BLOCK_SWEEP = {  # the block launch ("stream" tiles; each config is a compile of a four-branch kernel)
    "tf32": ((64, 128), (16, 32, 64), (4, 8), (2,)),
    "tf32x3": ((64, 128), (16, 32), (4, 8), (2,)),
    "ieee": ((16, 32), (16, 32), (4,), (2,)),
}
PARALLEL_SWEEP = {  # "parallel": per phase, the settings tried together (the other phases at their defaults)
    "phase 1": dict(P1_BLOCK_S=(32, 64), P1_BLOCK_R=(32, 64), P1_SPLIT=(256, 512, 1024), P1_WARPS=(4, 8)),
    "phase 2": dict(P2_BLOCK_V=(16, 32, 64), P2_BLOCK_C=(16, 32), P2_WARPS=(4, 8)),
    "phase 3": dict(P3_BLOCK_S=(32, 64, 128), P3_BLOCK_V=(32, 64, 128), P3_WARPS=(4, 8)),
}

PHASES_SWEEP = {  # the phased block (`--block ... --sweep`): per phase, as PARALLEL_SWEEP, with larger phase-1 tiles
    "phase 1": dict(P1_BLOCK_S=(32, 64, 128), P1_BLOCK_R=(32, 64, 128), P1_SPLIT=(512, 1024), P1_WARPS=(4, 8)),
    "phase 2": PARALLEL_SWEEP["phase 2"],
    "phase 3": PARALLEL_SWEEP["phase 3"],
}


def sweep_configs(strategy: str, prec: str, D: int):
    """(label, launch_with_config keywords) per config to time."""
    if strategy == "stream":
        for bs, bv, warps, stages in itertools.product(*SWEEP_GRID[prec]):
            yield "stream", dict(BLOCK_S=bs, BLOCK_V=bv, BLOCK_S_NORM=bs, num_warps=warps, num_stages=stages)
        return
    base = gdn_triton._parallel_blocks(D, D, prec)
    for phase, grid in PARALLEL_SWEEP.items():
        for values in itertools.product(*grid.values()):
            yield phase, dict(base, **dict(zip(grid, values, strict=True)))


def shown(label: str, cfg: dict) -> dict:
    """The settings a sweep line varies (a parallel phase's), or every setting (stream)."""
    keys = PHASES_SWEEP[label] if label in PHASES_SWEEP else SWEEP_KEYS
    return {k: cfg[k] for k in keys}


SWEEP_KEYS = ("BLOCK_S", "BLOCK_V", "num_warps", "num_stages")


def sweep(x, args) -> list[dict]:
    """Graph-replayed time of the GDN forward (with state) and backward launches (numerator + normaliser) per
    tile config, for each strategy."""
    fa = (x["q_rot"], x["k_rot"], x["v"], x["beta"], x["gamma"])
    out = []
    for strategy in args.strategy:
        for prec in args.sweep:
            for label, cfg in sweep_configs(strategy, prec, args.head_dim):
                row = dict(strategy=strategy, precision=prec, varied=label, **cfg)
                for direction, reverse in (("forward", False), ("backward", True)):
                    call = functools.partial(gdn_triton.launch_with_config, *fa, None if reverse else x["sigma"],
                                             reverse=reverse, precision=prec, strategy=strategy, qn=x["q"],
                                             kn=x["k"], z=None if reverse else x["z"], **cfg)
                    try:
                        row[f"{direction}_ms"] = time_graph(call, args.iters)
                    except Exception as e:  # noqa: BLE001 - a config that does not compile (resources) is skipped
                        print(f"sweep {strategy} {prec} {cfg} {direction}: failed ({type(e).__name__})")
                        row[f"{direction}_ms"] = float("inf")
                row["ms"] = row["forward_ms"] + row["backward_ms"]
                print(f"sweep {strategy:8s} {prec:7s} fwd {row['forward_ms']:.4f} bwd {row['backward_ms']:.4f} ms  "
                      f"{label}: {shown(label, cfg)}")
                out.append(row)
    for strategy in args.strategy:
        for prec in args.sweep:
            for label in dict.fromkeys(r["varied"] for r in out if r["strategy"] == strategy):
                mine = [r for r in out if (r["strategy"], r["precision"], r["varied"]) == (strategy, prec, label)]
                for r in sorted(mine, key=lambda r: r["ms"])[:3]:
                    print(f"best {strategy:8s} {prec:7s} {label}: fwd+bwd {r['ms']:.4f} ms  {shown(label, r)}")
    return out


def block_rows(x, args) -> dict:
    """One GDN block's four scans (camera inputs: the main q, k, v again): the block launch vs four launches."""
    from engine.fast.scans import triton_scan_ops
    from engine.stage1.temporal import ScanOps

    one_launch = lambda prec: functools.partial(gdn_triton.gdn_block_triton, precision=prec)
    a = (x["q_rot"], x["k_rot"], x["q"], x["k"], x["v"], x["beta"], x["gamma"], (x["sigma"], x["z"]),
         x["q_rot"], x["k_rot"], x["v"], x["beta"] * 0.5, x["sigma"] * 0.5)
    rows, sweep_rows = [], []
    for prec in args.block:
        four = triton_scan_ops(precision=prec, strategy="stream")
        four.gdn_block = None
        one = functools.partial(gdn_triton.gdn_block_triton, *a, precision=prec)
        diff = max_rel(one(), four.block(*a))
        t_four, t_one = time_graph(functools.partial(four.block, *a), args.iters), time_graph(one, args.iters)
        rows.append(dict(precision=prec, four_launches_ms=t_four, one_launch_ms=t_one, max_rel_diff=diff))
        print(f"block {prec:7s} four launches {t_four:.4f} ms  one launch {t_one:.4f} ms  diff {diff:.1e}")
        stream_sweep = args.sweep is not None and args.block_sweep in ("stream", "both")
        for bs, bv, warps, stages in itertools.product(*BLOCK_SWEEP[prec]) if stream_sweep else ():
            cfg = dict(BLOCK_S=bs, BLOCK_V=bv, BLOCK_S_NORM=bs, num_warps=warps, num_stages=stages)
            try:
                ms = time_graph(functools.partial(gdn_triton.gdn_block_triton, *a, precision=prec, config=cfg),
                                args.iters)
            except Exception as e:  # noqa: BLE001 - a config that does not compile (resources) is skipped
                print(f"sweep block {prec} {cfg}: failed ({type(e).__name__})")
                ms = float("inf")
            sweep_rows.append(dict(precision=prec, ms=ms, **cfg))
            print(f"sweep block {prec:7s} {ms:.4f} ms  {cfg}")
        for r in sorted((r for r in sweep_rows if r["precision"] == prec and "BLOCK_S" in r),
                        key=lambda r: r["ms"])[:3]:
            print(f"best block {prec:7s} {r['ms']:.4f} ms  {({k: r[k] for k in SWEEP_KEYS})}")
        # the combined results the blocks use: the one launch + the combination in torch (eager kernels; compiled,
        # inductor fuses them into the neighbours) vs the phased block, which combines in its readout
        out_dtype = x["q"].dtype
        combined_one = functools.partial(ScanOps(gdn_block=one_launch(prec)).block_combined, *a, eps=1e-8,
                                         out_dtype=out_dtype)
        phases = functools.partial(gdn_triton.gdn_block_phases_triton, *a, eps=1e-8, out_dtype=out_dtype,
                                   precision=prec)
        m1, s1, c1, sc1 = combined_one()
        m2, s2, c2, sc2 = phases()
        diff = max(max_rel(p, q) for p, q in zip((m2, *s2, c2, sc2), (m1, *s1, c1, sc1), strict=True))
        t_comb, t_phases = time_graph(combined_one, args.iters), time_graph(phases, args.iters)
        rows[-1].update(one_launch_combined_ms=t_comb, phases_ms=t_phases, phases_max_rel_diff=diff)
        print(f"block {prec:7s} one launch + torch combine {t_comb:.4f} ms  phases (combined) {t_phases:.4f} ms  "
              f"diff {diff:.1e}")
        split = prec == "tf32" and out_dtype == torch.bfloat16  # as gdn_block_phases_triton decides
        base = gdn_triton._phases_blocks(args.head_dim, args.head_dim, prec, split)
        phases_sweep = args.sweep is not None and args.block_sweep in ("phases", "both")
        for phase, grid in PHASES_SWEEP.items() if phases_sweep else ():
            for values in itertools.product(*grid.values()):
                cfg = dict(base, **dict(zip(grid, values, strict=True)))
                try:
                    ms = time_graph(functools.partial(gdn_triton.gdn_block_phases_triton, *a, eps=1e-8,
                                                      out_dtype=out_dtype, precision=prec, config=cfg), args.iters)
                except Exception as e:  # noqa: BLE001 - a config that does not compile (resources) is skipped
                    print(f"sweep phases {prec} {cfg}: failed ({type(e).__name__})")
                    ms = float("inf")
                sweep_rows.append(dict(precision=prec, ms=ms, launch="phases", varied=phase, **cfg))
                print(f"sweep phases {prec:7s} {ms:.4f} ms  {phase}: {shown(phase, cfg)}")
            mine = [r for r in sweep_rows if r.get("varied") == phase and r["precision"] == prec]
            for r in sorted(mine, key=lambda r: r["ms"])[:3]:
                print(f"best phases {prec:7s} {phase}: {r['ms']:.4f} ms  {shown(phase, r)}")
    return dict(shape=dict(B=args.batch, H=args.heads, T=args.frames, S=args.tokens, D=args.head_dim),
                dtype=args.dtype, device=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=getattr(gdn_triton.triton, "__version__", None), block=rows, sweep=sweep_rows)

def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=20)
    ap.add_argument("--frames", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=880, help="tokens per frame (22x40 at release)")
    ap.add_argument("--head-dim", type=int, default=112)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--strategy", nargs="+", default=list(gdn_triton.STRATEGIES), choices=gdn_triton.STRATEGIES,
                    help="the Triton strategies to time side by side (default: all)")
    ap.add_argument("--sweep", nargs="*", default=None, choices=gdn_triton.PRECISIONS,
                    help="also time tile configs of the Triton kernels in these precisions")
    ap.add_argument("--block", nargs="+", default=None, choices=gdn_triton.PRECISIONS,
                    help="only time a GDN block's four scans, one launch vs four, in these precisions")
    ap.add_argument("--block-sweep", default="both", choices=("stream", "phases", "both"),
                    help="with --block and --sweep: which block launch's tiles to sweep")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("scan_bench needs a CUDA device")
    if args.block:
        result = block_rows(release_inputs(args.batch, args.heads, args.frames, args.tokens, args.head_dim,
                                           getattr(torch, args.dtype), torch.device("cuda")), args)
    else:
        result = run(args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
