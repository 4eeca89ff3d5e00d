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

Session 7, H100 (torch 2.11, triton 3.6), the unflatten / stack form (`--ropes stack` now): `graphs+compile` 2.32e-1
(twice; also with the torch scans stacking their frames instead of writing a preallocated output, so that is not the
cause), `graphs+compile+phases` 1.79e-3. On the CPU (inductor's C++ backend) `compile` gives 4.6e-5 with either form,
and the real form is bit-equal to the complex one there.

Session 8, H100 (tests/benchmarks/results/h100_2026-11-27_s8_call1_rope_probe.txt): `graphs+compile` complex 1.13e-3,
stack 2.32e-1, and the pair-swap form x cos + x[pair-swapped] (-sin, +sin) (`real`, kept as `kernels.rope.
rope_pairs_real`, fast path `stage1-real-rope`) 1.14e-3, the complex form's own figure; `graphs+compile+phases` all
three 1.78e-3. So the miscompile belongs to the unflatten / stack form with the torch scans (still not understood);
tests/test_fast_paths_gpu.py compares `real` with the complex multiply under the same compiled graphs (2.7e-7 with the
torch scans, 4.4e-5 with the Triton ones).

Prints one line per variant and form (max relative error over latents, frames and caches against the plain eager loop;
the forms after the first also against the first, with the worst items) and writes JSON with `--out`.

    PYTHONPATH=. python3 tests/benchmarks/rope_probe.py --out rope_probe.json
"""

from __future__ import annotations

import argparse
import json

import torch

import engine.stage1.attention as attention
import engine.stage1.geometry as geometry
from engine.bench import build_bench_world
from engine.fast.stage1_rope import apply_rope_compiled
from tests.test_fast_paths_gpu import GRAPHS, compare, rel, rollout, tiny_split_rope, undo_fast_paths

PLAIN = geometry.apply_rope


def stack_rope(x: torch.Tensor, table: torch.Tensor, *, inverse: bool = False) -> torch.Tensor:
    """Under torch.compile, the unflatten / stack real form (the one that miscompiled); the complex product eagerly."""
    if not torch.compiler.is_compiling():
        return PLAIN(x, table, inverse=inverse)
    tab = torch.view_as_real(table)
    c, s = tab[..., 0], tab[..., 1]
    if inverse:
        s = -s
    xf = x.float().unflatten(-1, (-1, 2))
    a, b = xf[..., 0], xf[..., 1]
    return torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2).to(x.dtype)


ROPES = {"complex": PLAIN, "stack": stack_rope, "real": apply_rope_compiled}

VARIANTS = {
    "compile": ("stage1-compile",),
    "graphs+compile": GRAPHS + ("stage1-compile",),
    "graphs+compile+phases": GRAPHS + ("stage1-compile", "stage1-block-phases"),
}


def worst(fast, plain, snap_fast, snap_plain, n: int = 3) -> list[tuple[str, float]]:
    """The `n` largest relative errors of `compare`'s items (latents and frames per chunk, every cache entry)."""
    errs = []
    for a, b in zip(fast, plain, strict=True):
        errs.append((f"latents[{a.index}]", rel(a.latents, b.latents)))
        errs.append((f"frames[{a.index}]", rel(torch.from_numpy(a.frames).float(), torch.from_numpy(b.frames).float())))
    for k in snap_plain:
        if k.split(".")[0] == "stage1" and snap_plain[k].is_floating_point() and snap_plain[k].abs().max() > 0:
            errs.append((k, rel(snap_fast[k], snap_plain[k])))
    return sorted(errs, key=lambda e: -e[1])[:n]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--ropes", default="complex,real", help=f"forms to run, of {list(ROPES)}; the first is the "
                    "one the others are also compared with (complex: the plain path)")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu to smoke-test the `compile` variant")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    result = {"device": name, "torch": torch.__version__, "rows": []}
    ropes = args.ropes.split(",")
    for name in args.variants.split(","):
        world = build_bench_world(tiny_split_rope(), device=device, dtype=torch.float32, seed=1)
        _, _, plain, snap_plain = rollout(world, (), "preview")
        first = None
        for rope in ropes:
            torch._dynamo.reset()
            geometry.apply_rope = attention.apply_rope = ROPES[rope]
            try:
                _, _, fast, snap_fast = rollout(world, VARIANTS[name], "preview")
            finally:
                undo_fast_paths(world)  # the stage-1 RoPE back to the plain one in both modules, among the rest
            row = {"variant": name, "rope": rope, "max_rel_err": compare(fast, plain, snap_fast, snap_plain, "preview"),
                   "worst": worst(fast, plain, snap_fast, snap_plain)}
            if first is None:
                first = (fast, snap_fast)
            else:
                row[f"vs_{ropes[0]}"] = compare(fast, first[0], snap_fast, first[1], "preview")
                row[f"worst_vs_{ropes[0]}"] = worst(fast, first[0], snap_fast, first[1])
            result["rows"].append(row)
            extra = f", vs {ropes[0]} {row[f'vs_{ropes[0]}']:.2e}" if f"vs_{ropes[0]}" in row else ""
            worst_first = row.get(f"worst_vs_{ropes[0]}")
            print(f"{name:24s} {rope:8s} max rel err vs eager {row['max_rel_err']:.2e}{extra}; worst "
                  + ", ".join(f"{k} {e:.1e}" for k, e in worst_first or row["worst"]), flush=True)
            if args.out:  # after each row: a run cut short keeps what it measured
                with open(args.out, "w") as f:
                    json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
