"""Probe for issue 7: does `torch.compile` of the stage-1 blocks cut the steady-state streaming forward?

Builds the preset's stage-1 with random weights (engine.bench), runs three chunks of the live loop so the
caches hold a full softmax window, then times one read-only streaming forward of a 3-frame chunk eagerly and
with every block compiled (`block.compile()`, inductor defaults; compile time reported apart), and the
relative difference of the two outputs. Prints a table; writes JSON with `--out`.

    PYTHONPATH=. python3 tests/benchmarks/compile_probe.py --preset release --device cuda --out probe.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from engine.bench import build_bench_world, first_image, scripted_controls
from engine.rollout import Rollout, chunk_plan
from engine.world import WorldPipeline, resolve_dtype


def timed(fn, device, iters):
    for _ in range(2):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) * 1e3 / iters


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--mode", default=None, help="torch.compile mode, e.g. reduce-overhead (default: inductor's)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    world = build_bench_world(args.preset, device=device, dtype=resolve_dtype(args.dtype, device), with_refiner=False)
    p = world.preset
    pipe = WorldPipeline(world)
    pipe.start(first_image(p, 0), "a street", "preview")
    ro = Rollout(pipe, scripted_controls(5), intrinsics_px=p.default_intrinsics, quality="preview")
    list(ro.chunks(3))
    plan = chunk_plan(ro.next_index)
    ctl = ro.controls.next_chunk(plan)
    cam = ro._camera(plan, ctl.poses)
    s = pipe.stream
    cc, cp = (t.to(device, world.dtype) for t in (cam["camera_conditions"], cam["chunk_plucker"]))
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn((1, p.stage1.in_channels, 3, *pipe.latent_hw), generator=g).to(device, world.dtype)
    t = torch.full((1, 1, 3), 960.0, device=device)

    def forward():
        with torch.no_grad():
            return s.model.forward_cached(x, t, s.text, cc, cp, s.cache, write_cache=False, mode=s.mode)

    eager_out = forward().float()
    eager_ms = timed(forward, device, args.iters)
    for block in s.model.blocks:
        block.compile(mode=args.mode)
    t0 = time.perf_counter()
    compiled_out = forward().float()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    compile_s = time.perf_counter() - t0
    compiled_ms = timed(forward, device, args.iters)
    rel = ((compiled_out - eager_out).norm() / eager_out.norm()).item()
    result = {
        "preset": p.name, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(world.dtype), "torch": torch.__version__, "eager_ms": round(eager_ms, 3),
        "compiled_blocks_ms": round(compiled_ms, 3), "first_compiled_call_s": round(compile_s, 1),
        "compile_mode": args.mode, "rel_diff": rel, "date_utc": time.strftime("%Y-%m-%d", time.gmtime()),
    }
    print(f"{'stage-1 streaming forward (3 frames, read-only)':<52}{'ms':>10}")
    print(f"{'eager':<52}{eager_ms:>10.2f}")
    print(f"{'blocks compiled (inductor)':<52}{compiled_ms:>10.2f}")
    print(f"first compiled call {compile_s:.1f} s, relative difference {rel:.2e}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
