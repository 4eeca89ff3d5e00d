"""Positional geometry of stage-1: the Wan 3-axis RoPE tables and the UCPE per-ray camera matrices.

Spec stage1.md §3.4 (RoPE: adjacent-pair complex layout, t/y/x axis split, camera table re-sliced from the
main one) and §3.5 (per-token ray-local <- world SE(3) matrices from `camera_conditions`). Pure functions of
positions and cameras; no parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.errors import InputError

ROPE_THETA = 10000.0
ROPE_MAX_POSITIONS = 1024


def rope_axis_pairs(head_dim: int) -> tuple[int, int, int]:
    """Complex pairs of the (t, y, x) axes for a head of `head_dim` real dims (112 -> 20, 18, 18)."""
    hw = head_dim // 6
    return head_dim // 2 - 2 * hw, hw, hw


def _axis_freqs(pairs: int, d_axis: int) -> torch.Tensor:
    """omega_j = 1 / theta^(2j / d_axis), j < pairs, fp32 `[pairs]`."""
    return 1.0 / (ROPE_THETA ** (torch.arange(0, 2 * pairs, 2, dtype=torch.float32) / d_axis))


def rope_angles(head_dim: int, frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Angles phi `[T*h*w, head_dim/2]` (fp32) for tokens (f, y, x) in frame-major order.

    `frames` `[T]` holds the absolute latent frame index of each frame (streaming uses the chunk's
    position in the video). Axis dims t = D - 4*floor(D/6), y = x = 2*floor(D/6).
    """
    pt, py, px = rope_axis_pairs(head_dim)
    wt = _axis_freqs(pt, 2 * pt)
    wy = _axis_freqs(py, 2 * py)
    wx = _axis_freqs(px, 2 * px)
    if int(frames.max()) >= ROPE_MAX_POSITIONS or max(height, width) > ROPE_MAX_POSITIONS:
        raise InputError(f"latent position (frame {int(frames.max())}, grid {height}x{width}) beyond the RoPE "
                         f"table: frames and grid sides must be < {ROPE_MAX_POSITIONS}")
    T = frames.numel()
    at = frames.float()[:, None] * wt  # [T, pt]
    ay = torch.arange(height, dtype=torch.float32)[:, None] * wy  # [h, py]
    ax = torch.arange(width, dtype=torch.float32)[:, None] * wx  # [w, px]
    return torch.cat(
        [
            at[:, None, None, :].expand(T, height, width, pt),
            ay[None, :, None, :].expand(T, height, width, py),
            ax[None, None, :, :].expand(T, height, width, px),
        ],
        dim=-1,
    ).reshape(T * height * width, pt + py + px)


