"""Stage-1 samplers: distilled chunk Euler and offline flow-matching Euler (spec stage1.md §6, §7.1)."""

import pytest
import torch

from engine.stage1.sampler import (
    DISTILLED_SIGMAS,
    distilled_chunk_sample,
    flow_euler_sample,
    flow_match_sigmas,
    sample_offline,
)
from engine.stage1.temporal import bidirectional_mode
from tests.test_stage1_parity import random_camera
from tests.test_stage1_streaming import small_model


def test_flow_match_sigmas_match_diffusers_scheduler():
    sched_mod = pytest.importorskip("diffusers.schedulers.scheduling_flow_match_euler_discrete")
    for shift in (9.8, 8.0):
        sched = sched_mod.FlowMatchEulerDiscreteScheduler(shift=shift)
        sched.set_timesteps(60)
        ours = flow_match_sigmas(60, shift)
        assert ours.shape == (61,) and ours[-1] == 0
        torch.testing.assert_close(ours, sched.sigmas.float(), rtol=0, atol=1e-7)
    # the double shift of spec §6: second sigma 0.998261, last nonzero 0.087705 at s = 9.8
    s = flow_match_sigmas(60, 9.8)
    assert abs(s[1].item() - 0.998261) < 1e-6 and abs(s[-2].item() - 0.087705) < 1e-6


def fake_velocity(calls):
    def velocity(x, t):
        calls.append(t.clone())
        return 0.3 * x + t.reshape(t.shape[0], 1, -1, 1, 1) / 1000.0

    return velocity


def test_distilled_chunk_sample_steps_by_hand():
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(2, 3, 4, 2, 2, generator=g)
    anchor = torch.randn(2, 3, 1, 2, 2, generator=g)
    calls = []
    out = distilled_chunk_sample(fake_velocity(calls), noise, anchor)
    sig = list(DISTILLED_SIGMAS) + [0.0]
    x = noise.clone()
    x[:, :, :1] = anchor
    for i, (s, s_next) in enumerate(zip(sig[:-1], sig[1:], strict=True)):
        t = torch.tensor([0.0] + [s * 1000] * 3)
        assert torch.allclose(calls[i], t.reshape(1, 1, 4).expand(2, 1, 4))
        v = 0.3 * x + t.reshape(1, 1, 4, 1, 1) / 1000
        x = torch.cat([x[:, :, :1], x[:, :, 1:] - (s - s_next) * v[:, :, 1:]], dim=2)
    assert len(calls) == 4
    torch.testing.assert_close(out, x, rtol=1e-6, atol=1e-6)
    assert torch.equal(out[:, :, :1], anchor)
    # later chunks: no anchor, every frame at sigma
    calls.clear()
    distilled_chunk_sample(fake_velocity(calls), noise[:, :, :3])
    assert torch.equal(calls[1], torch.full((2, 1, 3), 960.0))


def test_flow_euler_sample_steps_by_hand():
    g = torch.Generator().manual_seed(1)
    lat = torch.randn(1, 3, 3, 2, 2, generator=g)
    cond = torch.tensor([1.0, 0.0, 0.0])
    sig = flow_match_sigmas(3, 9.8)
    calls = []
    out = flow_euler_sample(fake_velocity(calls), lat, cond, sig)
    x = lat.clone()
    for i in range(3):
        t = sig[i] * 1000
        tau = torch.stack([torch.zeros(()), t, t])
        torch.testing.assert_close(calls[i], tau.reshape(1, 1, 3))
        v = 0.3 * x + tau.reshape(1, 1, 3, 1, 1) / 1000
        x = torch.cat([x[:, :, :1], x[:, :, 1:] - (tau[1] / 1000 - sig[i + 1]) * v[:, :, 1:]], dim=2)
    torch.testing.assert_close(out, x, rtol=1e-6, atol=1e-6)
    assert torch.equal(out[:, :, 0], lat[:, :, 0])


@torch.no_grad()
def test_offline_one_step_with_cfg_equals_hand_update():
    model = small_model()
    g = torch.Generator().manual_seed(2)
    B, C, T, h, w = 1, model.config.in_channels, 3, 2, 3
    lat = torch.randn(B, C, T, h, w, generator=g)
    cam = random_camera(B, T, g)
    pl = torch.randn(B, 48, T, h, w, generator=g)
    y, y_neg = torch.randn(B, 3, 16, generator=g), torch.randn(B, 3, 16, generator=g)
    m, m_neg = torch.tensor([[1, 1, 0]]), torch.tensor([[1, 0, 0]])
    cond = torch.tensor([1.0, 0.0, 0.0])
    out = sample_offline(model, lat, cond, y, m, y_neg, m_neg, cam, pl, steps=1, guidance=5.0)
    t = torch.tensor([[[0.0, 1000.0, 1000.0]]])
    v_c = model(lat, t, y, m, cam, pl)
    v_u = model(lat, t, y_neg, m_neg, cam, pl)
    v = v_u + 5.0 * (v_c - v_u)
    expected = torch.cat([lat[:, :, :1], lat[:, :, 1:] - v[:, :, 1:]], dim=2)  # sigma 1 -> 0
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    again = sample_offline(model, lat, cond, y, m, y_neg, m_neg, cam, pl, steps=1, guidance=5.0)
    assert torch.equal(out, again)
    assert bidirectional_mode(48, "R").main_softmax_scale == 48**-0.5
