"""LTX-2 video VAE: encoder, decoder (causal / non-causal), streaming causal decode."""

from engine.vae.config import VAEConfig
from engine.vae.model import VideoVAE, load_vae
from engine.vae.pixels import frames_to_pixels, pixels_to_frames
from engine.vae.stream import DecoderConvCache, StreamingDecoder

__all__ = [
    "VAEConfig",
    "VideoVAE",
    "load_vae",
    "frames_to_pixels",
    "pixels_to_frames",
    "DecoderConvCache",
    "StreamingDecoder",
]
