"""The LTX-2 video VAE: encoder, decoder (causal or not) and latent normalisation (spec `refiner_vae.md` §5).

Parameter names follow diffusers' `AutoencoderKLLTX2Video` 1:1, so a diffusers `vae/` checkpoint loads with
`load_vae` (every key checked). Pixels are in [−1, 1]; latents "in model space" are normalised with the
per-channel `latents_mean`/`latents_std` buffers (`z_model = (z − mean)·scaling_factor/std`).

Every temporal operation is a 3×3×3 conv whose time padding is copies of the first (and, non-causal, last)
frame. When a `DecoderConvCache` (engine/vae/stream.py) is passed to the decoder, each conv takes its two
frames of past context from the cache instead, which makes block-by-block decoding equal the whole causal
decode. This module knows nothing about blocks or streams beyond that hook.

The LTX-2 release has no decoder timestep conditioning and no noise injection; both are built when a config
asks for them, with the noise maps an explicit input (`Decoder.draw_noise`) so that decoding is deterministic.
"""

from __future__ import annotations

import math
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


class TimestepMLP(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(256, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(e)))


class TimeEmbedder(nn.Module):
    """Decode timestep [B] -> [B, dim]: MLP([cos | sin](t·ω)), ω_i = 10000^(−i/128), i < 128."""

    def __init__(self, dim: int):
        super().__init__()
        self.timestep_embedder = TimestepMLP(dim)

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        freqs = torch.exp(-math.log(10000.0) * torch.arange(128, dtype=torch.float32, device=t.device) / 128)
        angles = t.float()[:, None] * freqs[None]
        return self.timestep_embedder(torch.cat([torch.cos(angles), torch.sin(angles)], dim=1).to(dtype))


