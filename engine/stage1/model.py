"""The stage-1 SANA-WM DiT (`SanaWMTransformer3DModel`), spec stage1.md §2-§3 and §7.

Read top-down: embedders, FFN, block, final layer, then `Stage1Transformer` with its three forwards:

- `forward(...)`: the bidirectional offline model, called like the reference;
- `forward_chunk_causal(...)`: the whole sequence at once, chunk-causal (full attention inside a chunk,
  causal across chunks, softmax window = sink chunk + previous chunk); the definition the streaming mode
  must reproduce;
- `forward_cached(...)`: one chunk of a stream, reading (and on a cache-write pass writing) a
  `Stage1Cache`.

State-dict keys equal the release checkpoint's 1:1 (`stage1_full_state_dict.tsv`; no `pos_embed`).
The model knows nothing of schedulers, prompts or files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import InputError
from engine.stage1.attention import CrossAttention, RMSNorm, SelfAttention
from engine.stage1.cache import Stage1Cache
from engine.stage1.config import Stage1Config
from engine.stage1.geometry import (
    camera_rope_angles,
    invert_se3,
    rope_angles,
    rope_table,
    ucpe_ray_matrices,
)
from engine.stage1.temporal import (
    AttentionMode,
    FrameContext,
    ScanOps,
    bidirectional_mode,
    check_segments,
    streaming_mode,
    temporal_conv,
)

TIMESTEP_CHANNELS = 256


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`; to a GPU through page-locked memory without blocking (the caching host allocator
    keeps the staging buffer until the copy has run)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def timestep_sinusoid(t: torch.Tensor) -> torch.Tensor:
    """t `[...]` fp32 -> `[..., 256]` = [cos(t w_i), sin(t w_i)], w_i = exp(-ln(1e4) i / 128)."""
    half = TIMESTEP_CHANNELS // 2
    w = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    arg = t.float()[..., None] * w
    return torch.cat([torch.cos(arg), torch.sin(arg)], dim=-1)


class PatchEmbed(nn.Module):
    """`proj`: a 1x1x1 Conv3d, i.e. a per-voxel Linear; `[B, Cin, T, h, w]` -> tokens `[B, N, C]`."""

    def __init__(self, in_channels: int, hidden: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_channels, hidden, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight.flatten(1)  # [C, Cin]
        return F.linear(x.flatten(2).transpose(1, 2).to(w.dtype), w, self.proj.bias)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(TIMESTEP_CHANNELS, hidden), nn.SiLU(), nn.Linear(hidden, hidden))


class CaptionMlp(nn.Module):
    def __init__(self, in_channels: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_channels, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class CaptionEmbedder(nn.Module):
    def __init__(self, config: Stage1Config) -> None:
        super().__init__()
        # training-time null caption (CFG dropout); unused at inference, kept for the checkpoint
        self.register_buffer("y_embedding", torch.zeros(config.model_max_length, config.caption_channels))
        self.y_proj = CaptionMlp(config.caption_channels, config.hidden_size)


class ConvLayer(nn.Module):
    """Wrapper giving the checkpoint's `*.conv.weight` names."""

    def __init__(self, cin: int, cout: int, kernel: int, groups: int = 1, bias: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, groups=groups, bias=bias)


