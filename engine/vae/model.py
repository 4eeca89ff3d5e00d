"""The LTX-2 video VAE: encoder, decoder (causal or not) and latent normalisation (spec `refiner_vae.md` §5).

Parameter names follow diffusers' `AutoencoderKLLTX2Video` 1:1, so a diffusers `vae/` checkpoint loads with
`load_vae` (every key checked). Pixels are in [−1, 1]; latents "in model space" are normalised with the
per-channel `latents_mean`/`latents_std` buffers (`z_model = (z − mean)·scaling_factor/std`).

Every temporal operation is a 3×3×3 conv whose time padding is copies of the first (and, non-causal, last)
frame. When a `DecoderConvCache` (engine/vae/stream.py) is passed to the decoder, each conv takes its two
frames of past context from the cache instead, which makes block-by-block decoding equal the whole causal
decode. This module knows nothing about blocks or streams beyond that hook.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import InputError
from engine.vae.config import SAMPLE_STRIDES, VAEConfig
from engine.weights import load_checked, read_state_dict

if TYPE_CHECKING:
    from engine.vae.stream import DecoderConvCache

TEMPORAL_CONTEXT = 2  # past frames a 3-tap causal conv needs


def per_channel_rms_norm(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """x / RMS over channels, per location; no weights. x: [B, C, T, H, W]."""
    return x / torch.sqrt(torch.mean(x**2, dim=1, keepdim=True) + eps)


def space_to_depth(x: torch.Tensor, stride: tuple[int, int, int]) -> torch.Tensor:
    """[B, C, T·st, H·sh, W·sw] -> [B, C·st·sh·sw, T, H, W], channel ((c·st + a)·sh + b)·sw + e."""
    st, sh, sw = stride
    b, c, t, h, w = x.shape
    x = x.reshape(b, c, t // st, st, h // sh, sh, w // sw, sw)
    return x.permute(0, 1, 3, 5, 7, 2, 4, 6).reshape(b, c * st * sh * sw, t // st, h // sh, w // sw)


def depth_to_space(x: torch.Tensor, stride: tuple[int, int, int]) -> torch.Tensor:
    """Inverse of `space_to_depth`: [B, C·st·sh·sw, T, H, W] -> [B, C, T·st, H·sh, W·sw]."""
    st, sh, sw = stride
    b, c, t, h, w = x.shape
    x = x.reshape(b, c // (st * sh * sw), st, sh, sw, t, h, w)
    return x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, c // (st * sh * sw), t * st, h * sh, w * sw)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """Pixels [B, C, F, H, W] -> [B, C·p·p, F, H/p, W/p], channel c·p² + px·p + py (x offset before y)."""
    b, c, f, h, w = x.shape
    x = x.reshape(b, c, f, h // p, p, w // p, p)
    return x.permute(0, 1, 6, 4, 2, 3, 5).reshape(b, c * p * p, f, h // p, w // p)


def unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """Inverse of `patchify`: [B, C·p·p, F, h, w] -> [B, C, F, h·p, w·p]."""
    b, c, f, h, w = x.shape
    x = x.reshape(b, c // (p * p), p, p, f, h, w)  # [B, C, px, py, F, h, w]
    return x.permute(0, 1, 4, 5, 3, 6, 2).reshape(b, c // (p * p), f, h * p, w * p)


class CausalConv3d(nn.Module):
    """3×3×3 conv, stride 1; spatial padding 1 in `padding_mode`, temporal padding by frame copies.

    causal: 2 copies of the first frame before; non-causal: 1 copy of the first before, 1 of the last after;
    with a cache: the 2 frames before come from the previous block (always causal).
    """

    def __init__(self, in_channels: int, out_channels: int, padding_mode: str):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, 3, padding=(0, 1, 1), padding_mode=padding_mode)
        self.cache_key = ""  # this conv's name in a DecoderConvCache; set by Decoder

    def forward(self, x: torch.Tensor, causal: bool, cache: DecoderConvCache | None = None) -> torch.Tensor:
        if cache is not None:
            x = cache.extend(self.cache_key, x)
        elif causal:
            x = torch.cat([x[:, :, :1]] * TEMPORAL_CONTEXT + [x], dim=2)
        else:
            x = torch.cat([x[:, :, :1], x, x[:, :, -1:]], dim=2)
        return self.conv(x)


class ResnetBlock(nn.Module):
    """x + conv2(SiLU(PCRMS(conv1(SiLU(PCRMS(x)))))); channel count kept."""

    def __init__(self, channels: int, padding_mode: str):
        super().__init__()
        self.conv1 = CausalConv3d(channels, channels, padding_mode)
        self.conv2 = CausalConv3d(channels, channels, padding_mode)

    def forward(self, x: torch.Tensor, causal: bool, cache: DecoderConvCache | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(per_channel_rms_norm(x)), causal, cache)
        h = self.conv2(F.silu(per_channel_rms_norm(h)), causal, cache)
        return x + h


class Downsampler(nn.Module):
    """conv + space-to-depth, plus a residual of the space-to-depth input averaged over channel groups."""

    def __init__(self, in_channels: int, out_channels: int, stride: tuple[int, int, int], padding_mode: str):
        super().__init__()
        self.stride = stride
        k = stride[0] * stride[1] * stride[2]
        self.group_size = in_channels * k // out_channels
        self.conv = CausalConv3d(in_channels, out_channels // k, padding_mode)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        # st−1 leading frames are duplicated so that frame 0 stays a latent frame of its own
        x = torch.cat([x[:, :, : self.stride[0] - 1], x], dim=2)
        residual = space_to_depth(x, self.stride).unflatten(1, (-1, self.group_size)).mean(dim=2)
        return space_to_depth(self.conv(x, causal), self.stride) + residual


class Upsampler(nn.Module):
    """conv + depth-to-space (plus the input's depth-to-space tiled along channels); drops the first frame."""

    def __init__(self, in_channels: int, stride: tuple[int, int, int], residual: bool, upscale_factor: int,
                 padding_mode: str):
        super().__init__()
        self.stride = stride
        self.residual = residual
        k = stride[0] * stride[1] * stride[2]
        self.repeats = k // upscale_factor
        self.conv = CausalConv3d(in_channels, in_channels * k // upscale_factor, padding_mode)

    def forward(self, x: torch.Tensor, causal: bool, cache: DecoderConvCache | None = None) -> torch.Tensor:
        h = depth_to_space(self.conv(x, causal, cache), self.stride)
        if self.residual:
            h = h + depth_to_space(x, self.stride).repeat(1, self.repeats, 1, 1, 1)
        # the first latent frame is one pixel frame, not st: its st−1 extra frames go, in a stream only once
        drop = self.stride[0] - 1 if cache is None or cache.first_block else 0
        return h[:, :, drop:]


class DownBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, downsample: str | None,
                 padding_mode: str):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(in_channels, padding_mode) for _ in range(num_layers))
        self.downsamplers = None
        if downsample is not None:
            self.downsamplers = nn.ModuleList(
                [Downsampler(in_channels, out_channels, SAMPLE_STRIDES[downsample], padding_mode)]
            )

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x, causal)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x, causal)
        return x


