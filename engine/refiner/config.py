"""Configs of the LTX-2 refiner (video transformer, text connectors) and of its AR refinement recipe.

Field names are the diffusers constructor arguments of `LTX2VideoTransformer3DModel` and `LTX2TextConnectors`, so
a checkpoint's `config.json` (or a fixture's `transformer_config`) loads with `from_dict`. Defaults are the
diffusers defaults; note that the LTX-2.0 release config sets `rope_type="split"` (refiner_vae.md §2.1) while
the diffusers default is `"interleaved"`: the json decides. Audio fields are accepted (a checkpoint config carries
them) but only the video path is built. Knows nothing of weights or devices.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from engine.errors import InputError

ROPE_TYPES = ("interleaved", "split")


def _from_dict(cls, d: dict[str, Any], what: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in d if k not in names and not k.startswith("_"))
    if unknown:
        raise InputError(f"{what} has unknown field {unknown[0]!r}; accepted fields: {sorted(names)}")
    return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names})


@dataclass
class RefinerConfig:
    """`LTX2VideoTransformer3DModel` arguments. Only the video stream is built from these."""

    in_channels: int = 128
    out_channels: int | None = 128  # None = in_channels
    patch_size: int = 1
    patch_size_t: int = 1
    num_attention_heads: int = 32
    attention_head_dim: int = 128
    cross_attention_dim: int = 4096  # K/V input width of attn2 (= inner dim after caption_projection)
    vae_scale_factors: tuple[int, int, int] = (8, 32, 32)  # latent -> pixel (t, y, x), for RoPE positions
    pos_embed_max_pos: int = 20  # RoPE base for time, in seconds
    base_height: int = 2048  # RoPE base for y, in pixels
    base_width: int = 2048
    gated_attn: bool = False  # per-head sigmoid gate on attn1/attn2 outputs (`to_gate_logits`)
    cross_attn_mod: bool = False  # LTX-2.3 prompt modulation: not supported
    audio_in_channels: int = 128
    audio_out_channels: int | None = 128
    audio_patch_size: int = 1
    audio_patch_size_t: int = 1
    audio_num_attention_heads: int = 32
    audio_attention_head_dim: int = 64
    audio_cross_attention_dim: int = 2048
    audio_scale_factor: int = 4
    audio_pos_embed_max_pos: int = 20
    audio_sampling_rate: int = 16000
    audio_hop_length: int = 160
    audio_gated_attn: bool = False
    audio_cross_attn_mod: bool = False
    num_layers: int = 48
    activation_fn: str = "gelu-approximate"
    qk_norm: str = "rms_norm_across_heads"
    norm_elementwise_affine: bool = False  # block norms norm1/2/3 carry a weight
    norm_eps: float = 1e-6
    caption_channels: int = 3840  # width of the connector output fed to caption_projection
    attention_bias: bool = True
    attention_out_bias: bool = True
    rope_theta: float = 10000.0
    rope_double_precision: bool = True
    causal_offset: int = 1  # first latent frame covers one pixel frame (causal VAE)
    timestep_scale_multiplier: int = 1000  # timestep = sigma * this
    cross_attn_timestep_scale_multiplier: int = 1000
    rope_type: str = "interleaved"
    use_prompt_embeddings: bool = True
    perturbed_attn: bool = False  # STG guidance processor; same weights, unused here
    ff_bias: bool = True
    audio_ff_bias: bool = True
    use_prompt_adaln_single: bool = True
    use_keyframes_abs_pos_embedding: bool = False

    def __post_init__(self) -> None:
        if self.out_channels is None:
            self.out_channels = self.in_channels
        self.vae_scale_factors = tuple(self.vae_scale_factors)
        unsupported = {
            "patch_size": (self.patch_size, 1),
            "patch_size_t": (self.patch_size_t, 1),
            "cross_attn_mod": (self.cross_attn_mod, False),
            "use_prompt_embeddings": (self.use_prompt_embeddings, True),
            "use_keyframes_abs_pos_embedding": (self.use_keyframes_abs_pos_embedding, False),
            "qk_norm": (self.qk_norm, "rms_norm_across_heads"),
            "activation_fn": (self.activation_fn, "gelu-approximate"),
        }
        for name, (value, accepted) in unsupported.items():
            if value != accepted:
                raise InputError(f"refiner config {name}={value!r} is not supported; accepted: {accepted!r}")
        if self.rope_type not in ROPE_TYPES:
            raise InputError(f"refiner config rope_type={self.rope_type!r}; accepted: {ROPE_TYPES}")
        if self.attention_head_dim % 2:
            raise InputError(f"refiner config attention_head_dim={self.attention_head_dim} must be even (RoPE pairs)")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RefinerConfig:
        return _from_dict(cls, d, "refiner config")


@dataclass
class ConnectorsConfig:
    """`LTX2TextConnectors` arguments. Only `text_proj_in` and the video connector are built."""

    caption_channels: int = 3840  # Gemma-3 hidden size
    text_proj_in_factor: int = 49  # hidden states stacked per token (embeddings + every layer)
    video_connector_num_attention_heads: int = 30
    video_connector_attention_head_dim: int = 128
    video_connector_num_layers: int = 2
    video_connector_num_learnable_registers: int | None = 128  # None: padded tokens stay masked instead
    video_gated_attn: bool = False
    audio_connector_num_attention_heads: int = 30
    audio_connector_attention_head_dim: int = 128
    audio_connector_num_layers: int = 2
    audio_connector_num_learnable_registers: int | None = 128
    audio_gated_attn: bool = False
    connector_rope_base_seq_len: int = 4096  # RoPE position = token index / this
    rope_theta: float = 10000.0
    rope_double_precision: bool = True
    causal_temporal_positioning: bool = False
    rope_type: str = "interleaved"
    per_modality_projections: bool = False  # LTX-2.3 feature extractors: not supported
    video_hidden_dim: int = 4096
    audio_hidden_dim: int = 2048
    proj_bias: bool = False

    def __post_init__(self) -> None:
        if self.per_modality_projections:
            raise InputError(
                "connectors config per_modality_projections=True (LTX-2.3) is not supported; accepted: False"
            )
        if self.rope_type not in ROPE_TYPES:
            raise InputError(f"connectors config rope_type={self.rope_type!r}; accepted: {ROPE_TYPES}")
        inner = self.video_connector_num_attention_heads * self.video_connector_attention_head_dim
        if inner != self.caption_channels:
            raise InputError(
                f"connectors config: video connector width {inner} (heads x head_dim) must equal "
                f"caption_channels={self.caption_channels}"
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ConnectorsConfig:
        return _from_dict(cls, d, "connectors config")


@dataclass
class ARConfig:
    """The chunk-causal AR refinement recipe (`rf_shifted_sink`, refiner_vae.md §4)."""

    block_size: int = 3  # latent frames refined per block
    kv_max_frames: int = 11  # sink + history frames of K/V kept (the active block not counted)
    sink_size: int = 1  # leading stage-1 frames used as the attention sink, returned unrefined
    sigmas: tuple[float, ...] = field(default=(0.909375, 0.725, 0.421875, 0.0))  # descending, ends at 0
    fps: float = 16.0  # drives the RoPE time axis (seconds)
    seed: int = 42  # noise generator seed when the caller gives no noise

    def __post_init__(self) -> None:
        self.sigmas = tuple(float(s) for s in self.sigmas)
        s = self.sigmas
        if len(s) < 2 or s[-1] != 0.0 or any(a <= b for a, b in zip(s, s[1:], strict=False)) or s[0] >= 1.0:
            raise InputError(f"AR sigmas {s} must be strictly descending in (0, 1) and end with 0.0")
        if self.block_size < 1 or self.sink_size < 1:
            raise InputError(f"AR block_size={self.block_size}, sink_size={self.sink_size}; both must be >= 1")
        if self.kv_max_frames <= self.sink_size:
            raise InputError(
                f"AR kv_max_frames={self.kv_max_frames} must exceed sink_size={self.sink_size} (room for history)"
            )
        if self.fps <= 0:
            raise InputError(f"AR fps={self.fps} must be > 0")

    @property
    def history_frames(self) -> int:
        return self.kv_max_frames - self.sink_size

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ARConfig:
        return _from_dict(cls, d, "AR config")
