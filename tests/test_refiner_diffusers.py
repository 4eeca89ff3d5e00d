"""Our refiner transformer and text connectors against diffusers' own classes at tiny random configs (fp32).

diffusers' `LTX2VideoTransformer3DModel` always runs its audio stream too; with `isolate_modalities=True` the
audio<->video cross-attention is off and its video output is the video-only path (checked below: the audio input
then does not move the video output). Every weight is re-initialised (no zero-inits left) so every branch counts.
"""

import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import LTX2VideoTransformer3DModel  # noqa: E402
from diffusers.models.transformers.transformer_sana_wm_refiner import (  # noqa: E402
    SanaWMLTX2RefinerTransformer3DModel,
)
from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors  # noqa: E402

from engine.errors import InputError  # noqa: E402
from engine.refiner.config import ConnectorsConfig, RefinerConfig  # noqa: E402
from engine.refiner.connectors import TextConnectors, load_connector_weights  # noqa: E402
from engine.refiner.model import RefinerTransformer, is_audio_key, load_refiner_weights  # noqa: E402

REL_TOL = 1e-4


def reinit_(module: torch.nn.Module, seed: int) -> None:
    """Seeded random weights everywhere: no zero/one inits survive, so every branch moves the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if "scale_shift_table" in name:
                p.copy_(0.2 * r)
            elif p.ndim >= 2:
                p.copy_(r / math.sqrt(p[0].numel()))
            elif "norm" in name:
                p.copy_(1 + 0.2 * r)
            else:
                p.copy_(0.1 * r)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def tokens(latents: torch.Tensor) -> torch.Tensor:  # [B, C, T, H, W] -> [B, T·H·W, C]
    return latents.permute(0, 2, 3, 4, 1).flatten(1, 3)


def tiny_transformer_config(rope_type: str, gated: bool, heads: int, head_dim: int, affine: bool = False) -> dict:
    return dict(
        norm_elementwise_affine=affine,
        in_channels=8,
        out_channels=8,
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        cross_attention_dim=heads * head_dim,
        num_layers=2,
        caption_channels=24,
        audio_in_channels=4,
        audio_out_channels=4,
        audio_num_attention_heads=2,
        audio_attention_head_dim=8,
        audio_cross_attention_dim=16,
        rope_type=rope_type,
        gated_attn=gated,
    )


CONFIGS = [
    pytest.param("interleaved", False, 2, 32, False, id="interleaved-64"),
    pytest.param("split", False, 2, 32, False, id="split-64"),
    pytest.param("split", True, 2, 24, False, id="split-48-gated"),
    pytest.param("interleaved", False, 3, 16, True, id="interleaved-48-affine-norms"),
]


def build_pair(cfg_dict: dict, seed: int = 0):
    ref = LTX2VideoTransformer3DModel(**cfg_dict).eval()
    reinit_(ref, seed)
    ours = RefinerTransformer(RefinerConfig.from_dict(cfg_dict)).eval()
    skipped = load_refiner_weights(ours, ref.state_dict())
    return ref, ours, skipped


def inputs(cfg: dict, b=2, t=3, h=3, w=4, text_len=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(b, cfg["in_channels"], t, h, w, generator=g)
    text = torch.randn(b, text_len, cfg["caption_channels"], generator=g)
    mask = torch.ones(b, text_len, dtype=torch.int64)
    mask[0, :3] = 0  # left padding, as the Gemma-3 path produces
    sigma = torch.rand(b, t * h * w, generator=g)  # per token, so per-token modulation is exercised
    return latents, text, mask, sigma


def diffusers_video(ref, cfg, latents, text, mask, timestep, fps, audio_seed=2):
    b, _, t, h, w = latents.shape
    g = torch.Generator().manual_seed(audio_seed)
    n_audio = 5
    out = ref(
        hidden_states=tokens(latents),
        audio_hidden_states=torch.randn(b, n_audio, cfg["audio_in_channels"], generator=g),
        encoder_hidden_states=text,
        audio_encoder_hidden_states=torch.randn(b, text.shape[1], cfg["caption_channels"], generator=g),
        timestep=timestep,
        audio_timestep=torch.full((b,), 500.0),  # per batch: diffusers' audio stream takes no per-token timestep
        encoder_attention_mask=mask,
        audio_encoder_attention_mask=mask,
        num_frames=t,
        height=h,
        width=w,
        fps=fps,
        audio_num_frames=n_audio,
        isolate_modalities=True,
        return_dict=False,
    )
    return out[0]


@pytest.mark.parametrize("rope_type,gated,heads,head_dim,affine", CONFIGS)
@torch.no_grad()
def test_forward_matches_diffusers_video_path(rope_type, gated, heads, head_dim, affine):
    cfg = tiny_transformer_config(rope_type, gated, heads, head_dim, affine)
    ref, ours, _ = build_pair(cfg)
    latents, text, mask, sigma = inputs(cfg)
    fps = 16.0
    expected = diffusers_video(ref, cfg, latents, text, mask, sigma * 1000.0, fps)
    # The comparison is video-only: other audio inputs leave diffusers' video output unchanged.
    assert torch.equal(expected, diffusers_video(ref, cfg, latents, text, mask, sigma * 1000.0, fps, audio_seed=3))
    got = ours(latents, sigma, ours.prepare_text(text, mask), fps=fps)
    assert got.shape == latents.shape
    err = rel_err(tokens(got), expected)
    assert err <= REL_TOL, err


@torch.no_grad()
def test_per_batch_sigma_equals_per_token_sigma():
    cfg = tiny_transformer_config("split", False, 2, 32)
    ref, ours, _ = build_pair(cfg)
    latents, text, mask, _ = inputs(cfg)
    n = latents[0, 0].numel()
    sig = torch.tensor([0.725, 0.421875])
    expected = diffusers_video(ref, cfg, latents, text, mask, (sig[:, None] * 1000).expand(-1, n), 16.0)
    tx = ours.prepare_text(text, mask)
    assert rel_err(tokens(ours(latents, sig, tx, fps=16.0)), expected) <= REL_TOL
    per_token = ours(latents, sig[:, None].expand(-1, n), tx, fps=16.0)
    assert rel_err(ours(latents, sig, tx, fps=16.0), per_token) <= 1e-6


@pytest.mark.parametrize("rope_type", ["interleaved", "split"])
@torch.no_grad()
def test_absolute_frame_positions_match_sana_wm_refiner(rope_type):
    """Frames at absolute positions (the AR blocks) against the reference refiner transformer's RoPE builder."""
    cfg = tiny_transformer_config(rope_type, False, 2, 32)
    ref = SanaWMLTX2RefinerTransformer3DModel(**cfg).eval()
    reinit_(ref, 5)
    ours = RefinerTransformer(RefinerConfig.from_dict(cfg)).eval()
    load_refiner_weights(ours, ref.state_dict())
    latents, text, mask, _ = inputs(cfg)
    b, _, t, h, w = latents.shape
    positions = [7, 8, 9]
    rope = ref.build_rotary_emb_for_absolute_positions(
        batch_size=b, frame_positions=positions, height=h, width=w, device=latents.device, fps=16.0
    )
    expected = ref(
        hidden_states=tokens(latents),
        encoder_hidden_states=text,
        timestep=torch.full((b, t * h * w), 421.875),
        video_rotary_emb=rope,
        encoder_attention_mask=mask,
        return_dict=False,
    )[0]
    got = ours(latents, 0.421875, ours.prepare_text(text, mask), fps=16.0, frame_positions=torch.tensor(positions))
    assert rel_err(tokens(got), expected) <= REL_TOL
    at_zero = ours(latents, 0.421875, ours.prepare_text(text, mask), fps=16.0)
    assert rel_err(tokens(at_zero), expected) > 1e-3  # the positions matter


