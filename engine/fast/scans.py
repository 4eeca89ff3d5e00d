"""Fast versions of the stage-1 GDN / camera scans (the plain path: kernels/gdn.py in strict fp32).

The frame-wise delta-rule scans run in fp32 with many small batched matmuls; with strict fp32 they fall on a
SIMT (CUDA-core) GEMM, the largest single kernel of the release stage-1 forward. `tf32_scan_ops()` returns a
`ScanOps` whose functions are the reference scans run with TF32 matmuls allowed (~1e-3 relative on the scan,
under the bf16 model's own rounding); the flag is restored after each call. `triton_scan_ops()` returns the
Triton scans of kernels/gdn_triton.py (one launch per call, numerator and normaliser fused; with the "stream"
strategy a one-segment GDN block's four scans, main and camera, forward and backward, go out as one launch, or
with `block="phases"` as three launches that also combine them; CUDA only), in the chosen tl.dot precision.
"""

from __future__ import annotations

import functools

import torch

from engine.stage1.temporal import ScanOps


def with_tf32(fn):
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            return fn(*args, **kwargs)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = prev

    return wrapped


def tf32_scan_ops(base: ScanOps | None = None) -> ScanOps:
    b = base or ScanOps()
    return ScanOps(gdn_forward=with_tf32(b.gdn_forward), gdn_backward=with_tf32(b.gdn_backward),
                   camera_forward=with_tf32(b.camera_forward), camera_backward=with_tf32(b.camera_backward))


BLOCK_LAUNCHES = ("stream", "phases")


def triton_scan_ops(precision: str | None = None, strategy: str | None = None, block: str = "stream") -> ScanOps:
    """`ScanOps` running kernels/gdn_triton.py; precision "ieee", "tf32x3" or "tf32", strategy "stream" or
    "parallel" (None = the module's defaults when this is called, gdn_triton.DEFAULT_PRECISION / DEFAULT_STRATEGY).
    `block`: how a one-segment GDN block's scans go out when combined (`ScanOps.block_combined`, what the blocks
    call): "stream", the one-launch `gdn_block_triton` (with the "stream" strategy; its results combined in torch),
    or "phases", `gdn_block_phases_triton` (three launches, the combination in its readout).
    Needs Triton and CUDA tensors at call time."""
    if block not in BLOCK_LAUNCHES:
        raise ValueError(f"block {block!r}; accepted: {BLOCK_LAUNCHES}")
    from kernels import gdn_triton as gt

    precision = precision or gt.DEFAULT_PRECISION
    strategy = strategy or gt.DEFAULT_STRATEGY
    if precision not in gt.PRECISIONS:
        raise ValueError(f"precision {precision!r}; accepted: {gt.PRECISIONS}")
    if strategy not in gt.STRATEGIES:
        raise ValueError(f"strategy {strategy!r}; accepted: {gt.STRATEGIES}")
    bind = lambda fn: functools.partial(fn, precision=precision, strategy=strategy)
    one_launch = functools.partial(gt.gdn_block_triton, precision=precision) if strategy == "stream" else None
    combined = functools.partial(gt.gdn_block_phases_triton, precision=precision) if block == "phases" else None
    return ScanOps(gdn_forward=bind(gt.gdn_forward_triton), gdn_backward=bind(gt.gdn_backward_triton),
                   camera_forward=bind(gt.camera_scan_forward_triton),
                   camera_backward=bind(gt.camera_scan_backward_triton), gdn_block=one_launch,
                   gdn_block_combined=combined)
