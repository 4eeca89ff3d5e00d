"""Stage-1 attention layers: GDN and softmax self-attention (each with its UCPE camera branch) and the
masked text cross-attention. Spec stage1.md §3.7-§3.11; parameter names are the release keys.

Time enters only through `engine.stage1.temporal` (segments, caches), so the same layer serves the
bidirectional, whole-sequence chunk-causal and streaming forwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.stage1.cache import GDNBlockCache, SoftmaxBlockCache
from engine.stage1.config import Stage1Config
from engine.stage1.geometry import apply_rope, ucpe_transform
from engine.stage1.temporal import (
    FrameContext,
    combine_scans,
    key_scale,
    rms_downscale,
    sdpa,
    segment_slices,
    symmetric_short_conv,
    window_mask,
)


@dataclass
class Projections:
    """What a self-attention layer computes from its input `a [B, N, C]` by linear maps (`SelfAttention.project`)."""

    q: torch.Tensor  # [B, N, C] each, from `qkv`
    k: torch.Tensor
    v: torch.Tensor
    q_cam: torch.Tensor  # [B, N, C] each, the camera branch's
    k_cam: torch.Tensor
    v_cam: torch.Tensor
    gate: torch.Tensor  # [B, N, C] output gate logits
    beta: torch.Tensor | None  # [B, N, H] write-strength logits per token (GDN blocks)
    decay: torch.Tensor | None  # [B, T, H] fp32 decay logits per frame (GDN blocks)


class RMSNorm(nn.Module):
    """w * x / sqrt(mean(x^2) + eps) over the last dim, computed in fp32, returned in x's dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


class ShortConv(nn.Module):
    """Holder of a depthwise temporal conv weight `[C, 1, K]` (applied by `temporal.symmetric_short_conv`)."""

    def __init__(self, channels: int, taps: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(channels, 1, taps))


def to_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, N, H*D] -> [B, H, N, D]."""
    B, N, C = x.shape
    return x.reshape(B, N, heads, C // heads).transpose(1, 2)


def from_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, N, D] -> [B, N, H*D]."""
    B, H, N, D = x.shape
    return x.transpose(1, 2).reshape(B, N, H * D)


