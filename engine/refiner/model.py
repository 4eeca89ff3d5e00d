"""The LTX-2 video transformer, video stream only (the SANA-WM refiner, refiner_vae.md §2).

One forward predicts the flow velocity of a block of latent frames `[B, C, n, h, w]` (one token per latent voxel,
token order (t, y, x)) at noise level sigma, with 3-D fractional RoPE at the block's absolute frame positions,
cross-attention to the projected text (prepared once per prompt by `prepare_text`), and adaLN timestep
modulation. Self-attention K/V go through an optional `SelfAttentionKV` object so a caller can prepend a prefix
(the AR recipe's sink + history window) and record each layer's pre-RoPE key (after norm_k), post-RoPE key and
value. Parameter names are those of a diffusers `LTX2VideoTransformer3DModel` `transformer/` checkpoint; its audio
and audio-video weights are skipped by `is_audio_key` (`load_refiner_weights`).

The model knows nothing of denoising schedules, caches or the rollout: see `ar.py`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.errors import InputError
from engine.refiner.config import RefinerConfig
from engine.refiner.rope import Rope, apply_rope, rope_from_fractions, video_fractions
from engine.weights import load_checked
from kernels.fp8_attention import QuantizedKV, fp8_segment_attention

TIMESTEP_CHANNELS = 256  # sinusoid width of the timestep embedding (fixed in LTX-2)

# Checkpoint keys of the audio stream and the audio<->video cross-attention: present in every LTX-2 transformer
# checkpoint, never used by the video-only refiner. Matched on the top-level name or the name inside a block.
AUDIO_KEY_PREFIXES = ("audio_", "av_cross_attn_", "video_to_audio_", "audio_to_video_", "video_a2v_")


def is_audio_key(key: str) -> bool:
    """True for checkpoint keys of the audio half of an LTX-2 transformer (skipped when loading)."""
    parts = key.split(".")
    name = ".".join(parts[2:]) if parts[0] == "transformer_blocks" and len(parts) > 2 else key
    return name.startswith(AUDIO_KEY_PREFIXES)


class SelfAttentionKV(Protocol):
    """What a self-attention layer attends to, given the current tokens' K/V.

    `attend(layer, k_pre, k, v)` gets the current tokens' key after norm_k and before RoPE (`k_pre`), the rotated
    key `k` and the value `v`, all `[B, H, N, D]`, and returns the keys/values `[B, H, P + N, D]` the queries attend
    to (no mask), or two segments `(prefix, current)` of them as tuples of keys and values (attended as one set,
    `two_segment_attention`); a segment may also be an e4m3 `QuantizedKV`, the same object in both tuples (then
    the segments are attended in fp8). Implementations may record what they are given. One that sets
    `writes_after_attention` also gets `after_attention(layer, k, v)` once the layer has attended.
    """

    def attend(self, layer: int, k_pre: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]: ...


class ExplicitKV:
    """Attend to `[prefix ; current]` from explicit per-layer tensors (no cache); optionally record every layer.

    `prefix[layer] = (K, V)`, each `[B, H, P, D]` (post-RoPE keys), or None for no prefix. With `record=True`,
    `k_pre[layer]`, `k[layer]`, `v[layer]` hold the current tokens' pre-RoPE key, post-RoPE key and value.
    """

    def __init__(self, prefix: list[tuple[Tensor, Tensor]] | None = None, record: bool = False) -> None:
        self.prefix = prefix
        self.record = record
        self.k_pre: dict[int, Tensor] = {}
        self.k: dict[int, Tensor] = {}
        self.v: dict[int, Tensor] = {}

    def attend(self, layer: int, k_pre: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.record:
            self.k_pre[layer], self.k[layer], self.v[layer] = k_pre, k, v
        if self.prefix is None:
            return k, v
        pk, pv = self.prefix[layer]
        return torch.cat([pk.to(k.dtype), k], dim=2), torch.cat([pv.to(v.dtype), v], dim=2)


class Attention(nn.Module):
    """LTX-2 attention: q/k/v/out projections, RMS norm of q and k across all heads, optional per-head gate."""

    def __init__(
        self,
        query_dim: int,
        kv_dim: int,
        heads: int,
        head_dim: int,
        *,
        bias: bool = True,
        out_bias: bool = True,
        gated: bool = False,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(kv_dim, inner, bias=bias)
        self.to_v = nn.Linear(kv_dim, inner, bias=bias)
        self.norm_q = nn.RMSNorm(inner, eps=eps)
        self.norm_k = nn.RMSNorm(inner, eps=eps)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim, bias=out_bias)])
        self.to_gate_logits = nn.Linear(query_dim, heads, bias=True) if gated else None
        # to_q, to_k and to_v as one linear over one input (a fast path sets it: `refiner-fp8` for self-attention,
        # engine/fast/refiner_fp8.py), used by `qkv`; the three keep their own names
        self.to_qkv: nn.Module | None = None

    def _heads(self, x: Tensor) -> Tensor:  # [B, N, H·D] -> [B, H, N, D]
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """`query(x)` and `key_value(x)` of one input (self-attention): normed query, normed key and value
        `[B, H, N, D]` each (not rotated); one projection when `to_qkv` is set."""
        if self.to_qkv is None:
            return self.query(x), *self.key_value(x)
        q, k, v = self.to_qkv(x).split(self.heads * self.head_dim, dim=-1)
        return self._heads(self.norm_q(q)), self._heads(self.norm_k(k)), self._heads(v)

    def query(self, x: Tensor) -> Tensor:
        """`x [B, N, C]` -> normed query `[B, H, N, D]` (not rotated)."""
        return self._heads(self.norm_q(self.to_q(x)))

    def key_value(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """`x [B, N, C_kv]` -> (normed key, value), each `[B, H, N, D]` (not rotated)."""
        return self._heads(self.norm_k(self.to_k(x))), self._heads(self.to_v(x))

    def output(self, q: Tensor, k, v, x: Tensor, bias: Tensor | None = None) -> Tensor:
        """SDPA of `q [B,H,N,D]` over `k, v [B,H,M,D]` (additive `bias` broadcast to [B,H,N,M]; or two segments of
        keys and values as tuples, no bias), gate from the attention input `x [B, N, C]`, output projection ->
        `[B, N, C]`. Segments of which one is an e4m3 `QuantizedKV` (a K/V window with an fp8 copy, or a prompt's
        quantised K/V, fast path `refiner-fp8-attn`) run the fp8 attention over all of them
        (kernels/fp8_attention.py); a bias must then be all zeros (`engine.refiner.ar.quantize_text` sees to it)."""
        if isinstance(k, tuple) and any(isinstance(seg, QuantizedKV) for seg in k):
            out = fp8_segment_attention(q, k, v).transpose(1, 2)
        elif isinstance(k, tuple):
            out = two_segment_attention(q, k, v).transpose(1, 2)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2)  # [B, N, H, D]
        if self.to_gate_logits is not None:
            out = out * (2.0 * torch.sigmoid(self.to_gate_logits(x)))[..., None]
        return self.to_out[0](out.flatten(2))


def attention_with_lse(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax attention `[B, H, N, D]` (default scale) and its log-sum-exp `[B, H, N]` (fp32, natural log) over
    `k, v [B, H, M, D]`. CUDA half types: cuDNN's attention (the kernel SDPA picks on an H100); otherwise in fp32."""
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True)[:2]
        return out, lse.reshape(q.shape[:3])
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    lse = torch.logsumexp(s, dim=-1)
    return torch.matmul(torch.exp(s - lse[..., None]), v.float()).to(q.dtype), lse


