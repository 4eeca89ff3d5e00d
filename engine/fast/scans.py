"""TF32 tensor-core matmuls inside the stage-1 GDN / camera scans (the plain path: the same scans in strict fp32).

The frame-wise delta-rule scans run in fp32 with many small batched matmuls; with strict fp32 they fall on a
SIMT (CUDA-core) GEMM, the largest single kernel of the release stage-1 forward. `tf32_scan_ops()` returns a
`ScanOps` whose functions are the reference scans run with TF32 matmuls allowed (~1e-3 relative on the scan,
under the bf16 model's own rounding); the flag is restored after each call.
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
