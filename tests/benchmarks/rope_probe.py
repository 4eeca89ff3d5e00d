"""Probe: does a real-arithmetic stage-1 RoPE compile to the right values on this GPU?

`engine.stage1.geometry.apply_rope` is the complex product, eagerly and under torch.compile, where inductor runs it
as separate eager kernels (~2.3 ms of a 41 ms release forward on an H100, with the copies around them). A real form
(a cos - b sin, a sin + b cos) would fuse, but sessions 3 and 4 found the compiled live loop (tiny preset, fp32,
`stage1-graph` + `stage1-compile`, torch scans) 0.16-0.23 off the eager one with it. This probe swaps the real form
in under torch.compile only and compares the live loop with the plain eager one, with the pieces varied:

- `compile`: `stage1-compile` alone (every forward through the compiled block call, no CUDA graphs);
- `graphs+compile`: with `stage1-graph` (the failing case);
- `graphs+compile+phases`: with the Triton scans of `all` (`stage1-block-phases`) instead of the torch scans (their
  TF32-level products put this variant ~1e-3 from the fp32 eager loop with either form).

Session 7, H100 (torch 2.11, triton 3.6), `--ropes real`: `graphs+compile` 2.32e-1 (twice; also with the torch scans
stacking their frames instead of writing a preallocated output, so that is not the cause), `graphs+compile+phases`
1.79e-3 (not compared with the complex form's figure of the same run). On the CPU (inductor's C++ backend) `compile`
gives 4.5e-5 with either form. Cause not found.

Prints one line per variant (max relative error over latents, frames and caches; the test tolerance is 1e-4) and
writes JSON with `--out`.

    PYTHONPATH=. python3 tests/benchmarks/rope_probe.py --out rope_probe.json
"""

from __future__ import annotations

import argparse
import json

import torch

import engine.stage1.attention as attention
import engine.stage1.geometry as geometry
from engine.bench import build_bench_world
from engine.fast.frames import restore_plain_frames
from engine.fast.refiner_rope import restore_plain_rope
from engine.fast.vae_pad import restore_plain_pad
from tests.test_fast_paths_gpu import GRAPHS, compare, rollout, tiny_split_rope

PLAIN = geometry.apply_rope


def real_rope(x: torch.Tensor, table: torch.Tensor, *, inverse: bool = False) -> torch.Tensor:
    """`geometry.apply_rope` in real arithmetic under torch.compile (the complex product eagerly)."""
    if not torch.compiler.is_compiling():
        return PLAIN(x, table, inverse=inverse)
    tab = torch.view_as_real(table)
    c, s = tab[..., 0], tab[..., 1]
    if inverse:
        s = -s
    xf = x.float().unflatten(-1, (-1, 2))
    a, b = xf[..., 0], xf[..., 1]
    return torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2).to(x.dtype)


VARIANTS = {
    "compile": ("stage1-compile",),
    "graphs+compile": GRAPHS + ("stage1-compile",),
    "graphs+compile+phases": GRAPHS + ("stage1-compile", "stage1-block-phases"),
}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--ropes", default="complex,real", help="which forms to run (complex: the plain path)")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu to smoke-test the `compile` variant")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    result = {"device": name, "torch": torch.__version__, "rows": []}
    for name in args.variants.split(","):
        for rope in args.ropes.split(","):
            torch._dynamo.reset()
            world = build_bench_world(tiny_split_rope(), device=device, dtype=torch.float32, seed=1)
            _, _, plain, snap_plain = rollout(world, (), "preview")
            geometry.apply_rope = attention.apply_rope = real_rope if rope == "real" else PLAIN
            try:
                _, _, fast, snap_fast = rollout(world, VARIANTS[name], "preview")
            finally:
                geometry.apply_rope = attention.apply_rope = PLAIN
                restore_plain_rope()
                restore_plain_pad(world.vae)
                restore_plain_frames()
            err = compare(fast, plain, snap_fast, snap_plain, "preview")
            result["rows"].append({"variant": name, "rope": rope, "max_rel_err": err})
            print(f"{name:24s} {rope:8s} max rel err {err:.2e}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
