"""Chunk-causal streaming of stage-1 (spec stage1.md §7): chunk-by-chunk with caches == one whole-sequence
chunk-causal forward; snapshot/restore; single chunk == bidirectional; constant cache memory."""

import pytest
import torch

from engine.errors import InputError
from engine.stage1.cache import Stage1Cache
from engine.stage1.config import Stage1Config
from engine.stage1.model import Stage1Transformer
from engine.stage1.stream import Stage1Stream, chunk_frame_counts
from engine.stage1.temporal import bidirectional_mode, streaming_mode
from tests.test_stage1_parity import random_camera, random_weights_

TOL = 1e-5


def small_model(seed=0, **overrides):
    kw = dict(in_channels=4, num_layers=4, hidden_size=96, num_attention_heads=2, linear_head_dim=48,
              softmax_every_n=2, caption_channels=16, model_max_length=4, chunk_plucker_post_attn_blocks=3)
    kw.update(overrides)
    model = Stage1Transformer(Stage1Config(**kw)).eval()
    state = model.state_dict()
    random_weights_(state, seed)
    model.load_state_dict(state)
    return model


def clip(model, T, h=2, w=3, B=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    x = torch.randn(B, cfg.in_channels, T, h, w, generator=g)
    t = torch.randint(0, 1000, (B, 1, T), generator=g).float()
    cam = random_camera(B, T, g)
    pl = torch.randn(B, cfg.chunk_plucker_channels, T, h, w, generator=g)
    y = torch.randn(B, 3, cfg.caption_channels, generator=g)
    mask = torch.tensor([[1, 1, 0]] * B)
    return x, t, cam, pl, y, mask


def stream_chunks(model, cache, text, x, t, cam, pl, counts, start=0, noise_passes=True):
    """Run chunks `start..` through the cache (each: a read-only pass on other inputs, then the write
    pass on the chunk's inputs); returns the write-pass outputs."""
    bounds = [sum(counts[:i]) for i in range(len(counts) + 1)]
    outs = []
    for c in range(start, len(counts)):
        s, e = bounds[c], bounds[c + 1]
        sl = slice(s, e)
        if noise_passes:  # a denoising step must not change what the cache holds
            model.forward_cached(torch.randn_like(x[:, :, sl]), t[:, :, sl] * 0 + 500, text, cam[:, sl],
                                 pl[:, :, sl], cache)
        outs.append(model.forward_cached(x[:, :, sl], t[:, :, sl], text, cam[:, sl], pl[:, :, sl], cache,
                                         write_cache=True))
    return torch.cat(outs, dim=2)


@torch.no_grad()
def test_streaming_equals_whole_sequence_chunk_causal():
    model = small_model()
    counts = [4, 3, 3, 3, 3, 2]  # 6 chunks: the softmax window slides past the sink; short last chunk
    T = sum(counts)
    x, t, cam, pl, y, mask = clip(model, T)
    text = model.encode_text(y, mask)
    whole = model.forward_chunk_causal(x, t, text, cam, pl, counts)

    cache = Stage1Cache(model.config, 1, 2, 3)
    streamed = stream_chunks(model, cache, text, x, t, cam, pl, counts)
    assert (streamed - whole).abs().max() <= TOL
    assert cache.frames_written == T

    # the chunk-causal model differs from the bidirectional one, and the windowed softmax from a full one
    bidir = model.run(x, t, text, cam, pl, mode=streaming_mode(model.config.linear_head_dim))
    assert (bidir[:, :, :4] - whole[:, :, :4]).abs().max() > 100 * TOL
    # a softmax block of the last chunk sees chunk 0 (sink) and chunk 4 only, the GDN state everything
    x2 = x.clone()
    x2[:, :, 10:13] += 1.0
    whole2 = model.forward_chunk_causal(x2, t, text, cam, pl, counts)
    assert (whole2[:, :, 16:] - whole[:, :, 16:]).abs().max() > 100 * TOL  # GDN state carries chunk 3 ...
    model_softmax_only = small_model(softmax_every_n=1, num_layers=1)
    w1 = model_softmax_only.forward_chunk_causal(x, t, model_softmax_only.encode_text(y, mask), cam, pl, counts)
    w2 = model_softmax_only.forward_chunk_causal(x2, t, model_softmax_only.encode_text(y, mask), cam, pl, counts)
    # ... but a softmax-only model forgets it (frame 16 still sees frame 15 through the FFN temporal conv)
    assert (w2[:, :, 17:] - w1[:, :, 17:]).abs().max() <= TOL
    assert (w2[:, :, 13:16] - w1[:, :, 13:16]).abs().max() > 100 * TOL


@torch.no_grad()
def test_snapshot_restore_into_fresh_model():
    model = small_model()
    counts = [4, 3, 3, 3, 3, 3]
    x, t, cam, pl, y, mask = clip(model, sum(counts), seed=1)
    text = model.encode_text(y, mask)
    whole = model.forward_chunk_causal(x, t, text, cam, pl, counts)

    cache = Stage1Cache(model.config, 1, 2, 3)
    first = stream_chunks(model, cache, text, x[:, :, :10], t[:, :, :10], cam[:, :10], pl[:, :, :10], counts[:3])
    snap = cache.snapshot()
    # poison the live cache: the restored one must not share storage with it
    for b in cache.blocks:
        for buf in b.buffers().values():
            buf.fill_(float("nan"))

    fresh = small_model()  # same seed -> same weights, a different object
    fresh_cache = Stage1Cache(fresh.config, 1, 2, 3)
    fresh_cache.restore(snap)
    rest = stream_chunks(fresh, fresh_cache, fresh.encode_text(y, mask), x, t, cam, pl, counts, start=3)
    streamed = torch.cat([first, rest], dim=2)
    assert (streamed - whole).abs().max() <= TOL


@torch.no_grad()
def test_single_chunk_equals_bidirectional():
    """§7.4: one chunk with empty caches == the bidirectional forward with the streaming softmax scale and
    camera variant; with the offline choices (main scale 1/sqrt(D), variant R) it differs."""
    model = small_model()
    x, t, cam, pl, y, mask = clip(model, 4, seed=2)
    text = model.encode_text(y, mask)
    cache = Stage1Cache(model.config, 1, 2, 3)
    chunk = model.forward_cached(x, t, text, cam, pl, cache)
    same = model(x, t, y, mask, cam, pl, mode=streaming_mode(model.config.linear_head_dim))
    assert (chunk - same).abs().max() <= TOL
    offline = model(x, t, y, mask, cam, pl)
    assert (chunk - offline).abs().max() > 100 * TOL
    renorm_only = bidirectional_mode(model.config.linear_head_dim, "T")
    assert (chunk - model(x, t, y, mask, cam, pl, mode=renorm_only)).abs().max() > 100 * TOL


@torch.no_grad()
def test_cache_memory_constant():
    model = small_model(num_layers=2, hidden_size=16, linear_head_dim=16, num_attention_heads=1,
                        caption_channels=8, chunk_plucker_post_attn_blocks=2)
    stream = Stage1Stream(model, height=1, width=2)
    B, C = 1, model.config.in_channels
    g = torch.Generator().manual_seed(0)
    stream.reset(torch.randn(B, 2, 8, generator=g))
    ptrs = {k: v.data_ptr() for b in stream.cache.blocks for k, v in b.buffers().items()}
    sizes = {}
    for c in range(50):
        T = stream.next_chunk_frames()
        cam = random_camera(B, T, g)
        pl = torch.randn(B, 48, T, 1, 2, generator=g)
        anchor = torch.randn(B, C, 1, 1, 2, generator=g) if c == 0 else None
        clean = stream.denoise_chunk(torch.randn(B, C, T, 1, 2, generator=g), cam, pl, anchor)
        stream.write_cache(clean, cam, pl)
        sizes[c + 1] = (stream.cache.nbytes(), sum(v.numel() for v in stream.snapshot().values()))
    assert sizes[50] == sizes[5]
    assert {k: v.data_ptr() for b in stream.cache.blocks for k, v in b.buffers().items()} == ptrs
    assert stream.next_frame == 4 + 3 * 49


@torch.no_grad()
def test_stream_api_matches_manual_chunks_and_resumes():
    """Stage1Stream: denoise_chunk + write_cache, snapshot -> restore -> the same next chunk."""
    model = small_model()
    B, C, h, w = 1, model.config.in_channels, 2, 3
    counts = chunk_frame_counts(13)
    assert counts == [4, 3, 3, 3]
    g = torch.Generator().manual_seed(3)
    y = torch.randn(B, 3, model.config.caption_channels, generator=g)
    cam = random_camera(B, 13, g)
    pl = torch.randn(B, 48, 13, h, w, generator=g)
    noise = torch.randn(B, C, 13, h, w, generator=g)
    anchor = torch.randn(B, C, 1, h, w, generator=g)

    stream = Stage1Stream(model, height=h, width=w)
    stream.reset(y)
    latents, snap = [], None
    for c, T in enumerate(counts):
        s = stream.next_frame
        sl = slice(s, s + T)
        if c == 2:
            snap = stream.snapshot()
        clean = stream.denoise_chunk(noise[:, :, sl], cam[:, sl], pl[:, :, sl], anchor if c == 0 else None)
        stream.write_cache(clean, cam[:, sl], pl[:, :, sl])
        latents.append(clean)
    assert torch.equal(latents[0][:, :, :1], anchor)
    assert all(torch.isfinite(x).all() for x in latents)

    resumed = Stage1Stream(small_model(), height=h, width=w)
    resumed.reset(y)
    resumed.restore(snap)
    assert resumed.next_frame == 7
    again = resumed.denoise_chunk(noise[:, :, 7:10], cam[:, 7:10], pl[:, :, 7:10])
    assert (again - latents[2]).abs().max() <= TOL

    with pytest.raises(Exception, match="anchor"):
        resumed.denoise_chunk(noise[:, :, 7:10], cam[:, 7:10], pl[:, :, 7:10], anchor)


def test_chunk_schedule_and_bad_snapshot():
    assert len(chunk_frame_counts(121)) == 40 and chunk_frame_counts(121)[:3] == [4, 3, 3]
    model = small_model(num_layers=2)
    cache = Stage1Cache(model.config, 1, 2, 3)
    snap = cache.snapshot()
    snap["blocks.0.sigma"] = snap["blocks.0.sigma"][:, :1]
    with pytest.raises(InputError, match=r"blocks\.0\.sigma"):
        cache.restore(snap)
    del snap["blocks.1.sink_k"]
    with pytest.raises(InputError, match=r"blocks\.1\.sink_k"):
        cache.restore(snap)


def test_softmax_window_keys_values_view_or_concatenation():
    """`SoftmaxBlockCache.keys_values`: the chunk's keys, then sink, then recent; a view of the window buffers when
    they are contiguous there (nothing copied but the chunk), a concatenation when the sink is short; the cached
    window (`buffers`) unchanged either way."""
    from engine.stage1.cache import SoftmaxBlockCache

    g = torch.Generator().manual_seed(9)
    S, D = 2, 4
    rnd = lambda frames: [torch.randn(1, 2, frames * S, D, generator=g) for _ in range(4)]
    for first in (4, 2):  # a full sink (the stream's first chunk has 4 frames) and a short one
        cache = SoftmaxBlockCache(1, 2, D, S, 8, 4, 4, torch.float32, "cpu")
        sink, recent, chunk = rnd(first), rnd(3), rnd(3)
        got = cache.keys_values(*sink)  # nothing cached yet: the chunk alone
        assert all(torch.equal(a, b) for a, b in zip(got, sink, strict=True))
        cache.append(*sink)
        cache.append(*recent)
        before = {k: v.clone() for k, v in cache.buffers().items()}
        got = cache.keys_values(*chunk)
        for name, kv, s, r, c in zip(cache.NAMES, got, sink, recent, chunk, strict=True):
            assert torch.equal(kv, torch.cat([c, s, r], dim=2))
            shares = kv.untyped_storage().data_ptr() == cache.slots[name].untyped_storage().data_ptr()
            assert shares == (first == 4)
        assert all(torch.equal(v, before[k]) for k, v in cache.buffers().items())
