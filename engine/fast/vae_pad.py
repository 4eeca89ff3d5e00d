"""Cheaper spatial reflect padding for the VAE decoder's causal convs (the plain path is `nn.Conv3d` with
`padding_mode="reflect"`, whose `reflection_pad3d` kernel took a quarter of the release decode's GPU time).

`reflect_pad_hw1(x)` pads `[B, C, T, H, W]` by one pixel on each side of H and W, reflecting (edge pixel not
repeated): one Triton pass on a CUDA tensor (`kernels.frames.reflect_pad_hw1`), two concatenations elsewhere.
`use_fast_reflect_pad(vae)` points every reflect-padded `CausalConv3d` of the decoder at
`fast_causal_conv_forward` (an instance attribute, so `restore_plain_pad(vae)` undoes it); other padding modes
keep the plain path.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from engine.vae.model import TEMPORAL_CONTEXT, CausalConv3d
from kernels.frames import reflect_pad_hw1 as _pad


def reflect_pad_hw1(x: torch.Tensor) -> torch.Tensor:
    """`[B, C, T, H, W]` -> `[B, C, T, H+2, W+2]`, reflect padding of 1 on H and W (H, W >= 2)."""
    return _pad(x)


def fast_causal_conv_forward(self: CausalConv3d, x: torch.Tensor, causal: bool, cache=None) -> torch.Tensor:
    """`CausalConv3d.forward` with the reflect pad done by `reflect_pad_hw1`."""
    if cache is not None:
        x = cache.extend(self.cache_key, x)
    elif causal:
        x = torch.cat([x[:, :, :1]] * TEMPORAL_CONTEXT + [x], dim=2)
    else:
        x = torch.cat([x[:, :, :1], x, x[:, :, -1:]], dim=2)
    conv = self.conv
    return F.conv3d(reflect_pad_hw1(x), conv.weight, conv.bias)


def use_fast_reflect_pad(vae) -> int:
    """Switch the decoder's reflect-padded convs to the fast pad; returns how many were switched."""
    n = 0
    for m in vae.decoder.modules():
        if isinstance(m, CausalConv3d) and m.conv.padding_mode == "reflect" and m.conv.padding == (0, 1, 1) \
                and m.conv.stride == (1, 1, 1) and m.conv.dilation == (1, 1, 1) and m.conv.groups == 1:
            m.forward = types.MethodType(fast_causal_conv_forward, m)
            n += 1
    return n


def restore_plain_pad(vae) -> None:
    for m in vae.decoder.modules():
        if isinstance(m, CausalConv3d) and "forward" in m.__dict__:
            del m.forward
