"""Poses and intrinsics -> the two camera tensors the stage-1 DiT reads (spec: camera.md §1, §6-§10).

- `camera_conditions [T_lat, 20]`: per latent frame, the relative pose of pixel frame 8k flattened
  row-major and the latent-scale intrinsics `fx, fy, cx, cy`.
- `chunk_plucker [48, T_lat, h, w]`: per latent frame, the Plücker rays (direction, moment) of the 8 pixel
  frames it covers, on the latent grid.

Also the first image's resize + centre crop with the matching intrinsics transform, and intrinsics in
every accepted form. Packing runs in float32 as the reference does. An incremental form computes the
tensors of a range of latent frames from only the poses those frames cover, so a live session can pack
each chunk as it goes; it equals the slice of the whole-trajectory tensors. Knows nothing of models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from engine.errors import InputError

RELEASE_SIZE = (704, 1280)  # (H, W) pixels
VAE_STRIDE = (8, 32, 32)  # (time, height, width) pixels per latent


# ------------------------------------------------------------------------------------ intrinsics


def normalize_intrinsics(
    intrinsics, num_frames: int, *, image_size: tuple[int, int] | None = None, resample: bool = True
) -> np.ndarray:
    """Intrinsics in any accepted form -> `[num_frames, 4]` float32 rows `[fx, fy, cx, cy]` (pixels).

    Accepted: `(4,)` or `(3, 3)` (broadcast), `(F', 4)` or `(F', 3, 3)` with F' == 1 (broadcast), F' >= F
    (first F rows), or 1 < F' < F (linear resampling per entry when `resample`, the NVlabs rule; an error
    otherwise, the diffusers rule). With `image_size = (H, W)` the principal point must lie inside it.
    """
    if num_frames < 1:
        raise InputError(f"num_frames={num_frames} is not accepted; at least 1 frame is needed")
    arr = np.asarray(intrinsics.detach().cpu() if isinstance(intrinsics, torch.Tensor) else intrinsics,
                     dtype=np.float64)
    if arr.shape == (4,) or arr.shape == (3, 3):
        arr = arr[None]
    if arr.ndim == 3 and arr.shape[1:] == (3, 3):
        mats = arr
        arr = np.stack([mats[:, 0, 0], mats[:, 1, 1], mats[:, 0, 2], mats[:, 1, 2]], axis=1)
    elif not (arr.ndim == 2 and arr.shape[1] == 4):
        raise InputError(
            f"intrinsics of shape {tuple(arr.shape)} are not accepted; use (4,) [fx, fy, cx, cy], (3, 3), "
            "(F, 4) or (F, 3, 3)"
        )
    if not np.all(np.isfinite(arr)):
        raise InputError(f"intrinsics contain a non-finite value: {arr[~np.isfinite(arr)][:4].tolist()}")
    if np.any(arr[:, :2] <= 0):
        bad = arr[:, :2][arr[:, :2] <= 0][0]
        raise InputError(f"focal length {bad!r} is not accepted; fx and fy must be > 0 pixels")
    if image_size is not None:
        h, w = image_size
        cx, cy = arr[:, 2], arr[:, 3]
        if np.any((cx <= 0) | (cx >= w) | (cy <= 0) | (cy >= h)):
            i = int(np.argmax((cx <= 0) | (cx >= w) | (cy <= 0) | (cy >= h)))
            raise InputError(
                f"principal point (cx, cy)=({cx[i]:g}, {cy[i]:g}) lies outside the {w}x{h} image; "
                f"it must satisfy 0 < cx < {w} and 0 < cy < {h}"
            )
    n = arr.shape[0]
    if n == 1:
        out = np.repeat(arr, num_frames, axis=0)
    elif n >= num_frames:
        out = arr[:num_frames]
    elif resample:
        src = np.linspace(0.0, 1.0, n, dtype=np.float32)
        dst = np.linspace(0.0, 1.0, num_frames, dtype=np.float32)
        arr32 = arr.astype(np.float32)
        out = np.stack([np.interp(dst, src, arr32[:, c]) for c in range(4)], axis=1)
    else:
        raise InputError(f"{n} intrinsics rows for {num_frames} frames; give 1 row or at least {num_frames}")
    return np.ascontiguousarray(out, dtype=np.float32)


@dataclass(frozen=True)
class CropGeometry:
    """How an image of `src_size` is resized and centre-cropped to `target_size` (camera.md §7)."""

    src_size: tuple[int, int]  # (W, H) of the input image
    resized_size: tuple[int, int]  # (rw, rh) after the resize
    crop_offset: tuple[int, int]  # (left, top) of the crop box in the resized image
    target_size: tuple[int, int]  # (H, W) of the output


def crop_geometry(src_size: tuple[int, int], target_size: tuple[int, int] = RELEASE_SIZE) -> CropGeometry:
    """Resize so the image covers `target_size = (H, W)`, then centre crop. `src_size = (W, H)`."""
    w, h = (int(v) for v in src_size)
    th, tw = (int(v) for v in target_size)
    if w <= 0 or h <= 0:
        raise InputError(f"image size {w}x{h} is not accepted; both sides must be > 0 pixels")
    if th <= 0 or tw <= 0:
        raise InputError(f"target size {th}x{tw} (H x W) is not accepted; both sides must be > 0")
    scale = max(th / h, tw / w)
    rw = max(tw, int(round(w * scale)))
    rh = max(th, int(round(h * scale)))
    return CropGeometry((w, h), (rw, rh), ((rw - tw) // 2, (rh - th) // 2), (th, tw))


def crop_intrinsics(intrinsics: np.ndarray, geom: CropGeometry) -> np.ndarray:
    """`[..., 4]` pixel intrinsics of the source image -> those of the cropped image (float32)."""
    k = np.asarray(intrinsics, dtype=np.float32)
    (w, h), (rw, rh), (left, top) = geom.src_size, geom.resized_size, geom.crop_offset
    sx, sy = np.float32(rw / w), np.float32(rh / h)
    out = np.empty_like(k)
    out[..., 0] = k[..., 0] * sx
    out[..., 1] = k[..., 1] * sy
    out[..., 2] = k[..., 2] * sx - np.float32(left)
    out[..., 3] = k[..., 3] * sy - np.float32(top)
    return out


def prepare_image(image, intrinsics, target_size: tuple[int, int] = RELEASE_SIZE):
    """Resize + centre crop a PIL image (or a path) to `target_size = (H, W)`.

    Returns `(pixels [1, 3, H, W] float32 in [-1, 1], intrinsics [..., 4] of the crop, CropGeometry)`.
    `intrinsics` are `[fx, fy, cx, cy]` rows in the source image's pixels (any form of
    `normalize_intrinsics` with one frame, or `[F, 4]`).
    """
    from PIL import Image

    if not isinstance(image, Image.Image):
        try:
            image = Image.open(image)
        except (OSError, ValueError) as e:
            raise InputError(f"cannot read first image {str(image)!r}: {e}") from e
    image = image.convert("RGB")
    geom = crop_geometry(image.size, target_size)
    k = np.asarray(intrinsics, dtype=np.float32)
    if k.shape in ((4,), (3, 3)):
        k = normalize_intrinsics(k, 1, image_size=(image.size[1], image.size[0]))[0]
    resized = image.resize(geom.resized_size, Image.LANCZOS)
    left, top = geom.crop_offset
    th, tw = geom.target_size
    cropped = resized.crop((left, top, left + tw, top + th))
    pixels = torch.from_numpy(np.asarray(cropped, dtype=np.float32).copy()).permute(2, 0, 1)[None]
    pixels = 2.0 * (pixels / 255.0) - 1.0
    return pixels, crop_intrinsics(k, geom), geom


# ---------------------------------------------------------------------------------------- poses


def relative_to_first(c2w) -> torch.Tensor:
    """`[F, 4, 4]` poses -> the same poses relative to frame 0 (`P_0^-1 P_i`, frame 0 exactly identity)."""
    p = torch.as_tensor(np.asarray(c2w) if not isinstance(c2w, torch.Tensor) else c2w).to(torch.float32)
    _check_poses(p)
    r0, t0 = p[0, :3, :3], p[0, :3, 3]
    inv = torch.eye(4, dtype=torch.float32)
    inv[:3, :3] = r0.T
    inv[:3, 3] = -(r0.T @ t0)
    out = inv @ p
    out[0] = torch.eye(4, dtype=torch.float32)
    return out


def _check_poses(p: torch.Tensor) -> None:
    if p.ndim != 3 or p.shape[1:] != (4, 4) or p.shape[0] < 1:
        raise InputError(f"camera poses of shape {tuple(p.shape)} are not accepted; expected [F, 4, 4] c2w")
    if not torch.isfinite(p).all():
        raise InputError("camera poses contain a non-finite value")


def snap_num_frames(n: int, upper: int, temporal_stride: int = VAE_STRIDE[0]) -> int:
    """The nearest valid VAE frame count `s·k + 1` to `n` (ties go up, never above `upper`; camera.md §10)."""
    s = temporal_stride
    if n < 1:
        raise InputError(f"frame count {n} is not accepted; at least 1 frame is needed")
    if (n - 1) % s == 0:
        return n
    lo = n - (n - 1) % s
    hi = lo + s
    pick = lo if n - lo < hi - n else hi
    return lo if pick == hi and hi > upper else pick


def num_latent_frames(num_frames: int, temporal_stride: int = VAE_STRIDE[0]) -> int:
    return (num_frames - 1) // temporal_stride + 1


# ------------------------------------------------------------------------------------- packing


def latent_intrinsics(intrinsics_px: torch.Tensor, target_size: tuple[int, int], latent_hw: tuple[int, int]):
    """`[F, 4]` pixel intrinsics at `target_size = (H, W)` -> `[F, 4]` on the latent grid `(h, w)`."""
    (hp, wp), (h, w) = target_size, latent_hw
    k = intrinsics_px.to(torch.float32)
    sx, sy = w / wp, h / hp
    return torch.stack([k[:, 0] * sx, k[:, 1] * sy, k[:, 2] * sx, k[:, 3] * sy], dim=1)


def _latent_window(k: int, stride: int) -> int:
    """First pixel frame of latent frame k's window: latent 0 covers 0..s-1, latent k covers sk-s+1..sk."""
    return max(0, stride * k - (stride - 1))