def two_segment_attention(q: Tensor, ks: tuple[Tensor, Tensor], vs: tuple[Tensor, Tensor]) -> Tensor:
    """Softmax attention of `q` over the keys of two segments taken as one set (no concatenation): each segment's
    attention and log-sum-exp, merged with the weights exp(lse_i - lse). Equal to attention over the
    concatenation up to rounding."""
    (o1, l1), (o2, l2) = attention_with_lse(q, ks[0], vs[0]), attention_with_lse(q, ks[1], vs[1])
    lse = torch.logaddexp(l1, l2)
    return (o1.float() * torch.exp(l1 - lse)[..., None] + o2.float() * torch.exp(l2 - lse)[..., None]).to(q.dtype)


class GELUProj(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, bias: bool) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """`net.2(GELU_tanh(net.0.proj(x)))`, hidden 4x. Index 1 (dropout in the checkpoint's layout) has no weights."""

    def __init__(self, dim: int, bias: bool = True, mult: int = 4) -> None:
        super().__init__()
        self.net = nn.ModuleList(
            [GELUProj(dim, dim * mult, bias), nn.Identity(), nn.Linear(dim * mult, dim, bias=bias)]
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net[2](self.net[0](x))


class MLPEmbedder(nn.Module):
    """`linear_2(act(linear_1(x)))`: the timestep embedder (SiLU) and the caption projection (GELU tanh)."""

    def __init__(self, dim_in: int, dim: int, act: str) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(dim_in, dim)
        self.linear_2 = nn.Linear(dim, dim)
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        h = self.linear_1(x)
        h = F.silu(h) if self.act == "silu" else F.gelu(h, approximate="tanh")
        return self.linear_2(h)


@functools.cache
def _timestep_freqs(half: int, device: torch.device) -> Tensor:
    # Always computed on the CPU: timesteps reach 1000, so a one-ulp difference between devices' fp32 exp moves
    # the angles by ~1e-4 rad; this keeps GPU runs on the same table as the (CPU-made) reference fixtures.
    return torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half).to(device)


