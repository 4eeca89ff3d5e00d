"""Probe: what the stage-1 attentions cost at the release shape, and what the cross-attention's padding costs.

A release stage-1 forward runs 30 SDPA calls (bench profile, session 9: 5.6 ms of its 37.5 ms of GPU time): per
softmax block (5) the main and the camera self-attention, 2640 queries (3 frames of 22 x 40) over a 8800-key window
(the chunk, the 4-frame sink, the 3-frame recent chunk), and per block (20) the cross-attention to the prompt: 2640
queries over the stage-1 text's 300 positions, padding masked by an additive -10000 bias (the bench's stand-in
prompt has `--tokens` = 40 real ones). 20 heads of 112.

Timed, each replayed from a CUDA graph (`--iters` replays one by one with CUDA events; median, min), with torch's
SDPA backend choice and with cuDNN's forced:

- self-attention, 2640 x 8800 keys, no mask;
- cross-attention as the model runs it: 300 keys + the bias;
- cross-attention on the real tokens only (no bias), and on them padded to a multiple of 64 (bias over those).

Softmax gives the masked keys weight exp(-10000 - ...) = 0 exactly in fp32, so the trimmed calls compute the same
function; their max |difference| / max |value| against the full call is printed. Prints a table last; writes JSON
with `--out`.

    PYTHONPATH=. python3 tests/benchmarks/sdpa_probe.py --iters 50 --out sdpa_probe.json
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from graph_timing import time_graph  # this directory is on sys.path when run as a script
from torch.nn.attention import SDPBackend, sdpa_kernel

HEADS, HEAD_DIM, QUERIES, WINDOW, TEXT = 20, 112, 3 * 22 * 40, 10 * 22 * 40, 300
DEVICE = "cuda"


def max_rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return ((out.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def run(args) -> dict:
    g = torch.Generator(device=DEVICE).manual_seed(0)
    dt = torch.bfloat16

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=DEVICE).to(dt)

    q = randn(1, HEADS, QUERIES, HEAD_DIM)
    k_win, v_win = randn(1, HEADS, WINDOW, HEAD_DIM), randn(1, HEADS, WINDOW, HEAD_DIM)
    k_txt, v_txt = randn(1, HEADS, TEXT, HEAD_DIM), randn(1, HEADS, TEXT, HEAD_DIM)
    mask = torch.zeros(1, TEXT, device=DEVICE)
    mask[:, : args.tokens] = 1
    bias = (-10000.0 * (1.0 - mask.to(dt)))[:, None, None, :]  # as Stage1Transformer.encode_text makes it
    n64 = -(-args.tokens // 64) * 64
    scale = HEAD_DIM ** -0.5
    cases = {
        "self-attention, 8800 keys": lambda: F.scaled_dot_product_attention(q, k_win, v_win, scale=scale),
        "cross, 300 keys + bias (model)": lambda: F.scaled_dot_product_attention(q, k_txt, v_txt, attn_mask=bias,
                                                                                 scale=scale),
        f"cross, {args.tokens} real keys, no bias": lambda: F.scaled_dot_product_attention(
            q, k_txt[:, :, : args.tokens], v_txt[:, :, : args.tokens], scale=scale),
        f"cross, {n64} keys + bias": lambda: F.scaled_dot_product_attention(
            q, k_txt[:, :, :n64], v_txt[:, :, :n64], attn_mask=bias[..., :n64], scale=scale),
    }
    rows = []
    for backend in ("default", "cudnn"):
        ref = None
        for name, fn in cases.items():
            row = {"backend": backend, "name": name}
            try:
                if backend == "cudnn":
                    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                        r = time_graph(fn, args.iters)
                else:
                    r = time_graph(fn, args.iters)
                out = r.pop("out")
                row.update(r)
                if name.startswith("cross"):
                    ref = out.clone() if ref is None else ref
                    row["max_rel_diff_vs_model"] = max_rel(out, ref)
            except RuntimeError as e:  # a backend that refuses the case
                row.update(median_ms=float("nan"), min_ms=float("nan"), error=str(e).splitlines()[0][:160])
            rows.append(row)
    return dict(device=torch.cuda.get_device_name(), torch=torch.__version__, tokens=args.tokens,
                shape=dict(heads=HEADS, head_dim=HEAD_DIM, queries=QUERIES, window=WINDOW, text=TEXT), rows=rows)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=40, help="real prompt tokens of the 300 positions")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("sdpa_probe needs a CUDA device")
    if not 1 <= args.tokens <= TEXT:
        raise SystemExit(f"--tokens {args.tokens}; accepted: 1 .. {TEXT}")
    result = run(args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(f"{result['device']}  torch {result['torch']}  bf16, {HEADS} heads of {HEAD_DIM}, {QUERIES} queries")
    print(f"{'backend':8s} {'case':36s} {'median ms':>10s} {'min ms':>8s} {'diff vs model':>14s}")
    for r in result["rows"]:
        diff = r.get("max_rel_diff_vs_model")
        print(f"{r['backend']:8s} {r['name']:36s} {r['median_ms']:>10.4f} {r['min_ms']:>8.4f} "
              f"{'' if diff is None else f'{diff:.1e}':>14s}" + (f"  {r['error']}" if "error" in r else ""))
    return result


if __name__ == "__main__":
    main()