def pixel_span(latent_start: int, latent_count: int, temporal_stride: int = VAE_STRIDE[0]) -> tuple[int, int]:
    """Inclusive `(first, last)` pixel frames whose poses latent frames `[start, start + count)` read."""
    s = temporal_stride
    first = _latent_window(latent_start, s)
    last = s * (latent_start + latent_count - 1)
    if latent_start == 0:
        last = max(last, s - 1)  # latent 0 reads pixels 0 .. s-1
    return first, last


def pack_camera_range(
    c2w_rel: torch.Tensor,
    intrinsics_px: torch.Tensor,
    target_size: tuple[int, int],
    latent_start: int,
    latent_count: int,
    *,
    pixel_offset: int = 0,
    num_frames: int | None = None,
    vae_stride: tuple[int, int, int] = VAE_STRIDE,
) -> dict[str, torch.Tensor]:
    """Camera tensors for latent frames `[latent_start, latent_start + latent_count)` only.

    `c2w_rel [P, 4, 4]` and `intrinsics_px [P, 4]` hold pixel frames `pixel_offset .. pixel_offset + P - 1`
    of a trajectory already relative to frame 0. `num_frames` is the trajectory's total length F when
    known (frames at or past F are replaced by frame F-1, the reference's repeat padding); otherwise the
    given frames must cover every window. Returns `camera_conditions [latent_count, 20]` and
    `chunk_plucker [6*st, latent_count, h, w]`, equal to the matching slice of `prepare_camera`.
    """
    st, sh, sw = vae_stride
    hp, wp = target_size
    if hp % sh or wp % sw:
        raise InputError(f"target size {hp}x{wp} is not a multiple of the VAE stride {sh}x{sw}")
    h, w = hp // sh, wp // sw
    avail = c2w_rel.shape[0]
    last = pixel_offset + avail - 1 if num_frames is None else num_frames - 1
    first_needed = _latent_window(latent_start, st)
    if first_needed < pixel_offset:
        raise InputError(f"latent frame {latent_start} needs pixel frame {first_needed}, "
                         f"but the poses start at pixel frame {pixel_offset}")
    k_lat = latent_intrinsics(intrinsics_px, target_size, (h, w))  # [P, 4]
    # which given pose each latent frame reads: its own (conditions) and its window's st (Plücker channels)
    own, window = [], []
    for k in range(latent_start, latent_start + latent_count):
        j = st * k
        if j > last or j - pixel_offset >= avail:
            raise InputError(f"latent frame {k} needs the pose of pixel frame {j}; poses end at {last}")
        own.append(j - pixel_offset)
        for p in range(st):
            jj = min(_latent_window(k, st) + p, last) - pixel_offset
            if jj >= avail:
                raise InputError(f"latent frame {k} needs pixel frame {jj + pixel_offset}, beyond the poses given")
            window.append(jj)
    own, window = torch.tensor(own), torch.tensor(window)
    conds = torch.cat([c2w_rel[own].reshape(-1, 16), k_lat[own]], dim=1)  # [n, 20]
    # all n * st Plücker maps at once (one batched pass instead of ~10 small ops per pixel frame)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                            indexing="ij")
    fx, fy, cx, cy = (k_lat[window, i, None, None] for i in range(4))  # [m, 1, 1]
    cam = torch.stack([(xs - cx) / fx, (ys - cy) / fy, torch.ones_like(xs).expand_as(xs - cx)], dim=-1)
    R = c2w_rel[window, :3, :3]  # [m, 3, 3]
    d = (cam[..., None, :] * R[:, None, None]).sum(-1)  # R d_cam per pixel  [m, h, w, 3]
    d = d / d.norm(dim=-1, keepdim=True)
    o = c2w_rel[window, None, None, :3, 3].expand_as(d)
    m = torch.linalg.cross(o, d, dim=-1)
    plucker = torch.cat([d, m], dim=-1).reshape(latent_count, st, h, w, 6)  # [n, st, h, w, 6]
    return {
        "camera_conditions": conds.contiguous(),
        "chunk_plucker": plucker.permute(1, 4, 0, 2, 3).reshape(st * 6, latent_count, h, w).contiguous(),
    }