def timestep_sinusoid(timestep: Tensor, channels: int = TIMESTEP_CHANNELS) -> Tensor:
    """`[...]` timesteps -> `[..., channels]` as `[cos | sin]` of `t·exp(−ln(1e4)·i/half)`, fp32."""
    angles = timestep.to(torch.float32)[..., None] * _timestep_freqs(channels // 2, timestep.device)
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class _TimestepEmbedding(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.timestep_embedder = MLPEmbedder(TIMESTEP_CHANNELS, dim, act="silu")


class AdaLNSingle(nn.Module):
    """Timestep -> (`emb` [..., C] for the output layer, `temb` [..., 6·C] for the blocks' modulation)."""

    def __init__(self, dim: int, num_mod_params: int = 6) -> None:
        super().__init__()
        self.emb = _TimestepEmbedding(dim)
        self.linear = nn.Linear(dim, num_mod_params * dim)

    def forward(self, timestep: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        emb = self.emb.timestep_embedder(timestep_sinusoid(timestep).to(dtype))
        return emb, self.linear(F.silu(emb))


@dataclass
class RefinerText:
    """A prompt prepared for the refiner: every layer's cross-attention K/V (they depend on the prompt only)."""

    k: list  # per layer [B, H, L, D] (normed by attn2.norm_k), or (QuantizedKV,) (engine.refiner.ar.quantize_text)
    v: list  # per layer [B, H, L, D], or (None,) beside a QuantizedKV
    bias: Tensor  # [B, 1, 1, L] additive: −10000 on padded text tokens, 0 elsewhere


class RefinerBlock(nn.Module):
    def __init__(self, cfg: RefinerConfig) -> None:
        super().__init__()
        dim, heads, hd = cfg.inner_dim, cfg.num_attention_heads, cfg.attention_head_dim
        common = dict(bias=cfg.attention_bias, out_bias=cfg.attention_out_bias, gated=cfg.gated_attn)
        self.norm1 = nn.RMSNorm(dim, eps=cfg.norm_eps, elementwise_affine=cfg.norm_elementwise_affine)
        self.attn1 = Attention(dim, dim, heads, hd, **common)
        self.norm2 = nn.RMSNorm(dim, eps=cfg.norm_eps, elementwise_affine=cfg.norm_elementwise_affine)
        self.attn2 = Attention(dim, cfg.cross_attention_dim, heads, hd, **common)
        self.norm3 = nn.RMSNorm(dim, eps=cfg.norm_eps, elementwise_affine=cfg.norm_elementwise_affine)
        self.ff = FeedForward(dim, bias=cfg.ff_bias)
        # rows: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp
        self.scale_shift_table = nn.Parameter(torch.zeros(6, dim))

    def forward(
        self,
        x: Tensor,
        temb: Tensor,
        rope: Rope,
        text_k: Tensor,
        text_v: Tensor,
        text_bias: Tensor,
        layer: int,
        kv: SelfAttentionKV | None,
        parts: tuple | None = None,
        kv_only: bool = False,
    ) -> Tensor | None:
        """`x [B, N, C]`, `temb [B, 1 or N, 6·C]` -> `[B, N, C]`. The block is two functions around the K/V window:
        `parts = (attention_inputs, attention_outputs)` by default (fast paths pass compiled versions). `kv_only`:
        only this layer's K/V reach `kv` (the attention and what follows are not computed); returns None."""
        inputs, outputs = parts or (attention_inputs, attention_outputs)
        h, q, k_pre, k, v, mod = inputs(self, x, temb, rope)
        kw, vw = (k, v) if kv is None else kv.attend(layer, k_pre, k, v)
        out = None if kv_only else outputs(self, x, h, q, kw, vw, mod, text_k, text_v, text_bias)
        if getattr(kv, "writes_after_attention", False):
            kv.after_attention(layer, k, v)
        return out


def attention_inputs(blk: RefinerBlock, x: Tensor, temb: Tensor, rope: Rope):
    """First half of a block: modulation, the self-attention input `h`, rotated query, pre-RoPE key, rotated key and
    value (`[B, H, N, D]` each), and the modulation rows `mod [B, 1|N, 6, C]`."""
    mod = blk.scale_shift_table + temb.unflatten(-1, (6, -1))  # [B, 1|N, 6, C]
    shift_msa, scale_msa = mod[:, :, 0], mod[:, :, 1]
    h = blk.norm1(x) * (1 + scale_msa) + shift_msa
    q, k_pre, v = blk.attn1.qkv(h)
    return h, apply_rope(q, rope), k_pre, apply_rope(k_pre, rope), v, mod


def attention_outputs(blk: RefinerBlock, x: Tensor, h: Tensor, q: Tensor, k: Tensor, v: Tensor, mod: Tensor,
                      text_k: Tensor, text_v: Tensor, text_bias: Tensor) -> Tensor:
    """Second half: self-attention over the window `k, v`, the gated residual, cross-attention, the modulated FFN."""
    gate_msa, shift_mlp, scale_mlp, gate_mlp = mod[:, :, 2], mod[:, :, 3], mod[:, :, 4], mod[:, :, 5]
    x = x + blk.attn1.output(q, k, v, h) * gate_msa

    h = blk.norm2(x)
    x = x + blk.attn2.output(blk.attn2.query(h), text_k, text_v, h, text_bias)

    h = blk.norm3(x) * (1 + scale_mlp) + shift_mlp
    return x + blk.ff(h) * gate_mlp


class RefinerTransformer(nn.Module):
    """LTX-2 video transformer, video stream. State-dict names: diffusers `LTX2VideoTransformer3DModel` minus audio."""

    def __init__(self, cfg: RefinerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dim = cfg.inner_dim
        self.proj_in = nn.Linear(cfg.in_channels, dim)
        self.caption_projection = MLPEmbedder(cfg.caption_channels, dim, act="gelu_tanh")
        self.time_embed = AdaLNSingle(dim, num_mod_params=6)
        self.transformer_blocks = nn.ModuleList([RefinerBlock(cfg) for _ in range(cfg.num_layers)])
        self.scale_shift_table = nn.Parameter(torch.zeros(2, dim))  # rows: shift, scale of the output layer
        self.norm_out = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.proj_out = nn.Linear(dim, cfg.out_channels)

    @property
    def num_layers(self) -> int:
        return len(self.transformer_blocks)

    def video_rope(
        self, frame_positions: Tensor, height: int, width: int, fps: float, device: torch.device | None = None,
        async_copy: bool = False,
    ) -> Rope:
        """RoPE table `[H, n·h·w, D/2]` on `device` (default: the weights') for latent frames at absolute indices
        `frame_positions [n]` (best kept on the CPU, where positions are computed); `async_copy`: see
        `rope_from_fractions`."""
        c = self.cfg
        fr = video_fractions(
            frame_positions,
            height,
            width,
            fps=fps,
            scale_factors=c.vae_scale_factors,
            causal_offset=c.causal_offset,
            base=(c.pos_embed_max_pos, c.base_height, c.base_width),
        )
        return rope_from_fractions(
            fr,
            num_heads=c.num_attention_heads,
            dim=c.inner_dim,
            theta=c.rope_theta,
            layout=c.rope_type,
            double_precision=c.rope_double_precision,
            device=self.proj_in.weight.device if device is None else device,
            async_copy=async_copy,
        )

    def prepare_text(self, prompt_embeds: Tensor, mask: Tensor | None = None) -> RefinerText:
        """Connector output `prompt_embeds [B, L, caption_channels]` (+ `mask [B, L]`, 1 = token) -> per-layer
        cross-attention K/V. Compute once per prompt."""
        if prompt_embeds.ndim != 3 or prompt_embeds.shape[-1] != self.cfg.caption_channels:
            raise InputError(
                f"prompt_embeds shape {tuple(prompt_embeds.shape)}; expected [B, L, {self.cfg.caption_channels}]"
            )
        dtype = self.proj_in.weight.dtype
        txt = self.caption_projection(prompt_embeds.to(dtype))
        b, n = txt.shape[:2]
        if mask is None:
            mask = torch.ones(b, n, device=txt.device)
        if tuple(mask.shape) != (b, n):
            raise InputError(f"prompt mask shape {tuple(mask.shape)}; expected {(b, n)}")
        bias = ((1 - mask.to(dtype)) * -10000.0)[:, None, None, :]
        ks, vs = zip(*(blk.attn2.key_value(txt) for blk in self.transformer_blocks), strict=True)
        return RefinerText(k=list(ks), v=list(vs), bias=bias)

    def forward(
        self,
        latents: Tensor,
        sigma: Tensor | float,
        text: RefinerText,
        *,
        fps: float,
        frame_positions: Tensor | None = None,
        kv: SelfAttentionKV | None = None,
        kv_only: bool = False,
    ) -> Tensor | None:
        """Velocity `[B, C_out, n, h, w]` of `latents [B, C_in, n, h, w]` at noise level `sigma` (a float, `[B]`,
        or per token `[B, n·h·w]`); the frames sit at absolute latent indices `frame_positions [n]` (default
        0..n−1; keep them on the CPU to avoid a device sync). x0 = latents − sigma·velocity. `kv_only` (a capture
        pass, whose velocity nobody reads): every layer's K/V reach `kv`, the last block stops there and no velocity
        is computed; returns None."""
        b, c, n, h, w = latents.shape
        if c != self.cfg.in_channels:
            raise InputError(f"refiner latents have {c} channels; the model takes {self.cfg.in_channels}")
        dev, dtype = latents.device, self.proj_in.weight.dtype
        if frame_positions is None:
            frame_positions = torch.arange(n)
        if frame_positions.numel() != n:
            raise InputError(f"{frame_positions.numel()} frame positions for {n} latent frames")
        rope = self.video_rope(frame_positions, h, w, fps, device=dev)

        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=dev)
        sigma = sigma.expand(b) if sigma.ndim == 0 else sigma
        # The timestep is rounded to fp32 once, after scaling in float64 (as a Python float sigma would be).
        timestep = (sigma.to(torch.float64) * self.cfg.timestep_scale_multiplier).to(torch.float32)
        timestep = timestep.reshape(b, -1)  # [B, 1] or [B, N]
        emb, temb = self.time_embed(timestep, dtype)  # [B, 1|N, C], [B, 1|N, 6·C]

        x = self.proj_in(latents.permute(0, 2, 3, 4, 1).reshape(b, n * h * w, c).to(dtype))
        last = self.num_layers - 1
        for i, blk in enumerate(self.transformer_blocks):
            x = blk(x, temb, rope, text.k[i], text.v[i], text.bias, i, kv, kv_only=kv_only and i == last)
        if kv_only:
            return None

        shift = self.scale_shift_table[0] + emb
        scale = self.scale_shift_table[1] + emb
        out = self.proj_out(self.norm_out(x) * (1 + scale) + shift)  # [B, N, C_out]
        return out.reshape(b, n, h, w, -1).permute(0, 4, 1, 2, 3)


def load_refiner_weights(model: RefinerTransformer, state: Mapping[str, Tensor]) -> list[str]:
    """Load a diffusers-layout `transformer/` state dict; returns the skipped (audio) keys, sorted."""
    return load_checked(model, state, skip=is_audio_key, what="refiner transformer checkpoint")