def camera_rope_angles(angles: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Camera-branch table `[N, head_dim/4]`: the first (pt', py', px') pairs of each axis of the main
    table, where (pt', py', px') = rope_axis_pairs(head_dim/2) (112 -> first 10 t, 9 y, 9 x pairs)."""
    pt, py, _ = rope_axis_pairs(head_dim)
    ct, cy, cx = rope_axis_pairs(head_dim // 2)
    return torch.cat(
        [angles[:, :ct], angles[:, pt : pt + cy], angles[:, pt + py : pt + py + cx]], dim=-1
    )


def rope_table(angles: torch.Tensor) -> torch.Tensor:
    """Complex64 e^{i phi} for an angle table."""
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, table: torch.Tensor, *, inverse: bool = False) -> torch.Tensor:
    """Rotate adjacent pairs (x[2k], x[2k+1]) of the last dim by `table` (complex `[N, D/2]`,
    broadcast against x `[..., N, D]`); computed in fp32, returned in x's dtype.

    The same under `torch.compile` (inductor runs the complex multiply as eager kernels); the fast path
    `stage1-real-rope` swaps in a real-arithmetic form there (kernels/rope.py `rope_pairs_real`:
    x cos + x[pair-swapped] (-sin, +sin)). The unflatten / stack real form (a cos - b sin, a sin + b cos over a new
    last axis), tried in sessions 3, 4 and 7, compiled to wrong values on the H100 with the torch scans (relative
    error 0.23 on stage-1 latents; correct on the CPU; tests/benchmarks/rope_probe.py reproduces it)."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2).contiguous())
    rot = table.conj() if inverse else table
    return torch.view_as_real(xc * rot).flatten(-2).to(x.dtype)


def ucpe_ray_matrices(camera_conditions: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Per-token ray-local <- world matrices P `[B, T*h*w, 4, 4]` (fp32) from `camera_conditions [B, T, 20]`.

    Row f: c2w_f (16 values, row-major) then latent-scale fx, fy, cx, cy. Rays through integer pixel
    centres (no +0.5); the ray frame has z along the world ray and x = normalize(camera_down x z).

    Computed on the cameras' device with elementwise products (no matmul, so no TF32 on a GPU) and without a
    device -> host sync (rays whose direction is not finite get the identity through `torch.where`)."""
    cc = camera_conditions.float()
    B, T, _ = cc.shape
    dev = cc.device
    c2w = cc[..., :16].reshape(B, T, 4, 4)
    fx, fy, cx, cy = (cc[..., 16 + i, None, None] for i in range(4))  # [B, T, 1, 1]
    ys = torch.arange(height, dtype=torch.float32, device=dev)[:, None]
    xs = torch.arange(width, dtype=torch.float32, device=dev)[None, :]
    X = (xs - cx) / fx  # [B, T, h, w]
    Y = (ys - cy) / fy
    X, Y = torch.broadcast_tensors(X, Y)
    inv = 1.0 / torch.sqrt(1.0 + X * X + Y * Y)
    d_cam = torch.stack([X * inv, Y * inv, inv], dim=-1)  # [B, T, h, w, 3]
    R = c2w[..., :3, :3]
    t = c2w[..., :3, 3]
    d_world = (R[:, :, None, None] * d_cam[..., None, :]).sum(-1)  # R d per ray
    cam_y = R[..., :, 1][:, :, None, None, :].expand_as(d_world)
    z_ray = F.normalize(d_world, dim=-1, eps=1e-6)
    x_ray = F.normalize(torch.cross(cam_y, z_ray, dim=-1), dim=-1, eps=1e-6)
    y_ray = F.normalize(torch.cross(z_ray, x_ray, dim=-1), dim=-1, eps=1e-6)
    r_w2l = torch.stack([x_ray, y_ray, z_ray], dim=-2)  # rows = ray axes
    t_w2l = -(r_w2l * t[:, :, None, None, None, :]).sum(-1)
    P = torch.zeros(*d_world.shape[:-1], 4, 4, device=dev)
    P[..., :3, :3] = r_w2l
    P[..., :3, 3] = t_w2l
    P[..., 3, 3] = 1.0
    bad = torch.isnan(d_world).any(-1)
    P = torch.where(bad[..., None, None], torch.eye(4, device=dev), P)
    return P.reshape(B, T * height * width, 4, 4)


def invert_se3(P: torch.Tensor) -> torch.Tensor:
    """Closed-form inverse of rigid transforms `[..., 4, 4]` (elementwise: no matmul, so no TF32 on a GPU)."""
    Rinv = P[..., :3, :3].transpose(-1, -2)
    out = torch.zeros_like(P)
    out[..., :3, :3] = Rinv
    out[..., :3, 3] = -(Rinv * P[..., None, :3, 3]).sum(-1)
    out[..., 3, 3] = 1.0
    return out


def apply_4x4(matrix: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Per-token 4x4 matrices `[B, N, 4, 4]` applied to every group of 4 features `[B, H, N, G, 4]`.

    Eagerly one batched GEMM (einsum). Under `torch.compile` the same sums of four products in fp32 as
    elementwise work that inductor fuses into the neighbouring kernels (as a GEMM with K = 4 it runs on a
    16x16 tensor-core tile: 2.9 ms of a 50 ms release stage-1 forward on an H100)."""
    if torch.compiler.is_compiling():
        m = matrix.float()[:, None, :, None]  # [B, 1, N, 1, 4, 4]
        return (m * groups.float()[..., None, :]).sum(-1).to(groups.dtype)
    return torch.einsum("bnij,bhngj->bhngi", matrix, groups)


def ucpe_transform(
    x: torch.Tensor, matrix: torch.Tensor, cam_table: torch.Tensor, *, inverse_rope: bool = False
) -> torch.Tensor:
    """UCPE on per-head features x `[B, H, N, D]`: the first D/2 dims, as D/8 groups of 4, are multiplied
    by the per-token `matrix [B, N, 4, 4]`; the last D/2 dims get RoPE with `cam_table [N, D/4]`."""
    B, H, N, D = x.shape
    proj, rot = x.split(D // 2, dim=-1)
    proj = apply_4x4(matrix.to(x.dtype), proj.reshape(B, H, N, D // 8, 4))
    rot = apply_rope(rot, cam_table, inverse=inverse_rope)
    return torch.cat([proj.reshape(B, H, N, D // 2), rot], dim=-1)
