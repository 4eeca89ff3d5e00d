"""Probe: the refiner's self-attention at the release shape, bf16 (cuDNN) against the fp8 kernel
(kernels/fp8_attention.py, fast path `refiner-fp8-attn`), with the fp8 kernel's launch configurations swept.

A release refiner forward runs 48 self-attentions: 2640 queries (a 3-frame block of 22 x 40) over the window's
sink + history (11 frames, 9680 keys) and the block's own 2640, 32 heads of 128. Timed, each replayed from a CUDA
graph (`--iters` replays one by one with CUDA events; median, min):

- bf16: SDPA over the 12320 keys as one tensor (the window with active slots), and the two-segment attention
  (`lean-memory`'s window: two cuDNN calls with their log-sum-exp, merged);
- fp8: the kernel over the two quantised segments, per configuration (`--configs`, of
  `kernels.fp8_attention.SWEEP`), and what a forward pays per layer with the default one: the block's K/V
  quantised (`quantize_kv`) plus the kernel;
- the window's fp8 copy rebuilt for all 48 layers (`quantize_kv_into`, once a block).

TFLOP/s count 4·N·M·D per head (the two products). Accuracy against fp32 attention over the same bf16 inputs:
relative Frobenius error. Prints a table last; writes JSON with `--out`.

    PYTHONPATH=. python3 tests/benchmarks/fp8_attention_probe.py --iters 30 --out fp8_attention_probe.json
"""

from __future__ import annotations

import argparse
import json

import torch
from graph_timing import time_graph  # this directory is on sys.path when run as a script

from engine.refiner.model import two_segment_attention
from kernels.fp8_attention import (
    DEFAULT_CONFIG,
    SWEEP,
    empty_quantized,
    fp8_attention_triton,
    quantize_kv,
    quantize_kv_into,
)

HEADS, HEAD_DIM, QUERIES, HISTORY, LAYERS = 32, 128, 3 * 22 * 40, 11 * 22 * 40, 48
DEVICE = "cuda"
def rel_fro(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def run(args) -> dict:
    g = torch.Generator(device=DEVICE).manual_seed(0)
    dt = torch.bfloat16

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=DEVICE).to(dt)

    q = randn(1, QUERIES, HEADS, HEAD_DIM).transpose(1, 2)  # [B, H, N, D] as the model's queries are laid out
    k_hist, v_hist = randn(1, HEADS, HISTORY, HEAD_DIM), randn(1, HEADS, HISTORY, HEAD_DIM)
    k_act, v_act = randn(1, HEADS, QUERIES, HEAD_DIM), randn(1, HEADS, QUERIES, HEAD_DIM)
    k_all, v_all = torch.cat([k_hist, k_act], 2), torch.cat([v_hist, v_act], 2)
    keys = HISTORY + QUERIES
    flop = 4.0 * QUERIES * keys * HEAD_DIM * HEADS
    exact = torch.nn.functional.scaled_dot_product_attention(q.float(), k_all.float(), v_all.float())
    hist8, act8 = quantize_kv(k_hist, v_hist), quantize_kv(k_act, v_act)

    cases = {
        "bf16 SDPA, one tensor": lambda: torch.nn.functional.scaled_dot_product_attention(q, k_all, v_all),
        "bf16 two segments (lean)": lambda: two_segment_attention(q, (k_hist, k_act), (v_hist, v_act)),
        "fp8 quantize_kv(block) + kernel": lambda: fp8_attention_triton(q, [hist8, quantize_kv(k_act, v_act)]),
        "fp8 quantize_kv(block) alone": lambda: quantize_kv(k_act, v_act).k,
    }
    for name in args.configs.split(","):
        cases[f"fp8 kernel {name}"] = (lambda cfg=SWEEP[name]: fp8_attention_triton(q, [hist8, act8], config=cfg))
    rows = []
    for name, fn in cases.items():
        row = {"name": name}
        try:
            r = time_graph(fn, args.iters)
            out = r.pop("out")
            row.update(r)
            if out.shape == exact.shape:
                row["tflops"] = round(flop / (row["median_ms"] * 1e-3) / 1e12, 1)
                row["rel_err_vs_fp32"] = rel_fro(out, exact)
        except Exception as e:  # a configuration the compiler refuses (shared memory, registers)
            row.update(median_ms=float("nan"), min_ms=float("nan"), error=f"{type(e).__name__}: "
                       + (str(e).splitlines() or [""])[0][:160])
        rows.append(row)

    # the window's fp8 copy, all layers at once (one block's refresh)
    win_k = randn(LAYERS, 1, HEADS, HISTORY, HEAD_DIM)
    win_v = randn(LAYERS, 1, HEADS, HISTORY, HEAD_DIM)
    copy = empty_quantized((LAYERS, 1, HEADS), HISTORY, HEAD_DIM, DEVICE)
    r = time_graph(lambda: quantize_kv_into(win_k, win_v, copy).k, max(3, args.iters // 5))
    r.pop("out")
    rows.append({"name": f"fp8 copy refresh, {LAYERS} layers (once a block)", **r})
    return dict(device=torch.cuda.get_device_name(), torch=torch.__version__, default_config=DEFAULT_CONFIG,
                shape=dict(heads=HEADS, head_dim=HEAD_DIM, queries=QUERIES, history=HISTORY, keys=keys,
                           layers=LAYERS), rows=rows)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--configs", default=",".join(SWEEP), help=f"comma-separated, of: {', '.join(SWEEP)}")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("fp8_attention_probe needs a CUDA device")
    unknown = [c for c in args.configs.split(",") if c not in SWEEP]
    if unknown:
        raise SystemExit(f"--configs: unknown {unknown[0]!r}; accepted: {', '.join(SWEEP)}")
    result = run(args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    sh = result["shape"]
    print(f"{result['device']}  torch {result['torch']}  {sh['heads']} heads of {sh['head_dim']}, {sh['queries']} "
          f"queries over {sh['keys']} keys")
    print(f"{'case':44s} {'median ms':>10s} {'min ms':>8s} {'TFLOP/s':>8s} {'rel err':>9s}")
    for r in result["rows"]:
        err = r.get("rel_err_vs_fp32")
        print(f"{r['name']:44s} {r['median_ms']:>10.4f} {r['min_ms']:>8.4f} {r.get('tflops', ''):>8} "
              f"{'' if err is None else f'{err:.2e}':>9s}" + (f"  {r['error']}" if "error" in r else ""))
    return result


if __name__ == "__main__":
    main()