def prepare_camera(
    c2w,
    intrinsics,
    target_size: tuple[int, int] = RELEASE_SIZE,
    vae_stride: tuple[int, int, int] = VAE_STRIDE,
) -> dict[str, torch.Tensor]:
    """Whole-trajectory camera tensors (camera.md §8-§9).

    `c2w [F, 4, 4]` absolute or relative camera-to-world poses (made relative to frame 0 here);
    `intrinsics` pixel intrinsics at `target_size = (H, W)` in any form `normalize_intrinsics` accepts.
    Returns float32 `camera_conditions [T_lat, 20]` and `chunk_plucker [48, T_lat, H/32, W/32]` with
    `T_lat = (F - 1) // 8 + 1`.
    """
    rel = relative_to_first(c2w)
    f = rel.shape[0]
    k = torch.from_numpy(normalize_intrinsics(intrinsics, f))
    return pack_camera_range(rel, k, tuple(target_size), 0, num_latent_frames(f, vae_stride[0]),
                             num_frames=f, vae_stride=vae_stride)


def fov_degrees(intrinsics_px, image_size: tuple[int, int]) -> tuple[float, float]:
    """Horizontal and vertical field of view of `[fx, fy, cx, cy]` for an `(H, W)` image."""
    fx, fy = float(intrinsics_px[0]), float(intrinsics_px[1])
    h, w = image_size
    return math.degrees(2 * math.atan(w / (2 * fx))), math.degrees(2 * math.atan(h / (2 * fy)))
