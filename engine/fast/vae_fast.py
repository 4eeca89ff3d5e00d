"""Faster VAE decode (issue 7): candidate fast paths for `engine.vae.model.Decoder`, each switchable and each
beside the plain path, which stays `Decoder.forward` (engine/vae/model.py).

Switching any of the first three on points the decoder instance at `fast_decoder_forward`, one walk over the same
modules and weights that honours the switched-on options; `restore_plain_*` switch them off again, and with none
left the instance uses `Decoder.forward` again. Same contract as the plain forward, cache included: the
`DecoderConvCache` buffers hold the same conv-input frames, so a stream may switch between paths between blocks.

- `use_channels_last(vae)`: activations, conv weights and the conv cache buffers in `torch.channels_last_3d`
  end to end, so cudnn's NHWC kernels need no NCHW<->NHWC transposes around every conv; the upsamplers'
  depth-to-space (plus its residual) is one channels-last copy.
- `use_fused_norm(vae)`: per-channel RMS norm + SiLU as one pass (`kernels.vae_norm.rms_silu_pad`, Triton on
  CUDA, its fp32 torch reference elsewhere), with the previous conv's bias and the resnet's residual add folded
  into it (those convs run without bias; the norm pass adds it and writes the residual stream once).
- `use_folded_pad(vae)`: each conv's input is written once into a buffer that already holds the temporal context
  (cache or first-frame copies) and the reflect border, and the conv runs unpadded; the plain path writes a
  concatenated copy and then a padded copy per conv.
- `use_cudnn_benchmark(vae)`: `torch.backends.cudnn.benchmark = True` (process-wide: `restore_plain_cudnn_benchmark()`).

Supported: decoders with reflect spatial padding, no timestep conditioning and no noise injection (the LTX-2
release and the tiny preset); for others the `use_*` functions change nothing and say so. The fast forward does
not call `CausalConv3d.forward`, so `vae-pad` (engine/fast/vae_pad.py) has no effect on a decoder switched here.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
import torch.nn.functional as F

from engine.vae.model import TEMPORAL_CONTEXT, CausalConv3d, Decoder, depth_to_space, per_channel_rms_norm, unpatchify
from engine.vae.stream import DecoderConvCache
from kernels.vae_norm import rms_silu_pad

CL = torch.channels_last_3d
OPTIONS_ATTR = "_vae_fast"  # the decoder instance's VAEFastOptions while a fast forward is on


@dataclass
class VAEFastOptions:
    channels_last: bool = False
    fused_norm: bool = False
    fold_pad: bool = False

    def any(self) -> bool:
        return any(getattr(self, f.name) for f in fields(self))


class Pending(NamedTuple):
    """A residual-stream value not yet summed: `x + h + bias[c]` (h, bias optional), all [B, C, T, H, W] / [C].
    Fused-norm mode leaves conv biases and residual adds pending so the next norm pass does them."""

    x: torch.Tensor
    h: torch.Tensor | None = None
    bias: torch.Tensor | None = None


def unsupported_reason(decoder: Decoder) -> str | None:
    if decoder.time_embedder is not None:
        return "the decoder is timestep-conditioned"
    if decoder.injects_noise:
        return "the decoder injects noise"
    modes = {m.conv.padding_mode for m in decoder.modules() if isinstance(m, CausalConv3d)}
    if modes != {"reflect"}:
        return f"the decoder's spatial padding is {sorted(modes)}; only 'reflect' is supported"
    return None


# ------------------------------------------------------------------------------------------ the fast forward


def _act(src: Pending, out: torch.Tensor, *, norm: bool, residual: bool, pad: bool,
         opts: VAEFastOptions) -> torch.Tensor | None:
    """Writes act(src) into `out` (padded by 1 on H, W if `pad`), act = SiLU∘RMS-norm if `norm` else identity;
    returns the summed residual stream `x + h + bias` when `residual` (else None)."""
    if opts.fused_norm:
        summed = src.h is not None or src.bias is not None
        res = torch.empty_like(src.x, memory_format=_fmt(opts)) if residual and summed else None
        rms_silu_pad(src.x, out, h=src.h, bias=src.bias, residual=res, norm=norm, pad=pad)
        return res if summed else (src.x if residual else None)
    # plain numerics (the decoder's dtype throughout), only the copies are placed differently
    v = src.x if src.h is None else src.x + src.h
    if src.bias is not None:
        v = v + src.bias.view(-1, 1, 1, 1)
    y = F.silu(per_channel_rms_norm(v)) if norm else v
    if pad:
        rms_silu_pad(y, out, norm=False, pad=True)
    else:
        out.copy_(y)
    return v if residual else None


def _fmt(opts: VAEFastOptions) -> torch.memory_format:
    return CL if opts.channels_last else torch.contiguous_format


def _cache_buffer(cache: DecoderConvCache, key: str, opts: VAEFastOptions) -> torch.Tensor:
    buf = cache.buffers[key]
    if opts.channels_last and not buf.is_contiguous(memory_format=CL):
        buf = cache.buffers[key] = buf.contiguous(memory_format=CL)  # once per stream: later blocks reuse it
    return buf


def _conv(m: CausalConv3d, src: Pending, *, norm: bool, causal: bool, cache: DecoderConvCache | None,
          opts: VAEFastOptions, residual: bool = False, defer_bias: bool = False
          ) -> tuple[Pending, torch.Tensor | None]:
    """`m(act(src))` with `CausalConv3d.forward`'s temporal padding and cache; returns (conv output, with its bias
    pending when `defer_bias`; the materialised `src` when `residual`)."""
    x = src.x
    B, C, n, H, W = x.shape
    before, after = (TEMPORAL_CONTEXT, 0) if cache is not None or causal else (1, 1)
    fold = opts.fold_pad
    Ho, Wo = (H + 2, W + 2) if fold else (H, W)
    buf = torch.empty(B, C, before + n + after, Ho, Wo, dtype=x.dtype, device=x.device, memory_format=_fmt(opts))
    res = _act(src, buf[:, :, before:before + n], norm=norm, residual=residual, pad=fold, opts=opts)
    if cache is not None and not cache.first_block:
        past = _cache_buffer(cache, m.cache_key, opts)  # [B, C, 2, H, W], conv input frames (normed, unpadded)
        if fold:
            rms_silu_pad(past, buf[:, :, :before], norm=False, pad=True)
        else:
            buf[:, :, :before].copy_(past)
    else:
        buf[:, :, :before].copy_(buf[:, :, before:before + 1])  # broadcast over the context frames
    if after:
        buf[:, :, -after:].copy_(buf[:, :, -after - 1:-after])
    if cache is not None:
        last = buf[:, :, -TEMPORAL_CONTEXT:]
        _cache_buffer(cache, m.cache_key, opts).copy_(last[:, :, :, 1:-1, 1:-1] if fold else last)
    if not fold:
        padded = torch.empty(B, C, buf.shape[2], H + 2, W + 2, dtype=x.dtype, device=x.device,
                             memory_format=_fmt(opts))
        buf = rms_silu_pad(buf, padded, norm=False, pad=True)
    bias = m.conv.bias
    h = F.conv3d(buf, m.conv.weight, None if defer_bias else bias)
    return Pending(h, None, bias if defer_bias else None), res


def _depth_to_space_residual_cl(h: torch.Tensor, x: torch.Tensor | None, stride: tuple[int, int, int],
                                repeats: int) -> torch.Tensor:
    """`depth_to_space(h) (+ depth_to_space(x).repeat(1, repeats, 1, 1, 1))` as one channels-last copy (an add
    when `x` is given). h: [B, C'·k, T, H, W]; x: [B, C'·k/repeats, T, H, W]; out [B, C', T·st, H·sh, W·sw]."""
    st, sh, sw = stride
    k = st * sh * sw
    B, Ck, T, H, W = h.shape
    c = Ck // k
    out = torch.empty(B, T * st, H * sh, W * sw, c, dtype=h.dtype, device=h.device)  # physical NDHWC
    ov = out.view(B, T, st, H, sh, W, sw, c)
    # channel index ((c·st + a)·sh + b)·sw + e of the conv output -> position (t·st + a, h·sh + b, w·sw + e)
    hv = h.permute(0, 2, 3, 4, 1).unflatten(-1, (c, st, sh, sw)).permute(0, 1, 5, 2, 6, 3, 7, 4)
    if x is None:
        ov.copy_(hv)
    else:
        cx = x.shape[1] // k
        xv = x.permute(0, 2, 3, 4, 1).unflatten(-1, (cx, st, sh, sw)).permute(0, 1, 5, 2, 6, 3, 7, 4)
        # .repeat(1, repeats) tiles channels: output channel r·cx + j reads input channel j
        torch.add(hv.unflatten(-1, (repeats, cx)), xv.unsqueeze(-2), out=ov.unflatten(-1, (repeats, cx)))
    return out.permute(0, 4, 1, 2, 3)


def _upsample(up, src: Pending, causal: bool, cache: DecoderConvCache | None, opts: VAEFastOptions) -> Pending:
    conv, x = _conv(up.conv, src, norm=False, causal=causal, cache=cache, opts=opts, residual=True)
    if opts.channels_last:
        h = _depth_to_space_residual_cl(conv.x, x if up.residual else None, up.stride, up.repeats)
    else:
        h = depth_to_space(conv.x, up.stride)
        if up.residual:
            h = h + depth_to_space(x, up.stride).repeat(1, up.repeats, 1, 1, 1)
    drop = up.stride[0] - 1 if cache is None or cache.first_block else 0
    return Pending(h[:, :, drop:])


def _resnet(resnet, src: Pending, causal: bool, cache: DecoderConvCache | None, opts: VAEFastOptions) -> Pending:
    fused = opts.fused_norm
    h, x = _conv(resnet.conv1, src, norm=True, causal=causal, cache=cache, opts=opts, residual=True,
                 defer_bias=fused)
    h, _ = _conv(resnet.conv2, h, norm=True, causal=causal, cache=cache, opts=opts, defer_bias=fused)
    return Pending(x, h.x, h.bias)  # x + conv2(...): summed by the next norm pass (fused) or the next _act


def fast_decoder_forward(self: Decoder, z: torch.Tensor, causal: bool, cache: DecoderConvCache | None = None,
                         timestep: torch.Tensor | None = None, noise: dict | None = None) -> torch.Tensor:
    """`Decoder.forward` along the options in `self._vae_fast` (set by the `use_*` functions)."""
    opts = self.__dict__.get(OPTIONS_ATTR)
    if opts is None or not opts.any() or timestep is not None or noise:
        return Decoder.forward(self, z, causal, cache, timestep, noise)
    fused = opts.fused_norm
    x, _ = _conv(self.conv_in, Pending(z), norm=False, causal=causal, cache=cache, opts=opts, defer_bias=fused)
    for resnet in self.mid_block.resnets:
        x = _resnet(resnet, x, causal, cache, opts)
    for block in self.up_blocks:
        if block.upsamplers is not None:
            x = _upsample(block.upsamplers[0], x, causal, cache, opts)
        for resnet in block.resnets:
            x = _resnet(resnet, x, causal, cache, opts)
    out, _ = _conv(self.conv_out, x, norm=True, causal=causal, cache=cache, opts=opts)
    return unpatchify(out.x, self.patch_size)


# ------------------------------------------------------------------------------------------ switches


def _set(vae, **flags) -> str | None:
    """Sets option flags on `vae.decoder` and points it at the fast forward (or back at the plain one when no
    flag is left); returns why nothing was done, if so."""
    dec = vae.decoder
    why = unsupported_reason(dec)
    if why is not None:
        return why
    opts = dec.__dict__.get(OPTIONS_ATTR) or VAEFastOptions()
    for k, v in flags.items():
        setattr(opts, k, v)
    if opts.any():
        dec.__dict__[OPTIONS_ATTR] = opts
        dec.forward = types.MethodType(fast_decoder_forward, dec)
    else:
        dec.__dict__.pop(OPTIONS_ATTR, None)
        dec.__dict__.pop("forward", None)
    return None


def _conv_weights(vae, fmt: torch.memory_format) -> int:
    n = 0
    with torch.no_grad():
        for m in vae.decoder.modules():
            if isinstance(m, CausalConv3d):
                m.conv.weight.data = m.conv.weight.data.contiguous(memory_format=fmt)
                n += 1
    return n


def use_channels_last(vae) -> str:
    why = _set(vae, channels_last=True)
    if why:
        return f"skipped: {why}"
    n = _conv_weights(vae, CL)
    return f"VAE decoder: channels-last activations, cache and {n} conv weights"


def restore_plain_channels_last(vae) -> None:
    if _set(vae, channels_last=False) is None:
        _conv_weights(vae, torch.contiguous_format)


def use_fused_norm(vae) -> str:
    why = _set(vae, fused_norm=True)
    if why:
        return f"skipped: {why}"
    return "VAE decoder: RMS norm + SiLU + conv bias + residual add in one pass (kernels.vae_norm)"


def restore_plain_fused_norm(vae) -> None:
    _set(vae, fused_norm=False)


def use_folded_pad(vae) -> str:
    why = _set(vae, fold_pad=True)
    if why:
        return f"skipped: {why}"
    return "VAE decoder: temporal context + reflect pad written once per conv, unpadded convs"


def restore_plain_folded_pad(vae) -> None:
    _set(vae, fold_pad=False)


_BENCHMARK_BEFORE: list[bool] = []


def use_cudnn_benchmark(vae=None) -> str:
    """Process-wide: cudnn times its algorithms per conv shape on first sight and keeps the fastest."""
    if not _BENCHMARK_BEFORE:
        _BENCHMARK_BEFORE.append(torch.backends.cudnn.benchmark)
    torch.backends.cudnn.benchmark = True
    return "torch.backends.cudnn.benchmark = True (process-wide)"


def restore_plain_cudnn_benchmark() -> None:
    if _BENCHMARK_BEFORE:
        torch.backends.cudnn.benchmark = _BENCHMARK_BEFORE.pop()


# name -> (switch on, switch off); the off functions take the VAE (cudnn's ignores it)
CANDIDATES = {
    "channels-last": (use_channels_last, restore_plain_channels_last),
    "fused-norm": (use_fused_norm, restore_plain_fused_norm),
    "fold-pad": (use_folded_pad, restore_plain_folded_pad),
    "cudnn-benchmark": (use_cudnn_benchmark, lambda vae=None: restore_plain_cudnn_benchmark()),
}


def use_all(vae) -> dict[str, str]:
    return {name: on(vae) for name, (on, _) in CANDIDATES.items()}


def restore_plain(vae) -> None:
    for _, off in CANDIDATES.values():
        off(vae)