def frames_view(x: torch.Tensor, T: int) -> torch.Tensor:
    """[B, H, N, D] -> [B, H, T, S, D] (or [B, H, N] -> [B, H, T, S])."""
    return x.reshape(*x.shape[:2], T, x.shape[2] // T, *x.shape[3:])


class SelfAttention(nn.Module):
    """`blocks.i.attn`: GDN (`softmax=False`) or softmax self-attention, plus the UCPE camera branch.

    Softmax blocks carry the GDN gate parameters too (checkpoint layout) but do not use them, and have no
    short convs.
    """

    def __init__(self, config: Stage1Config, softmax: bool) -> None:
        super().__init__()
        C, H = config.hidden_size, config.self_attn_heads
        self.softmax = softmax
        self.heads, self.head_dim = H, config.linear_head_dim
        self.eps = config.gdn_eps
        self.A_log = nn.Parameter(torch.zeros(H))
        self.dt_bias = nn.Parameter(torch.zeros(H))
        self.register_buffer("recall_gate", torch.zeros(1))  # unused; checkpoint compatibility
        self.qkv = nn.Linear(C, 3 * C, bias=False)
        self.q_norm = RMSNorm(C, 1e-5)
        self.k_norm = RMSNorm(C, 1e-5)
        self.proj = nn.Linear(C, C)
        self.beta_proj = nn.Linear(C, H)
        self.gate_proj = nn.Linear(C, H)
        self.output_gate = nn.Linear(C, C)
        if not softmax:
            self.conv_k = ShortConv(C, config.conv_kernel_size)
        self.q_proj_cam = nn.Linear(C, C)
        self.k_proj_cam = nn.Linear(C, C)
        self.v_proj_cam = nn.Linear(C, C)
        self.out_proj_cam = nn.Linear(C, C)
        self.q_norm_cam = RMSNorm(C, 1e-5)
        self.k_norm_cam = RMSNorm(C, 1e-5)
        if not softmax:
            self.conv_k_cam = ShortConv(C, config.conv_kernel_size)
        # `in_projections()`' weights and biases concatenated (fast path `stage1-fused-proj`, which makes the linears'
        # parameters views of them); not in the state dict. None: `project` calls the linears one by one
        self.register_buffer("fused_weight", None, persistent=False)
        self.register_buffer("fused_bias", None, persistent=False)

    def forward(self, a: torch.Tensor, ctx: FrameContext, cache=None) -> torch.Tensor:
        """a `[B, N, C]` (modulated LN output) -> `[B, N, C]`."""
        p = self.project(a, ctx.frames)
        if self.softmax:
            out = self._softmax(p, ctx, cache)
        else:
            out = self._gdn(p, ctx, cache)
        out = out * F.silu(p.gate.float())
        return self.proj(out.to(a.dtype))

    # the projections of the block input ---------------------------------------------------------------
    def in_projections(self) -> list[tuple[str, nn.Linear]]:
        """The linears this layer applies to its input `a`, in `project`'s order (GDN blocks add beta and decay)."""
        names = ["qkv", "q_proj_cam", "k_proj_cam", "v_proj_cam", "output_gate"]
        names += [] if self.softmax else ["beta_proj", "gate_proj"]
        return [(n, getattr(self, n)) for n in names]

    def project(self, a: torch.Tensor, T: int) -> Projections:
        """Everything this layer computes from `a [B, N, C]` by a linear map. With `fused_weight` set (fast path
        `stage1-fused-proj`) one GEMM over the concatenated weights; the decay logits are then the frame mean of the
        per-token ones (mean and the affine map commute), else `gate_proj` of the frame mean of `a`."""
        B, N, C = a.shape
        if self.fused_weight is not None:
            y = F.linear(a, self.fused_weight, self.fused_bias)
            sizes = [lin.out_features for _, lin in self.in_projections()]
            parts = y.split(sizes + [y.shape[-1] - sum(sizes)], dim=-1)  # the last: zero padding rows, if any
            (q, k, v), rest = parts[0].split(C, dim=-1), parts[1:]
            decay = None if self.softmax else rest[5].reshape(B, T, N // T, -1).float().mean(2)
        else:
            q, k, v = self.qkv(a).split(C, dim=-1)
            rest = [self.q_proj_cam(a), self.k_proj_cam(a), self.v_proj_cam(a), self.output_gate(a)]
            if not self.softmax:
                rest.append(self.beta_proj(a))
            decay = None if self.softmax else self.gate_proj(a.reshape(B, T, N // T, C).mean(2)).float()
        return Projections(q, k, v, rest[0], rest[1], rest[2], rest[3],
                           None if self.softmax else rest[4], decay)

    # GDN ------------------------------------------------------------------------------------------
    def _gates(self, p: Projections, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """beta `[B, H, T, S]` per token, gamma `[B, H, T]` fp32 per frame."""
        B, N, _ = p.beta.shape
        beta = torch.sigmoid(p.beta).transpose(1, 2).reshape(B, self.heads, T, N // T)
        gamma = torch.exp(-self.A_log.float().exp() * F.softplus(p.decay + self.dt_bias.float()))  # [B, T, H]
        return beta, gamma.transpose(1, 2)

    def _gdn(self, p: Projections, ctx: FrameContext, cache: GDNBlockCache | None) -> torch.Tensor:
        B, N, C = p.q.shape
        T, S, H = ctx.frames, ctx.tokens_per_frame, self.heads
        beta, gamma = self._gates(p, T)
        kscale = key_scale(self.head_dim, S)

        # main branch
        q, k, v = p.q, p.k, p.v
        k_frames = k.reshape(B, T, S, C)
        left = None if cache is None else cache.k_tail
        k = symmetric_short_conv(k_frames, self.conv_k.weight, ctx.segments, left,
                                 causal_across_segments=True).reshape(B, N, C)
        if cache is not None and ctx.write_cache:
            cache.write_k_tail(torch.cat([cache.k_tail, k_frames], dim=1))
        q = to_heads(F.relu(self.q_norm(q)), H)
        k = to_heads(F.relu(self.k_norm(k)) * kscale, H)
        v = to_heads(v, H)
        q_rot, k_rot = apply_rope(q, ctx.rope), apply_rope(k, ctx.rope)
        fr = lambda t: frames_view(t, T)
        q, k, v, q_rot, k_rot = map(fr, (q, k, v, q_rot, k_rot))

        # camera branch inputs
        qc, kc, vc = p.q_cam, p.k_cam, p.v_cam
        kc = symmetric_short_conv(kc.reshape(B, T, S, C), self.conv_k_cam.weight, ctx.segments,
                                  causal_across_segments=False).reshape(B, N, C)
        qc = to_heads(F.relu(self.q_norm_cam(qc)), H)
        kc = to_heads(F.relu(self.k_norm_cam(kc)) * kscale, H)
        vc = to_heads(vc, H)
        qu, ku, vu = self._ucpe(qc, kc, vc, ctx)
        inflation = (torch.linalg.vector_norm(ku, dim=-1).clamp_min(1e-6)
                     / torch.linalg.vector_norm(kc, dim=-1).clamp_min(1e-6)) ** 2  # [B, H, N]
        beta_cam = beta / frames_view(inflation, T).mean(-1, keepdim=True).clamp_min(1.0)
        qu, ku, vu = map(fr, (qu, ku, vu))

        # the scans: forward ones seeded from the cache, backward ones per segment
        state = None if cache is None else (cache.sigma, cache.z)
        sigma_cam = None if cache is None else cache.sigma_cam
        if len(ctx.segments) == 1:
            main, state, cam, sigma_cam = ctx.scans.block_combined(
                q_rot, k_rot, q, k, v, beta, gamma, state, qu, ku, vu, beta_cam, sigma_cam, eps=self.eps,
                out_dtype=p.q.dtype)  # [B, H, T, S, D] each
        else:
            num_f, den_f, state = ctx.scans.gdn_forward(q_rot, k_rot, q, k, v, beta, gamma, state)
            backward = [ctx.scans.gdn_backward(q_rot[:, :, s], k_rot[:, :, s], q[:, :, s], k[:, :, s], v[:, :, s],
                                               beta[:, :, s], gamma[:, :, s]) for s in segment_slices(ctx)]
            num_b = torch.cat([n for n, _ in backward], dim=2)
            den_b = torch.cat([d for _, d in backward], dim=2)
            cam_f, sigma_cam = ctx.scans.camera_forward(qu, ku, vu, beta_cam, gamma, sigma_cam)
            cam_b = torch.cat([ctx.scans.camera_backward(qu[:, :, s], ku[:, :, s], vu[:, :, s], beta_cam[:, :, s],
                                                         gamma[:, :, s]) for s in segment_slices(ctx)], dim=2)
            main, cam = combine_scans(num_f, den_f, num_b, den_b, cam_f, cam_b, self.eps, p.q.dtype)
        main = from_heads(main.reshape(B, H, N, self.head_dim))
        cam = cam.reshape(B, H, N, self.head_dim)
        cam = from_heads(ucpe_transform(cam, ctx.P, ctx.cam_rope, inverse_rope=True))
        if cache is not None and ctx.write_cache:
            cache.write_states(state[0], state[1], sigma_cam)
        return main + self.out_proj_cam(cam)

    def _ucpe(self, q, k, v, ctx: FrameContext):
        """UCPE-encode camera q (by P^T), k, v (by P^-1), then the optional variant-R renorm."""
        qu = ucpe_transform(q, ctx.P.transpose(-1, -2), ctx.cam_rope)
        ku = ucpe_transform(k, ctx.P_inv, ctx.cam_rope)
        vu = ucpe_transform(v, ctx.P_inv, ctx.cam_rope)
        if ctx.mode.camera_renorm:
            qu, ku, vu = rms_downscale(q, qu), rms_downscale(k, ku), rms_downscale(v, vu)
        return qu, ku, vu

    # softmax --------------------------------------------------------------------------------------
    def _softmax(self, p: Projections, ctx: FrameContext, cache: SoftmaxBlockCache | None) -> torch.Tensor:
        H = self.heads
        q = apply_rope(to_heads(self.q_norm(p.q), H), ctx.rope)
        k = apply_rope(to_heads(self.k_norm(p.k), H), ctx.rope)
        v = to_heads(p.v, H)
        qc = to_heads(self.q_norm_cam(p.q_cam), H)
        kc = to_heads(self.k_norm_cam(p.k_cam), H)
        vc = to_heads(p.v_cam, H)
        qc, kc, vc = self._ucpe(qc, kc, vc, ctx)

        mask = window_mask(ctx.segments, ctx.tokens_per_frame)
        mask = None if mask is None else mask.to(q.device)
        K, V, Kc, Vc = k, v, kc, vc
        if cache is not None:
            if len(ctx.segments) != 1:
                raise ValueError("a cached (streaming) forward takes exactly one chunk")
            K, V, Kc, Vc = cache.keys_values(k, v, kc, vc)  # this chunk's tokens, then the cached window
        main = from_heads(sdpa(q, K, V, ctx.mode.main_softmax_scale, mask))
        cam = sdpa(qc, Kc, Vc, ctx.mode.camera_softmax_scale, mask)
        if cache is not None and ctx.write_cache:  # after the attention: K, V may be views of the window buffers
            cache.append(k, v, kc, vc)
        cam = from_heads(ucpe_transform(cam, ctx.P, ctx.cam_rope, inverse_rope=True))
        return main + self.out_proj_cam(cam)


class CrossAttention(nn.Module):
    """`blocks.i.cross_attn`: image tokens attend to the prompt; additive -10000 padding bias."""

    def __init__(self, config: Stage1Config) -> None:
        super().__init__()
        C = config.hidden_size
        self.heads = config.num_attention_heads
        self.q_linear = nn.Linear(C, C)
        self.kv_linear = nn.Linear(C, 2 * C)
        self.proj = nn.Linear(C, C)
        self.q_norm = RMSNorm(C, 1e-6)
        self.k_norm = RMSNorm(C, 1e-6)

    def text_kv(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """y `[B, L, C]` -> k, v `[B, H_x, L, C/H_x]` (depend on the prompt only)."""
        k, v = self.kv_linear(y).chunk(2, dim=-1)
        return to_heads(self.k_norm(k), self.heads), to_heads(v, self.heads)

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], bias: torch.Tensor) -> torch.Tensor:
        """x `[B, N, C]`, kv from `text_kv`, bias `[B, 1, 1, L]` additive -> `[B, N, C]`."""
        q = to_heads(self.q_norm(self.q_linear(x)), self.heads)
        k, v = kv
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=q.shape[-1] ** -0.5)
        return self.proj(from_heads(out))
