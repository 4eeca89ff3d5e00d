"""fp8 (e4m3) GEMMs for the refiner (engine/fast/refiner_fp8.py): the quantiser's error bounds, the swap, clear
errors, and (GPU) `_scaled_mm` against bf16 `nn.Linear`, a whole tiny refiner fp8 vs bf16, and the CUDA-graph path.

Bounds: e4m3 keeps 3 mantissa bits, so one rounding moves a value by at most 2^-4 relative (normal range) and by
~2.5e-2 rms (a uniform error of ±half a 2^-3 step, over mantissas in [1, 2)); a GEMM quantises both operands, whose
errors add up like noise over K products, so its output is off by ~sqrt(2) x 2.5e-2 ≈ 3.5e-2 relative. The bounds
below are derived from that and say so.
"""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.bench import stand_in_text
from engine.errors import InputError
from engine.fast.refiner_fp8 import (
    BLOCK_LINEARS,
    E4M3,
    E4M3_MAX,
    Fp8Linear,
    PreActivation,
    _compare_forwards,
    fp8_quality_delta,
    quantize_rows,
    quantize_rows_reference,
    refiner_fp8_quality,
    rel_err,
    scaled_mm_emulated,
    use_fp8_linears,
)
from engine.presets import get_preset
from engine.refiner.ar import ARRefiner
from engine.refiner.model import ExplicitKV, GELUProj, RefinerTransformer
from engine.vae.model import VideoVAE
from engine.world import World, seeded_init_

GEMM_REL_TOL = 5e-2  # one fp8 GEMM vs the exact GEMM (module docstring): ~3.5e-2 expected and seen (emulated)
GEMM_REL_FLOOR = 5e-3  # below this the "fp8" GEMM did not quantise at all


def tiny_refiner(dtype=torch.float32, device="cpu", **changes) -> RefinerTransformer:
    cfg = dataclasses.replace(get_preset("tiny").refiner, **changes)
    m = RefinerTransformer(cfg)
    seeded_init_(m, 5)
    return m.to(device=device, dtype=dtype).eval().requires_grad_(False)


