"""Decoded pixels -> uint8 frames in one Triton pass (`kernels.frames.to_uint8_frames`), then to the host; the
plain path is `engine.vae.pixels.pixels_to_frames` (~7 full-size passes on the GPU). Bit-equal output.

`use_fast_frames()` points `engine.world.pixels_to_frames` (what `WorldPipeline.run_chunk` calls) at
`pixels_to_frames_fast`; `restore_plain_frames()` undoes it. Process-wide (a module attribute).
"""

from __future__ import annotations

import torch

import engine.world as _world
from engine.vae.pixels import pixels_to_frames as _PLAIN
from kernels.frames import to_uint8_frames


def pixels_to_frames_fast(pixels: torch.Tensor) -> torch.Tensor:
    """Same contract as `engine.vae.pixels.pixels_to_frames`: [1, 3, F, H, W] or [3, F, H, W] -> [F, H, W, 3]
    uint8 on the CPU."""
    if not pixels.is_cuda or pixels.ndim not in (4, 5) or (pixels.ndim == 5 and pixels.shape[0] != 1):
        return _PLAIN(pixels)
    p = pixels[0] if pixels.ndim == 5 else pixels
    if p.shape[0] != 3:
        return _PLAIN(pixels)
    return to_uint8_frames(p).cpu()


def use_fast_frames() -> None:
    _world.pixels_to_frames = pixels_to_frames_fast


def restore_plain_frames() -> None:
    _world.pixels_to_frames = _PLAIN
