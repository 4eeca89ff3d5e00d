"""fp8 attention (kernels/fp8_attention.py, fast path `refiner-fp8-attn`): the quantiser's bounds, the reference's
maths against an independent fp64 computation, the error against exact attention, the K/V window's fp8 copy
(built from the bf16 window, refused when stale, constant memory, resume == uninterrupted), the quality report,
and (interpreter / GPU) the Triton kernels against the reference.

Bounds. e4m3 keeps 3 mantissa bits: one rounding moves a normal value by at most 2^-4 relative and a subnormal one
by at most 2^-10 (half the 2^-9 step) in units of the scale; the rounding error of a value in a random position
of its binade is ~uniform, rms 2^-4/sqrt(3) / 1.5 ≈ 2.4% relative. The attention output carries two such roundings
that add in quadrature (P and V: ~3.4%) plus the scores' (Q and K each, ~2.4%·sqrt(2)·|s| spread over the
softmax). Gaussian test inputs with unit-scale scores land at ~6.5% (measured: the fp32 emulation and the kernel
agree), so the bound against exact attention is 0.1, and an error below 1e-2 would mean nothing was quantised.
"""

import math

import pytest
import torch

from engine.errors import InputError
from engine.refiner.ar import ARRefiner
from engine.refiner.model import ExplicitKV
from kernels import interpreter_usable
from kernels.fp8_attention import (
    E4M3,
    E4M3_MAX,
    HEAD_DIMS,
    LOG2E,
    P_SCALE,
    SCALE_BLOCK,
    SWEEP,
    QuantizedKV,
    empty_quantized,
    fp8_attention,
    fp8_attention_reference,
    fp8_segment_attention,
    quantize_kv,
    quantize_kv_into,
    quantize_kv_reference,
    quantize_rows_e4m3,
    segment_view,
)

EXACT_REL_TOL = 0.1  # fp8 attention vs exact attention on Gaussian inputs (module docstring: ~6.5% expected)
QUANTISED_FLOOR = 1e-2  # below this nothing was quantised
BF16_OUT_TOL = 1e-2  # kernel vs reference: the bf16 output rounding (2^-9) plus rare e4m3 ties decided differently


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def gaussian(b, h, n, m, d, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=g) * 1.5
    k, v = torch.randn(b, h, m, d, generator=g), torch.randn(b, h, m, d, generator=g) * 3
    return (t.to(device, dtype) for t in (q, k, v))


def assert_same_segment(got: QuantizedKV, want: QuantizedKV) -> None:
    """Bit for bit (e4m3 compared as bytes, so NaN == NaN)."""
    for name, a, b in zip(QuantizedKV._fields, got, want, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)) if a.dtype == E4M3 else torch.equal(a, b), name


def exact_attention(q, ks, vs):
    k, v = torch.cat([x.double() for x in ks], 2), torch.cat([x.double() for x in vs], 2)
    return torch.nn.functional.scaled_dot_product_attention(q.double(), k, v)


# ------------------------------------------------------------------------------------------ quantisation


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_kv_round_trip_bound(dtype):
    """Two scale blocks (128 + 72 tokens), token magnitudes over six decades (the small ones go subnormal)."""
    g = torch.Generator().manual_seed(1)
    k = (torch.randn(2, 3, 200, 32, generator=g) * torch.logspace(-4, 2, 200)[:, None]).to(dtype)
    v = torch.randn(2, 3, 200, 32, generator=g).to(dtype)
    seg = quantize_kv_reference(k, v)
    assert seg.k.dtype == E4M3 and seg.v_t.dtype == E4M3
    assert seg.k.shape == (2, 3, 200, 32) and seg.v_t.shape == (2, 3, 32, 200)
    assert seg.k_scale.shape == seg.v_scale.shape == (2, 3, 2) and seg.k_scale.dtype == torch.float32
    for x, q, s in ((k, seg.k, seg.k_scale), (v, seg.v_t.transpose(-1, -2), seg.v_scale)):
        x = x.double()
        s = s.double().repeat_interleave(SCALE_BLOCK, dim=-1)[..., :200, None]  # each token's block scale
        err = (q.double() * s - x).abs()
        allowed = torch.maximum(2.0 ** -4 * x.abs(), 2.0 ** -10 * s) * (1 + 1e-6)
        assert (err <= allowed).all()
        for blk in (slice(0, 128), slice(128, 200)):  # each block's largest value maps to 448
            assert (q[..., blk, :].float().abs().amax(dim=(-2, -1)) == E4M3_MAX).all()
        assert err.max() > 0  # it did round


