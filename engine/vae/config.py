"""Configuration of the LTX-2 video VAE, with the argument names of diffusers' `AutoencoderKLLTX2Video`.

A diffusers `vae/config.json` loads with `VAEConfig.from_json`. The LTX-2 release (spec `refiner_vae.md` §5)
uses neither timestep conditioning nor decoder noise injection; both are built when asked for. Not built:
channel-changing resnets (an up block's `conv_in`), `"conv"` downsamplers and `patch_size_t > 1`; a config
asking for one raises `InputError` naming the field rather than building a model that differs from the
checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

from engine.errors import InputError

DOWN_BLOCK = "LTX2VideoDownBlock3D"
SAMPLE_STRIDES = {"spatial": (1, 2, 2), "temporal": (2, 1, 1), "spatiotemporal": (2, 2, 2)}
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def _per_block(value, n: int, name: str) -> tuple:
    """diffusers accepts a bool for some per-block fields; expand it to a tuple of length `n`."""
    if isinstance(value, bool):
        return (value,) * n
    value = tuple(value)
    if len(value) != n:
        raise InputError(f"VAE config {name}={value!r} has {len(value)} entries; expected {n}")
    return value


@dataclass
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 128
    # encoder: conv_in maps the patchified pixels to `latent_channels`, then down block i maps to block_out_channels[i]
    block_out_channels: tuple[int, ...] = (256, 512, 1024, 2048)
    down_block_types: tuple[str, ...] = (DOWN_BLOCK,) * 4
    # decoder channels, listed from the pixel end: up block i outputs reversed(...)[i] // upsample_factor[i]
    decoder_block_out_channels: tuple[int, ...] = (256, 512, 1024)
    layers_per_block: tuple[int, ...] = (4, 6, 6, 2, 2)  # encoder: resnets per down block, last = mid block
    decoder_layers_per_block: tuple[int, ...] = (5, 5, 5, 5)  # decoder, pixel end first; last = mid block
    spatio_temporal_scaling: bool | tuple[bool, ...] = (True, True, True, True)
    decoder_spatio_temporal_scaling: bool | tuple[bool, ...] = (True, True, True)
    decoder_inject_noise: bool | tuple[bool, ...] = (False, False, False, False)  # pixel end first; last = mid
    downsample_type: tuple[str, ...] = ("spatial", "temporal", "spatiotemporal", "spatiotemporal")
    # unlike the other decoder fields, diffusers indexes upsample_type from the latent end
    upsample_type: tuple[str, ...] = ("spatiotemporal", "spatiotemporal", "spatiotemporal")
    upsample_residual: bool | tuple[bool, ...] = (True, True, True)
    upsample_factor: tuple[int, ...] = (2, 2, 2)  # channel reduction of the upsampler beyond depth-to-space
    timestep_conditioning: bool = False  # decoder modulated by a per-video decode timestep
    patch_size: int = 4
    patch_size_t: int = 1
    resnet_norm_eps: float = 1e-6  # only used by channel-changing resnets, which LTX-2 does not have
    scaling_factor: float = 1.0
    encoder_causal: bool = True
    # diffusers' default; the LTX-2.0 bidirectional release converts with False, the streaming VAE with True
    decoder_causal: bool = True
    encoder_spatial_padding_mode: str = "zeros"
    decoder_spatial_padding_mode: str = "reflect"
    # diffusers stores these but derives them from the wrong field when None; we derive them from the strides
    spatial_compression_ratio: int | None = None
    temporal_compression_ratio: int | None = None

    def __post_init__(self) -> None:
        n_enc = len(self.layers_per_block) - 1
        n_dec = len(self.decoder_layers_per_block) - 1
        for name in ("block_out_channels", "down_block_types", "downsample_type", "layers_per_block"):
            setattr(self, name, tuple(getattr(self, name)))
        for name in ("decoder_block_out_channels", "upsample_type", "upsample_factor", "decoder_layers_per_block"):
            setattr(self, name, tuple(getattr(self, name)))
        self.spatio_temporal_scaling = _per_block(self.spatio_temporal_scaling, n_enc, "spatio_temporal_scaling")
        self.decoder_spatio_temporal_scaling = _per_block(
            self.decoder_spatio_temporal_scaling, n_dec, "decoder_spatio_temporal_scaling"
        )
        self.decoder_inject_noise = _per_block(self.decoder_inject_noise, n_dec + 1, "decoder_inject_noise")
        self.upsample_residual = _per_block(self.upsample_residual, n_dec, "upsample_residual")
        for name, n in (
            ("block_out_channels", n_enc),
            ("down_block_types", n_enc),
            ("downsample_type", n_enc),
            ("decoder_block_out_channels", n_dec),
            ("upsample_type", n_dec),
            ("upsample_factor", n_dec),
        ):
            if len(getattr(self, name)) != n:
                raise InputError(
                    f"VAE config {name}={getattr(self, name)!r} has {len(getattr(self, name))} "
                    f"entries; expected {n} (from the layers_per_block fields)"
                )
        for t in self.down_block_types:
            if t != DOWN_BLOCK:
                raise InputError(f"VAE config down_block_types entry {t!r} is not supported; accepted: {DOWN_BLOCK!r}")
        for name in ("downsample_type", "upsample_type"):
            for t in getattr(self, name):
                if t not in SAMPLE_STRIDES:
                    raise InputError(
                        f"VAE config {name} entry {t!r} is not supported; accepted: {list(SAMPLE_STRIDES)}"
                    )
        for name in ("encoder_spatial_padding_mode", "decoder_spatial_padding_mode"):
            if getattr(self, name) not in PADDING_MODES:
                raise InputError(f"VAE config {name}={getattr(self, name)!r}; accepted: {list(PADDING_MODES)}")
        if self.patch_size_t != 1:
            raise InputError(f"VAE config patch_size_t={self.patch_size_t} is not supported; accepted: 1")
        self._check_channels()
        dec = [
            SAMPLE_STRIDES[k]
            for k, on in zip(self.upsample_type, reversed(self.decoder_spatio_temporal_scaling), strict=True)
            if on
        ]
        dec_t, dec_s = _prod(s[0] for s in dec), self.patch_size * _prod(s[1] for s in dec)
        if (dec_t, dec_s) != (self.temporal_scale, self.spatial_scale):
            raise InputError(
                f"VAE config: the decoder upsamples by {dec_t} (time) × {dec_s} (space) but the "
                f"encoder downsamples by {self.temporal_scale} × {self.spatial_scale}; they must match"
            )
        for name, derived in (
            ("spatial_compression_ratio", self.spatial_scale),
            ("temporal_compression_ratio", self.temporal_scale),
        ):
            given = getattr(self, name)
            if given is not None and given != derived:
                raise InputError(f"VAE config {name}={given} contradicts the strides, which give {derived}")

    def _check_channels(self) -> None:
        c = self.latent_channels
        for i, (cout, kind, scaled) in enumerate(
            zip(self.block_out_channels, self.downsample_type, self.spatio_temporal_scaling, strict=True)
        ):
            if not scaled:
                if cout != c:
                    raise InputError(
                        f"VAE config: down block {i} has no downsampler but block_out_channels[{i}]="
                        f"{cout} differs from its input {c}"
                    )
                continue
            k = _prod(SAMPLE_STRIDES[kind])
            if cout % k or (c * k) % cout:
                raise InputError(f"VAE config: down block {i} ({kind}) cannot map {c} to {cout} channels")
            c = cout
        c = self.decoder_block_out_channels[-1]
        for i, (cout, f, kind, scaled) in enumerate(
            zip(
                reversed(self.decoder_block_out_channels),
                reversed(self.upsample_factor),
                self.upsample_type,
                reversed(self.decoder_spatio_temporal_scaling),
                strict=True,
            )
        ):
            # the upsampler takes (cout // f)·f channels and gives cout // f; diffusers would insert a
            # channel-changing resnet ("conv_in") where that does not fit, which LTX-2 never needs
            k = _prod(SAMPLE_STRIDES[kind]) if scaled else 1
            if not scaled and f != 1:
                raise InputError(
                    f"VAE config: decoder up block {i} has no upsampler but upsample_factor {f}; accepted: 1"
                )
            if c != (cout // f) * f or (scaled and c % k) or (scaled and k % f):
                raise InputError(
                    f"VAE config: decoder up block {i} cannot map {c} to {cout // f} channels "
                    f"(decoder_block_out_channels reversed {cout}, upsample_factor {f}); only blocks "
                    "without an up-block conv_in are supported"
                )
            c = cout // f

    @property
    def spatial_scale(self) -> int:
        """Pixels per latent along H and W."""
        s = self.patch_size
        for kind, scaled in zip(self.downsample_type, self.spatio_temporal_scaling, strict=True):
            s *= SAMPLE_STRIDES[kind][1] if scaled else 1
        return s

    @property
    def temporal_scale(self) -> int:
        """Pixel frames per latent frame after the first (F = temporal_scale·(T−1) + 1)."""
        s = self.patch_size_t
        for kind, scaled in zip(self.downsample_type, self.spatio_temporal_scaling, strict=True):
            s *= SAMPLE_STRIDES[kind][0] if scaled else 1
        return s

    def pixel_frames(self, latent_frames: int) -> int:
        return self.temporal_scale * (latent_frames - 1) + 1

    def latent_frames(self, pixel_frames: int) -> int:
        return (pixel_frames - 1) // self.temporal_scale + 1

    @classmethod
    def from_dict(cls, d: dict) -> VAEConfig:
        """From a diffusers config dict; keys starting with '_' (class name, version) are ignored."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(k for k in d if not k.startswith("_") and k not in known)
        if unknown:
            raise InputError(f"VAE config has unknown field {unknown[0]!r}; accepted: {sorted(known)}")
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_json(cls, path: str | Path) -> VAEConfig:
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        if not p.is_file():
            raise InputError(f"VAE config {str(p)!r} does not exist; pass a diffusers vae/ directory or config.json")
        with open(p) as f:
            return cls.from_dict(json.load(f))


def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= x
    return out
