"""Camera "single path" scan of SANA-WM's UCPE branch (plain torch reference; fp32; CPU).

The numerator stream of the frame-wise gated delta rule (`kernels.gdn.delta_rule_scan`) on the UCPE-
transformed q, k, v with the inflation-discounted beta; there is no normaliser and no epsilon. The
bidirectional output is `camera_scan_forward(...)[0] + camera_scan_backward(...)`.

Shapes: q, k, v `[B, H, T, S, D]`, beta `[B, H, T, S]`, gamma `[B, H, T]`, state `[B, H, D, D]`.
"""

from __future__ import annotations

import torch

from kernels.gdn import delta_rule_scan


def camera_scan_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    gamma: torch.Tensor,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive forward scan seeded with `state` (None = zeros). Returns (out `[B, H, T, S, D]`, state)."""
    return delta_rule_scan(q, k, v, beta, gamma, state)


def camera_scan_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    gamma: torch.Tensor,
) -> torch.Tensor:
    """Exclusive backward scan over the given frames, zero-initialised. Returns out `[B, H, T, S, D]`."""
    return delta_rule_scan(q, k, v, beta, gamma, reverse=True)[0]