def test_quantize_kv_zero_and_nan_blocks():
    k = torch.zeros(1, 2, 5, 32)
    v = torch.randn(1, 2, 5, 32)
    v[0, 1, 2, 3] = float("nan")
    seg = quantize_kv_reference(k, v)
    assert (seg.k.float() == 0).all() and torch.isfinite(seg.k_scale).all()
    assert torch.isnan(seg.v_scale[0, 1]).all() and torch.isfinite(seg.v_scale[0, 0]).all()
    assert torch.isnan(seg.v_t[0, 1].float()).all()  # a NaN is not hidden: its block is NaN
    assert torch.isfinite(seg.v_t[0, 0].float()).all()  # the other head's is untouched


def test_quantize_kv_into_writes_views_and_checks_shapes():
    k, v = torch.randn(2, 1, 2, 9, 32), torch.randn(2, 1, 2, 9, 32)
    buf = empty_quantized((2, 1, 2), 16, 32, "cpu")  # larger than needed: written through views of it
    quantize_kv_into(k, v, segment_view(buf, 9))
    assert_same_segment(segment_view(buf, 9), quantize_kv_reference(k, v))
    with pytest.raises(ValueError, match="quantize_kv_into"):
        quantize_kv_into(k, v, buf)  # 16 tokens for 9


# ------------------------------------------------------------------------------------------ reference maths


def independent_fp64(q, segs, scale):
    """The module docstring's formula in fp64, with p quantised relative to the final row max and the final value
    scale max (the reference with one key tile computes exactly this up to fp32 rounding)."""
    q8, qs = quantize_rows_e4m3(q)

    def per_token(sc, m):
        return sc.double().repeat_interleave(SCALE_BLOCK, dim=-1)[..., :m]

    s = [(q8.double() @ seg.k.double().transpose(-1, -2)) * per_token(seg.k_scale, seg.tokens)[..., None, :]
         * qs.double() * (scale * LOG2E) for seg in segs]
    m = torch.cat(s, -1).amax(-1, keepdim=True)
    r = torch.cat([seg.v_scale.double() for seg in segs], -1).amax(-1)[..., None, None]
    p = [torch.exp2(t - m) for t in s]
    l = sum(t.sum(-1, keepdim=True) for t in p)
    out = sum((P_SCALE * t * per_token(seg.v_scale, seg.tokens)[..., None, :] / r).to(E4M3).double()
              @ seg.v_t.double().transpose(-1, -2) for t, seg in zip(p, segs, strict=True))
    return out * r / (P_SCALE * l)


def test_reference_is_the_formula():
    q, k, v = gaussian(1, 2, 20, 50, 32, seed=2)
    seg = quantize_kv_reference(k, v)
    got = fp8_attention_reference(q, [seg], block_n=128, exp16=False)  # one tile: the running maxima are the final
    want = independent_fp64(q, [seg], 32 ** -0.5)
    # fp32 vs fp64 moves p by ~1e-7 relative: only p·256 within that of an e4m3 tie can round the other way
    assert rel(got, want) < 1e-4


@pytest.mark.parametrize("block_n", [16, 64, 128])
def test_reference_tiles_and_segments_close_to_exact(block_n):
    """Two segments of different scales (the accumulator moves to a larger value scale when one comes), several
    scale blocks, tiles that do not divide the segments (a partial last tile each)."""
    q, k1, v1 = gaussian(2, 3, 33, 300, 64, seed=3)
    _, k2, v2 = gaussian(2, 3, 1, 45, 64, seed=4)
    k2, v2 = k2 * 0.3, v2 * 7
    segs = [quantize_kv_reference(k1, v1), quantize_kv_reference(k2, v2)]
    got = fp8_attention_reference(q, segs, block_n=block_n)
    err = rel(got, exact_attention(q, (k1, k2), (v1, v2)))
    assert QUANTISED_FLOOR < err < EXACT_REL_TOL


def test_segment_attention_quantises_bf16_segments():
    q, k1, v1 = gaussian(1, 2, 10, 30, 32, seed=5)
    _, k2, v2 = gaussian(1, 2, 1, 12, 32, seed=6)
    seg = quantize_kv_reference(k1, v1)
    got = fp8_segment_attention(q, (seg, k2), (seg, v2))
    want = fp8_attention_reference(q, [seg, quantize_kv_reference(k2, v2)])
    assert torch.equal(got, want)  # on the CPU both are the reference, over the same quantised segments
    assert got.shape == q.shape


