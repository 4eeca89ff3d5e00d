"""Probe for `refiner-gelu`: the refiner FFN up-projection at the release block shape, plain (GEMM, then the tanh
GELU as its own pass, eagerly and under torch.compile) against the fused op (engine/fast/refiner_gelu.py: bias and
GELU in cuBLASLt's epilogue). Each replayed from a CUDA graph, `--iters` replays timed one by one with CUDA events
(median, min); error of each against an fp64 evaluation of the same function. Prints a table; writes JSON with `--out`.

    PYTHONPATH=. python3 tests/benchmarks/gelu_probe.py --out gelu.json
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from graph_timing import time_graph  # this directory is on sys.path when run as a script

from engine.fast.refiner_gelu import linear_gelu_tanh


def plain(x, w, b):
    return F.gelu(F.linear(x, w, b), approximate="tanh")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2640)  # one release block: 3 latent frames x 22 x 40
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=16384)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, args.tokens, args.dim, device="cuda", generator=g).to(torch.bfloat16)
    w = (torch.randn(args.hidden, args.dim, device="cuda", generator=g) / args.dim**0.5).to(torch.bfloat16)
    b = (0.1 * torch.randn(args.hidden, device="cuda", generator=g)).to(torch.bfloat16)
    exact = plain(x.double(), w.double(), b.double())
    compiled = torch.compile(plain)
    rows = []
    for name, fn in (("plain eager", lambda: plain(x, w, b)), ("plain compiled", lambda: compiled(x, w, b)),
                     ("GEMM only (no GELU)", lambda: F.linear(x, w, b)),
                     ("fused epilogue", lambda: linear_gelu_tanh(x, w, b))):
        r = time_graph(fn, args.iters)
        out = r.pop("out")
        r["rel_err"] = None if "no GELU" in name else ((out.double() - exact).norm() / exact.norm()).item()
        rows.append({"name": name, **r})
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "shape": {"tokens": args.tokens, "dim": args.dim, "hidden": args.hidden}, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    print(f"{'FFN up-projection ' + str((args.tokens, args.dim, args.hidden)):44s} {'median ms':>10s} {'min ms':>8s} "
          f"{'rel err':>9s}")
    for r in rows:
        err = "-" if r["rel_err"] is None else f"{r['rel_err']:.2e}"
        print(f"{r['name']:44s} {r['median_ms']:>10.4f} {r['min_ms']:>8.4f} {err:>9s}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
