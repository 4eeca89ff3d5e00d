"""LTX-2 VAE: parity with diffusers' AutoencoderKLLTX2Video at tiny random configs, and streaming causal decode.

diffusers is the reference (test-only). Every tensor of the reference, including the latent mean/std buffers,
is re-drawn at random so that no branch hides behind a zero or identity init.
"""

import functools

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLLTX2Video
from diffusers.pipelines.ltx2.pipeline_ltx2 import LTX2Pipeline
from diffusers.video_processor import VideoProcessor

from engine.errors import InputError
from engine.vae import (
    StreamingDecoder,
    VAEConfig,
    VideoVAE,
    frames_to_pixels,
    load_vae,
    pixels_to_frames,
)
from engine.weights import load_checked

TINY = dict(
    latent_channels=8,
    block_out_channels=(16, 32, 64, 64),
    decoder_block_out_channels=(8, 16, 32),
    layers_per_block=(1, 1, 1, 1, 1),
    decoder_layers_per_block=(1, 1, 1, 2),
    scaling_factor=0.7,
)
# other strides per stage, an encoder stage without downsampler, an upsampler without residual: ×16 space, ×4 time
MIXED = dict(
    TINY,
    downsample_type=("temporal", "spatial", "spatiotemporal", "spatial"),
    spatio_temporal_scaling=(True, True, True, False),
    upsample_type=("spatial", "temporal", "spatiotemporal"),
    upsample_residual=(False, True, True),
    decoder_layers_per_block=(2, 1, 1, 1),
)
# not in the LTX-2 release, built when a config asks: decode-timestep modulation and spatial noise injection
CONDITIONED = dict(TINY, timestep_conditioning=True, decoder_inject_noise=(True, False, True, True))
CONFIGS = {"tiny": TINY, "mixed": MIXED, "conditioned": CONDITIONED}
DECODE_TIMESTEP = torch.tensor([0.05])