class GLUMBConvTemp(nn.Module):
    """`blocks.i.mlp` (spec §3.12): per-frame gated inverted bottleneck, then the residual temporal conv."""

    def __init__(self, config: Stage1Config) -> None:
        super().__init__()
        C, Hd = config.hidden_size, config.ffn_hidden
        self.inverted_conv = ConvLayer(C, 2 * Hd, 1)
        self.depth_conv = ConvLayer(2 * Hd, 2 * Hd, 3, groups=2 * Hd)
        self.point_conv = ConvLayer(Hd, C, 1, bias=False)
        self.t_conv = nn.Conv2d(C, C, kernel_size=(config.t_kernel_size, 1), padding=(1, 0), bias=False)

    def forward(self, m: torch.Tensor, ctx: FrameContext, cache=None) -> torch.Tensor:
        """m `[B, N, C]` -> `[B, N, C]`."""
        B, N, C = m.shape
        s = self.spatial(m, ctx.frames, ctx.height, ctx.width, ctx.ffn)
        r = temporal_conv(s, self.t_conv.weight, ctx.segments, None if cache is None else cache.ffn_tail)
        if cache is not None and ctx.write_cache:
            cache.write_ffn_tail(s)
        return r.reshape(B, N, C)

    def spatial(self, m: torch.Tensor, T: int, h: int, w: int, ffn=None) -> torch.Tensor:
        """The per-frame branch: m `[B, T*h*w, C]` -> s `[B, T, h*w, C]` (`ffn`: the fused depthwise conv + GLU op,
        `FrameContext.ffn`; None: the plain convs)."""
        B, N, C = m.shape
        if ffn is None:
            u = m.reshape(B * T, h, w, C).permute(0, 3, 1, 2)
            u = F.silu(self.inverted_conv.conv(u))
            u = self.depth_conv.conv(u)
            val, gate = u.chunk(2, dim=1)
            s = self.point_conv.conv(val * F.silu(gate))  # [B*T, C, h, w]
            return s.permute(0, 2, 3, 1).reshape(B, T, h * w, C)
        # the same math token-major: two GEMMs around one fused depthwise conv + GLU pass, no permutes
        Hd = self.point_conv.conv.in_channels
        y = F.linear(m.reshape(B * N, C), self.inverted_conv.conv.weight.view(2 * Hd, C),
                     self.inverted_conv.conv.bias)  # [B*N, 2Hd], SiLU not yet applied
        g = ffn(y.view(B * T, h, w, 2 * Hd), self.depth_conv.conv.weight, self.depth_conv.conv.bias,
                silu_input=True)  # [B*T, h, w, Hd]
        return F.linear(g.reshape(B * N, Hd), self.point_conv.conv.weight.view(C, Hd)).reshape(B, T, h * w, C)