def test_loading_skips_exactly_the_audio_keys():
    cfg = tiny_transformer_config("split", True, 2, 32)
    ref, ours, skipped = build_pair(cfg)
    ref_keys = set(ref.state_dict())
    our_keys = set(ours.state_dict())
    assert our_keys <= ref_keys  # no video key is missing (load_checked would have raised anyway)
    assert set(skipped) == ref_keys - our_keys
    audio_like = {k for k in ref_keys if "audio" in k or "a2v" in k or k.startswith("av_cross_attn")}
    assert set(skipped) == audio_like
    assert all(is_audio_key(k) for k in skipped) and not any(is_audio_key(k) for k in our_keys)
    # A video weight removed from the checkpoint is reported by name.
    state = ref.state_dict()
    del state["transformer_blocks.1.attn1.norm_k.weight"]
    with pytest.raises(InputError, match="transformer_blocks.1.attn1.norm_k.weight"):
        load_refiner_weights(RefinerTransformer(RefinerConfig.from_dict(cfg)), state)


def test_unsupported_config_is_an_input_error():
    with pytest.raises(InputError, match="cross_attn_mod"):
        RefinerConfig(cross_attn_mod=True)
    with pytest.raises(InputError, match="not_a_field"):
        RefinerConfig.from_dict({"not_a_field": 1})


def tiny_connector_config(rope_type: str, registers: int | None) -> dict:
    return dict(
        caption_channels=48,
        text_proj_in_factor=3,
        video_connector_num_attention_heads=2,
        video_connector_attention_head_dim=24,
        video_connector_num_layers=2,
        video_connector_num_learnable_registers=registers,
        audio_connector_num_attention_heads=1,  # diffusers feeds it the same 48-wide projection
        audio_connector_attention_head_dim=48,
        audio_connector_num_layers=1,
        audio_connector_num_learnable_registers=registers,
        rope_type=rope_type,
    )


@pytest.mark.parametrize(
    "rope_type,registers",
    [("interleaved", 4), ("split", 4), ("split", None)],
    ids=["interleaved", "split", "no-registers"],
)
@torch.no_grad()
def test_connectors_match_diffusers(rope_type, registers):
    cfg = tiny_connector_config(rope_type, registers)
    ref = LTX2TextConnectors(**cfg).eval()
    reinit_(ref, 3)
    ours = TextConnectors(ConnectorsConfig.from_dict(cfg)).eval()
    skipped = load_connector_weights(ours, ref.state_dict())
    assert skipped and all(k.startswith("audio_connector.") for k in skipped)
    assert set(skipped) == set(ref.state_dict()) - set(ours.state_dict())

    g = torch.Generator().manual_seed(4)
    b, n = 2, 8
    hidden = 3 * torch.randn(b, n, cfg["caption_channels"], cfg["text_proj_in_factor"], generator=g) + 0.5
    mask = torch.zeros(b, n, dtype=torch.int64)
    mask[0, -5:] = 1  # left padding, different lengths
    mask[1, -8:] = 1
    expected, _, expected_mask = ref(hidden, mask)
    got, got_mask = ours(hidden, mask)
    assert rel_err(got, expected) <= REL_TOL
    assert torch.equal(got_mask, expected_mask.to(got_mask.dtype))
    flat, _ = ours(hidden.flatten(2), mask)  # the flattened [B, L, C·layers] input is the same thing
    assert torch.equal(flat, got)