class ResnetBlock(nn.Module):
    """x + conv2(SiLU(PCRMS(conv1(SiLU(PCRMS(x)))))); channel count kept.

    Optional (not in the LTX-2 release): timestep modulation after each norm (`scale_shift_table` [4, C] plus the
    block's time embedding) and a spatial noise map added after each conv, scaled per channel.
    """

    def __init__(
        self, channels: int, padding_mode: str, inject_noise: bool = False, timestep_conditioning: bool = False
    ):
        super().__init__()
        self.conv1 = CausalConv3d(channels, channels, padding_mode)
        self.conv2 = CausalConv3d(channels, channels, padding_mode)
        self.per_channel_scale1 = self.per_channel_scale2 = None
        if inject_noise:
            self.per_channel_scale1 = nn.Parameter(torch.zeros(channels, 1, 1))
            self.per_channel_scale2 = nn.Parameter(torch.zeros(channels, 1, 1))
        self.scale_shift_table = nn.Parameter(torch.zeros(4, channels)) if timestep_conditioning else None
        self.noise_key = ""  # this block's name in a noise dict; set by Decoder

    def forward(
        self,
        x: torch.Tensor,
        causal: bool,
        cache: DecoderConvCache | None = None,
        temb: torch.Tensor | None = None,
        noise: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """temb: [B, 4·C] block time embedding; noise[noise_key]: [2, H, W] maps, constant over frames."""
        h = per_channel_rms_norm(x)
        if self.scale_shift_table is not None:
            mod = (temb.unflatten(1, (4, -1)) + self.scale_shift_table)[..., None, None, None]
            shift1, scale1, shift2, scale2 = mod.unbind(dim=1)  # each [B, C, 1, 1, 1]
            h = h * (1 + scale1) + shift1
        h = self.conv1(F.silu(h), causal, cache)
        if self.per_channel_scale1 is not None:
            h = h + (noise[self.noise_key][0] * self.per_channel_scale1)[:, None]
        h = per_channel_rms_norm(h)
        if self.scale_shift_table is not None:
            h = h * (1 + scale2) + shift2
        h = self.conv2(F.silu(h), causal, cache)
        if self.per_channel_scale2 is not None:
            h = h + (noise[self.noise_key][1] * self.per_channel_scale2)[:, None]
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

    def __init__(
        self, in_channels: int, stride: tuple[int, int, int], residual: bool, upscale_factor: int, padding_mode: str
    ):
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
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, downsample: str | None, padding_mode: str):
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
    def __init__(
        self,
        channels: int,
        num_layers: int,
        padding_mode: str,
        inject_noise: bool = False,
        timestep_conditioning: bool = False,
    ):
        super().__init__()
        self.time_embedder = TimeEmbedder(4 * channels) if timestep_conditioning else None
        self.resnets = nn.ModuleList(
            ResnetBlock(channels, padding_mode, inject_noise, timestep_conditioning) for _ in range(num_layers)
        )

    def forward(
        self,
        x: torch.Tensor,
        causal: bool,
        cache: DecoderConvCache | None = None,
        temb: torch.Tensor | None = None,
        noise: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        block_temb = self.time_embedder(temb, x.dtype) if self.time_embedder is not None else None
        for resnet in self.resnets:
            x = resnet(x, causal, cache, block_temb, noise)
        return x


class UpBlock(nn.Module):
    def __init__(
        self,
        out_channels: int,
        num_layers: int,
        upsample: str | None,
        residual: bool,
        upscale_factor: int,
        padding_mode: str,
        inject_noise: bool = False,
        timestep_conditioning: bool = False,
    ):
        super().__init__()
        self.time_embedder = TimeEmbedder(4 * out_channels) if timestep_conditioning else None
        self.upsamplers = None
        if upsample is not None:
            self.upsamplers = nn.ModuleList(
                [
                    Upsampler(
                        out_channels * upscale_factor, SAMPLE_STRIDES[upsample], residual, upscale_factor, padding_mode
                    )
                ]
            )
        self.resnets = nn.ModuleList(
            ResnetBlock(out_channels, padding_mode, inject_noise, timestep_conditioning) for _ in range(num_layers)
        )

    def forward(
        self,
        x: torch.Tensor,
        causal: bool,
        cache: DecoderConvCache | None = None,
        temb: torch.Tensor | None = None,
        noise: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        block_temb = self.time_embedder(temb, x.dtype) if self.time_embedder is not None else None
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, causal, cache)
        for resnet in self.resnets:
            x = resnet(x, causal, cache, block_temb, noise)
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
        tc = cfg.timestep_conditioning
        self.patch_size = cfg.patch_size
        # diffusers lists most decoder fields from the pixel end; build it from the latent end
        channels = tuple(reversed(cfg.decoder_block_out_channels))
        layers = tuple(reversed(cfg.decoder_layers_per_block))
        scaled = tuple(reversed(cfg.decoder_spatio_temporal_scaling))
        kinds = cfg.upsample_type  # diffusers does not reverse this one: it is listed from the latent end
        residual = tuple(reversed(cfg.upsample_residual))
        factors = tuple(reversed(cfg.upsample_factor))
        noise = tuple(reversed(cfg.decoder_inject_noise))
        self.conv_in = CausalConv3d(cfg.latent_channels, channels[0], mode)
        self.mid_block = MidBlock(channels[0], layers[0], mode, noise[0], tc)
        self.up_blocks = nn.ModuleList()
        for i, cout in enumerate(channels):
            c = cout // factors[i]
            self.up_blocks.append(
                UpBlock(
                    c, layers[i + 1], kinds[i] if scaled[i] else None, residual[i], factors[i], mode, noise[i + 1], tc
                )
            )
        self.conv_out = CausalConv3d(c, cfg.out_channels * cfg.patch_size**2, mode)
        self.time_embedder = self.scale_shift_table = self.timestep_scale_multiplier = None
        if tc:
            self.timestep_scale_multiplier = nn.Parameter(torch.tensor(1000.0))
            self.time_embedder = TimeEmbedder(2 * c)
            self.scale_shift_table = nn.Parameter(torch.zeros(2, c))
        for name, m in self.named_modules():
            if isinstance(m, CausalConv3d):
                m.cache_key = name
            if isinstance(m, ResnetBlock):
                m.noise_key = name

    def forward(
        self,
        z: torch.Tensor,
        causal: bool,
        cache: DecoderConvCache | None = None,
        timestep: torch.Tensor | None = None,
        noise: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """timestep: [B] decode timestep (timestep-conditioned decoders only); noise: `draw_noise` output
        (noise-injecting decoders only)."""
        temb = None
        if self.time_embedder is not None:
            if timestep is None:
                raise InputError("this VAE decoder is timestep-conditioned: pass a decode timestep")
            temb = timestep.flatten() * self.timestep_scale_multiplier
        x = self.conv_in(z, causal, cache)
        x = self.mid_block(x, causal, cache, temb, noise)
        for block in self.up_blocks:
            x = block(x, causal, cache, temb, noise)
        x = per_channel_rms_norm(x)
        if self.time_embedder is not None:
            mod = self.time_embedder(temb, x.dtype).unflatten(1, (2, -1)) + self.scale_shift_table
            shift, scale = mod[..., None, None, None].unbind(dim=1)  # each [B, C, 1, 1, 1]
            x = x * (1 + scale) + shift
        x = self.conv_out(F.silu(x), causal, cache)
        return unpatchify(x, self.patch_size)

    @property
    def injects_noise(self) -> bool:
        return any(isinstance(m, ResnetBlock) and m.per_channel_scale1 is not None for m in self.modules())

    def _sizes(self, height: int, width: int) -> list[tuple[nn.Module, int, int]]:
        """(module, h, w) for every conv and resnet in forward order, for latents of h×w."""
        out: list[tuple[nn.Module, int, int]] = [(self.conv_in, height, width)]
        for resnet in self.mid_block.resnets:
            out += [(resnet, height, width), (resnet.conv1, height, width), (resnet.conv2, height, width)]
        for block in self.up_blocks:
            if block.upsamplers is not None:
                up = block.upsamplers[0]
                out.append((up.conv, height, width))
                height, width = height * up.stride[1], width * up.stride[2]
            for resnet in block.resnets:
                out += [(resnet, height, width), (resnet.conv1, height, width), (resnet.conv2, height, width)]
        out.append((self.conv_out, height, width))
        return out

    def conv_cache_shapes(self, batch: int, height: int, width: int) -> dict[str, tuple[int, ...]]:
        """Shape [B, C_in, 2, h_conv, w_conv] of the past-frame context of every conv, for latents of h×w."""
        shapes = {
            m.cache_key: (batch, m.conv.in_channels, TEMPORAL_CONTEXT, h, w)
            for m, h, w in self._sizes(height, width)
            if isinstance(m, CausalConv3d)
        }
        assert len(shapes) == sum(isinstance(m, CausalConv3d) for m in self.modules())
        return shapes

    def draw_noise(self, height: int, width: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Spatial noise maps [2, h, w] of every noise-injecting resnet, for latents of h×w (empty if none).

        Drawn in forward order, conv1's map before conv2's, so a generator in the state diffusers' decoder
        draws from gives diffusers' noise. The maps are constant over frames, so one draw serves a whole video.
        """
        weight = self.conv_in.conv.weight
        noise = {}
        for m, h, w in self._sizes(height, width):
            if isinstance(m, ResnetBlock) and m.per_channel_scale1 is not None:
                noise[m.noise_key] = torch.stack(
                    [
                        torch.randn((h, w), generator=generator, device=weight.device, dtype=weight.dtype)
                        for _ in range(2)
                    ]
                )
        return noise


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
            raise InputError(
                f"VAE encode: pixel shape F×H×W = {f}×{h}×{w}; accepted: H, W multiples of {s} and F = {t}·k + 1"
            )
        causal = cfg.encoder_causal if causal is None else causal
        moments = self.encoder(pixels, causal)
        return self.normalize(moments[:, : cfg.latent_channels])

    def decode(
        self,
        z_model: torch.Tensor,
        causal: bool | None = None,
        *,
        timestep: float | torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        noise: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Model-space latents [B, C, T, h, w] -> pixels [B, 3, 8(T−1)+1, 32h, 32w] in ≈[−1, 1] (not clamped).

        `causal=None` uses `config.decoder_causal`; an explicit value overrides it either way (diffusers can only
        turn causality on per call). `timestep` (scalar or [B]) is required by, and only accepted by, a
        timestep-conditioned decoder. A noise-injecting decoder uses `noise` (from `decoder.draw_noise`) or
        draws it from `generator` (None: torch's global generator, as diffusers does).
        """
        cfg = self.config
        if z_model.ndim != 5 or z_model.shape[1] != cfg.latent_channels:
            raise InputError(
                f"VAE decode expects latents [B, {cfg.latent_channels}, T, h, w]; got {tuple(z_model.shape)}"
            )
        if cfg.decoder_spatial_padding_mode == "reflect" and min(z_model.shape[3:]) < 2:
            raise InputError(f"VAE decode: latent h×w {tuple(z_model.shape[3:])}; reflect padding needs ≥ 2×2")
        causal = cfg.decoder_causal if causal is None else causal
        t = self.decode_timestep(timestep, z_model.shape[0])
        if noise is None and self.decoder.injects_noise:
            noise = self.decoder.draw_noise(z_model.shape[3], z_model.shape[4], generator)
        return self.decoder(self.denormalize(z_model), causal, timestep=t, noise=noise)

    def decode_timestep(self, timestep: float | torch.Tensor | None, batch: int) -> torch.Tensor | None:
        """The decode timestep as a [B] tensor, checked against `config.timestep_conditioning`."""
        if not self.config.timestep_conditioning:
            if timestep is not None:
                raise InputError(
                    f"decode timestep {timestep!r} given, but this VAE is not timestep-conditioned; accepted: None"
                )
            return None
        if timestep is None:
            raise InputError(
                "this VAE is timestep-conditioned (config timestep_conditioning=True): pass a decode "
                "timestep (e.g. 0.05)"
            )
        weight = self.decoder.conv_in.conv.weight
        t = torch.as_tensor(timestep, dtype=weight.dtype, device=weight.device).flatten()
        if t.numel() not in (1, batch):
            raise InputError(f"decode timestep has {t.numel()} values; accepted: 1 or the batch size {batch}")
        return t.expand(batch)


def is_encoder_key(key: str) -> bool:
    return key.startswith("encoder.")


def load_vae(
    path: str | Path,
    config: VAEConfig | None = None,
    *,
    with_encoder: bool = True,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> VideoVAE:
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
