"""Reference scans (kernels/gdn.py, kernels/camera_scan.py) against their definitions, at odd shapes."""

import pytest
import torch

from kernels.camera_scan import camera_scan_backward, camera_scan_forward
from kernels.gdn import delta_rule_scan, gdn_backward, gdn_forward


def inputs(B=2, H=3, T=5, S=7, D=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    q, k, v = r(B, H, T, S, D), r(B, H, T, S, D) / S, r(B, H, T, S, D)
    beta = torch.rand(B, H, T, S, generator=g, dtype=torch.float64)
    gamma = torch.rand(B, H, T, generator=g, dtype=torch.float64) * 0.5 + 0.5
    return q, k, v, beta, gamma


def per_token_forward(q, k, v, beta, gamma):
    """Spec §3.7 per-token form: state <- gamma*state; state += sum_s beta_s (v_s - state k_s) k_s^T with the
    same decayed state for every token of the frame; out = state q (inclusive)."""
    B, H, T, S, D = q.shape
    out = torch.zeros(B, H, T, S, v.shape[-1], dtype=q.dtype)
    for b in range(B):
        for h in range(H):
            st = torch.zeros(v.shape[-1], D, dtype=q.dtype)
            for f in range(T):
                st = gamma[b, h, f] * st
                upd = sum(beta[b, h, f, s] * torch.outer(v[b, h, f, s] - st @ k[b, h, f, s], k[b, h, f, s])
                          for s in range(S))
                st = st + upd
                out[b, h, f] = q[b, h, f] @ st.T
    return out


def test_forward_matches_per_token_form():
    q, k, v, beta, gamma = inputs()
    out, _ = delta_rule_scan(q, k, v, beta, gamma)
    torch.testing.assert_close(out.double(), per_token_forward(q, k, v, beta, gamma), rtol=1e-5, atol=1e-5)


def test_backward_is_flipped_and_shifted_forward():
    """Exclusive backward scan == forward scan on the reversed sequence shifted by one frame (k, v, beta
    padded with 0 and gamma with 1 at the front), flipped back."""
    q, k, v, beta, gamma = inputs(T=6)
    shift = lambda x, fill: torch.cat([torch.full_like(x[:, :, :1], fill), x.flip(2)[:, :, :-1]], dim=2)
    expected = per_token_forward(q.flip(2), shift(k, 0), shift(v, 0), shift(beta, 0), shift(gamma, 1)).flip(2)
    out, _ = delta_rule_scan(q, k, v, beta, gamma, reverse=True)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("split", [1, 3, 4])
def test_forward_state_carries_across_calls(split):
    q, k, v, beta, gamma = inputs(T=5)
    args = lambda s: (q[:, :, s], k[:, :, s], q[:, :, s], k[:, :, s], v[:, :, s], beta[:, :, s], gamma[:, :, s])
    num, den, _ = gdn_forward(*args(slice(None)))
    n1, d1, state = gdn_forward(*args(slice(0, split)))
    n2, d2, _ = gdn_forward(*args(slice(split, None)), state=state)
    torch.testing.assert_close(torch.cat([n1, n2], 2), num, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([d1, d2], 2), den, rtol=1e-5, atol=1e-6)
    c_all, _ = camera_scan_forward(q, k, v, beta, gamma)
    c1, s1 = camera_scan_forward(*(t[:, :, :split] for t in (q, k, v, beta, gamma)))
    c2, _ = camera_scan_forward(*(t[:, :, split:] for t in (q, k, v, beta, gamma)), state=s1)
    torch.testing.assert_close(torch.cat([c1, c2], 2), c_all, rtol=1e-5, atol=1e-6)


def test_normaliser_is_scan_with_unit_values():
    """den = z^T q with z_f = gamma (z - K^T B K z) + K^T beta: check one frame by hand."""
    q, k, v, beta, gamma = inputs(T=1)
    _, den, (_, z) = gdn_forward(q, k, q, k, v, beta, gamma)
    z_hand = gamma[:, :, 0, None] * 0 + torch.einsum("bhsd,bhs->bhd", k[:, :, 0], beta[:, :, 0])
    torch.testing.assert_close(z.double(), z_hand, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(den[:, :, 0].double(), torch.einsum("bhsd,bhd->bhs", q[:, :, 0], z_hand),
                               rtol=1e-5, atol=1e-6)
    num_b, den_b = gdn_backward(q, k, q, k, v, beta, gamma)
    assert num_b.abs().max() == 0 and den_b.abs().max() == 0  # one frame: nothing after it
    assert camera_scan_backward(q, k, v, beta, gamma).abs().max() == 0
