"""Decoded pixels -> uint8 frames in one Triton pass (`kernels.frames.to_uint8_frames`), then to the host through
page-locked memory; the plain path is `engine.vae.pixels.pixels_to_frames` (~7 full-size passes on the GPU, then
a pageable copy). Bit-equal output.

A 1.5 s chunk at 704x1280 is 65 MB of frames. A copy into pageable memory runs through the driver's bounce
buffers (on the H100 host we measured, the decode stage spent ~40 ms beyond the VAE, now ~5); a copy into pinned
memory is one DMA at PCIe speed. The pinned tensor comes from torch's caching host allocator (which keeps freed
blocks, rounded up to a power of two, for reuse and never returns them to the OS), so the number of chunks held
in pinned memory at once is capped at `MAX_PINNED_CHUNKS`: a chunk's block counts until the last array or view
of its frames is gone (an owner object is the arrays' numpy base), and past the cap (a slow consumer, a backlog)
frames take the pageable copy. Pinned memory stays bounded by the cap, whatever the backlog.

`use_fast_frames()` points `engine.world.pixels_to_frames` (what `WorldPipeline.run_chunk` calls) at
`pixels_to_frames_fast`; `restore_plain_frames()` undoes it. Process-wide (a module attribute).
"""

from __future__ import annotations

import threading
import weakref

import numpy as np
import torch

import engine.world as _world
from engine.vae.pixels import pixels_to_frames as _PLAIN
from kernels.frames import to_uint8_frames

MAX_PINNED_CHUNKS = 4  # chunks of frames alive in page-locked memory at once (65 MB each at release, before rounding)
_lock = threading.Lock()
_pinned_alive = 0


class _HostFrames:
    """Owns one host frames tensor; arrays made from it (`np.asarray`) have it as their numpy base, so it lives,
    and counts against the cap, until the last array or view of those frames is gone."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        self.__array_interface__ = {"shape": tuple(tensor.shape), "typestr": "|u1",
                                    "data": (tensor.data_ptr(), False), "version": 3}


def _release() -> None:
    global _pinned_alive
    with _lock:
        _pinned_alive -= 1


def pinned_chunks_alive() -> int:
    """How many chunks' frames are held in page-locked memory now."""
    return _pinned_alive


def _counted(host: torch.Tensor) -> torch.Tensor:
    """`host` (uint8, contiguous) behind an owner that counts against `MAX_PINNED_CHUNKS` while its frames live;
    the caller has already taken the count."""
    owner = _HostFrames(host)
    weakref.finalize(owner, _release)
    return torch.from_numpy(np.asarray(owner))


def _take() -> bool:
    global _pinned_alive
    with _lock:
        if _pinned_alive >= MAX_PINNED_CHUNKS:
            return False
        _pinned_alive += 1
        return True


def pixels_to_frames_fast(pixels: torch.Tensor) -> torch.Tensor:
    """Same contract as `engine.vae.pixels.pixels_to_frames`: [1, 3, F, H, W] or [3, F, H, W] -> [F, H, W, 3]
    uint8 on the CPU."""
    if not pixels.is_cuda or pixels.ndim not in (4, 5) or (pixels.ndim == 5 and pixels.shape[0] != 1):
        return _PLAIN(pixels)
    p = pixels[0] if pixels.ndim == 5 else pixels
    if p.shape[0] != 3:
        return _PLAIN(pixels)
    frames = to_uint8_frames(p)
    if not _take():  # the cap is reached: a pageable copy
        return frames.cpu()
    try:
        host = torch.empty(frames.shape, dtype=frames.dtype, pin_memory=True)
        host.copy_(frames)  # synchronous: the caller reads the frames next
    except BaseException:
        _release()
        raise
    return _counted(host)


def use_fast_frames() -> None:
    _world.pixels_to_frames = pixels_to_frames_fast


def restore_plain_frames() -> None:
    _world.pixels_to_frames = _PLAIN
