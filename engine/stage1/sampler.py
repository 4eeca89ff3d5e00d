"""Stage-1 samplers (spec stage1.md §6, §7.1), written against a velocity function so they know nothing
of caches, prompts or cameras:

- `distilled_chunk_sample`: the 4-step distilled Euler of the streaming model on one chunk
  (sigmas 1.0, 0.96, 0.889, 0.727 -> 0; per-frame timesteps; the anchor frame pinned clean; no CFG);
- `flow_match_sigmas` + `flow_euler_sample`: the offline bidirectional flow-matching Euler (60 steps,
  diffusers' double-shifted schedule, per-token timesteps with the conditioning frame at 0, CFG on text
  via `cfg_velocity`).

Latents are `[B, C, T, H, W]`; the velocity is v = noise - x0, so x moves to sigma' by x + (sigma' - sigma) v.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

DISTILLED_SIGMAS = (1.0, 0.96, 0.889, 0.727)  # denoising list [1000, 960, 889, 727, 0] / 1000
TRAIN_TIMESTEPS = 1000

# velocity(x [B,C,T,H,W], timestep [B,1,T]) -> v [B,C,T,H,W]
VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def distilled_chunk_sample(
    velocity: VelocityFn,
    noise: torch.Tensor,
    anchor: torch.Tensor | None = None,
    sigmas: Sequence[float] = DISTILLED_SIGMAS,
) -> torch.Tensor:
    """Denoise one chunk from `noise [B, C, T, H, W]`. `anchor [B, C, 1, H, W]` (the clean first-image
    latent; chunk 0 only) replaces frame 0, which is fed at timestep 0 and never moves. Returns clean
    latents `[B, C, T, H, W]` in the dtype of `noise`."""
    B, _, T = noise.shape[:3]
    x = noise.float().clone()
    # on x's device from the start: no host -> device copy (each a stream synchronisation) inside the step loop
    frame_sigma_scale = torch.ones(T, device=x.device)
    if anchor is not None:
        x[:, :, :1] = anchor.float()
        frame_sigma_scale[0] = 0.0
    steps = list(sigmas) + [0.0]
    for sigma, sigma_next in zip(steps[:-1], steps[1:], strict=True):
        sigma_tok = sigma * frame_sigma_scale  # [T]
        timestep = (sigma_tok * TRAIN_TIMESTEPS).reshape(1, 1, T).expand(B, 1, T)
        v = velocity(x.to(noise.dtype), timestep).float()
        step = torch.where(sigma_tok > 0, sigma_tok - sigma_next, torch.zeros_like(sigma_tok))
        x = x - step.reshape(1, 1, T, 1, 1) * v
        if anchor is not None:
            x[:, :, :1] = anchor.float()
    return x.to(noise.dtype)


def flow_match_sigmas(steps: int, shift: float) -> torch.Tensor:
    """diffusers FlowMatchEulerDiscreteScheduler(shift).set_timesteps(steps) sigmas `[steps + 1]` (fp32,
    ending in 0). The init already shifts the training table, so the schedule spans linspace(1, sigma_min')
    and is then shifted again (spec §6)."""
    s_min = torch.tensor(1.0 / TRAIN_TIMESTEPS, dtype=torch.float32)
    s_min = (shift * s_min / (1 + (shift - 1) * s_min)).item()
    u = np.linspace(1.0 * TRAIN_TIMESTEPS, s_min * TRAIN_TIMESTEPS, steps) / TRAIN_TIMESTEPS
    sig = torch.from_numpy(shift * u / (1 + (shift - 1) * u)).to(torch.float32)
    return torch.cat([sig, torch.zeros(1)])


def cfg_velocity(velocity_cond: VelocityFn, velocity_uncond: VelocityFn, guidance: float) -> VelocityFn:
    """v = v_u + g (v_c - v_u) from two separate velocity functions."""

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v_u = velocity_uncond(x, t)
        return v_u + guidance * (velocity_cond(x, t) - v_u)

    return velocity


def flow_euler_sample(
    velocity: VelocityFn,
    latents: torch.Tensor,
    condition_mask: torch.Tensor,
    sigmas: torch.Tensor,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Offline Euler with per-token timesteps. latents `[B, C, T, H, W]` (noise, conditioning frames
    already clean), condition_mask `[T]` (1 = conditioning frame: timestep 0, never updated), sigmas from
    `flow_match_sigmas`. Returns the sampled latents (fp32 arithmetic, returned in the input dtype)."""
    B, _, T = latents.shape[:3]
    x = latents.float().clone()
    cond = condition_mask.float().to(x.device)
    sigmas = sigmas.to(x.device)
    timesteps = sigmas[:-1] * TRAIN_TIMESTEPS
    for i, t in enumerate(timesteps):
        tau = torch.minimum(t.expand(T), (1 - cond) * TRAIN_TIMESTEPS)  # [T]
        v = velocity(x.to(latents.dtype), tau.reshape(1, 1, T).expand(B, 1, T)).float()
        sigma_tok = tau / TRAIN_TIMESTEPS
        below = sigmas[None, :] < (sigma_tok[:, None] - 1e-6)  # [T, steps+1]
        sigma_next = torch.where(below, sigmas[None, :], torch.zeros(())).amax(dim=1)
        x_new = x - (sigma_tok - sigma_next).reshape(1, 1, T, 1, 1) * v
        keep_new = (t / TRAIN_TIMESTEPS - 1e-6) < (1 - cond)
        x = torch.where(keep_new.reshape(1, 1, T, 1, 1), x_new, x)
        if progress is not None:
            progress(i + 1, len(timesteps))
    return x.to(latents.dtype)


def sample_offline(
    model,
    latents: torch.Tensor,
    condition_mask: torch.Tensor,
    prompt_embeds: torch.Tensor,
    prompt_mask: torch.Tensor,
    negative_embeds: torch.Tensor,
    negative_mask: torch.Tensor,
    camera_conditions: torch.Tensor,
    chunk_plucker: torch.Tensor,
    *,
    steps: int = 60,
    shift: float = 9.8,
    guidance: float = 5.0,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Whole-clip bidirectional sampling with `model` (a `Stage1Transformer`): one model call per step on
    the batch [negative, conditional]; the camera tensors are duplicated (the camera is not guided).
    Embeddings `[B, L, Cc]` (or `[B, 1, L, Cc]`) with masks `[B, L]`; both prompts padded to the same L."""
    from engine.stage1.temporal import bidirectional_mode

    B = latents.shape[0]
    text = model.encode_text(torch.cat([negative_embeds, prompt_embeds]), torch.cat([negative_mask, prompt_mask]))
    mode = bidirectional_mode(model.config.linear_head_dim, model.config.camera_renorm)
    cam2, pl2 = torch.cat([camera_conditions] * 2), torch.cat([chunk_plucker] * 2)

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v = model.run(torch.cat([x, x]), torch.cat([t, t]), text, cam2, pl2, mode=mode)
        v_u, v_c = v[:B], v[B:]
        return v_u + guidance * (v_c - v_u)

    return flow_euler_sample(velocity, latents, condition_mask, flow_match_sigmas(steps, shift), progress)