class MidBlock(nn.Module):
    def __init__(self, channels: int, num_layers: int, padding_mode: str):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(channels, padding_mode) for _ in range(num_layers))

    def forward(self, x: torch.Tensor, causal: bool, cache: DecoderConvCache | None = None) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x, causal, cache)
        return x


class UpBlock(nn.Module):
    def __init__(self, out_channels: int, num_layers: int, upsample: str | None, residual: bool,
                 upscale_factor: int, padding_mode: str):
        super().__init__()
        self.upsamplers = None
        if upsample is not None:
            self.upsamplers = nn.ModuleList([Upsampler(out_channels * upscale_factor, SAMPLE_STRIDES[upsample],
                                                       residual, upscale_factor, padding_mode)])
        self.resnets = nn.ModuleList(ResnetBlock(out_channels, padding_mode) for _ in range(num_layers))

    def forward(self, x: torch.Tensor, causal: bool, cache: DecoderConvCache | None = None) -> torch.Tensor:
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, causal, cache)
        for resnet in self.resnets:
            x = resnet(x, causal, cache)
        return x


class Encoder(nn.Module):
    """Pixels [B, 3, F, H, W] in [−1, 1] -> moments [B, C+1, T, H/32, W/32]: C latent means, 1 shared log-variance."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        mode = cfg.encoder_spatial_padding_mode
        self.patch_size = cfg.patch_size
        self.conv_in = CausalConv3d(cfg.in_channels * cfg.patch_size**2, cfg.latent_channels, mode)
        self.down_blocks = nn.ModuleList()
        c = cfg.latent_channels
        for i, cout in enumerate(cfg.block_out_channels):
            kind = cfg.downsample_type[i] if cfg.spatio_temporal_scaling[i] else None
            self.down_blocks.append(DownBlock(c, cout, cfg.layers_per_block[i], kind, mode))
            c = cout
        self.mid_block = MidBlock(c, cfg.layers_per_block[-1], mode)
        self.conv_out = CausalConv3d(c, cfg.latent_channels + 1, mode)

    def forward(self, pixels: torch.Tensor, causal: bool) -> torch.Tensor:
        x = self.conv_in(patchify(pixels, self.patch_size), causal)
        for block in self.down_blocks:
            x = block(x, causal)
        x = self.mid_block(x, causal)
        return self.conv_out(F.silu(per_channel_rms_norm(x)), causal)


class Decoder(nn.Module):
    """Latents [B, C, T, h, w] (not normalised) -> pixels [B, 3, 8(T−1)+1, 32h, 32w], roughly in [−1, 1]."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        mode = cfg.decoder_spatial_padding_mode
        self.patch_size = cfg.patch_size
        # diffusers lists most decoder fields from the pixel end; build it from the latent end
        channels = tuple(reversed(cfg.decoder_block_out_channels))
        layers = tuple(reversed(cfg.decoder_layers_per_block))
        scaled = tuple(reversed(cfg.decoder_spatio_temporal_scaling))
        kinds = cfg.upsample_type  # diffusers does not reverse this one: it is listed from the latent end
        residual = tuple(reversed(cfg.upsample_residual))
        factors = tuple(reversed(cfg.upsample_factor))
        self.conv_in = CausalConv3d(cfg.latent_channels, channels[0], mode)
        self.mid_block = MidBlock(channels[0], layers[0], mode)
        self.up_blocks = nn.ModuleList()
        for i, cout in enumerate(channels):
            c = cout // factors[i]
            self.up_blocks.append(UpBlock(c, layers[i + 1], kinds[i] if scaled[i] else None, residual[i],
                                          factors[i], mode))
        self.conv_out = CausalConv3d(c, cfg.out_channels * cfg.patch_size**2, mode)
        for name, m in self.named_modules():
            if isinstance(m, CausalConv3d):
                m.cache_key = name

    def forward(self, z: torch.Tensor, causal: bool, cache: DecoderConvCache | None = None) -> torch.Tensor:
        x = self.conv_in(z, causal, cache)
        x = self.mid_block(x, causal, cache)
        for block in self.up_blocks:
            x = block(x, causal, cache)
        x = self.conv_out(F.silu(per_channel_rms_norm(x)), causal, cache)
        return unpatchify(x, self.patch_size)

    def conv_cache_shapes(self, batch: int, height: int, width: int) -> dict[str, tuple[int, ...]]:
        """Shape [B, C_in, 2, h_conv, w_conv] of the past-frame context of every conv, for latents of h×w."""
        shapes: dict[str, tuple[int, ...]] = {}

        def add(conv: CausalConv3d) -> None:
            shapes[conv.cache_key] = (batch, conv.conv.in_channels, TEMPORAL_CONTEXT, height, width)

        add(self.conv_in)
        for resnet in self.mid_block.resnets:
            add(resnet.conv1), add(resnet.conv2)
        for block in self.up_blocks:
            if block.upsamplers is not None:
                add(block.upsamplers[0].conv)
                height, width = height * block.upsamplers[0].stride[1], width * block.upsamplers[0].stride[2]
            for resnet in block.resnets:
                add(resnet.conv1), add(resnet.conv2)
        add(self.conv_out)
        assert len(shapes) == sum(isinstance(m, CausalConv3d) for m in self.modules())
        return shapes


