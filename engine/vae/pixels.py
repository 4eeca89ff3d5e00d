"""Conversions between uint8 frames and the VAE's pixel tensors in [−1, 1] (spec `refiner_vae.md` §5.1)."""

from __future__ import annotations

import torch

from engine.errors import InputError


def frames_to_pixels(frames: torch.Tensor) -> torch.Tensor:
    """uint8 frames [F, H, W, 3] -> float32 pixels [1, 3, F, H, W] in [−1, 1] (2·x/255 − 1)."""
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise InputError(f"expected uint8 frames [F, H, W, 3]; got {frames.dtype} {tuple(frames.shape)}")
    return (frames.permute(3, 0, 1, 2).float() / 255.0 * 2.0 - 1.0).unsqueeze(0)


def pixels_to_frames(pixels: torch.Tensor) -> torch.Tensor:
    """Decoded pixels [1, 3, F, H, W] (or [3, F, H, W]) in ≈[−1, 1] -> uint8 frames [F, H, W, 3] on the CPU.

    clamp(x/2 + 0.5, 0, 1)·255, rounded to nearest.
    """
    if pixels.ndim == 5:
        if pixels.shape[0] != 1:
            raise InputError(f"pixels_to_frames takes one video [1, 3, F, H, W]; got {tuple(pixels.shape)}")
        pixels = pixels[0]
    if pixels.ndim != 4 or pixels.shape[0] != 3:
        raise InputError(f"expected pixels [1, 3, F, H, W] or [3, F, H, W]; got {tuple(pixels.shape)}")
    x = (pixels.float() / 2 + 0.5).clamp(0, 1) * 255
    return x.round().to(torch.uint8).permute(1, 2, 3, 0).contiguous().cpu()
