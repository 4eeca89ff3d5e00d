"""How stage-1 sees time: the frame layout of one forward call and the temporal operators.

Every temporal operator of the DiT (the short convs on K, the GDN and camera scans, softmax attention, the
FFN temporal conv) is written once for a sequence split into *segments* (chunks) of frames:

- forward-in-time parts (causal conv taps, forward scans, the t_conv left tap) run across segments and can
  be seeded with the state cached from earlier chunks;
- backward-in-time parts (anti-causal conv taps, backward scans, the t_conv right tap) are confined to
  the segment;
- softmax attention from segment c sees segments {0, c-1, c} (sink + previous chunk + itself).

One segment covering all frames with nothing cached is the bidirectional model (spec §3); several
segments are the whole-sequence chunk-causal model; one segment plus a cache is a streaming chunk (§7).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kernels.camera_scan import camera_scan_backward, camera_scan_forward
from kernels.gdn import gdn_backward, gdn_forward


@dataclass(frozen=True)
class AttentionMode:
    """The scale and renorm choices that differ between the bidirectional and the streaming model
    (spec §3.9 table, §3.8 step 4, §7.3). Scales are explicit, never a side effect of padding."""

    main_softmax_scale: float
    camera_softmax_scale: float
    camera_renorm: bool  # True = variant R (post-UCPE RMS renorm), False = variant T


def flash_padded_head_dim(head_dim: int) -> int:
    """Head dim the reference pads to before a FlashAttention call (whose default scale it then gets)."""
    if head_dim in (32, 64, 128, 256):
        return head_dim
    if head_dim > 256:
        raise ValueError(f"head dim {head_dim} > 256 has no FlashAttention padding")
    return 128 if head_dim <= 128 else 256


def bidirectional_mode(head_dim: int, camera_renorm: str) -> AttentionMode:
    """Offline model: main softmax unpadded (1/sqrt(D)), camera padded (1/sqrt(128) at D=112)."""
    return AttentionMode(
        main_softmax_scale=head_dim**-0.5,
        camera_softmax_scale=flash_padded_head_dim(head_dim) ** -0.5,
        camera_renorm=camera_renorm == "R",
    )


def streaming_mode(head_dim: int, camera_renorm: str = "T") -> AttentionMode:
    """Streaming (cached chunk-causal) model: both softmax paths padded (1/sqrt(128) at D=112); NVlabs'
    streaming code has no camera renorm (variant T)."""
    s = flash_padded_head_dim(head_dim) ** -0.5
    return AttentionMode(main_softmax_scale=s, camera_softmax_scale=s, camera_renorm=camera_renorm == "R")


@dataclass
class ScanOps:
    """The recurrent scans used by the GDN blocks; swap in fast versions (same signatures, see
    kernels/gdn.py and kernels/camera_scan.py)."""

    gdn_forward: Callable = gdn_forward
    gdn_backward: Callable = gdn_backward
    camera_forward: Callable = camera_scan_forward
    camera_backward: Callable = camera_scan_backward
    # all four scans of a one-segment GDN block in one call (same arguments and results as `block`), e.g.
    # kernels.gdn_triton.gdn_block_triton's single launch; None: `block` calls the four functions above
    gdn_block: Callable | None = None
    # the block's scans already combined (same arguments as `block_combined`), e.g.
    # kernels.gdn_triton.gdn_block_phases_triton; None: `block_combined` combines `block`'s results in torch
    gdn_block_combined: Callable | None = None

    def block(self, q_rot, k_rot, q, k, v, beta, gamma, state, qc, kc, vc, beta_cam, cam_state):
        """The forward and backward GDN scans (main q_rot, k_rot, q, k, v; state (Sigma, z) or None) and camera
        scans (qc, kc, vc, beta_cam; state Sigma_c or None) over the same frames, the backward ones over all of
        them (one segment). Returns num_f, den_f, (Sigma, z), num_b, den_b, cam_f, Sigma_c, cam_b."""
        if self.gdn_block is not None:
            return self.gdn_block(q_rot, k_rot, q, k, v, beta, gamma, state, qc, kc, vc, beta_cam, cam_state)
        num_f, den_f, state = self.gdn_forward(q_rot, k_rot, q, k, v, beta, gamma, state)
        num_b, den_b = self.gdn_backward(q_rot, k_rot, q, k, v, beta, gamma)
        cam_f, cam_state = self.camera_forward(qc, kc, vc, beta_cam, gamma, cam_state)
        cam_b = self.camera_backward(qc, kc, vc, beta_cam, gamma)
        return num_f, den_f, state, num_b, den_b, cam_f, cam_state, cam_b

    def block_combined(self, q_rot, k_rot, q, k, v, beta, gamma, state, qc, kc, vc, beta_cam, cam_state, *,
                       eps: float, out_dtype: torch.dtype):
        """`block`'s scans combined as a GDN block uses them: main = (num_f + num_b) / (den_f + den_b + eps) and
        cam = cam_f + cam_b, `[B, H, T, S, D]` in out_dtype (computed in fp32). Returns main, (Sigma, z), cam,
        Sigma_c."""
        if self.gdn_block_combined is not None:
            return self.gdn_block_combined(q_rot, k_rot, q, k, v, beta, gamma, state, qc, kc, vc, beta_cam, cam_state,
                                           eps=eps, out_dtype=out_dtype)
        num_f, den_f, state, num_b, den_b, cam_f, cam_state, cam_b = self.block(
            q_rot, k_rot, q, k, v, beta, gamma, state, qc, kc, vc, beta_cam, cam_state)
        main, cam = combine_scans(num_f, den_f, num_b, den_b, cam_f, cam_b, eps, out_dtype)
        return main, state, cam, cam_state


def combine_scans(num_f, den_f, num_b, den_b, cam_f, cam_b, eps: float, out_dtype: torch.dtype):
    """A GDN block's scan results combined (in their fp32): main = (num_f + num_b) / (den_f + den_b + eps), cam =
    cam_f + cam_b, both in out_dtype."""
    main = ((num_f + num_b) / (den_f + den_b + eps)[..., None]).to(out_dtype)
    return main, (cam_f + cam_b).to(out_dtype)


@dataclass
class FrameContext:
    """Everything the blocks need about the frames of one forward call (shared by all blocks)."""

    frames: int  # T: latent frames in this call
    height: int
    width: int
    segments: tuple[tuple[int, int], ...]  # chunk frame ranges [s, e) covering 0..T
    rope: torch.Tensor  # complex64 [N, D/2], absolute positions
    cam_rope: torch.Tensor  # complex64 [N, D/4]
    P: torch.Tensor  # [B, N, 4, 4] ray-local <- world (decodes the camera output)
    P_inv: torch.Tensor  # [B, N, 4, 4] (encodes camera k, v); q uses P^T
    mode: AttentionMode
    write_cache: bool = False  # a cache-write (t=0) pass: blocks store their state after reading it
    scans: ScanOps = field(default_factory=ScanOps)
    # the FFN's fused depthwise 3x3 conv + bias + GLU, `op(y [F, h, w, 2Hd], weight, bias, *, silu_input)` ->
    # `[F, h, w, Hd]` (kernels/dwconv_glu.py); None = the plain FFN (Stage1Transformer.ffn_ops)
    ffn: Callable | None = None
    # a cache-write pass whose output nobody reads, given to its last block: that block computes only what its
    # caches keep (its attention caches in full; the FFN tail from the last frame's tokens) and returns its input
    # (`Stage1Block.forward`; fast path `stage1-lean-pass`)
    caches_only: bool = False

    @property
    def tokens_per_frame(self) -> int:
        return self.height * self.width


def check_segments(segments: tuple[tuple[int, int], ...], frames: int) -> None:
    pos = 0
    for s, e in segments:
        if s != pos or e <= s:
            raise ValueError(f"segments {segments} must tile 0..{frames} in order")
        pos = e
    if pos != frames:
        raise ValueError(f"segments {segments} must tile 0..{frames} in order")


def symmetric_short_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    segments: tuple[tuple[int, int], ...],
    left: torch.Tensor | None = None,
    *,
    causal_across_segments: bool,
) -> torch.Tensor:
    """Depthwise temporal conv with taps (w0..w_{K-1}..w0) over offsets -(K-1)..K-1 (spec §3.7, §7.3).

    x `[B, T, S, C]`, weight `[C, 1, K]` (w_{K-1} multiplies the current frame), left `[B, K-1, S, C]`
    pre-conv frames before frame 0 (None = zeros). The causal half looks across segments (and into `left`)
    when `causal_across_segments`, else it is confined to the segment like the anti-causal half.
    """
    B, T, S, C = x.shape
    K = weight.shape[-1]
    w = weight[:, 0, :].to(x.dtype)  # [C, K]
    pad = x.new_zeros(B, K - 1, S, C)

    def causal(xp: torch.Tensor, n: int) -> torch.Tensor:  # xp: K-1 context frames + n frames
        return sum(w[:, j] * xp[:, j : j + n] for j in range(K))

    if causal_across_segments:
        fwd = causal(torch.cat([pad if left is None else left.to(x.dtype), x], dim=1), T)
    else:
        fwd = torch.cat([causal(torch.cat([pad, x[:, s:e]], dim=1), e - s) for s, e in segments], dim=1)
    bwd = torch.cat(
        [causal(torch.cat([pad, x[:, s:e].flip(1)], dim=1), e - s).flip(1) for s, e in segments], dim=1
    )
    return fwd + bwd - w[:, K - 1] * x


def temporal_conv(
    s: torch.Tensor,
    weight: torch.Tensor,
    segments: tuple[tuple[int, int], ...],
    left: torch.Tensor | None = None,
) -> torch.Tensor:
    """FFN residual temporal conv r = s + t_conv(s) (spec §3.12, §7.3).

    s `[B, T, S, C]`, weight `[C, C, 3, 1]` (full channel mixing, no bias), left `[B, 1, S, C]` = the frame
    before frame 0 (None = zeros). The left tap crosses segments; the right tap is zero at a segment end.

    One GEMM with K = 3C: each token's (previous, own, next frame) features times the weight viewed `[C, 3C]` in
    its storage order, with s added in the GEMM's epilogue (addmm). The three taps are summed in the GEMM's fp32
    accumulator and rounded once. (The earlier form, three GEMMs of K = C whose rounded outputs were added, took
    0.31 ms a release block eagerly on an H100: tests/benchmarks/ffn_probe.py, "temporal conv alone".) The taps
    follow the weight's storage, so the GEMM reads it in place:

    - stored as the conv's (contiguous, index 3i + tau): the taps interleaved per channel, `[N, C, 3]`;
    - stored tap-major (`[C, 3, C]` memory, index tau C + i; fast path `stage1-tconv`): three contiguous copies
      `[N, 3, C]`, a cheaper pass than the interleave.
    """
    B, T, S, C = s.shape
    prev = torch.cat([s.new_zeros(s[:, :1].shape) if left is None else left.to(s.dtype), s[:, :-1]], dim=1)
    nxt = torch.cat([s[:, 1:], s.new_zeros(s[:, :1].shape)], dim=1)
    for _, e in segments:  # python-int indexing: no host->device index copy (CUDA-graph capturable)
        nxt[:, e - 1] = 0
    weight = weight.to(s.dtype)
    if not weight.is_contiguous() and weight.permute(0, 2, 1, 3).is_contiguous():  # tap-major storage
        taps = torch.cat([prev, s, nxt], dim=-1).reshape(B * T * S, 3 * C)  # [N, (tau, i)]
        w = weight.permute(0, 2, 1, 3).reshape(weight.shape[0], 3 * C)  # [Cout, (tau, i)]: a view
    else:
        taps = torch.stack([prev, s, nxt], dim=-1).reshape(B * T * S, 3 * C)  # [N, (i, tau)]
        w = weight.reshape(weight.shape[0], 3 * C)  # [Cout, (i, tau)]: a view when contiguous
    return torch.addmm(s.reshape(B * T * S, C), taps, w.T).reshape(B, T, S, C)


def window_mask(segments: tuple[tuple[int, int], ...], tokens_per_frame: int) -> torch.Tensor | None:
    """Boolean softmax mask `[N, N]` (True = attend) of the whole-sequence chunk-causal model: a query of
    segment c sees segments 0 (sink), c-1 and c. None when there is a single segment (full attention)."""
    if len(segments) == 1:
        return None
    seg_of_frame = torch.cat([torch.full((e - s,), i) for i, (s, e) in enumerate(segments)])
    seg = seg_of_frame.repeat_interleave(tokens_per_frame)
    q, k = seg[:, None], seg[None, :]
    return (k == q) | ((k == q - 1) & (k >= 0)) | ((k == 0) & (q > 0))


def segment_slices(ctx: FrameContext) -> list[slice]:
    return [slice(s, e) for s, e in ctx.segments]


def sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Softmax attention `[B, H, Nq, D]` x `[B, H, Nk, D]` with an explicit scale and an optional boolean
    mask `[Nq, Nk]` (True = attend)."""
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def rms_downscale(reference: torch.Tensor, x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Variant-R renorm: shrink x `[..., D]` to the RMS of `reference` when larger (spec §3.8 step 4)."""
    r_ref = reference.square().mean(-1, keepdim=True).add(eps).sqrt()
    r_x = x.square().mean(-1, keepdim=True).add(eps).sqrt()
    return x * (r_ref / r_x.clamp_min(eps)).clamp(max=1.0)


def key_scale(head_dim: int, tokens_per_frame: int) -> float:
    """GDN key scale 1/sqrt(D*S) applied after the ReLU kernel."""
    return (head_dim**-0.5) * (tokens_per_frame**-0.5)
