"""LTX-2 fractional rotary embeddings (refiner_vae.md §2.4 and §3).

Positions are fractions of a base extent: video tokens sit at the midpoint of their patch in seconds / pixels
(divided by (20 s, 2048 px, 2048 px)), connector tokens at index / 4096. Each axis gets `dim // (2·axes)`
frequencies `θ^{linspace(0,1)}·π/2` (computed in float64, used in fp32); the angle is `(2·p − 1)·ω`. Angles are
flattened frequency-major, axis-minor, and zero angles pad the front up to `dim / 2`, so head `h` owns angles
`[h·D/2, (h+1)·D/2)`. Two layouts apply them to a head of `D` channels: "interleaved" rotates pairs `(2r, 2r+1)`,
"split" rotates `(r, r + D/2)`. Knows nothing of models: tables in, tables out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Rope:
    """Rotation table for `N` tokens, shared by the batch."""

    cos: Tensor  # [H, N, D/2] fp32
    sin: Tensor  # [H, N, D/2] fp32
    layout: str  # "interleaved" | "split"


def _to_device(t: Tensor, device, async_copy: bool) -> Tensor:
    """A host tensor onto `device`; `async_copy`: onto a GPU through page-locked memory without making the host
    wait (a pageable copy waits for the stream's queued work). The same values either way."""
    device = torch.device(device)
    if async_copy and device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def rope_from_fractions(
    fractions: Tensor,
    *,
    num_heads: int,
    dim: int,
    theta: float,
    layout: str,
    double_precision: bool = True,
    device: torch.device | str | None = None,
    async_copy: bool = False,
) -> Rope:
    """`fractions [N, A]` (position / base per axis) -> the rotation table for `num_heads` heads of `dim/num_heads`,
    on `device` (default: the fractions' device). `async_copy`: the host-made inputs reach a GPU without a host wait
    (for a table made on a side stream beside queued work)."""
    n, axes = fractions.shape
    device = fractions.device if device is None else device
    num_freqs = dim // (2 * axes)
    # Frequencies on the CPU (see video_fractions); angles, cos and sin on the device (IEEE-exact ops + cos/sin).
    exponents = torch.linspace(0.0, 1.0, num_freqs, dtype=torch.float64 if double_precision else torch.float32)
    freqs = _to_device((theta**exponents * math.pi / 2.0).to(torch.float32), device, async_copy)  # [F]
    angles = (_to_device(fractions.to(torch.float32), device, async_copy)[..., None] * 2 - 1) * freqs  # [N, A, F]
    angles = angles.transpose(-1, -2).reshape(n, num_freqs * axes)  # index j·A + axis
    pad = dim // 2 - num_freqs * axes
    if pad:
        angles = torch.cat([angles.new_zeros(n, pad), angles], dim=-1)
    angles = angles.view(n, num_heads, dim // (2 * num_heads)).transpose(0, 1)  # [H, N, D/2]
    return Rope(cos=angles.cos(), sin=angles.sin(), layout=layout)


def video_fractions(
    frame_positions: Tensor,
    height: int,
    width: int,
    *,
    fps: float,
    scale_factors: tuple[int, int, int],
    causal_offset: int,
    base: tuple[float, float, float],
) -> Tensor:
    """Fractional (t, y, x) positions `[n·h·w, 3]` of latent voxels, token order (t, y, x), on the CPU.

    `frame_positions [n]` are absolute latent frame indices in the video. A latent frame f covers pixel frames
    `[max(0, st·f + causal_offset − st), st·(f+1) + causal_offset − st)` (the first latent frame holds one pixel
    frame), converted to seconds by `fps`; y and x cover `[s·i, s·(i+1))` pixels. The position is the midpoint.

    Computed on the CPU whatever the device: CUDA divides by a Python scalar through its reciprocal, which moves
    some positions by one ulp, i.e. up to ~5e-4 rad at the highest frequencies (~1.6e4 rad), enough to move the
    AR recipe's output by ~5e-5 relative. On the CPU the positions are those of the (CPU-made) reference fixtures.
    """
    st, sy, sx = scale_factors
    f = frame_positions.detach().to("cpu", torch.float32)
    t_start = (f * st + causal_offset - st).clamp(min=0) / fps
    t_end = ((f + 1) * st + causal_offset - st).clamp(min=0) / fps
    y = torch.arange(height, dtype=torch.float32)
    x = torch.arange(width, dtype=torch.float32)
    t_mid = (t_start + t_end) / 2.0 / base[0]
    y_mid = (y * sy + (y + 1) * sy) / 2.0 / base[1]
    x_mid = (x * sx + (x + 1) * sx) / 2.0 / base[2]
    grid = torch.meshgrid(t_mid, y_mid, x_mid, indexing="ij")
    return torch.stack(grid, dim=-1).reshape(-1, 3)


def apply_rope(x: Tensor, rope: Rope) -> Tensor:
    """Rotate `x [..., H, N, D]` by `rope` (fp32 math, result in x's dtype)."""
    xf = x.float()
    cos, sin = rope.cos, rope.sin
    if rope.layout == "interleaved":
        a, b = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2)
    else:
        a, b = xf.chunk(2, dim=-1)
        out = torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)
    return out.to(x.dtype)