class Stage1Block(nn.Module):
    """`blocks.i` (spec §3.6)."""

    def __init__(self, config: Stage1Config, index: int) -> None:
        super().__init__()
        C = config.hidden_size
        self.scale_shift_table = nn.Parameter(torch.zeros(6, C))
        if config.has_plucker_proj(index):
            self.plucker_proj = nn.Linear(C, C)
        self.attn = SelfAttention(config, softmax=config.is_softmax_block(index))
        self.cross_attn = CrossAttention(config)
        self.mlp = GLUMBConvTemp(config)

    def forward(self, x, mod, p_emb, text_kv, text_bias, ctx: FrameContext, cache=None) -> torch.Tensor:
        """x `[B, N, C]`, mod `[B, T, 6, C]` (t_block output per frame), p_emb `[B, N, C]`."""
        B, N, C = x.shape
        T = ctx.frames
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            (self.scale_shift_table + mod).unsqueeze(3).unbind(2)  # each [B, T, 1, C]
        )
        per_frame = lambda t: t.reshape(B, T, N // T, C)
        a = (per_frame(layer_norm(x)) * (1 + scale_msa) + shift_msa).reshape(B, N, C)
        attn = self.attn(a, ctx, cache)
        if ctx.caches_only and cache is not None and ctx.write_cache:
            self._ffn_tail_only(x, attn, p_emb, text_kv, text_bias, gate_msa, shift_mlp, scale_mlp, ctx, cache)
            return x
        x = x + (gate_msa * per_frame(attn)).reshape(B, N, C)
        if hasattr(self, "plucker_proj"):
            x = x + self.plucker_proj(p_emb)
        x = x + self.cross_attn(x, text_kv, text_bias)
        m = (per_frame(layer_norm(x)) * (1 + scale_mlp) + shift_mlp).reshape(B, N, C)
        return x + (gate_mlp * per_frame(self.mlp(m, ctx, cache))).reshape(B, N, C)

    def _ffn_tail_only(self, x, attn, p_emb, text_kv, text_bias, gate_msa, shift_mlp, scale_mlp, ctx, cache) -> None:
        """The rest of `forward` on the last frame's tokens only, as far as the FFN tail it writes (the per-frame
        branch's output of that frame): the same operations on the same rows. The attention caches are written."""
        B, N, C = x.shape
        S = ctx.tokens_per_frame
        last = lambda t: t[:, N - S:]
        x = last(x) + gate_msa[:, -1] * last(attn)  # [B, S, C]
        if hasattr(self, "plucker_proj"):
            x = x + self.plucker_proj(last(p_emb))
        x = x + self.cross_attn(x, text_kv, text_bias)
        m = layer_norm(x) * (1 + scale_mlp[:, -1]) + shift_mlp[:, -1]
        cache.write_ffn_tail(self.mlp.spatial(m, 1, ctx.height, ctx.width, ctx.ffn))


def call_block(block: Stage1Block, x, mod, p_emb, text_kv, text_bias, ctx: FrameContext, cache=None) -> torch.Tensor:
    """The plain block call of `Stage1Transformer.run` (a function, so fast paths can compile one for all blocks)."""
    return block(x, mod, p_emb, text_kv, text_bias, ctx, cache)


class FinalLayer(nn.Module):
    def __init__(self, config: Stage1Config) -> None:
        super().__init__()
        self.scale_shift_table = nn.Parameter(torch.zeros(2, config.hidden_size))
        self.linear = nn.Linear(config.hidden_size, config.in_channels)

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        """x `[B, N, C]`, t_emb `[B, T, C]` -> `[B, N, out]`."""
        B, N, C = x.shape
        T = t_emb.shape[1]
        shift = self.scale_shift_table[0] + t_emb[:, :, None]
        scale = self.scale_shift_table[1] + t_emb[:, :, None]
        x = (layer_norm(x).reshape(B, T, N // T, C) * (1 + scale) + shift).reshape(B, N, C)
        return self.linear(x)


@dataclass
class TextContext:
    """Prompt-only tensors, computed once per prompt: per-block cross-attention K/V and the padding bias."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per block: k, v [B, H_x, L, C/H_x]
    bias: torch.Tensor  # [B, 1, 1, L] additive: 0 for tokens, -10000 for padding
    dynamic_length: bool = False  # L is marked dynamic for torch.compile (`trim_text`): copies should be too


def trim_text(text: TextContext, multiple: int = 64) -> TextContext:
    """`text` without the padding after its last token: positions kept to the next multiple of `multiple` (at least
    `multiple`, at most all), each block's K/V and the bias contiguous copies (fast path `stage1-prompt-trim`). Beside
    a token, a padding position's weight in the cross-attention, e^(-10000 + logit - max), is 0 in fp32, so the output
    is that of the whole prompt; its cost follows the positions (H100, session 9: 45 us a release cross-attention over
    300 positions, 24 us over 64). A row without any token attends to all its padding evenly: then every position is
    kept. The count is marked dynamic for torch.compile, so a prompt of another length needs no recompile. Reads the
    bias on the host (once a prompt)."""
    if multiple < 1:
        raise InputError(f"prompt trim multiple {multiple}; accepted: >= 1")
    L = text.bias.shape[-1]
    valid = text.bias.reshape(-1, L) > -5000.0  # [rows, L]
    if bool(valid.any(1).all()):
        last = int(valid.any(0).nonzero().max()) + 1
        keep = min(L, max(multiple, -(-last // multiple) * multiple))
    else:
        keep = L
    kv = [(k[:, :, :keep].contiguous(), v[:, :, :keep].contiguous()) for k, v in text.kv]
    trimmed = TextContext(kv=kv, bias=text.bias[..., :keep].contiguous(), dynamic_length=True)
    mark_text_dynamic(trimmed)
    return trimmed


def mark_text_dynamic(text: TextContext) -> None:
    """Mark the prompt positions of `text`'s K/V and bias dynamic for torch.compile (where the compiled code allows)."""
    for k, v in text.kv:
        torch._dynamo.maybe_mark_dynamic(k, 2)
        torch._dynamo.maybe_mark_dynamic(v, 2)
    torch._dynamo.maybe_mark_dynamic(text.bias, text.bias.ndim - 1)


class Stage1Transformer(nn.Module):
    def __init__(self, config: Stage1Config) -> None:
        super().__init__()
        self.config = config
        C = config.hidden_size
        self.t_embedder = TimestepEmbedder(C)
        self.attention_y_norm = RMSNorm(C, 1e-5)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        self.x_embedder = PatchEmbed(config.in_channels, C)
        self.y_embedder = CaptionEmbedder(config)
        self.plucker_embedder = PatchEmbed(config.chunk_plucker_channels, C)
        self.raymap_embedder = PatchEmbed(3, C)  # unused with the Plücker path; checkpoint compatibility
        self.blocks = nn.ModuleList(Stage1Block(config, i) for i in range(config.num_layers))
        self.final_layer = FinalLayer(config)
        self.scan_ops = ScanOps()  # swap for fast scans
        # the FFN's depthwise conv + bias + GLU as one op (kernels/dwconv_glu.py's signature); None = the plain FFN
        self.ffn_ops = None

    # conditioning -----------------------------------------------------------------------------------
    def encode_text(self, encoder_hidden_states: torch.Tensor, mask: torch.Tensor | None = None) -> TextContext:
        """encoder_hidden_states `[B, 1, L, Cc]` or `[B, L, Cc]`, mask `[B, L]` (1 = token; None = all)."""
        y = encoder_hidden_states
        if y.ndim == 4:
            y = y[:, 0]
        if y.ndim != 3 or y.shape[-1] != self.config.caption_channels:
            raise InputError(f"encoder_hidden_states shape {tuple(encoder_hidden_states.shape)}; expected "
                             f"[B, 1, L, {self.config.caption_channels}] or [B, L, {self.config.caption_channels}]")
        dtype = self.dtype
        y = self.attention_y_norm(self.y_embedder.y_proj(y.to(dtype)))
        if mask is None:
            mask = torch.ones(y.shape[:2], device=y.device)
        mask = mask.reshape(mask.shape[0], -1)
        if mask.shape[0] != y.shape[0]:
            mask = mask.repeat(y.shape[0] // mask.shape[0], 1)
        bias = (-10000.0 * (1.0 - mask.to(dtype)))[:, None, None, :]
        return TextContext(kv=[blk.cross_attn.text_kv(y) for blk in self.blocks], bias=bias)

    def embed_timestep(self, timestep: torch.Tensor, batch: int, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """timestep `[B, 1, T]`, `[B, T]`, `[B]` or scalar -> t_emb `[B, T, C]`, mod `[B, T, 6, C]`.
        Timesteps are truncated toward zero first (reference quirk, spec §3.1)."""
        t = torch.as_tensor(timestep)
        if t.ndim == 3 and t.shape[1] == 1:
            t = t[:, 0]
        if t.ndim <= 1:
            t = t.reshape(-1, 1).expand(batch, frames)
        if t.shape != (batch, frames):
            raise InputError(f"timestep shape {tuple(timestep.shape)}; expected [B, 1, T], [B, T] or [B] "
                             f"with B={batch}, T={frames}")
        t = t.long().to(torch.float32)
        e = timestep_sinusoid(t).to(self.dtype)
        mlp = self.t_embedder.mlp
        t_emb = mlp[2](F.silu(mlp[0](e)))
        mod = self.t_block(t_emb).reshape(batch, frames, 6, -1)
        return t_emb, mod

    @property
    def dtype(self) -> torch.dtype:
        return self.final_layer.linear.weight.dtype

    def _context(self, camera_conditions, frame_offset, T, h, w, segments, mode, write) -> FrameContext:
        """The frame context of a forward. No device -> host sync and no stream sync: the RoPE tables (functions of
        positions only) are computed on the host and copied in without blocking, the ray matrices on the cameras'
        device (a sync here left the GPU idle while the host built the context, twice a live chunk)."""
        D = self.config.linear_head_dim
        device = camera_conditions.device
        angles = rope_angles(D, torch.arange(frame_offset, frame_offset + T), h, w)
        P = ucpe_ray_matrices(camera_conditions, h, w)
        cam_angles = camera_rope_angles(angles, D)
        return FrameContext(
            frames=T, height=h, width=w, segments=tuple(segments),
            rope=to_device(rope_table(angles), device), cam_rope=to_device(rope_table(cam_angles), device),
            P=P, P_inv=invert_se3(P), mode=mode, write_cache=write, scans=self.scan_ops,
            ffn=self.ffn_ops,
        )

    def _check_inputs(self, hidden_states, camera_conditions, chunk_plucker) -> tuple[int, int, int, int]:
        cfg = self.config
        if hidden_states.ndim != 5 or hidden_states.shape[1] != cfg.in_channels:
            raise InputError(f"hidden_states shape {tuple(hidden_states.shape)}; expected "
                             f"[B, {cfg.in_channels}, T, H, W]")
        B, _, T, h, w = hidden_states.shape
        if camera_conditions is None or tuple(camera_conditions.shape) != (B, T, 20):
            got = None if camera_conditions is None else tuple(camera_conditions.shape)
            raise InputError(f"camera_conditions shape {got}; expected {(B, T, 20)}")
        want = (B, cfg.chunk_plucker_channels, T, h, w)
        if chunk_plucker is None or tuple(chunk_plucker.shape) != want:
            got = None if chunk_plucker is None else tuple(chunk_plucker.shape)
            raise InputError(f"chunk_plucker shape {got}; expected {want}")
        return B, T, h, w

    # forwards ----------------------------------------------------------------------------------------
    def run(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        text: TextContext,
        camera_conditions: torch.Tensor,
        chunk_plucker: torch.Tensor,
        *,
        segments: tuple[tuple[int, int], ...] | None = None,
        mode: AttentionMode,
        cache: Stage1Cache | None = None,
        frame_offset: int = 0,
        write_cache: bool = False,
        block_fn=None,
        caches_only: bool = False,
    ) -> torch.Tensor | None:
        """The one forward all modes share; returns the velocity `[B, C, T, H, W]`. `block_fn(block, *args)`
        replaces the plain block call (`call_block`), e.g. with a compiled version of it. `caches_only` (a
        cache-write pass whose output nobody reads): the last block computes only what its caches keep, no final
        layer, returns None (fast path `stage1-lean-pass`)."""
        B, T, h, w = self._check_inputs(hidden_states, camera_conditions, chunk_plucker)
        segments = ((0, T),) if segments is None else tuple(segments)
        check_segments(segments, T)
        if caches_only and (cache is None or not write_cache):
            raise ValueError("caches_only is for a cache-write pass (write_cache=True, with a cache)")
        ctx = self._context(camera_conditions, frame_offset, T, h, w, segments, mode, write_cache)
        x = self.x_embedder(hidden_states.to(self.dtype))
        p_emb = self.plucker_embedder(chunk_plucker.to(self.dtype))
        t_emb, mod = self.embed_timestep(timestep, B, T)
        return self.run_blocks(x, mod, p_emb, t_emb, text, ctx, cache, block_fn, caches_only, (B, T, h, w))

    def run_blocks(self, x, mod, p_emb, t_emb, text: TextContext, ctx: FrameContext, cache: Stage1Cache | None,
                   block_fn, caches_only: bool, bthw: tuple[int, int, int, int]) -> torch.Tensor | None:
        """The blocks and the final layer of `run` on embedded inputs (the CUDA-graph runner calls this too)."""
        B, T, h, w = bthw
        block_fn = block_fn or call_block
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            c = replace(ctx, caches_only=True) if caches_only and i == last else ctx
            x = block_fn(block, x, mod, p_emb, text.kv[i], text.bias, c, None if cache is None else cache.blocks[i])
        if caches_only:
            return None
        out = self.final_layer(x, t_emb)  # [B, N, Cout]
        return out.transpose(1, 2).reshape(B, -1, T, h, w)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        mask: torch.Tensor | None = None,
        camera_conditions: torch.Tensor | None = None,
        chunk_plucker: torch.Tensor | None = None,
        *,
        encoder_attention_mask: torch.Tensor | None = None,
        mode: AttentionMode | None = None,
    ) -> torch.Tensor:
        """Bidirectional forward, called like the reference. hidden_states `[B, C, T, H, W]`, timestep
        `[B, 1, T]`, encoder_hidden_states `[B, 1, L, Cc]`, mask `[B, L]`, camera_conditions `[B, T, 20]`,
        chunk_plucker `[B, 48, T, H, W]` -> velocity `[B, C, T, H, W]`. `mode` overrides the softmax
        scales / camera renorm (default: the reference's bidirectional choice)."""
        text = self.encode_text(encoder_hidden_states, mask if mask is not None else encoder_attention_mask)
        mode = mode or bidirectional_mode(self.config.linear_head_dim, self.config.camera_renorm)
        return self.run(hidden_states, timestep, text, camera_conditions, chunk_plucker, mode=mode)

    def forward_chunk_causal(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        text: TextContext,
        camera_conditions: torch.Tensor,
        chunk_plucker: torch.Tensor,
        chunk_frames: list[int],
        *,
        mode: AttentionMode | None = None,
    ) -> torch.Tensor:
        """The whole sequence in one pass, chunk-causal; chunk_frames e.g. [4, 3, 3, ...] sums to T."""
        bounds = torch.tensor([0] + list(chunk_frames)).cumsum(0).tolist()
        segments = tuple(zip(bounds[:-1], bounds[1:], strict=True))
        mode = mode or streaming_mode(self.config.linear_head_dim)
        return self.run(hidden_states, timestep, text, camera_conditions, chunk_plucker,
                        segments=segments, mode=mode)

    def forward_cached(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        text: TextContext,
        camera_conditions: torch.Tensor,
        chunk_plucker: torch.Tensor,
        cache: Stage1Cache,
        *,
        write_cache: bool = False,
        mode: AttentionMode | None = None,
        block_fn=None,
        caches_only: bool = False,
    ) -> torch.Tensor | None:
        """One streaming chunk whose first frame is video frame `cache.frames_written`; reads the cache,
        and on a cache-write pass stores this chunk's state and advances `cache.frames_written` (`caches_only`:
        see `run`)."""
        T = hidden_states.shape[2]
        mode = mode or streaming_mode(self.config.linear_head_dim)
        out = self.run(hidden_states, timestep, text, camera_conditions, chunk_plucker, mode=mode,
                       cache=cache, frame_offset=cache.frames_written, write_cache=write_cache, block_fn=block_fn,
                       caches_only=caches_only)
        if write_cache:
            cache.frames_written += T
        return out