def refiner_inputs(model, device="cpu", n=3, hw=(4, 6), prompt_len=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = model.cfg
    dtype = model.proj_in.weight.dtype
    latents = torch.randn(1, c.in_channels, n, *hw, generator=g).to(device, dtype)
    embeds = torch.randn(1, prompt_len, c.caption_channels, generator=g).to(device, dtype)
    mask = torch.ones(1, prompt_len, dtype=torch.int64, device=device)
    mask[:, -2:] = 0
    return latents, embeds, mask


def block_linear(block, name):
    return block.get_submodule(name)


# ------------------------------------------------------------------------------------------ quantiser (CPU)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_rows_round_trip_bound(dtype):
    g = torch.Generator().manual_seed(1)
    # rows of very different magnitudes, heavy tails, and values deep in e4m3's subnormal range after scaling
    x = (torch.randn(64, 96, generator=g) ** 3 * torch.logspace(-3, 3, 64)[:, None]).to(dtype)
    q, scale = quantize_rows_reference(x)
    assert q.dtype == E4M3 and q.shape == x.shape and scale.shape == (64, 1) and scale.dtype == torch.float32
    xf = x.float()
    deq = q.float() * scale
    # per element: half an ulp of a 3-bit mantissa (2^-4 relative) in the normal range, half the subnormal step
    # (2^-9 / 2 of the scaled unit) below it; + fp32 rounding of the scaling itself
    bound = torch.maximum(xf.abs() * 2**-4, scale * 2**-10) * (1 + 1e-6)
    assert ((deq - xf).abs() <= bound).all()
    # each row's largest magnitude lands on ±448 and comes back (up to fp32 rounding)
    top = xf.abs().argmax(dim=1, keepdim=True)
    assert torch.equal(q.float().gather(1, top).abs(), torch.full((64, 1), E4M3_MAX))
    assert torch.allclose(deq.gather(1, top), xf.gather(1, top), rtol=1e-6, atol=0)
    r = rel_err(deq, xf)
    print(f"quantise round trip {dtype}: rel err {r:.3e}")
    assert 2**-7 < r < 2**-4  # ~2^-5.5 for Gaussian-ish data: clearly quantised, never more than half an ulp


def test_quantize_rows_zero_and_nan_rows():
    x = torch.randn(3, 32)
    x[1] = 0
    x[2, 5] = float("nan")
    q, scale = quantize_rows_reference(x)
    assert torch.equal(q[1].float(), torch.zeros(32)) and torch.isfinite(scale[1]).all() and scale[1] > 0
    assert q[2].float().isnan().all() and scale[2].isnan().all()  # a NaN is not quantised away
    assert torch.isfinite(q[0].float()).all()
    # quantize_rows is the reference on a CPU tensor
    q2, s2 = quantize_rows(x[:1])
    assert torch.equal(q2.view(torch.uint8), q[:1].view(torch.uint8)) and torch.equal(s2, scale[:1])


# ------------------------------------------------------------------------------------------ Fp8Linear (CPU)


@pytest.mark.parametrize("bias", [True, False])
def test_fp8_linear_emulation_close_to_linear(bias):
    g = torch.Generator().manual_seed(2)
    lin = nn.Linear(128, 48, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(48, 128, generator=g) / math.sqrt(128))
        if bias:
            lin.bias.copy_(torch.randn(48, generator=g) * 0.1)
    fp8 = Fp8Linear.from_linear(lin)
    x = torch.randn(2, 5, 7, 128, generator=g)  # leading dims are flattened and restored
    y, want = fp8(x), lin(x)
    assert y.shape == (2, 5, 7, 48) and y.dtype == torch.float32
    r = rel_err(y, want)
    print(f"Fp8Linear (emulated) vs nn.Linear, bias={bias}: rel err {r:.3e}")
    assert GEMM_REL_FLOOR < r < GEMM_REL_TOL
    # it is exactly the dequantised GEMM of the documented quantisation, row by row
    qa, sa = quantize_rows_reference(x.reshape(-1, 128))
    qw, sw = quantize_rows_reference(lin.weight)
    manual = (qa.float() * sa) @ (qw.float() * sw).t() + (lin.bias if bias else 0)
    torch.testing.assert_close(y.reshape(-1, 48), manual, rtol=1e-5, atol=1e-6)
    # a row's output does not depend on the other rows (its own scale; CPU matmul blocking may differ by M)
    torch.testing.assert_close(fp8(x[1, 2]), y[1, 2], rtol=1e-5, atol=1e-6)
    assert fp8(x[:0]).shape == (0, 5, 7, 48)


def test_fp8_linear_keeps_output_dtype_and_halves_weight_bytes():
    lin = nn.Linear(64, 32).to(torch.bfloat16)
    fp8 = Fp8Linear.from_linear(lin)
    assert fp8.weight.dtype == E4M3 and fp8.weight.shape == (32, 64)
    assert fp8.weight_scale.shape == (1, 32) and fp8.bias.dtype == torch.bfloat16
    assert fp8.weight.nbytes * 2 == lin.weight.nbytes
    assert fp8(torch.randn(3, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_fp8_linear_errors_are_clear():
    with pytest.raises(InputError, match="multiples of 16"):
        Fp8Linear.from_linear(nn.Linear(40, 32))
    with pytest.raises(InputError, match="multiples of 16"):
        Fp8Linear.from_linear(nn.Linear(32, 2))
    with pytest.raises(InputError, match="nn.Linear"):
        Fp8Linear.from_linear(nn.Conv1d(16, 16, 1))
    fp8 = Fp8Linear.from_linear(nn.Linear(32, 16))
    with pytest.raises(InputError, match="in_features=32"):
        fp8(torch.randn(4, 31))
    fp8.to(torch.bfloat16)  # casts the e4m3 buffers: forward must refuse, not compute garbage
    with pytest.raises(RuntimeError, match=r"\.to\(dtype\) after the fp8 swap"):
        fp8(torch.randn(4, 32))


# ------------------------------------------------------------------------------------------ swap (CPU)


def test_swap_counts_and_leaves_the_rest_alone():
    model = tiny_refiner(torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n = use_fp8_linears(model)
    assert n == len(BLOCK_LINEARS) * model.num_layers
    for blk in model.transformer_blocks:
        for name in BLOCK_LINEARS:
            assert isinstance(block_linear(blk, name), Fp8Linear)
        assert not any(type(mod) is nn.Linear for mod in blk.modules())  # the bf16 weights are gone
    kept = [name for name, mod in model.named_modules() if type(mod) is nn.Linear]
    assert kept and not any(name.startswith("transformer_blocks.") for name in kept)
    assert {"proj_in", "proj_out", "caption_projection.linear_1", "time_embed.linear"} <= set(kept)
    for name, t in model.state_dict().items():  # everything that was not swapped is untouched, still bf16
        if name in before and t.dtype != E4M3 and not name.endswith("weight_scale"):
            assert torch.equal(t, before[name]), name
    assert model.proj_in.weight.dtype == torch.bfloat16 and model.proj_out.weight.dtype == torch.bfloat16
    assert use_fp8_linears(model) == 0  # idempotent


def test_swap_include_and_alignment():
    model = tiny_refiner()
    assert use_fp8_linears(model, include=("ff.net.2", "attn1.to_q")) == 2 * model.num_layers
    blk = model.transformer_blocks[0]
    assert isinstance(blk.ff.net[2], Fp8Linear) and type(blk.ff.net[0].proj) is nn.Linear
    with pytest.raises(InputError, match="accepted"):
        use_fp8_linears(model, include=("attn1.to_gate_logits",))
    # cross_attention_dim 40: attn2.to_k/to_v (K = 40) do not meet _scaled_mm's alignment and stay as they are;
    # gated attention: the per-head gates are never swapped
    odd = tiny_refiner(cross_attention_dim=40, gated_attn=True)
    assert use_fp8_linears(odd) == (len(BLOCK_LINEARS) - 2) * odd.num_layers
    b0 = odd.transformer_blocks[0]
    assert type(b0.attn2.to_k) is nn.Linear and type(b0.attn2.to_v) is nn.Linear
    assert type(b0.attn1.to_gate_logits) is nn.Linear and isinstance(b0.attn2.to_q, Fp8Linear)
    with pytest.raises(InputError, match="RefinerTransformer"):
        use_fp8_linears(nn.Sequential(nn.Linear(16, 16)))


def test_fp8_refiner_forward_emulated_close_to_plain():
    model = tiny_refiner()
    latents, embeds, mask = refiner_inputs(model)
    want = model(latents, 0.7, model.prepare_text(embeds, mask), fps=16.0)
    use_fp8_linears(model)
    got = model(latents, 0.7, model.prepare_text(embeds, mask), fps=16.0)
    r = rel_err(got, want)
    print(f"tiny refiner forward, fp8 (emulated) vs fp32: rel err {r:.3e}")
    # 2 blocks x 5 chained GEMMs each, each ~2.5e-2 off, seen through residuals and norms: well under 0.1
    assert torch.isfinite(got).all() and GEMM_REL_FLOOR < r < 0.1


# ------------------------------------------------------------------------------------------ quality (CPU)


def test_quality_reference_pass_is_the_model_forward():
    model = tiny_refiner()
    latents, embeds, mask = refiner_inputs(model)
    g = torch.Generator().manual_seed(3)
    heads, hd = model.cfg.num_attention_heads, model.cfg.attention_head_dim
    prefix = [(torch.randn(1, heads, 20, hd, generator=g), torch.randn(1, heads, 20, hd, generator=g))
              for _ in range(model.num_layers)]
    kv = ExplicitKV(prefix)
    pos = torch.arange(5, 8)
    ref, fp8, errs, swapped = _compare_forwards(model, latents, 0.4, embeds, mask, fps=16.0, frame_positions=pos,
                                                kv=kv, include=BLOCK_LINEARS, fast_accum=False)
    want = model(latents, 0.4, model.prepare_text(embeds, mask), fps=16.0, frame_positions=pos, kv=kv)
    assert torch.equal(ref, want)  # the block-by-block loop is RefinerTransformer.forward, op for op
    assert swapped == len(BLOCK_LINEARS) * model.num_layers and len(errs) == model.num_layers
    assert GEMM_REL_FLOOR < rel_err(fp8, ref) < 0.1 and all(GEMM_REL_FLOOR < e < 0.1 for e in errs)
    # nothing swapped: the "fp8" pass is the reference pass
    ref0, same, errs0, n0 = _compare_forwards(model, latents, 0.4, embeds, mask, fps=16.0, frame_positions=pos,
                                              kv=kv, include=(), fast_accum=False)
    assert n0 == 0 and torch.equal(same, ref0) and errs0 == [0.0] * model.num_layers


def test_quality_delta_leaves_the_model_unchanged():
    model = tiny_refiner()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    latents, embeds, mask = refiner_inputs(model)
    rep = fp8_quality_delta(model, latents, 0.9, embeds, mask, fps=16.0)
    print(f"tiny quality delta (emulated): {rep}")
    assert rep["linears_fp8"] == len(BLOCK_LINEARS) * model.num_layers and rep["tokens"] == 3 * 4 * 6
    assert rep["block_rel_err_max"] >= rep["block_rel_err_mean"] > GEMM_REL_FLOOR
    assert GEMM_REL_FLOOR < rep["forward_rel_err"] < 0.1
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not any(isinstance(mod, Fp8Linear | PreActivation) for mod in model.modules())  # the GELU is back too
    assert all(type(blk.ff.net[0]) is GELUProj and blk.attn1.to_qkv is None for blk in model.transformer_blocks)
    use_fp8_linears(model)
    with pytest.raises(InputError, match="before use_fp8_linears"):
        fp8_quality_delta(model, latents, 0.9, embeds, mask, fps=16.0)


def test_refiner_fp8_quality_on_a_tiny_world():
    p = dataclasses.replace(get_preset("tiny"), pixel_hw=(64, 96))  # few tokens: the CPU emulation is slow
    world = World(p, None, tiny_refiner(), None, VideoVAE(p.vae), stand_in_text(p, 0), torch.device("cpu"),
                  torch.float32)
    before = {k: v.clone() for k, v in world.refiner.state_dict().items()}
    rep = refiner_fp8_quality(world, seed=1)
    print(f"tiny world fp8 quality (emulated): forward {rep['forward_rel_err_max']:.3e} "
          f"block {rep['block_rel_err_max']:.3e}")
    ar, scale = p.ar, world.vae.config.spatial_scale
    assert rep["latent_hw"] == [64 // scale, 96 // scale]
    assert [s["sigma"] for s in rep["steps"]] == list(ar.sigmas)
    assert rep["history_frames"] == ar.kv_max_frames and rep["block_frames"] == ar.block_size
    assert GEMM_REL_FLOOR < rep["forward_rel_err_max"] < 0.1
    assert all(torch.equal(world.refiner.state_dict()[k], v) for k, v in before.items())
    no_refiner = dataclasses.replace(world, refiner=None)
    with pytest.raises(InputError, match="refiner"):
        refiner_fp8_quality(no_refiner)


# ------------------------------------------------------------------------------------------ GPU


def gpu_rel_and_print(label, got, want, tol):
    r = rel_err(got, want)
    print(f"{label}: rel err {r:.3e} (tol {tol:.1e})")
    return r


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("m,k", [(2640, 4096), (2640, 16384), (7, 48), (1, 16), (300, 4100)])
def test_triton_quantiser_equals_reference(dtype, m, k):
    g = torch.Generator(device="cuda").manual_seed(m + k)
    x = (torch.randn(m, k, device="cuda", generator=g) ** 3).to(dtype)
    x[0, :] = 0  # an all-zero row
    q, s = quantize_rows(x)  # Triton on CUDA
    qr, sr = quantize_rows_reference(x)
    assert torch.equal(s, sr)
    assert torch.equal(q.view(torch.uint8), qr.view(torch.uint8))
    xs = torch.randn(m, k + 32, device="cuda", generator=g).to(dtype)[:, 16 : 16 + k]  # strided rows
    q, s = quantize_rows(xs)
    qr, sr = quantize_rows_reference(xs)
    assert torch.equal(s, sr) and torch.equal(q.view(torch.uint8), qr.view(torch.uint8))


def test_fused_qkv_is_the_three_projections():
    """Self-attention's q/k/v as one fp8 projection: the three keep their names as views of its buffers (no second
    copy) and compute what the fused one does; a quality measurement's swap undoes the fusion."""
    model = tiny_refiner()
    use_fp8_linears(model)
    attn = model.transformer_blocks[0].attn1
    assert isinstance(attn.to_qkv, Fp8Linear) and attn.to_qkv.out_features == 3 * attn.to_q.out_features
    assert attn.to_q.weight.data_ptr() == attn.to_qkv.weight.data_ptr()
    assert attn.to_v.weight.untyped_storage().data_ptr() == attn.to_qkv.weight.untyped_storage().data_ptr()
    assert model.transformer_blocks[0].attn2.to_qkv is None  # cross-attention: K/V from the prompt, apart
    x = torch.randn(2, 5, attn.to_q.in_features)
    fused = attn.qkv(x)
    attn.to_qkv, kept = None, attn.to_qkv
    apart = attn.qkv(x)
    attn.to_qkv = kept
    for a, b in zip(fused, apart, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_qkv_of_unequal_widths_stay_apart():
    """`Attention.qkv` splits a fused output in three equal widths: projections of other widths are not fused."""
    from engine.fast.refiner_fp8 import fuse_qkv

    attn = nn.Module()
    attn.to_q, attn.to_k, attn.to_v = (Fp8Linear.from_linear(nn.Linear(64, n)) for n in (64, 32, 32))
    attn.to_qkv = None
    parts = (attn.to_q, attn.to_k, attn.to_v)
    fuse_qkv(attn)
    assert attn.to_qkv is None and (attn.to_q, attn.to_k, attn.to_v) == parts


def test_quantiser_gelu_is_gelu_then_quantise():
    """The FFN's GELU inside the quantiser: gelu_tanh in fp32 of the input, then the same rowwise quantisation."""
    x = torch.randn(6, 96, dtype=torch.bfloat16) * 3
    q, s = quantize_rows_reference(x, "gelu_tanh")
    qr, sr = quantize_rows_reference(F.gelu(x.float(), approximate="tanh"))
    assert torch.equal(s, sr) and torch.equal(q.view(torch.uint8), qr.view(torch.uint8))
    with pytest.raises(InputError, match="gelu_tanh"):
        quantize_rows_reference(x, "relu")


@pytest.mark.gpu
@pytest.mark.parametrize("m,k", [(2640, 16384), (7, 48), (300, 4100)])
def test_triton_gelu_quantiser_close_to_reference(m, k):
    """Triton's GELU (libdevice tanh) against torch's: the same values up to an ulp, so an e4m3 rounding may flip
    (one step, 2^-3 relative) where the value sat on a tie; the scales may differ by an ulp."""
    g = torch.Generator(device="cuda").manual_seed(m)
    x = (torch.randn(m, k, device="cuda", generator=g) * 3).to(torch.bfloat16)
    q, s = quantize_rows(x, "gelu_tanh")
    qr, sr = quantize_rows_reference(x, "gelu_tanh")
    torch.testing.assert_close(s, sr, rtol=2 ** -20, atol=0)
    flips = (q.float() != qr.float()).float().mean().item()
    print(f"\ngelu quantiser {m}x{k}: {flips:.2e} of the values rounded the other way")
    assert flips < 1e-3
    assert ((q.float() - qr.float()).abs() <= qr.float().abs() * 2 ** -3 + 2 ** -9).all()


@pytest.mark.gpu
def test_triton_quantiser_keeps_nan():
    x = torch.randn(4, 256, device="cuda", dtype=torch.bfloat16)
    x[2, 100] = float("nan")
    q, s = quantize_rows(x)
    assert s[2].isnan().all() and q[2].float().isnan().all() and torch.isfinite(s[[0, 1, 3]]).all()


@pytest.mark.gpu
@pytest.mark.parametrize("fast_accum", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("lead,k,n", [((2640,), 4096, 4096), ((2640,), 4096, 16384), ((2640,), 16384, 4096),
                                      ((1, 1024), 4096, 4096), ((2, 3, 7), 64, 256), ((1,), 16, 16)])
def test_fp8_linear_cuda_vs_linear(fast_accum, dtype, lead, k, n):
    g = torch.Generator(device="cuda").manual_seed(k + n)
    lin = nn.Linear(k, n, device="cuda", dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, device="cuda", generator=g) / math.sqrt(k))
        lin.bias.copy_(torch.randn(n, device="cuda", generator=g) * 0.1)
    fp8 = Fp8Linear.from_linear(lin, fast_accum=fast_accum)
    x = torch.randn(*lead, k, device="cuda", generator=g).to(dtype)
    y = fp8(x)
    assert y.shape == (*lead, n) and y.dtype == dtype and torch.isfinite(y).all()
    want = torch.nn.functional.linear(x.double(), lin.weight.double(), lin.bias.double())
    r = gpu_rel_and_print(f"Fp8Linear {dtype} {lead}x{k}->{n} fast_accum={fast_accum} vs fp64 linear", y, want,
                          GEMM_REL_TOL)
    r16 = rel_err(lin(x), want)
    print(f"  (the {dtype} nn.Linear itself: {r16:.3e})")
    assert GEMM_REL_FLOOR < r < GEMM_REL_TOL
    # _scaled_mm against the exact (fp64) product of the same quantised operands: what differs is the output
    # rounding (under eps of the output dtype) and Hopper's fp8 tensor-core accumulator, which keeps fewer bits
    # than fp32 between promotions to fp32 (seen ~1.3e-4) and, with fast_accum, never promotes (seen ~3e-3 at
    # K = 16384)
    qa, sa = quantize_rows_reference(x.reshape(-1, k))
    exact = (qa.double() @ fp8.weight.double().t()) * sa.double() * fp8.weight_scale.double() + fp8.bias.double()
    assert rel_err(scaled_mm_emulated(qa, sa, fp8.weight, fp8.weight_scale, fp8.bias, torch.float32), exact) < 1e-5
    emu = exact.reshape(y.shape)
    tol = torch.finfo(dtype).eps + (5e-3 if fast_accum else 2.5e-4)
    assert gpu_rel_and_print("  _scaled_mm vs exact product of the e4m3 operands", y, emu, tol) <= tol


@pytest.mark.gpu
def test_tiny_refiner_forward_fp8_vs_bf16():
    from engine.bench import build_bench_world

    world = build_bench_world("tiny", device="cuda", dtype=torch.bfloat16, seed=4)
    model = world.refiner
    latents, embeds, mask = refiner_inputs(model, device="cuda", hw=(12, 20), prompt_len=32)
    pos = torch.arange(11, 14)
    want = model(latents, 0.725, model.prepare_text(embeds, mask), fps=16.0, frame_positions=pos)
    ref32 = tiny_refiner(torch.float32, "cuda")
    ref32.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    want32 = ref32(latents.float(), 0.725, ref32.prepare_text(embeds.float(), mask), fps=16.0, frame_positions=pos)
    rep = fp8_quality_delta(model, latents, 0.725, embeds, mask, fps=16.0, frame_positions=pos)
    assert use_fp8_linears(model) == len(BLOCK_LINEARS) * model.num_layers
    got = model(latents, 0.725, model.prepare_text(embeds, mask), fps=16.0, frame_positions=pos)
    print(f"tiny refiner: bf16 vs fp32 {rel_err(want, want32):.3e}; fp8 vs fp32 {rel_err(got, want32):.3e}; "
          f"report {rep}")
    # the fp8 forward of the report is this forward (same kernels, same order)
    assert abs(rel_err(got, want) - rep["forward_rel_err"]) <= 1e-3
    # 2 blocks x 5 chained GEMMs, each ~2.5e-2 off, through residuals and norms (CPU emulation: same order)
    assert GEMM_REL_FLOOR < rel_err(got, want) < 0.1 and torch.isfinite(got).all()


@pytest.mark.gpu
def test_fp8_refiner_under_cuda_graphs_equals_eager():
    from engine.bench import build_bench_world
    from engine.fast.refiner_graph import GraphedRefinerModel

    world = build_bench_world("tiny", device="cuda", dtype=torch.bfloat16, seed=5)
    assert use_fp8_linears(world.refiner) > 0
    ar = world.preset.ar
    s = world.vae.config.spatial_scale
    h, w = world.preset.pixel_hw[0] // s, world.preset.pixel_hw[1] // s
    blocks = 8  # the window is full from block 4: graphs captured then replayed from there on
    g = torch.Generator(device="cuda").manual_seed(9)
    z = torch.randn(1, world.refiner.cfg.in_channels, ar.sink_size + ar.block_size * blocks, h, w, device="cuda",
                    generator=g).to(torch.bfloat16)
    noises = [torch.randn(1, z.shape[1], ar.block_size, h, w, device="cuda", generator=g).to(torch.bfloat16)
              for _ in range(blocks)]
    remb = world.text.refiner.encode("a street")
    embeds, mask = remb.embeds.to("cuda", torch.bfloat16), remb.mask.to("cuda")
    eager = ARRefiner(world.refiner, ar).refine_video(z, embeds, mask, noises=noises)
    graphed_model = GraphedRefinerModel(world.refiner)
    graphed = ARRefiner(graphed_model, ar).refine_video(z, embeds, mask, noises=noises)
    print(f"fp8 refiner graphed vs eager: rel err {rel_err(graphed, eager):.3e}, replays {graphed_model.replays}")
    # two graphs: the denoising steps and the K/V-only capture pass (a key of its own)
    assert graphed_model.replays > 0 and len(graphed_model.graphs) == 2
    assert torch.isfinite(graphed).all()
    assert rel_err(graphed, eager) <= 1e-6  # same kernels on the same data: replay == eager