PARITY_RTOL = 1e-4
STREAM_RTOL = 1e-5


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def randomize(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if name.endswith("timestep_scale_multiplier"):
                t.fill_(1000.0 * (1 + 0.2 * torch.randn((), generator=g).item()))
            elif name == "latents_std":
                t.copy_(torch.exp(0.3 * torch.randn(t.shape, generator=g)))
            elif name == "latents_mean":
                t.copy_(0.5 * torch.randn(t.shape, generator=g))
            elif t.ndim >= 2:
                t.copy_(torch.randn(t.shape, generator=g) / t[0].numel() ** 0.5)
            else:
                t.copy_(0.1 * torch.randn(t.shape, generator=g))


@functools.cache
def pair(name: str, *, encoder_causal: bool = True, decoder_causal: bool = True):
    """(diffusers reference, ours) with the same random weights; shared, so tests must not modify them."""
    return make_pair(CONFIGS[name], encoder_causal=encoder_causal, decoder_causal=decoder_causal)


def make_pair(kwargs: dict, *, encoder_causal: bool, decoder_causal: bool, seed: int = 0):
    ref = AutoencoderKLLTX2Video(**kwargs, encoder_causal=encoder_causal, decoder_causal=decoder_causal).eval()
    randomize(ref, seed)
    ours = VideoVAE(VAEConfig.from_dict(dict(ref.config))).eval()
    assert load_checked(ours, ref.state_dict()) == []
    return ref, ours


@pytest.fixture(scope="module")
def causal_pair():
    return pair("tiny")


def latents(cfg: VAEConfig, t: int, h: int = 2, w: int = 3, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, cfg.latent_channels, t, h, w, generator=g)


@pytest.mark.parametrize("name", ["tiny", "mixed"])
@pytest.mark.parametrize("causal", [True, False])
@torch.no_grad()
def test_encoder_matches_diffusers(name, causal):
    ref, ours = pair(name, encoder_causal=causal)
    cfg, c = ours.config, ours.config.latent_channels
    g = torch.Generator().manual_seed(2)
    s = cfg.spatial_scale
    for frames in (1, cfg.pixel_frames(3)):  # the first image alone, and a short video
        pixels = torch.rand(1, 3, frames, 2 * s, 3 * s, generator=g) * 2 - 1
        moments_ref = ref.encoder(pixels, causal=causal)  # [B, 2C]: C means, then the log-variance repeated
        moments = ours.encoder(pixels, causal)
        assert moments.shape == (1, c + 1, cfg.latent_frames(frames), 2, 3)
        assert rel_err(moments, moments_ref[:, : c + 1]) <= PARITY_RTOL
        assert torch.equal(moments_ref[:, c:], moments_ref[:, c : c + 1].expand_as(moments_ref[:, c:]))
        z_ref = LTX2Pipeline._normalize_latents(
            ref.encode(pixels, causal=causal).latent_dist.mode(),
            ref.latents_mean,
            ref.latents_std,
            ref.config.scaling_factor,
        )
        assert rel_err(ours.encode(pixels, causal=causal), z_ref) <= PARITY_RTOL


def decode_kwargs(ours: VideoVAE, seed: int = 5) -> dict:
    if not ours.config.timestep_conditioning:
        return {}
    return dict(timestep=DECODE_TIMESTEP, generator=torch.Generator().manual_seed(seed))


def reference_decode(ref, z: torch.Tensor, seed: int = 5) -> torch.Tensor:
    """diffusers draws its noise from torch's global generator and takes the raw decode timestep as `temb`."""
    if not ref.config.timestep_conditioning:
        return ref.decode(z).sample
    torch.manual_seed(seed)
    return ref.decode(z, temb=DECODE_TIMESTEP).sample


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("causal", [True, False])
@torch.no_grad()
def test_decoder_matches_diffusers(name, causal):
    ref, ours = pair(name, decoder_causal=causal)
    cfg = ours.config
    z_model = latents(cfg, t=4)
    z = LTX2Pipeline._denormalize_latents(z_model, ref.latents_mean, ref.latents_std, ref.config.scaling_factor)
    expected = reference_decode(ref, z)
    pixels = ours.decode(z_model, **decode_kwargs(ours))
    assert pixels.shape == (1, 3, cfg.pixel_frames(4), 2 * cfg.spatial_scale, 3 * cfg.spatial_scale)
    assert rel_err(pixels, expected) <= PARITY_RTOL
    # the other padding really is different, so the comparison above can tell them apart
    assert rel_err(ours.decode(z_model, causal=not causal, **decode_kwargs(ours)), expected) > 1e-3
    if cfg.timestep_conditioning:  # and so are other noise maps and another decode timestep
        assert rel_err(ours.decode(z_model, **decode_kwargs(ours, seed=6)), expected) > 1e-3
        other_t = dict(decode_kwargs(ours), timestep=0.5)
        assert rel_err(ours.decode(z_model, **other_t), expected) > 1e-3


def stream(decoder: StreamingDecoder, z_model: torch.Tensor, sizes) -> list[torch.Tensor]:
    out, start = [], 0
    for n in sizes:
        out.append(decoder.decode_block(z_model[:, :, start : start + n]))
        start += n
    assert start == z_model.shape[2]
    return out


def streaming_decoder(ours: VideoVAE, noise_seed: int = 0, width: int = 3) -> StreamingDecoder:
    timestep = DECODE_TIMESTEP if ours.config.timestep_conditioning else None
    return StreamingDecoder(
        ours, batch=1, latent_height=2, latent_width=width, timestep=timestep, noise_seed=noise_seed
    )


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("sizes", [(4, 3, 3, 3), (1, 3, 3, 3, 3), (2, 5, 1, 4, 1), (1,) * 13, (13,)])
@torch.no_grad()
def test_streaming_equals_whole_causal_decode(name, sizes):
    ref, ours = pair(name)
    cfg = ours.config
    z_model = latents(cfg, t=sum(sizes))
    decoder = streaming_decoder(ours)
    kwargs = dict(timestep=decoder.timestep, noise=decoder.noise) if cfg.timestep_conditioning else {}
    whole = ours.decode(z_model, **kwargs)
    if not cfg.timestep_conditioning:
        assert rel_err(whole, ref.decode(ours.denormalize(z_model)).sample) <= PARITY_RTOL
    blocks = stream(decoder, z_model, sizes)
    assert [b.shape[2] for b in blocks] == [cfg.pixel_frames(sizes[0])] + [cfg.temporal_scale * n for n in sizes[1:]]
    assert rel_err(torch.cat(blocks, dim=2), whole) <= STREAM_RTOL
    assert decoder.latent_frames == sum(sizes)


@pytest.mark.parametrize("name", ["tiny", "conditioned"])
@torch.no_grad()
def test_snapshot_restore_continues_identically(name):
    _, ours = pair(name)
    z_model = latents(ours.config, t=13)
    live = streaming_decoder(ours)
    stream(live, z_model[:, :, :7], (4, 3))
    state = live.snapshot()
    continued = stream(live, z_model[:, :, 7:], (3, 3))  # moves on after the snapshot; the snapshot must not
    fresh = streaming_decoder(ours, noise_seed=1)  # other noise maps, which restore must replace
    stream(fresh, z_model[:, :, :1], (1,))  # and some unrelated conv state
    fresh.restore(state)
    assert fresh.latent_frames == 7
    resumed = stream(fresh, z_model[:, :, 7:], (3, 3))
    for a, b in zip(continued, resumed, strict=True):
        assert torch.equal(a, b)


@torch.no_grad()
def test_cache_memory_is_constant_and_reset_starts_over(causal_pair):
    _, ours = causal_pair
    z_model = latents(ours.config, t=40)
    decoder = StreamingDecoder(ours, 1, 2, 3)
    first = decoder.decode_block(z_model[:, :, :4])
    nbytes = decoder.cache.nbytes
    ptrs = {k: b.data_ptr() for k, b in decoder.cache.buffers.items()}
    stream(decoder, z_model[:, :, 4:], (3, 1, 2) * 6)
    assert decoder.cache.nbytes == nbytes
    assert {k: b.data_ptr() for k, b in decoder.cache.buffers.items()} == ptrs
    # one buffer per causal conv: conv_in, conv_out, 2 per resnet, 1 per upsampler
    cfg = ours.config
    assert len(decoder.cache.buffers) == 2 + 2 * sum(cfg.decoder_layers_per_block) + len(cfg.upsample_type)
    decoder.reset()
    assert all(torch.isnan(b).all() for b in decoder.cache.buffers.values())
    assert torch.equal(decoder.decode_block(z_model[:, :, :4]), first)


def test_snapshot_of_other_shape_is_refused(causal_pair):
    _, ours = causal_pair
    state = streaming_decoder(ours, width=4).snapshot()
    decoder = streaming_decoder(ours)
    with pytest.raises(InputError, match="conv_in"):
        decoder.restore(state)
    del state["conv_out"]
    with pytest.raises(InputError, match="conv_out"):
        decoder.restore(state)


def test_decode_block_checks_input(causal_pair):
    _, ours = causal_pair
    decoder = StreamingDecoder(ours, 1, 2, 3)
    with pytest.raises(InputError, match=r"\(1, 8, 2, 2, 4\)"):
        decoder.decode_block(latents(ours.config, t=2, w=4))
    _, noncausal = pair("tiny", decoder_causal=False)
    with pytest.raises(InputError, match="decoder_causal"):
        StreamingDecoder(noncausal, 1, 2, 3)


def test_wrong_checkpoint_keys_are_named(causal_pair):
    ref, _ = causal_pair
    state = dict(ref.state_dict())
    key = "decoder.up_blocks.1.upsamplers.0.conv.conv.weight"
    state[key] = state[key][:, :-1]
    with pytest.raises(InputError, match=key.replace(".", r"\.")):
        load_checked(VideoVAE(VAEConfig(**TINY)), state)
    state = dict(ref.state_dict())
    del state["latents_std"]
    with pytest.raises(InputError, match="latents_std"):
        load_checked(VideoVAE(VAEConfig(**TINY)), state)


@torch.no_grad()
def test_load_vae_from_diffusers_directory(causal_pair, tmp_path):
    ref, ours = causal_pair
    ref.save_pretrained(tmp_path)
    loaded = load_vae(tmp_path)
    assert loaded.config == ours.config
    z_model = latents(ours.config, t=2)
    assert torch.equal(loaded.decode(z_model), ours.decode(z_model))
    decoder_only = load_vae(tmp_path, with_encoder=False)
    assert decoder_only.encoder is None
    assert torch.equal(decoder_only.decode(z_model), ours.decode(z_model))


def test_config_refuses_what_it_cannot_build():
    with pytest.raises(InputError, match="'conv'"):
        VAEConfig(**{**TINY, "downsample_type": ("conv", "temporal", "spatiotemporal", "spatiotemporal")})
    with pytest.raises(InputError, match="patch_size_t"):
        VAEConfig(**TINY, patch_size_t=2)
    with pytest.raises(InputError, match="up block 1"):  # would need an up-block conv_in
        VAEConfig(**{**TINY, "decoder_block_out_channels": (8, 16, 64)})
    with pytest.raises(InputError, match="not_a_field"):
        VAEConfig.from_dict({**TINY, "not_a_field": 1})
    cfg = VAEConfig()  # release defaults: ×32 space, ×8 time
    assert (cfg.spatial_scale, cfg.temporal_scale, cfg.pixel_frames(4), cfg.latent_frames(25)) == (32, 8, 25, 4)


def test_decode_timestep_is_checked():
    z_model = latents(VAEConfig(**TINY), t=1)
    with pytest.raises(InputError, match="not timestep-conditioned"):
        pair("tiny")[1].decode(z_model, timestep=0.05)
    with pytest.raises(InputError, match="pass a decode timestep"):
        pair("conditioned")[1].decode(z_model)
    with pytest.raises(InputError, match="pass a decode timestep"):
        StreamingDecoder(pair("conditioned")[1], 1, 2, 3)


def test_pixel_frame_conversions_match_diffusers_postprocess():
    g = torch.Generator().manual_seed(3)
    pixels = torch.randn(1, 3, 5, 8, 6, generator=g) * 0.8  # some values beyond [−1, 1] get clamped
    frames = pixels_to_frames(pixels)
    assert frames.dtype == torch.uint8 and frames.shape == (5, 8, 6, 3)
    pil = VideoProcessor(vae_scale_factor=32).postprocess_video(pixels, output_type="pil")[0]
    assert np.array_equal(frames.numpy(), np.stack([np.asarray(im) for im in pil]))
    every = torch.arange(256, dtype=torch.uint8).reshape(4, 8, 8, 1).expand(4, 8, 8, 3)
    assert torch.equal(pixels_to_frames(frames_to_pixels(every)), every)
    with pytest.raises(InputError):
        pixels_to_frames(torch.zeros(2, 3, 1, 4, 4))


def test_release_config_has_diffusers_keys_and_shapes():
    """At release size (on the meta device: no memory, no compute) the state dicts agree key by key."""
    with torch.device("meta"):
        ref = AutoencoderKLLTX2Video(decoder_causal=False)
        ours = VideoVAE(VAEConfig.from_dict(dict(ref.config)))
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert 520e6 < sum(p.numel() for p in ours.decoder.parameters()) < 540e6  # spec §5.4: ≈ 528 M
    shapes = ours.decoder.conv_cache_shapes(1, 22, 40)  # 704×1280 pixels
    assert shapes["conv_in"] == (1, 128, 2, 22, 40) and shapes["conv_out"] == (1, 128, 2, 176, 320)


def test_encode_checks_pixel_shape(causal_pair):
    _, ours = causal_pair
    with pytest.raises(InputError, match=r"2×64×64"):  # F must be 8k + 1
        ours.encode(torch.zeros(1, 3, 2, 64, 64))
    with pytest.raises(InputError, match=r"1×64×48"):  # H, W multiples of 32
        ours.encode(torch.zeros(1, 3, 1, 64, 48))
    assert VideoVAE(ours.config, with_encoder=False).encoder is None
    with pytest.raises(InputError, match="with_encoder"):
        VideoVAE(ours.config, with_encoder=False).encode(torch.zeros(1, 3, 1, 64, 64))