class VideoVAE(nn.Module):
    """`AutoencoderKLLTX2Video` layout: `encoder.*`, `decoder.*`, buffers `latents_mean`, `latents_std` [C].

    `with_encoder=False` builds the decoder only (streaming decode needs no encoder).
    """

    def __init__(self, config: VAEConfig, with_encoder: bool = True):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config) if with_encoder else None
        self.decoder = Decoder(config)
        self.register_buffer("latents_mean", torch.zeros(config.latent_channels))
        self.register_buffer("latents_std", torch.ones(config.latent_channels))

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents [B, C, T, h, w] -> model space."""
        mean, std = self.latents_mean.view(1, -1, 1, 1, 1), self.latents_std.view(1, -1, 1, 1, 1)
        return (z - mean.to(z)) * self.config.scaling_factor / std.to(z)

    def denormalize(self, z_model: torch.Tensor) -> torch.Tensor:
        """Model-space latents [B, C, T, h, w] -> raw latents."""
        mean, std = self.latents_mean.view(1, -1, 1, 1, 1), self.latents_std.view(1, -1, 1, 1, 1)
        return z_model * std.to(z_model) / self.config.scaling_factor + mean.to(z_model)

    def encode(self, pixels: torch.Tensor, causal: bool | None = None) -> torch.Tensor:
        """Pixels [B, 3, F, H, W] in [−1, 1], F = 8(T−1)+1 -> model-space latents [B, C, T, H/32, W/32].

        The posterior mode (means); `causal=None` uses `config.encoder_causal`.
        """
        if self.encoder is None:
            raise InputError("this VideoVAE was built with with_encoder=False; build it with the encoder to encode")
        cfg = self.config
        if pixels.ndim != 5 or pixels.shape[1] != cfg.in_channels:
            raise InputError(f"VAE encode expects pixels [B, {cfg.in_channels}, F, H, W]; got {tuple(pixels.shape)}")
        f, h, w = pixels.shape[2:]
        s, t = cfg.spatial_scale, cfg.temporal_scale
        if h % s or w % s or (f - 1) % t:
            raise InputError(f"VAE encode: pixel shape F×H×W = {f}×{h}×{w}; accepted: H, W multiples of {s} and "
                             f"F = {t}·k + 1")
        causal = cfg.encoder_causal if causal is None else causal
        moments = self.encoder(pixels, causal)
        return self.normalize(moments[:, : cfg.latent_channels])

    def decode(self, z_model: torch.Tensor, causal: bool | None = None) -> torch.Tensor:
        """Model-space latents [B, C, T, h, w] -> pixels [B, 3, 8(T−1)+1, 32h, 32w] in ≈[−1, 1] (not clamped).

        `causal=None` uses `config.decoder_causal`; an explicit value overrides it either way (diffusers can only
        turn causality on per call).
        """
        cfg = self.config
        if z_model.ndim != 5 or z_model.shape[1] != cfg.latent_channels:
            raise InputError(f"VAE decode expects latents [B, {cfg.latent_channels}, T, h, w]; "
                             f"got {tuple(z_model.shape)}")
        if self.config.decoder_spatial_padding_mode == "reflect" and min(z_model.shape[3:]) < 2:
            raise InputError(f"VAE decode: latent h×w {tuple(z_model.shape[3:])}; reflect padding needs ≥ 2×2")
        causal = cfg.decoder_causal if causal is None else causal
        return self.decoder(self.denormalize(z_model), causal)


def is_encoder_key(key: str) -> bool:
    return key.startswith("encoder.")


def load_vae(path: str | Path, config: VAEConfig | None = None, *, with_encoder: bool = True,
             dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> VideoVAE:
    """A VideoVAE from a diffusers-layout `vae/` checkpoint (directory, file or shard index).

    `config=None` reads `config.json` from the checkpoint directory. Every key is checked; with
    `with_encoder=False` the `encoder.*` keys are skipped explicitly.
    """
    p = Path(path)
    if config is None:
        config = VAEConfig.from_json(p if p.is_dir() else p.parent)
    vae = VideoVAE(config, with_encoder=with_encoder)
    state = read_state_dict(p)
    load_checked(vae, state, skip=None if with_encoder else is_encoder_key, what=f"VAE checkpoint {str(p)!r}")
    return vae.to(device=device, dtype=dtype).eval()