def test_fp8_attention_refuses_bad_segments():
    q, k, v = gaussian(1, 2, 4, 6, 32)
    seg = quantize_kv_reference(k, v)
    with pytest.raises(ValueError, match="1 or 2"):
        fp8_attention(q, [seg, seg, seg])


# ------------------------------------------------------------------------------------------ the refiner's window

from test_refiner_ar import FIXTURES, block_noises, load_fixture, long_video  # noqa: E402


def fp8_refiner(model, ar_cfg, fp8=True, split=False):
    r = ARRefiner(model, ar_cfg)
    r.fp8_attention, r.split_window = fp8, split
    return r


@pytest.mark.parametrize("split", [False, True], ids=["active-slots", "split-window"])
@pytest.mark.parametrize("path", FIXTURES)
@torch.no_grad()
def test_fp8_window_copy_is_the_quantised_window(path, split):
    data, model, ar_cfg, _ = load_fixture(path)
    lat, noises = long_video(data, ar_cfg, blocks=ar_cfg.history_frames // ar_cfg.block_size + 2)
    r = fp8_refiner(model, ar_cfg, split=split)
    r.start(lat[:, :, : ar_cfg.sink_size], data["inputs.prompt_embeds"], data["inputs.prompt_attention_mask"])
    w = r.window
    assert w.fp8 is not None and w.fp8_stale
    for i, (a, b) in enumerate(r.blocks(lat.shape[2])):
        r._open(b - a)
        assert not w.fp8_stale
        t = w._tok(w.sink_frames + w.history_len)
        assert_same_segment(segment_view(w.fp8, t), quantize_kv_reference(w.k[:, :, :, :t], w.v[:, :, :, :t]))
        w.active_len = 0  # undo the open: refine_block opens again
        out = r.refine_block(lat[:, :, a:b], noises[i])
        assert torch.isfinite(out).all()
        assert w.fp8_stale  # the capture pass moved the block into the history


@pytest.mark.parametrize("path", FIXTURES)
@torch.no_grad()
def test_stale_fp8_copy_is_refused(path):
    data, model, ar_cfg, _ = load_fixture(path)
    z = data["inputs.stage1_latents"]
    r = fp8_refiner(model, ar_cfg)
    r.start(z[:, :, : ar_cfg.sink_size], data["inputs.prompt_embeds"], data["inputs.prompt_attention_mask"])
    noises = block_noises(data, r, z.shape[2])
    r.refine_block(z[:, :, ar_cfg.sink_size : ar_cfg.sink_size + ar_cfg.block_size], noises[0])
    w = r.window
    w.open_block(ar_cfg.block_size)  # opened without ARRefiner._open: no refresh after the capture pass
    x = z[:, :, ar_cfg.sink_size : ar_cfg.sink_size + ar_cfg.block_size]
    with pytest.raises(RuntimeError, match="refresh_fp8"):
        model(x, 0.5, r.text, fps=ar_cfg.fps, frame_positions=torch.arange(1, 1 + x.shape[2]), kv=w)
    w.refresh_fp8()
    assert torch.isfinite(model(x, 0.5, r.text, fps=ar_cfg.fps, frame_positions=torch.arange(1, 1 + x.shape[2]),
                                kv=w)).all()


@pytest.mark.parametrize("split", [False, True], ids=["active-slots", "split-window"])
@pytest.mark.parametrize("path", FIXTURES)
@torch.no_grad()
def test_fp8_refiner_close_to_bf16_and_memory_constant(path, split):
    """A long video (the window fills and slides) refined with the fp8 attention against the plain refiner: close
    (the attention's error, diluted by the residual stream and the Euler steps), never equal; the window's buffers,
    the fp8 copy included, never move or grow."""
    data, model, ar_cfg, _ = load_fixture(path)
    lat, noises = long_video(data, ar_cfg, blocks=ar_cfg.history_frames // ar_cfg.block_size + 3, seed=2)
    prompt, mask = data["inputs.prompt_embeds"], data["inputs.prompt_attention_mask"]
    plain = fp8_refiner(model, ar_cfg, fp8=False, split=split).refine_video(lat, prompt, mask, noises=noises)
    r = fp8_refiner(model, ar_cfg, split=split)
    r.start(lat[:, :, : ar_cfg.sink_size], prompt, mask)
    w = r.window
    ptrs, nbytes = [t.data_ptr() for t in w.buffers()], w.nbytes
    assert len(ptrs) == 7  # sink K, K, V and the copy's k, k_scale, v_t, v_scale
    out = [lat[:, :, : ar_cfg.sink_size]]
    for i, (a, b) in enumerate(r.blocks(lat.shape[2])):
        out.append(r.refine_block(lat[:, :, a:b], noises[i]))
        assert [t.data_ptr() for t in w.buffers()] == ptrs and w.nbytes == nbytes
    err = rel(torch.cat(out, 2), plain)
    assert QUANTISED_FLOOR / 10 < err < EXACT_REL_TOL


@pytest.mark.parametrize("path", FIXTURES)
@torch.no_grad()
def test_fp8_resume_equals_uninterrupted(path):
    """A snapshot holds the bf16 window only; a restored refiner rebuilds its fp8 copy from it and goes on bit for
    bit as the uninterrupted one."""
    data, model, ar_cfg, _ = load_fixture(path)
    lat, noises = long_video(data, ar_cfg, blocks=ar_cfg.history_frames // ar_cfg.block_size + 3, seed=3)
    prompt, mask = data["inputs.prompt_embeds"], data["inputs.prompt_attention_mask"]
    live = fp8_refiner(model, ar_cfg)
    live.start(lat[:, :, : ar_cfg.sink_size], prompt, mask)
    ranges = live.blocks(lat.shape[2])
    cut = len(ranges) - 2
    for i, (a, b) in enumerate(ranges[:cut]):
        live.refine_block(lat[:, :, a:b], noises[i])
    snap = live.snapshot()
    assert not any("fp8" in k for k in snap)
    rest_live = [live.refine_block(lat[:, :, a:b], noises[cut + i]) for i, (a, b) in enumerate(ranges[cut:])]
    resumed = fp8_refiner(model, ar_cfg)
    resumed.restore(snap)
    assert resumed.window.fp8 is not None and resumed.window.fp8_stale
    rest = [resumed.refine_block(lat[:, :, a:b], noises[cut + i]) for i, (a, b) in enumerate(ranges[cut:])]
    for x, y in zip(rest_live, rest, strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("path", FIXTURES)
@torch.no_grad()
def test_next_block_prepared_ahead_equals_opened(path):
    """`prepare_next_block` (the pipeline runs it beside the decode) places the sink and rebuilds the fp8 copy ahead:
    the block then refines bit for bit as one whose `_open` does it, and `_open` does not do it again; a window
    changed in between (a restore) is prepared again."""
    data, model, ar_cfg, _ = load_fixture(path)
    lat, noises = long_video(data, ar_cfg, blocks=ar_cfg.history_frames // ar_cfg.block_size + 3, seed=6)
    prompt, mask = data["inputs.prompt_embeds"], data["inputs.prompt_attention_mask"]
    plain, ahead = fp8_refiner(model, ar_cfg), fp8_refiner(model, ar_cfg)
    for r in (plain, ahead):
        r.start(lat[:, :, : ar_cfg.sink_size], prompt, mask)
    refreshes = []
    w = ahead.window
    real_refresh = w.refresh_fp8

    def counting_refresh():
        refreshes.append(1)
        real_refresh()

    w.refresh_fp8 = counting_refresh
    ranges = plain.blocks(lat.shape[2])
    for i, (a, b) in enumerate(ranges):
        want = plain.refine_block(lat[:, :, a:b], noises[i])
        before = len(refreshes)
        got = ahead.refine_block(lat[:, :, a:b], noises[i])
        assert len(refreshes) == before + (1 if i == 0 else 0)  # block 0 opens itself; the others were prepared
        assert torch.equal(got, want)
        ahead.prepare_next_block()
        assert not w.fp8_stale
    snap = ahead.snapshot()
    ahead.restore(snap)  # the window changed: the prepared copy no longer counts
    before = len(refreshes)
    ahead._open(ar_cfg.block_size)
    assert len(refreshes) == before + 1


@pytest.mark.parametrize("path", FIXTURES)
def test_windows_with_and_without_copy_are_not_reused_for_each_other(path):
    data, model, ar_cfg, _ = load_fixture(path)
    z = data["inputs.stage1_latents"]
    r = fp8_refiner(model, ar_cfg, fp8=False)
    r.start(z[:, :, : ar_cfg.sink_size], data["inputs.prompt_embeds"], data["inputs.prompt_attention_mask"])
    plain = r.window
    r.fp8_attention = True
    r.start(z[:, :, : ar_cfg.sink_size], data["inputs.prompt_embeds"], data["inputs.prompt_attention_mask"])
    assert r.window is not plain and r.window.fp8 is not None


@pytest.mark.parametrize("path", FIXTURES)
@torch.no_grad()
def test_unmasked_prompt_is_attended_in_fp8(path):
    """An unmasked prompt's cross-attention K/V become e4m3 segments (a masked one keeps its bf16 K/V and bias);
    the refiner then runs both attentions in fp8, close to the plain one."""
    data, model, ar_cfg, _ = load_fixture(path)
    lat, noises = long_video(data, ar_cfg, blocks=3, seed=5)
    prompt = data["inputs.prompt_embeds"]
    ones = torch.ones(prompt.shape[:2], dtype=torch.int64)
    masked = ones.clone()
    masked[:, -1] = 0
    r = fp8_refiner(model, ar_cfg)
    r.set_prompt(prompt, masked)
    assert all(torch.is_tensor(k) for k in r.text.k) and r.text.bias.ne(0).any()
    r.set_prompt(prompt, ones)
    assert all(isinstance(k, tuple) and isinstance(k[0], QuantizedKV) for k in r.text.k)
    assert all(v == (None,) for v in r.text.v)
    plain = fp8_refiner(model, ar_cfg, fp8=False).refine_video(lat, prompt, ones, noises=noises)
    got = fp8_refiner(model, ar_cfg).refine_video(lat, prompt, ones, noises=noises)
    assert QUANTISED_FLOOR / 10 < rel(got, plain) < EXACT_REL_TOL


# ------------------------------------------------------------------------------------------ quality report


def test_quality_of_fp8_attention_alone_on_a_tiny_world():
    import dataclasses

    from test_refiner_fp8 import tiny_refiner

    from engine.bench import stand_in_text
    from engine.fast.refiner_fp8 import Fp8AttentionKV, refiner_fp8_quality
    from engine.presets import get_preset
    from engine.vae.model import VideoVAE
    from engine.world import World

    p = dataclasses.replace(get_preset("tiny"), pixel_hw=(64, 96))  # few tokens: the CPU emulation is slow
    world = World(p, None, tiny_refiner(), None, VideoVAE(p.vae), stand_in_text(p, 0), torch.device("cpu"),
                  torch.float32)
    rep = refiner_fp8_quality(world, include=(), attention=True)
    assert rep["attention_fp8"] and rep["linears"] == []
    assert all(s["linears_fp8"] == 0 for s in rep["steps"])
    assert 0 < rep["block_rel_err_max"] < EXACT_REL_TOL
    both = refiner_fp8_quality(world, attention=True)
    assert both["steps"][0]["linears_fp8"] > 0 and both["forward_rel_err_max"] > 0
    with pytest.raises(InputError, match="nothing to measure"):
        refiner_fp8_quality(world, include=(), attention=False)
    with pytest.raises(InputError, match="ExplicitKV"):
        Fp8AttentionKV(object())
    assert isinstance(Fp8AttentionKV(ExplicitKV()).kv, ExplicitKV)


# ------------------------------------------------------------------------------------------ Triton: interpreter

interpreter = pytest.mark.skipif(not interpreter_usable(), reason="needs Triton and TRITON_INTERPRET=1 (Triton's "
                                 "CPU interpreter), with numpy < 2.4 for Triton <= 3.6")


@pytest.fixture
def exact_fp8_interpreter(monkeypatch):
    """Triton 3.6's interpreter converts fp32 -> e4m3 by truncating the mantissa and adding the cut-off bit without
    carrying into the exponent (31.78 becomes 16, not 32); the GPU rounds to nearest even. Route the interpreter's
    e4m3 conversions through torch's (exact) so the kernels' arithmetic can be checked on the CPU."""
    import numpy as np
    import triton.language as tl
    import triton.runtime.interpreter as ti

    plain = ti._convert_float

    def convert(data, src, dst, rounding):
        if dst == tl.float8e4nv and src == tl.float32:
            x = torch.from_numpy(np.ascontiguousarray(data).view(np.float32).copy())
            return x.to(E4M3).view(torch.uint8).numpy()
        if src == tl.float8e4nv and dst == tl.float16:
            x = torch.from_numpy(np.ascontiguousarray(data).view(np.uint8).copy()).view(E4M3)
            return x.to(torch.float16).view(torch.int16).numpy().view(np.uint16)
        return plain(data, src, dst, rounding)

    monkeypatch.setattr(ti, "_convert_float", convert)


@interpreter
@pytest.mark.usefixtures("exact_fp8_interpreter")
def test_interpreter_quantiser_is_the_reference():
    import kernels.fp8_attention as fa

    k, v = torch.randn(2, 3, 37, 32), torch.randn(2, 3, 37, 32) * 5
    ref = quantize_kv_reference(k, v)
    out = empty_quantized((2, 3), 37, 32, "cpu")
    fa._launch_quantize(k, out.k, out.k_scale, transposed=False)
    fa._launch_quantize(v, out.v_t, out.v_scale, transposed=True)
    assert_same_segment(out, ref)


@interpreter
@pytest.mark.usefixtures("exact_fp8_interpreter")
@pytest.mark.parametrize("two", [False, True])
def test_interpreter_kernel_is_the_reference(two):
    import kernels.fp8_attention as fa

    q, k1, v1 = gaussian(1, 2, 37, 300, 32, seed=7)  # three scale blocks, the last partial
    _, k2, v2 = gaussian(1, 2, 1, 19, 32, seed=8)
    q = q.bfloat16()
    segs = [quantize_kv_reference(k1, v1)] + ([quantize_kv_reference(k2 * 0.2, v2 * 4)] if two else [])
    s2 = segs[-1]
    n, h, d, bm, bn = q.shape[2], q.shape[1], q.shape[3], 16, 16
    out = torch.empty(1, n, h, d, dtype=torch.bfloat16)
    s1 = segs[0]
    fa._fp8_attention_kernel[(math.ceil(n / bm), h)](
        q, s1.k, s1.k_scale, s1.v_t, s1.v_scale, s2.k, s2.k_scale, s2.v_t, s2.v_scale, out,
        h, n, s1.tokens, s2.tokens, d ** -0.5 * LOG2E, *q.stride()[:3], *s1.k.stride()[:3], *s1.v_t.stride()[:3],
        *s1.k_scale.stride()[:2], *s2.k.stride()[:3], *s2.v_t.stride()[:3], *s2.k_scale.stride()[:2],
        *out.stride()[:3], D=d, BLOCK_M=bm, BLOCK_N=bn, TWO=two, FP8_MAX=E4M3_MAX, FLOOR=fa.AMAX_FLOOR,
        LOG2_PSCALE=fa.LOG2_P_SCALE, EXP16=False, SBLOCK=SCALE_BLOCK)
    want = fp8_attention_reference(q, segs, block_n=bn)
    assert rel(out.transpose(1, 2), want) < BF16_OUT_TOL


# ------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 32, 9680, 128), (2, 3, 37, 64), (1, 2, 1, 32), (1, 4, 300, 256)])
def test_cuda_quantiser_is_the_reference(shape):
    g = torch.Generator(device="cuda").manual_seed(0)
    k = torch.randn(*shape, generator=g, device="cuda").bfloat16()
    v = (torch.randn(*shape, generator=g, device="cuda") * 3).bfloat16()
    base = torch.randn(2, *shape[:2], shape[2] + 5, shape[3], device="cuda").bfloat16()  # strided views, as a window
    base[1, :, :, : shape[2]] = k
    kv = base[1:2, :, :, : shape[2]].squeeze(0)
    for kk in (k, kv):
        assert_same_segment(quantize_kv(kk, v), quantize_kv_reference(kk, v))


CUDA_CASES = [  # b, h, n, history, block, d
    pytest.param((1, 32, 2640, 9680, 2640, 128), id="release"),
    pytest.param((1, 2, 37, 50, 19, 32), id="odd-small"),
    pytest.param((2, 3, 130, 0, 77, 64), id="one-segment"),
    pytest.param((1, 2, 65, 129, 33, 256), id="d256"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CUDA_CASES)
def test_cuda_kernel_is_the_reference_and_close_to_exact(case, dtype):
    b, h, n, hist, blk, d = case
    q, k1, v1 = gaussian(b, h, n, max(hist, 1), d, seed=9, dtype=dtype, device="cuda")
    _, k2, v2 = gaussian(b, h, 1, blk, d, seed=10, dtype=dtype, device="cuda")
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # the model's layout: [B, N, H, D] memory
    ks, vs = ((k1, k2), (v1, v2)) if hist else ((k2,), (v2,))
    segs = [quantize_kv(k, v) for k, v in zip(ks, vs, strict=True)]
    got = fp8_attention(q, segs)
    assert got.dtype == dtype and got.shape == q.shape and got.transpose(1, 2).is_contiguous()
    want = fp8_attention_reference(q, segs)
    err_ref, err_exact = rel(got, want), rel(got, exact_attention(q, ks, vs))
    print(f"\n{case} {dtype}: vs reference {err_ref:.2e}, vs exact {err_exact:.2e}")
    assert err_ref < BF16_OUT_TOL
    assert QUANTISED_FLOOR < err_exact < EXACT_REL_TOL


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(SWEEP))
def test_cuda_kernel_configs_agree(name):
    """Every configuration the probe sweeps computes the reference of its own key tiling (and exponent precision)."""
    from kernels.fp8_attention import fp8_attention_triton

    config = SWEEP[name]
    q, k1, v1 = gaussian(1, 4, 300, 500, 128, seed=11, dtype=torch.bfloat16, device="cuda")
    _, k2, v2 = gaussian(1, 4, 1, 300, 128, seed=12, dtype=torch.bfloat16, device="cuda")
    segs = [quantize_kv(k1, v1), quantize_kv(k2, v2)]
    got = fp8_attention_triton(q, segs, config=config)
    want = fp8_attention_reference(q, segs, block_n=config["BLOCK_N"], exp16=config["EXP16"])
    err_ref, err_exact = rel(got, want), rel(got, exact_attention(q, (k1, k2), (v1, v2)))
    print(f"\n{config}: vs reference {err_ref:.2e}, vs exact {err_exact:.2e}")
    assert err_ref < BF16_OUT_TOL
    assert QUANTISED_FLOOR < err_exact < EXACT_REL_TOL


@pytest.mark.gpu
@pytest.mark.parametrize("split", [False, True], ids=["active-slots", "split-window"])
@pytest.mark.parametrize("prompt_mask", ["fixture", "unmasked"])
@pytest.mark.parametrize("path", FIXTURES)
@torch.no_grad()
def test_cuda_fp8_refiner_graphs_and_compile_equal_eager(path, prompt_mask, split):
    """The fp8 window (and, unmasked, the fp8 prompt K/V) under the refiner's CUDA graphs and compiled block halves
    against the same refiner run eagerly on the GPU (the kernel in both): the same values up to the compiled
    halves' rounding."""
    from engine.fast.refiner_compile import compiled_parts
    from engine.fast.refiner_graph import GraphedRefinerModel

    data, model, ar_cfg, _ = load_fixture(path)
    model = model.to("cuda", torch.bfloat16)
    if model.cfg.attention_head_dim not in HEAD_DIMS:
        pytest.skip(f"head dim {model.cfg.attention_head_dim}: the reference serves")
    lat, noises = long_video(data, ar_cfg, blocks=ar_cfg.history_frames // ar_cfg.block_size + 4, seed=4)
    lat, noises = lat.cuda().bfloat16(), [n.cuda().bfloat16() for n in noises]
    prompt, mask = data["inputs.prompt_embeds"].cuda(), data["inputs.prompt_attention_mask"].cuda()
    if prompt_mask == "unmasked":
        mask = torch.ones_like(mask)
    eager = fp8_refiner(model, ar_cfg, split=split).refine_video(lat, prompt, mask, noises=noises)
    r = fp8_refiner(model, ar_cfg, split=split)
    r.model = GraphedRefinerModel(model)
    r.model.parts = compiled_parts()
    fast = r.refine_video(lat, prompt, mask, noises=noises)
    assert r.model.replays > 0
    assert isinstance(r.text.k[0], tuple) == (prompt_mask == "unmasked" or not bool(mask.eq(0).any()))
    assert rel(fast, eager) < 2e-2  # bf16 compiled halves vs eager ones, through the fp8 attention's roundings


# ------------------------------------------------------------------------------------------ the live loop


@pytest.mark.parametrize("fast", [("refiner-fp8-attn",), ("refiner-fp8-attn", "lean-memory")], ids=["fp8-attn",
                                                                                                     "with-lean"])
def test_live_loop_with_fp8_attention_on_cpu(fast):
    """The fast path through the rollout (the tiny world on the CPU: the reference attention): stage-1 untouched,
    the refined latents close to the plain loop's and not equal, the window holding its fp8 copy."""
    from engine.bench import build_bench_world
    from tests.test_fast_paths_gpu import rollout

    world = build_bench_world("tiny", device="cpu", dtype=torch.float32, seed=1)
    _, _, plain, _ = rollout(world, (), "full", chunks=4)
    pipe, applied, fp8, _ = rollout(world, fast, "full", chunks=4)
    assert "refiner-fp8-attn" in applied and pipe.refiner.window.fp8 is not None
    errs = []
    for a, b in zip(fp8, plain, strict=True):
        assert torch.equal(a.latents, b.latents)
        errs.append(rel(a.refined, b.refined))
    print(f"refined latents vs the plain loop: {[f'{e:.2e}' for e in errs]}")
    # the tiny refiner's attention moves its output little: above fp32 rounding (1e-6) shows the fp8 path ran
    assert all(1e-5 < e < EXACT_REL_TOL for e in errs)


@interpreter
@pytest.mark.usefixtures("exact_fp8_interpreter")
def test_interpreter_tma_kernel_is_the_reference():
    """The descriptor-loading kernel: tiles past a segment's end come back as zeros (48 and 80 keys, tiles of 32)."""
    import kernels.fp8_attention as fa

    q, k1, v1 = gaussian(1, 2, 37, 48, 32, seed=13)
    _, k2, v2 = gaussian(1, 2, 1, 80, 32, seed=14)
    q = q.bfloat16()
    segs = [quantize_kv_reference(k1, v1), quantize_kv_reference(k2 * 0.2, v2 * 4)]
    (k1d, v1d), (k2d, v2d) = (fa._tma_descriptors(seg, 32) for seg in segs)
    n, h, d, bm = q.shape[2], q.shape[1], q.shape[3], 16
    out = torch.empty(1, n, h, d, dtype=torch.bfloat16)
    fa._fp8_attention_tma_kernel[(math.ceil(n / bm), h)](
        q, k1d, segs[0].k_scale, v1d, segs[0].v_scale, k2d, segs[1].k_scale, v2d, segs[1].v_scale, out,
        h, n, 48, 80, d ** -0.5 * LOG2E, *q.stride()[:3], *segs[0].k_scale.stride()[:2],
        *segs[1].k_scale.stride()[:2], *out.stride()[:3], D=d, BLOCK_M=bm, BLOCK_N=32, TWO=True, FP8_MAX=E4M3_MAX,
        FLOOR=fa.AMAX_FLOOR, LOG2_PSCALE=fa.LOG2_P_SCALE, EXP16=False, SBLOCK=SCALE_BLOCK)
    want = fp8_attention_reference(q, segs, block_n=32)
    assert rel(out.transpose(1, 2), want) < BF16_OUT_TOL
    unaligned = quantize_kv_reference(k1[:, :, :37], v1[:, :, :37])  # v_t rows of 37 bytes: no descriptor
    assert fa._tma_descriptors(unaligned, 32) is None


def test_graphs_keep_static_copies_of_an_fp8_prompt():
    """GraphedRefinerModel's prompt sync (CPU-callable logic): e4m3 segments beside None are cloned once, a prompt
    of the same structure is copied into them, one of another structure makes new copies (and drops the graphs)."""
    from types import SimpleNamespace

    from engine.fast.refiner_graph import GraphedRefinerModel
    from engine.refiner.ar import quantize_text
    from engine.refiner.model import RefinerText

    def prompt(seed):
        g = torch.Generator().manual_seed(seed)
        k = [torch.randn(1, 2, 8, 32, generator=g) for _ in range(2)]
        v = [torch.randn(1, 2, 8, 32, generator=g) for _ in range(2)]
        return RefinerText(k=k, v=v, bias=torch.zeros(1, 1, 1, 8))

    drops = []
    me = SimpleNamespace(text=None, _text_src=None, drop_graphs=lambda: drops.append(1))
    sync = GraphedRefinerModel._sync_text
    first = quantize_text(prompt(0))
    want = [seg.k.clone() for (seg,) in first.k]
    sync(me, first)
    assert drops == [1] and me.text.v == [(None,), (None,)]
    static = me.text.k[0][0].k
    assert all(torch.equal(seg.k.view(torch.uint8), w.view(torch.uint8))
               for (seg,), w in zip(me.text.k, want, strict=True))
    second = quantize_text(prompt(1))
    sync(me, second)
    assert drops == [1] and me.text.k[0][0].k is static  # copied in place: the graphs still read it
    assert torch.equal(static.view(torch.uint8), quantize_text(prompt(1)).k[0][0].k.view(torch.uint8))
    sync(me, prompt(2))  # bf16 K/V: another structure
    assert drops == [1, 1] and torch.is_tensor(me.text.k[0])


@pytest.mark.gpu
def test_cuda_live_loop_chunk_async_prepares_blocks_beside_the_decode():
    """chunk-async runs the next block's sink placement and fp8 copy on the side stream beside the decode: the same
    kernels on the same data as the plain loop, so the refined latents and frames are bit-equal."""
    from engine.bench import build_bench_world
    from tests.test_fast_paths_gpu import rollout

    world = build_bench_world("tiny", device="cuda", dtype=torch.bfloat16, seed=1)
    _, _, plain, _ = rollout(world, ("refiner-fp8-attn",), "full", chunks=5)
    pipe, applied, fast, _ = rollout(world, ("refiner-fp8-attn", "chunk-async"), "full", chunks=5)
    assert "chunk-async" in applied and pipe.refiner.window.fp8 is not None
    for a, b in zip(fast, plain, strict=True):
        assert torch.equal(a.refined, b.refined)
        assert (a.frames == b.frames).all()
