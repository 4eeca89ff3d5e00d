"""Decoded pixels -> uint8 frames in one Triton pass (`kernels.frames.to_uint8_frames`), then to the host through
page-locked memory; the plain path is `engine.vae.pixels.pixels_to_frames` (~7 full-size passes on the GPU, then
a pageable copy). Bit-equal output.

A 1.5 s chunk at 704x1280 is 65 MB of frames. A copy into pageable memory runs through the driver's bounce
buffers (tens of ms on the H100 hosts we measured); a copy into pinned memory is one DMA at PCIe speed. The
pinned host tensor comes from torch's caching host allocator and goes back to it when the last reference (the
numpy array the pipeline hands on) is dropped, so steady chunks reuse the same few blocks and nothing grows.

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
    frames = to_uint8_frames(p)
    host = torch.empty(frames.shape, dtype=frames.dtype, pin_memory=True)
    host.copy_(frames)  # synchronous: the caller reads the frames next
    return host


def use_fast_frames() -> None:
    _world.pixels_to_frames = pixels_to_frames_fast


def restore_plain_frames() -> None:
    _world.pixels_to_frames = _PLAIN
