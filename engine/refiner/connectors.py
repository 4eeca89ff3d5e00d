"""LTX-2 text connectors, video part (refiner_vae.md §3): Gemma-3 hidden states -> refiner prompt embeddings.

`[B, L, C, layers]` stacked hidden states (or flattened `[B, L, C·layers]`, index `c·layers + l`) and the token mask
`[B, L]` go through the per-layer masked mean/range normalisation, `text_proj_in`, and the video connector (valid
tokens moved to the front, padding replaced by learnable registers, 1-D RoPE, pre-norm transformer blocks,
final RMS norm). State-dict names are those of diffusers `LTX2TextConnectors`; the audio connector's keys are
skipped by `is_audio_connector_key`. Knows nothing of tokenizers or the text encoder (see `engine/text.py`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from engine.errors import InputError
from engine.refiner.config import ConnectorsConfig
from engine.refiner.model import Attention, FeedForward
from engine.refiner.rope import Rope, apply_rope, rope_from_fractions
from engine.weights import load_checked

NORM_SCALE = 8.0  # the normalised hidden states span [-8, 8]·(range share)
NORM_EPS = 1e-6


def is_audio_connector_key(key: str) -> bool:
    return key.startswith("audio_connector.")


def masked_layer_norm(hidden: Tensor, mask: Tensor) -> Tensor:
    """Per batch element and per layer: `8·(x − mean)/(max − min + 1e-6)` over valid tokens and all channels;
    padded tokens become 0. `hidden [B, L, C, layers]`, `mask [B, L]` -> `[B, L, C·layers]` (index c·layers + l)."""
    b, n, c, _ = hidden.shape
    valid = mask.bool()[:, :, None, None]  # [B, L, 1, 1]
    n_valid = mask.to(hidden.dtype).sum(dim=1).view(b, 1, 1, 1)
    mean = hidden.masked_fill(~valid, 0.0).sum(dim=(1, 2), keepdim=True) / (n_valid * c + NORM_EPS)
    lo = hidden.masked_fill(~valid, float("inf")).amin(dim=(1, 2), keepdim=True)
    hi = hidden.masked_fill(~valid, float("-inf")).amax(dim=(1, 2), keepdim=True)
    out = (hidden - mean) / (hi - lo + NORM_EPS) * NORM_SCALE
    return out.masked_fill(~valid, 0.0).flatten(2)


class ConnectorBlock(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, gated: bool) -> None:
        super().__init__()
        self.norm1 = nn.RMSNorm(dim, eps=1e-6, elementwise_affine=False)
        self.attn1 = Attention(dim, dim, heads, head_dim, gated=gated)
        self.norm2 = nn.RMSNorm(dim, eps=1e-6, elementwise_affine=False)
        self.ff = FeedForward(dim)

    def forward(self, x: Tensor, rope: Rope, bias: Tensor | None) -> Tensor:
        h = self.norm1(x)
        k, v = self.attn1.key_value(h)
        x = x + self.attn1.output(apply_rope(self.attn1.query(h), rope), apply_rope(k, rope), v, h, bias)
        return x + self.ff(self.norm2(x))


class Connector(nn.Module):
    """A 1-D transformer over text tokens (`video_connector.*`)."""

    def __init__(self, cfg: ConnectorsConfig) -> None:
        super().__init__()
        self.cfg = cfg
        heads, hd = cfg.video_connector_num_attention_heads, cfg.video_connector_attention_head_dim
        dim = heads * hd
        regs = cfg.video_connector_num_learnable_registers
        self.learnable_registers = nn.Parameter(torch.zeros(regs, dim)) if regs else None
        self.transformer_blocks = nn.ModuleList(
            [ConnectorBlock(dim, heads, hd, cfg.video_gated_attn) for _ in range(cfg.video_connector_num_layers)]
        )
        self.norm_out = nn.RMSNorm(dim, eps=1e-6, elementwise_affine=False)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """`x [B, L, C]`, `mask [B, L]` (1 = token) -> `[B, L, C]`."""
        b, n, _ = x.shape
        valid = mask.bool()
        bias = None
        if self.learnable_registers is not None:
            r = self.learnable_registers.shape[0]
            if n % r:
                raise InputError(f"text length {n} must be a multiple of the {r} connector registers")
            # Valid tokens move to the front in order; position p >= n_valid takes register p mod r. Then every
            # token attends to every token.
            order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)
            front = torch.gather(x, 1, order[..., None].expand_as(x))
            pos = torch.arange(n, device=x.device)
            is_token = pos[None, :] < valid.sum(dim=1, keepdim=True)  # [B, L]
            registers = self.learnable_registers.to(x.dtype)[pos % r]  # [L, C]
            x = torch.where(is_token[..., None], front, registers)
        else:
            bias = ((~valid).to(x.dtype) * torch.finfo(x.dtype).min)[:, None, None, :]
        fractions = torch.arange(n, dtype=torch.float32) / self.cfg.connector_rope_base_seq_len  # CPU: see rope.py
        rope = rope_from_fractions(
            fractions[:, None],
            num_heads=self.cfg.video_connector_num_attention_heads,
            dim=x.shape[-1],
            theta=self.cfg.rope_theta,
            layout=self.cfg.rope_type,
            double_precision=self.cfg.rope_double_precision,
            device=x.device,
        )
        for blk in self.transformer_blocks:
            x = blk(x, rope, bias)
        return self.norm_out(x)


class TextConnectors(nn.Module):
    """`LTX2TextConnectors` (LTX-2.0), video part: stacked Gemma-3 hidden states -> refiner prompt embeddings."""

    def __init__(self, cfg: ConnectorsConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.text_proj_in = nn.Linear(
            cfg.caption_channels * cfg.text_proj_in_factor, cfg.caption_channels, bias=cfg.proj_bias
        )
        self.video_connector = Connector(cfg)

    def forward(self, hidden_states: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """`hidden_states [B, L, C, layers]` or `[B, L, C·layers]`, `mask [B, L]` (1 = token) ->
        (`prompt_embeds [B, L, C]`, `mask [B, L]` int64, all ones: after the registers every position is valid)."""
        c, f = self.cfg.caption_channels, self.cfg.text_proj_in_factor
        if hidden_states.ndim == 3:
            hidden_states = hidden_states.unflatten(2, (c, -1))
        if hidden_states.ndim != 4 or tuple(hidden_states.shape[2:]) != (c, f):
            raise InputError(
                f"connector input shape {tuple(hidden_states.shape)}; expected [B, L, {c}, {f}] or [B, L, {c * f}]"
            )
        if tuple(mask.shape) != tuple(hidden_states.shape[:2]):
            raise InputError(f"connector mask shape {tuple(mask.shape)}; expected {tuple(hidden_states.shape[:2])}")
        dtype = self.text_proj_in.weight.dtype
        x = self.text_proj_in(masked_layer_norm(hidden_states, mask).to(dtype))
        out = self.video_connector(x, mask)
        return out, torch.ones(mask.shape, dtype=torch.int64, device=mask.device)


def load_connector_weights(model: TextConnectors, state: Mapping[str, Tensor]) -> list[str]:
    """Load a diffusers-layout `connectors/` state dict; returns the skipped (audio connector) keys, sorted."""
    return load_checked(model, state, skip=is_audio_connector_key, what="text connectors checkpoint")
