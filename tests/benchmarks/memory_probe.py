"""Where the GPU memory of a release live loop goes (issue 7's peak-memory target, <= 42 GB in full bf16).

Builds the release world with random weights, runs `--chunks` chunks of the live loop in `--quality` with
`--fast`, then reports, in GB:
- the weights by part, and the parts a chunk never reads (used only when a prompt is set or the first image is
  encoded): the refiner's cross-attention K/V projections and caption projection, stage-1's cross-attention K/V
  projection and caption embedder, the VAE encoder, the refiner's text connectors;
- the session state: stage-1 caches, VAE decoder caches, the refiner's K/V window (and of it the active-block
  slots) and the prompts' cached text K/V;
- the allocator after the chunks: allocated, reserved, and reserved / active per memory pool (the default pool
  and each CUDA graph's private pool);
- the peak over the last `--steady` chunks alone (after the warm-up, graphs captured) and over the whole run.

    PYTHONPATH=. python3 tests/benchmarks/memory_probe.py --quality full --fast all --chunks 8 --out mem.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from engine.bench import build_bench_world, first_image, scripted_controls
from engine.rollout import Rollout
from engine.world import WorldPipeline

GB = 1e9


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def param_bytes(module, pred=lambda name: True) -> int:
    return nbytes(p for n, p in module.named_parameters() if pred(n)) if module is not None else 0


def weights(world) -> dict:
    out = {"stage1": param_bytes(world.stage1), "refiner": param_bytes(world.refiner),
           "vae.encoder": param_bytes(world.vae.encoder), "vae.decoder": param_bytes(world.vae.decoder),
           "connectors": param_bytes(world.connectors)}
    out = {k: v for k, v in out.items() if v}
    out["prompt_or_image_only"] = {
        "refiner attn2.to_k/to_v/norm_k": param_bytes(world.refiner, lambda n: ".attn2.to_k." in n
                                                      or ".attn2.to_v." in n or ".attn2.norm_k." in n),
        "refiner caption_projection": param_bytes(world.refiner, lambda n: n.startswith("caption_projection.")),
        "stage1 cross_attn.kv_linear/k_norm": param_bytes(world.stage1, lambda n: ".cross_attn.kv_linear." in n
                                                          or ".cross_attn.k_norm." in n),
        "stage1 y_embedder": param_bytes(world.stage1, lambda n: n.startswith("y_embedder.")),
        "vae.encoder": out.get("vae.encoder", 0),
        "connectors": out.get("connectors", 0),
    }
    return out


def state(pipe) -> dict:
    out = {"stage1 caches": nbytes(pipe.stream.snapshot(copy=False).values()),
           "vae decoder caches": nbytes(pipe.decoder.snapshot(copy=False).values()),
           "stage1 text K/V": nbytes(t for kv in pipe.stream.text.kv for t in kv) + nbytes([pipe.stream.text.bias])}
    ref = pipe.refiner
    if ref is not None and ref.window is not None:
        w = ref.window
        out["refiner window (all slots)"] = w.nbytes
        if w.active_slots:  # lean-memory's split window has none
            active = w._tok(w.max_block)
            out["refiner window active-block slots"] = 2 * nbytes([w.k[:, :, :, :active]])
        if ref.text is not None:
            out["refiner text K/V"] = nbytes(list(ref.text.k) + list(ref.text.v))
    return out


def pools() -> list[dict]:
    rows: dict = {}
    for seg in torch.cuda.memory_snapshot():
        pool = str(tuple(seg.get("segment_pool_id", (0, 0))))
        r = rows.setdefault(pool, {"pool": pool, "segments": 0, "reserved": 0, "active": 0})
        r["segments"] += 1
        r["reserved"] += seg["total_size"]
        r["active"] += sum(b["size"] for b in seg["blocks"] if b["state"] == "active_allocated")
    return sorted(rows.values(), key=lambda r: -r["reserved"])


def here(filename: str) -> str:
    """A file of this project as `engine/...` or `kernels/...` ('' for other files)."""
    for part in ("/engine/", "/kernels/"):
        if part in filename:
            return filename[filename.rindex(part) + 1:]
    return ""


def largest_blocks(n: int) -> list[dict]:
    """The n largest live allocations with the innermost frames of this project that made them."""
    blocks = []
    for seg in torch.cuda.memory._snapshot()["segments"]:
        for b in seg["blocks"]:
            if b["state"] == "active_allocated":
                frames = [f"{here(f['filename'])}:{f['line']} {f['name']}" for f in b.get("frames", [])
                          if here(f["filename"])]
                blocks.append({"bytes": b["size"], "frames": frames[:4]})
    return sorted(blocks, key=lambda b: -b["bytes"])[:n]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quality", default="full", choices=("preview", "full"))
    ap.add_argument("--fast", default="all")
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--steady", type=int, default=2, help="chunks at the end whose peak is reported alone")
    ap.add_argument("--history", type=int, default=0,
                    help="record allocation stacks and list this many of the largest live blocks with their origin")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("memory_probe needs a CUDA device")
    if not 1 <= args.steady < args.chunks:
        raise SystemExit(f"--steady {args.steady}; accepted: 1 .. --chunks - 1 ({args.chunks - 1})")
    dev = torch.device("cuda")
    world = build_bench_world("release", device=dev, dtype=torch.bfloat16, seed=0,
                              with_refiner=args.quality == "full")
    pipe = WorldPipeline(world)
    fast = tuple(f for f in args.fast.split(",") if f)
    if fast:
        from engine.fast import apply_fast_paths

        apply_fast_paths(pipe, fast)
    if args.history:
        torch.cuda.memory._record_memory_history(max_entries=200000, stacks="python")
    torch.cuda.reset_peak_memory_stats(dev)
    pipe.start(first_image(world.preset, 0), "a quiet street at dusk", args.quality)
    ro = Rollout(pipe, scripted_controls(args.chunks), intrinsics_px=world.preset.default_intrinsics, seed=0,
                 quality=args.quality)
    after = []
    for i, _ in enumerate(ro.chunks(args.chunks)):
        torch.cuda.synchronize()
        after.append(torch.cuda.memory_allocated(dev))
        if i == args.chunks - args.steady - 1:
            whole_peak = torch.cuda.max_memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
    steady_peak = torch.cuda.max_memory_allocated(dev)
    report = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "quality": args.quality, "fast": list(fast), "chunks": args.chunks,
        "weights_bytes": weights(world), "state_bytes": state(pipe),
        "allocated_after_chunk": after, "reserved": torch.cuda.memory_reserved(dev),
        "peak_steady_chunks": steady_peak, "peak_before_steady": whole_peak, "pools": pools(),
    }
    if args.fast and "lean-memory" in fast:
        from engine.fast.lean_memory import host_resident_bytes

        report["host_resident_bytes"] = host_resident_bytes(world)
    if args.history:
        report["largest_live_blocks"] = largest_blocks(args.history)
    w, s = report["weights_bytes"], report["state_bytes"]
    print(f"{report['device']}  {args.quality}  fast={args.fast}  {args.chunks} chunks")
    for k, v in w.items():
        if k != "prompt_or_image_only":
            print(f"  weights {k:40s} {v / GB:7.3f} GB")
    for k, v in w["prompt_or_image_only"].items():
        print(f"  not read by a chunk: {k:29s} {v / GB:7.3f} GB")
    for k, v in s.items():
        print(f"  state {k:42s} {v / GB:7.3f} GB")
    for r in report["pools"][:8]:
        print(f"  pool {r['pool']:16s} segments {r['segments']:4d} reserved {r['reserved'] / GB:7.3f} GB "
              f"active {r['active'] / GB:7.3f} GB")
    print(f"  allocated after the last chunk {after[-1] / GB:.3f} GB, reserved {report['reserved'] / GB:.3f} GB")
    print(f"  peak: last {args.steady} chunks {steady_peak / GB:.3f} GB, before them {whole_peak / GB:.3f} GB")
    if "host_resident_bytes" in report:
        print(f"  lean-memory: {report['host_resident_bytes'] / GB:.3f} GB of weights in page-locked host memory")
    for b in report.get("largest_live_blocks", []):
        print(f"  live {b['bytes'] / GB:7.3f} GB  {' <- '.join(b['frames'][:2])}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
