"""Configuration of the stage-1 SANA-WM DiT.

Field names are the reference config keys (the diffusers `SanaWMTransformer3DModel` signature, as found in
`stage1_tiny.json` and in released `config.json` files); defaults are the public release (spec stage1.md §1).
Fields the reference keeps only so released configs load are accepted but must hold their release value
where another value would change the architecture (checked in `validate`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from engine.errors import InputError

CAMERA_RENORM_VARIANTS = ("R", "T")


@dataclass
class Stage1Config:
    in_channels: int = 128  # LTX-2 latent channels (in = out; prediction is the flow velocity)
    num_layers: int = 20
    hidden_size: int = 2240
    num_attention_heads: int = 20  # cross-attention heads only
    patch_size: tuple[int, int, int] = (1, 1, 1)  # only (1,1,1) is supported: one token per latent voxel
    softmax_every_n: int = 4  # block i is softmax iff (i+1) % n == 0; 0 = no softmax block
    linear_head_dim: int = 112  # head dim of the GDN / softmax / camera self-attention
    ffn_type: str = "GLUMBConvTemp"
    t_kernel_size: int = 3  # FFN temporal conv kernel (frames)
    conv_kernel_size: int = 4  # GDN short conv on K (frames, causal taps)
    k_conv_only: bool = True
    pos_embed_type: str = "wan_rope"
    qk_norm: bool = True
    cross_norm: bool = True
    y_norm: bool = True
    cam_attn_compress: int = 1
    init_cam_from_base: bool = True  # training-time only
    use_chunk_plucker_post_attn: bool = True
    chunk_plucker_channels: int = 48  # 6 Plücker dims x 8 pixel frames per latent frame
    chunk_plucker_post_attn_blocks: int = 20  # blocks i < n get plucker_proj (n < 0: all)
    fp32_attention: bool = True  # reference flag, no effect
    image_size: int = 720  # reference flag, no effect
    caption_channels: int = 2304  # Gemma-2-2B hidden size
    model_max_length: int = 300  # rows of the (unused) null caption y_embedder.y_embedding
    mlp_ratio: float = 3.0
    mlp_acts: tuple[str | None, str | None, str | None] = ("silu", "silu", None)
    use_pe: bool = True
    learn_sigma: bool = False
    pred_sigma: bool = False
    mixed_precision: str = "bf16"
    # Not a reference key: post-UCPE camera renorm variant (spec §3.8 step 4). "R" = the reference PyTorch
    # path (fixtures), "T" = the Triton / NVlabs path (no renorm; used by production GPU inference).
    camera_renorm: str = "R"
    # Not a reference key: GDN normaliser epsilon passed by the block (the class default 1e-15 is unused).
    gdn_eps: float = 1e-8

    def __post_init__(self) -> None:
        self.patch_size = tuple(self.patch_size)
        self.mlp_acts = tuple(self.mlp_acts)
        self.validate()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Stage1Config:
        """Build from a reference config dict; keys starting with `_` (diffusers metadata such as
        `_class_name`) are ignored, any other unknown key is an InputError."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if k not in names and not k.startswith("_"))
        if unknown:
            raise InputError(
                f"stage-1 config has unknown key {unknown[0]!r}; accepted keys: {sorted(names)}"
            )
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # Derived sizes -------------------------------------------------------------------------------
    @property
    def self_attn_heads(self) -> int:
        """H_a: heads of the GDN / softmax / camera self-attention."""
        return self.hidden_size // self.linear_head_dim

    @property
    def ffn_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    def is_softmax_block(self, i: int) -> bool:
        return self.softmax_every_n > 0 and (i + 1) % self.softmax_every_n == 0

    def has_plucker_proj(self, i: int) -> bool:
        n = self.chunk_plucker_post_attn_blocks
        return self.use_chunk_plucker_post_attn and (n < 0 or i < n)

    def validate(self) -> None:
        def need(ok: bool, what: str, value: Any, accepted: str) -> None:
            if not ok:
                raise InputError(f"stage-1 config {what}={value!r} is not supported; accepted: {accepted}")

        need(self.patch_size == (1, 1, 1), "patch_size", self.patch_size, "(1, 1, 1)")
        need(self.ffn_type == "GLUMBConvTemp", "ffn_type", self.ffn_type, "'GLUMBConvTemp'")
        need(self.pos_embed_type == "wan_rope", "pos_embed_type", self.pos_embed_type, "'wan_rope'")
        need(self.use_pe, "use_pe", self.use_pe, "True")
        need(self.k_conv_only, "k_conv_only", self.k_conv_only, "True")
        need(self.qk_norm and self.cross_norm and self.y_norm, "qk_norm/cross_norm/y_norm",
             (self.qk_norm, self.cross_norm, self.y_norm), "all True")
        need(self.cam_attn_compress == 1, "cam_attn_compress", self.cam_attn_compress, "1")
        need(not self.pred_sigma and not self.learn_sigma, "pred_sigma/learn_sigma",
             (self.pred_sigma, self.learn_sigma), "False")
        need(self.use_chunk_plucker_post_attn, "use_chunk_plucker_post_attn",
             self.use_chunk_plucker_post_attn, "True (the raymap path of older configs is not implemented)")
        need(tuple(self.mlp_acts) == ("silu", "silu", None), "mlp_acts", self.mlp_acts, "('silu', 'silu', None)")
        need(self.camera_renorm in CAMERA_RENORM_VARIANTS, "camera_renorm", self.camera_renorm,
             str(CAMERA_RENORM_VARIANTS))
        need(self.conv_kernel_size >= 1, "conv_kernel_size", self.conv_kernel_size, ">= 1")
        need(self.t_kernel_size == 3, "t_kernel_size", self.t_kernel_size, "3")
        D = self.linear_head_dim
        need(D > 0 and self.hidden_size % D == 0, "linear_head_dim", D, "a divisor of hidden_size")
        need(D % 8 == 0, "linear_head_dim", D, "a multiple of 8 (UCPE: half the head in groups of 4)")
        need(self.hidden_size % self.num_attention_heads == 0, "num_attention_heads",
             self.num_attention_heads, "a divisor of hidden_size")
