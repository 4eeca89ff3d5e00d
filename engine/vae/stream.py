"""Streaming causal VAE decode: one latent block at a time, equal to the whole-sequence causal decode.

Spec `refiner_vae.md` §5.5. Every temporal conv of the decoder needs the last 2 frames of its input from
the previous block; `DecoderConvCache` holds them in buffers allocated once (constant memory however long
the stream). Everything else in the decoder is frame-local. Upsamplers drop their first output frame only on
the first block. The LTX-2 decoder has no timestep conditioning and no noise injection; should a config ask
for them, the decode timestep is fixed per stream and each noise-injecting resnet's spatial noise map (constant
over frames in diffusers too) is drawn once from a seed, so the stream stays deterministic and equal to the
whole decode with the same maps.

First block of n latent frames -> 8(n−1)+1 pixel frames; every later block of n -> 8n. Dropping the first
pixel frame of a SANA-WM video is the caller's business. Knows nothing about the refiner or the rollout.
"""

from __future__ import annotations

import torch

from engine.errors import InputError
from engine.vae.model import TEMPORAL_CONTEXT, VideoVAE

FRAMES_KEY = "latent_frames"
NOISE_PREFIX = "noise."


class DecoderConvCache:
    """Past-frame context of every causal conv of a decoder, keyed by the conv's module name.

    buffers[name]: [B, C_in, 2, h_conv, w_conv] — the last 2 input frames that conv saw (NaN before any).
    latent_frames: latent frames decoded since `reset`; 0 means the next block is the first one.
    """

    def __init__(self, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, device: torch.device | str):
        self.buffers = {k: torch.empty(s, dtype=dtype, device=device) for k, s in shapes.items()}
        self.latent_frames = 0
        self.reset()

    def reset(self) -> None:
        # NaN so a read of context that was never written poisons the output instead of passing silently
        for buf in self.buffers.values():
            buf.fill_(float("nan"))
        self.latent_frames = 0

    @property
    def first_block(self) -> bool:
        return self.latent_frames == 0

    def extend(self, key: str, x: torch.Tensor) -> torch.Tensor:
        """[B, C, n, h, w] -> [B, C, 2+n, h, w]: the conv input with its 2 past frames; remembers the last 2."""
        buf = self.buffers[key]
        past = x[:, :, :1].expand(-1, -1, TEMPORAL_CONTEXT, -1, -1) if self.first_block else buf
        padded = torch.cat([past, x], dim=2)
        buf.copy_(padded[:, :, -TEMPORAL_CONTEXT:])
        return padded

    def end_block(self, latent_frames: int) -> None:
        self.latent_frames += latent_frames

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())

    def snapshot(self, copy: bool = True) -> dict[str, torch.Tensor]:
        """Copies (`copy=False`: the live buffers) of every buffer plus `latent_frames` (int64 scalar)."""
        state = {k: b.clone() if copy else b for k, b in self.buffers.items()}
        state[FRAMES_KEY] = torch.tensor(self.latent_frames, dtype=torch.int64)
        return state

    def restore(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.buffers) | {FRAMES_KEY}
        missing = sorted(expected - set(state))
        unexpected = sorted(set(state) - expected)
        if missing or unexpected:
            raise InputError(
                f"decoder cache snapshot: missing keys {missing}, unexpected keys {unexpected}; "
                f"a snapshot must come from a decoder with the same config and latent size"
            )
        for k, buf in self.buffers.items():
            if tuple(state[k].shape) != tuple(buf.shape):
                raise InputError(
                    f"decoder cache snapshot key {k!r} has shape {tuple(state[k].shape)}, expected {tuple(buf.shape)}"
                )
        for k, buf in self.buffers.items():
            buf.copy_(state[k])
        self.latent_frames = int(state[FRAMES_KEY])


