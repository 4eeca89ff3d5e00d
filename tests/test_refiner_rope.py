"""The refiner's RoPE tables against the closed forms of refiner_vae.md §2.4 and §3, at release sizes."""

import math

import torch

from engine.refiner.config import RefinerConfig
from engine.refiner.rope import Rope, apply_rope, rope_from_fractions, video_fractions


def fp32_angle_tol(angle: torch.Tensor) -> torch.Tensor:
    """Angles are fp32 (as in the reference) and reach ~1.6e4 rad: allow a few ulps of the angle."""
    return 4 * angle.abs() * 2.0**-23 + 1e-6


def test_video_positions_closed_form():
    fps, frames, h, w = 16.0, torch.tensor([0, 1, 2, 13]), 2, 3
    fr = video_fractions(
        frames, h, w, fps=fps, scale_factors=(8, 32, 32), causal_offset=1, base=(20.0, 2048.0, 2048.0)
    ).view(len(frames), h, w, 3)
    for i, f in enumerate(frames.tolist()):
        t_seconds = (1 / 32) if f == 0 else (8 * f - 3) / 16  # midpoint of [max(0, 8f-7), 8f+1) / fps
        assert math.isclose(fr[i, 0, 0, 0].item(), t_seconds / 20, rel_tol=1e-6)
    for y in range(h):
        assert math.isclose(fr[0, y, 0, 1].item(), (32 * y + 16) / 2048, rel_tol=1e-6)
    for x in range(w):
        assert math.isclose(fr[0, 0, x, 2].item(), (32 * x + 16) / 2048, rel_tol=1e-6)
    assert torch.equal(fr[:, :, :, 0], fr[:, :1, :1, 0].expand(-1, h, w))  # time does not depend on y, x


def test_release_video_angles_closed_form():
    """4096 = 32 heads x 128: 682 frequencies per axis, index 3j + axis, 2 zero angles in front, 64 per head."""
    cfg = RefinerConfig(rope_type="split")
    fr = torch.tensor([[1 / 32 / 20, 16 / 2048, 48 / 2048], [(8 * 5 - 3) / 16 / 20, 80 / 2048, 1264 / 2048]])
    rope = rope_from_fractions(fr, num_heads=32, dim=cfg.inner_dim, theta=1e4, layout="split")
    assert rope.cos.shape == (32, 2, 64)
    flat_cos = rope.cos.transpose(0, 1).reshape(2, 2048).double()
    flat_sin = rope.sin.transpose(0, 1).reshape(2, 2048).double()
    assert torch.equal(flat_cos[:, :2], torch.ones(2, 2, dtype=torch.float64))
    assert torch.equal(flat_sin[:, :2], torch.zeros(2, 2, dtype=torch.float64))
    j = torch.arange(682, dtype=torch.float64)
    omega = 1e4 ** (j / 681) * math.pi / 2
    for axis in range(3):
        angle = (2 * fr[:, axis : axis + 1].double() - 1) * omega  # [2, 682]
        idx = 2 + 3 * j.long() + axis
        tol = fp32_angle_tol(angle)
        assert ((flat_cos[:, idx] - angle.cos()).abs() <= tol).all()
        assert ((flat_sin[:, idx] - angle.sin()).abs() <= tol).all()


def test_connector_angles_closed_form():
    """3840 = 30 heads x 128, positions index / 4096, 1920 frequencies, no padding."""
    pos = torch.tensor([0.0, 1.0, 1023.0])
    rope = rope_from_fractions((pos / 4096)[:, None], num_heads=30, dim=3840, theta=1e4, layout="split")
    flat = rope.cos.transpose(0, 1).reshape(3, 1920).double()
    j = torch.arange(1920, dtype=torch.float64)
    angle = (2 * (pos / 4096)[:, None].double() - 1) * (1e4 ** (j / 1919) * math.pi / 2)
    assert ((flat - angle.cos()).abs() <= fp32_angle_tol(angle)).all()


def test_apply_rope_layouts():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 8, generator=g)  # [B, H, N, D]
    ang = torch.randn(3, 5, 4, generator=g)
    c, s = ang.cos(), ang.sin()
    split = apply_rope(x, Rope(cos=c, sin=s, layout="split"))
    a, b = x[..., :4], x[..., 4:]
    assert torch.allclose(split, torch.cat([a * c - b * s, b * c + a * s], dim=-1), atol=1e-6)
    inter = apply_rope(x, Rope(cos=c, sin=s, layout="interleaved"))
    a, b = x[..., 0::2], x[..., 1::2]
    assert torch.allclose(inter[..., 0::2], a * c - b * s, atol=1e-6)
    assert torch.allclose(inter[..., 1::2], b * c + a * s, atol=1e-6)
    # A rotation keeps the norm of every pair.
    assert torch.allclose(split.norm(dim=-1), x.norm(dim=-1), atol=1e-5)
    assert apply_rope(x.to(torch.bfloat16), Rope(cos=c, sin=s, layout="split")).dtype == torch.bfloat16
