"""Presets: plain data describing which models a world runs, at which size.

- `tiny`: the real architectures at toy width with deterministic seeded weights and a small resolution;
  a whole chunk runs on a laptop CPU in well under a second. The demo default and the test workhorse.
- `release`: the released sizes (704x1280; stage-1 2.66B, refiner 48 x 4096, LTX-2 VAE), built with
  seeded random weights for speed measurements (`sana-wm bench`), or filled from a weights directory.

A preset only describes; `engine.world.build_world` builds it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.errors import InputError
from engine.refiner.config import ARConfig, ConnectorsConfig, RefinerConfig
from engine.stage1.config import Stage1Config
from engine.vae.config import VAEConfig


@dataclass(frozen=True)
class TextPreset:
    """Which text stack to build: `tiny` (seeded offline Gemma-shaped models) or `weights` (from disk)."""

    kind: str = "tiny"
    stage1_max_length: int = 16  # = stage-1 model_max_length
    refiner_layers: int = 2  # Gemma-3 layers; connectors stack refiner_layers + 1 hidden states
    refiner_max_length: int = 32


@dataclass(frozen=True)
class Preset:
    name: str
    pixel_hw: tuple[int, int]  # (H, W) of generated frames
    fps: float
    stage1: Stage1Config
    refiner: RefinerConfig
    connectors: ConnectorsConfig
    ar: ARConfig
    vae: VAEConfig
    text: TextPreset = field(default_factory=TextPreset)
    camera_renorm: str = "T"  # post-UCPE camera renorm of the streaming model (stage1.md §3.8)
    default_intrinsics: tuple[float, float, float, float] | None = None  # [fx, fy, cx, cy] at pixel_hw


def _tiny() -> Preset:
    latent = 16
    h, w = 192, 320
    return Preset(
        name="tiny",
        pixel_hw=(h, w),
        fps=16.0,
        stage1=Stage1Config(in_channels=latent, num_layers=4, hidden_size=224, num_attention_heads=2,
                            linear_head_dim=112, softmax_every_n=4, caption_channels=64, model_max_length=16,
                            chunk_plucker_post_attn_blocks=4),
        refiner=RefinerConfig(in_channels=latent, out_channels=latent, num_attention_heads=2, attention_head_dim=32,
                              cross_attention_dim=64, num_layers=2, caption_channels=64, audio_in_channels=8,
                              audio_out_channels=8, audio_num_attention_heads=2, audio_attention_head_dim=8,
                              audio_cross_attention_dim=16),
        connectors=ConnectorsConfig(caption_channels=64, text_proj_in_factor=3, video_connector_num_attention_heads=2,
                                    video_connector_attention_head_dim=32, video_connector_num_layers=1,
                                    video_connector_num_learnable_registers=8, audio_connector_num_attention_heads=2,
                                    audio_connector_attention_head_dim=32, audio_connector_num_layers=1,
                                    audio_connector_num_learnable_registers=8, video_hidden_dim=64,
                                    audio_hidden_dim=32),
        ar=ARConfig(),
        vae=VAEConfig(latent_channels=latent, block_out_channels=(16, 32, 64, 64),
                      decoder_block_out_channels=(8, 16, 32), layers_per_block=(1, 1, 1, 1, 1),
                      decoder_layers_per_block=(1, 1, 1, 2)),
        text=TextPreset(kind="tiny", stage1_max_length=16, refiner_layers=2, refiner_max_length=32),
        default_intrinsics=(0.9 * w, 0.9 * w, w / 2, h / 2),
    )


def _release() -> Preset:
    h, w = 704, 1280
    return Preset(
        name="release",
        pixel_hw=(h, w),
        fps=16.0,
        stage1=Stage1Config(),
        refiner=RefinerConfig(rope_type="split", caption_channels=3840, cross_attention_dim=4096),
        connectors=ConnectorsConfig(),
        ar=ARConfig(),
        vae=VAEConfig(),
        text=TextPreset(kind="weights", stage1_max_length=300, refiner_layers=48, refiner_max_length=1024),
        default_intrinsics=(0.9 * w, 0.9 * w, w / 2, h / 2),
    )


PRESETS = {"tiny": _tiny, "release": _release}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise InputError(f"unknown preset {name!r}; accepted: {sorted(PRESETS)}")
    return PRESETS[name]()