class StreamingDecoder:
    """Causal decode of a latent stream [B, C, n, h, w] block by block, in the VAE's dtype and device.

    Latents are in model space (normalised), as the refiner produces them. `timestep` is the decode timestep of
    a timestep-conditioned decoder (must be None otherwise); `noise_seed` seeds the noise maps of a
    noise-injecting decoder (`self.noise`, name -> [2, h_l, w_l]), drawn once and kept across `reset`.
    """

    def __init__(
        self,
        vae: VideoVAE,
        batch: int,
        latent_height: int,
        latent_width: int,
        *,
        timestep: float | torch.Tensor | None = None,
        noise_seed: int = 0,
    ):
        if not vae.config.decoder_causal:
            raise InputError(
                "StreamingDecoder needs a causally trained decoder (config decoder_causal=True); this "
                "VAE has decoder_causal=False, whose bidirectional decode cannot be streamed exactly"
            )
        if vae.config.decoder_spatial_padding_mode == "reflect" and min(latent_height, latent_width) < 2:
            raise InputError(f"latent h×w {latent_height}×{latent_width}; reflect padding needs ≥ 2×2")
        self.vae = vae
        self.shape = (batch, vae.config.latent_channels, latent_height, latent_width)
        weight = vae.decoder.conv_in.conv.weight
        self.timestep = vae.decode_timestep(timestep, batch)  # [B] or None
        generator = torch.Generator(weight.device).manual_seed(noise_seed)
        self.noise = vae.decoder.draw_noise(latent_height, latent_width, generator)
        self.cache = DecoderConvCache(
            vae.decoder.conv_cache_shapes(batch, latent_height, latent_width), dtype=weight.dtype, device=weight.device
        )

    def reset(self) -> None:
        """Start a new video."""
        self.cache.reset()

    @torch.no_grad()
    def decode_block(self, latents: torch.Tensor) -> torch.Tensor:
        """Model-space latents [B, C, n, h, w] -> pixels [B, 3, F, 32h, 32w] in ≈[−1, 1];
        F = 8(n−1)+1 for the first block after `reset`, 8n after."""
        b, c, h, w = self.shape
        if (
            latents.ndim != 5
            or (latents.shape[0], latents.shape[1], *latents.shape[3:]) != (b, c, h, w)
            or latents.shape[2] < 1
        ):
            raise InputError(f"decode_block expects latents [{b}, {c}, n≥1, {h}, {w}]; got {tuple(latents.shape)}")
        weight = self.vae.decoder.conv_in.conv.weight
        z = self.vae.denormalize(latents.to(device=weight.device, dtype=weight.dtype))
        pixels = self.vae.decoder(z, causal=True, cache=self.cache, timestep=self.timestep, noise=self.noise)
        self.cache.end_block(latents.shape[2])
        return pixels

    @property
    def latent_frames(self) -> int:
        """Latent frames decoded since `reset`."""
        return self.cache.latent_frames

    def snapshot(self, copy: bool = True) -> dict[str, torch.Tensor]:
        """The conv cache (see `DecoderConvCache.snapshot`) plus the noise maps as `noise.<resnet>`."""
        return self.cache.snapshot(copy) | {NOISE_PREFIX + k: v.clone() if copy else v for k, v in self.noise.items()}

    def restore(self, state: dict[str, torch.Tensor]) -> None:
        noise = {k[len(NOISE_PREFIX) :]: v for k, v in state.items() if k.startswith(NOISE_PREFIX)}
        if noise.keys() != self.noise.keys():
            raise InputError(f"decoder snapshot has noise maps {sorted(noise)}, expected {sorted(self.noise)}")
        for k, v in noise.items():
            if v.shape != self.noise[k].shape:
                raise InputError(
                    f"decoder snapshot noise map {k!r} has shape {tuple(v.shape)}, "
                    f"expected {tuple(self.noise[k].shape)}"
                )
        self.cache.restore({k: v for k, v in state.items() if not k.startswith(NOISE_PREFIX)})
        for k, v in noise.items():
            self.noise[k].copy_(v)
