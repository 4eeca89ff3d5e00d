"""Frame-wise gated delta rule scans (plain torch reference; fp32; runs on CPU).

The SANA-WM GDN recurrence works on whole latent frames: all S tokens of a frame read the same state and
update it together. Per batch element and head, with frame f's tokens as rows of K_f, V_f ([S, D]),
B_f = diag(beta[f]) and gamma_f the frame decay:

    state_f = gamma_f * (state_{f-1} - state_{f-1} K_f^T B_f K_f) + V_f^T B_f K_f        # [Dv, Dk]
    out[f, s] = state_f q_{f,s}

`delta_rule_scan` runs this forwards (inclusive: frame f reads the state after its own update) or
backwards (exclusive: frame f reads the state built from frames f+1..T-1 only, zero-initialised). The
GDN normaliser is the same recurrence with a value of one per token (Dv = 1) on unrotated q, k.

Knows nothing of models. Shapes: q, k, v `[B, H, T, S, D]`, beta `[B, H, T, S]`, gamma `[B, H, T]`,
state `[B, H, Dv, Dk]`. A Triton version will replace these functions behind the same signatures.
"""

from __future__ import annotations

import torch


def delta_rule_scan(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    gamma: torch.Tensor,
    state: torch.Tensor | None = None,
    *,
    reverse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One direction of the frame-wise gated delta rule, in fp32.

    q, k `[B, H, T, S, Dk]`, v `[B, H, T, S, Dv]`, beta `[B, H, T, S]`, gamma `[B, H, T]`,
    state `[B, H, Dv, Dk]` or None (zeros; must be None when `reverse`).
    Forward (`reverse=False`): inclusive scan seeded with `state`. Backward (`reverse=True`): exclusive scan
    from the last frame, zero-initialised. Returns (out `[B, H, T, S, Dv]` fp32, final state fp32).
    """
    B, H, T, S, Dk = q.shape
    Dv = v.shape[-1]
    q, k, v, beta, gamma = (t.float() for t in (q, k, v, beta, gamma))
    if state is None:
        state = q.new_zeros(B, H, Dv, Dk)
    else:
        if reverse:
            raise ValueError("the backward (exclusive) scan starts from zeros; no state can be passed")
        state = state.float()
    out = q.new_empty(B, H, T, S, Dv)
    frames = range(T - 1, -1, -1) if reverse else range(T)
    for f in frames:
        if reverse:
            out[:, :, f] = q[:, :, f] @ state.transpose(-1, -2)
        kb = k[:, :, f] * beta[:, :, f, :, None]  # B_f K_f  [B, H, S, Dk]
        kbk = k[:, :, f].transpose(-1, -2) @ kb  # K^T B K   [B, H, Dk, Dk]
        vbk = v[:, :, f].transpose(-1, -2) @ kb  # V^T B K   [B, H, Dv, Dk]
        state = gamma[:, :, f, None, None] * (state - state @ kbk) + vbk
        if not reverse:
            out[:, :, f] = q[:, :, f] @ state.transpose(-1, -2)
    return out, state


def gdn_forward(
    q_rot: torch.Tensor,
    k_rot: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    gamma: torch.Tensor,
    state: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Forward (inclusive) GDN scan: numerator on RoPE'd q_rot/k_rot and v, normaliser on unrotated q/k.

    All of q_rot, k_rot, q, k, v `[B, H, T, S, D]`; beta `[B, H, T, S]`; gamma `[B, H, T]`;
    state = (Sigma `[B, H, D, D]`, z `[B, H, D]`) or None (zeros).
    Returns num `[B, H, T, S, D]`, den `[B, H, T, S]` (fp32) and the final (Sigma, z).
    """
    sigma, z = (None, None) if state is None else state
    num, sigma = delta_rule_scan(q_rot, k_rot, v, beta, gamma, sigma)
    ones = v.new_ones(v.shape[:-1] + (1,))
    den, z = delta_rule_scan(q, k, ones, beta, gamma, None if z is None else z[:, :, None, :])
    return num, den[..., 0], (sigma, z[:, :, 0, :])


def gdn_backward(
    q_rot: torch.Tensor,
    k_rot: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    gamma: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward (exclusive, zero-initialised) GDN scan over the given frames; shapes as `gdn_forward`.
    Returns num `[B, H, T, S, D]`, den `[B, H, T, S]` (fp32)."""
    num, _ = delta_rule_scan(q_rot, k_rot, v, beta, gamma, reverse=True)
    ones = v.new_ones(v.shape[:-1] + (1,))
    den, _ = delta_rule_scan(q, k, ones, beta, gamma, reverse=True)
    return num, den[..., 0]
