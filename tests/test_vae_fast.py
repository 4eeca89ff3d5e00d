"""The VAE decoder fast paths (engine/fast/vae_fast.py, kernels/vae_norm.py) against the plain decoder: the
one-pass norm/pad primitive against unfused ops, each candidate's streamed decode against the plain stream and
against its own whole-sequence decode (CPU, through the reference primitive), and on CUDA the Triton kernel and
every candidate over odd shapes in fp32 and bf16 (bf16 judged by its error against an fp32 decode, next to
plain bf16's)."""

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from engine.bench import build_bench_world
from engine.fast import vae_fast
from engine.fast.vae_pad import restore_plain_pad, use_fast_reflect_pad
from engine.presets import get_preset
from engine.vae.model import Decoder, VideoVAE, depth_to_space, per_channel_rms_norm
from engine.vae.stream import StreamingDecoder
from kernels import interpreter_usable
from kernels.vae_norm import rms_silu_pad_reference, rms_silu_pad_triton

CL = torch.channels_last_3d
SWITCHES = [(n,) for n in ("channels-last", "fused-norm", "fold-pad")] + [tuple(vae_fast.CANDIDATES)]
IDS = [",".join(s) for s in SWITCHES]
BLOCKS = (2, 1, 3)  # latent frames per streamed block: a first block, a 1-frame block (context spans blocks)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def unfused(x, h=None, bias=None, norm=True, pad=True):
    v = x.float() + (0 if h is None else h.float()) + (0 if bias is None else bias.float().view(-1, 1, 1, 1))
    y = F.silu(per_channel_rms_norm(v)) if norm else v
    return (F.pad(y, (1, 1, 1, 1, 0, 0), mode="reflect") if pad else y), v


def poisoned_view(shape, layout, dtype=torch.float32, device="cpu"):
    """A NaN buffer 3 frames longer than `shape` and the view of frames 2.. that a conv input occupies."""
    big = torch.full((shape[0], shape[1], shape[2] + 3, *shape[3:]), float("nan"), dtype=dtype, device=device)
    if layout == "cl":
        big = big.contiguous(memory_format=CL)
    return big, big[:, :, 2:2 + shape[2]]


def switched(vae, names):
    return {n: vae_fast.CANDIDATES[n][0](vae) for n in names}


def tiny_vae(dtype=torch.float32, device="cpu", seed=4):
    return build_bench_world("tiny", device=device, dtype=dtype, seed=seed, with_refiner=False).vae


def stream(vae, blocks, h, w):
    d = StreamingDecoder(vae, blocks[0].shape[0], h, w)
    return [d.decode_block(b) for b in blocks]


def latent_blocks(vae, h, w, batch=1, seed=0, device="cpu", frames=BLOCKS):
    g = torch.Generator().manual_seed(seed)
    c = vae.config.latent_channels
    return [torch.randn(batch, c, n, h, w, generator=g).to(device) for n in frames]


# ------------------------------------------------------------------------------------------ CPU


@pytest.mark.parametrize("layout", ["contiguous", "cl"])
@pytest.mark.parametrize("shape", [(1, 3, 1, 2, 2), (2, 7, 2, 5, 3), (1, 300, 1, 3, 4)])
@pytest.mark.parametrize("norm,pad,with_h", [(True, True, True), (True, False, False), (False, True, True),
                                             (False, True, False)])
def test_reference_equals_unfused_ops(shape, layout, norm, pad, with_h):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g)
    x = x.contiguous(memory_format=CL) if layout == "cl" else x
    h = torch.randn(shape, generator=g) if with_h else None
    bias = torch.randn(shape[1], generator=g) if with_h else None
    out_shape = (*shape[:3], shape[3] + 2, shape[4] + 2) if pad else shape
    big, out = poisoned_view(out_shape, layout)
    res = torch.full_like(x, float("nan")) if with_h else None
    rms_silu_pad_reference(x, out, h=h, bias=bias, residual=res, norm=norm, pad=pad)
    want, v = unfused(x, h, bias, norm, pad)
    assert rel(out, want) <= 1e-6
    assert torch.isnan(big[:, :, :2]).all() and torch.isnan(big[:, :, 2 + shape[2]:]).all()
    if with_h:
        assert rel(res, v) <= 1e-7


def test_reference_rejects_bad_shapes():
    x = torch.randn(1, 4, 2, 3, 3)
    with pytest.raises(ValueError, match="expected"):
        rms_silu_pad_reference(x, torch.empty(1, 4, 2, 3, 3), pad=True)
    with pytest.raises(ValueError, match="H, W >= 2"):
        rms_silu_pad_reference(torch.randn(1, 4, 2, 1, 3), torch.empty(1, 4, 2, 3, 5), pad=True)
    with pytest.raises(ValueError, match="bias"):
        rms_silu_pad_reference(x, torch.empty(1, 4, 2, 5, 5), bias=torch.zeros(3))


def test_depth_to_space_residual_cl_equals_plain():
    g = torch.Generator().manual_seed(2)
    stride, repeats = (2, 2, 2), 4
    h = torch.randn(2, 16 * 8 // 2, 3, 5, 7, generator=g).contiguous(memory_format=CL)  # conv out: C·k/f
    x = torch.randn(2, 16, 3, 5, 7, generator=g).contiguous(memory_format=CL)
    got = vae_fast._depth_to_space_residual_cl(h, x, stride, repeats)
    want = depth_to_space(h, stride) + depth_to_space(x, stride).repeat(1, repeats, 1, 1, 1)
    assert got.is_contiguous(memory_format=CL)
    assert torch.equal(got, want)
    assert torch.equal(vae_fast._depth_to_space_residual_cl(h, None, stride, 1), depth_to_space(h, stride))


@pytest.mark.parametrize("names", SWITCHES, ids=IDS)
def test_stream_equals_plain_and_whole_cpu(names):
    vae = tiny_vae()
    h, w = 3, 5
    blocks = latent_blocks(vae, h, w)
    plain = stream(vae, blocks, h, w)
    plain_nc = vae.decode(torch.cat(blocks, 2), causal=False)
    try:
        done = switched(vae, names)
        assert all(not d.startswith("skipped") for d in done.values())
        fast = stream(vae, blocks, h, w)
        whole = vae.decode(torch.cat(blocks, 2), causal=True)
        fast_nc = vae.decode(torch.cat(blocks, 2), causal=False)
    finally:
        vae_fast.restore_plain(vae)
    assert [p.shape for p in fast] == [p.shape for p in plain]
    for a, b in zip(fast, plain, strict=True):
        assert torch.isfinite(a).all()
        assert rel(a, b) <= 1e-5
    assert rel(torch.cat(fast, 2), whole) <= 1e-5  # streamed == whole, inside the fast path
    assert rel(fast_nc, plain_nc) <= 1e-5


def test_fast_and_plain_streams_interchange_cpu():
    """The conv cache means the same in both paths: a stream may switch path between blocks, and a snapshot
    taken on one path restores on the other."""
    vae = tiny_vae()
    h, w = 3, 4
    blocks = latent_blocks(vae, h, w, frames=(2, 2, 1))
    plain = stream(vae, blocks, h, w)
    d = StreamingDecoder(vae, 1, h, w)
    out = [d.decode_block(blocks[0])]
    snap = d.snapshot()
    try:
        vae_fast.use_all(vae)
        out.append(d.decode_block(blocks[1]))
        fast_snap = d.snapshot()
        again = d.decode_block(blocks[2])
        d.restore(snap)
        assert rel(d.decode_block(blocks[1]), out[1]) == 0.0  # restore inside the fast path
    finally:
        vae_fast.restore_plain(vae)
    d.restore(fast_snap)
    out.append(d.decode_block(blocks[2]))
    assert rel(again, out[2]) <= 1e-5
    for a, b in zip(out, plain, strict=True):
        assert rel(a, b) <= 1e-5


def test_restore_plain_undoes_everything():
    vae = tiny_vae()
    h, w = 2, 3
    blocks = latent_blocks(vae, h, w, frames=(1, 2))
    before = stream(vae, blocks, h, w)
    weights = {k: v.clone() for k, v in vae.state_dict().items()}
    benchmark = torch.backends.cudnn.benchmark
    vae_fast.use_all(vae)
    assert vae.decoder.conv_in.conv.weight.is_contiguous(memory_format=CL)
    assert torch.backends.cudnn.benchmark
    vae_fast.restore_plain(vae)
    assert "forward" not in vae.decoder.__dict__ and vae_fast.OPTIONS_ATTR not in vae.decoder.__dict__
    assert all(m.weight.is_contiguous() for m in vae.decoder.modules() if isinstance(m, torch.nn.Conv3d))
    assert torch.backends.cudnn.benchmark == benchmark
    assert all(torch.equal(v, weights[k]) for k, v in vae.state_dict().items())
    after = stream(vae, blocks, h, w)
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))


def test_one_switch_off_keeps_the_others():
    vae = tiny_vae()
    vae_fast.use_channels_last(vae)
    vae_fast.use_fused_norm(vae)
    vae_fast.restore_plain_channels_last(vae)
    opts = vae.decoder.__dict__[vae_fast.OPTIONS_ATTR]
    assert (opts.channels_last, opts.fused_norm, opts.fold_pad) == (False, True, False)
    assert "forward" in vae.decoder.__dict__
    vae_fast.restore_plain_fused_norm(vae)
    assert "forward" not in vae.decoder.__dict__


@pytest.mark.parametrize("change", [{"timestep_conditioning": True}, {"decoder_inject_noise": True},
                                    {"decoder_spatial_padding_mode": "zeros"}])
def test_unsupported_decoders_stay_plain(change):
    cfg = dataclasses.replace(get_preset("tiny").vae, **change)
    vae = VideoVAE(cfg, with_encoder=False)
    for name, (on, off) in vae_fast.CANDIDATES.items():
        if name == "cudnn-benchmark":
            continue
        assert on(vae).startswith("skipped")
        assert "forward" not in vae.decoder.__dict__
        off(vae)
    assert vae.decoder.forward.__func__ is Decoder.forward


def test_bf16_error_ratio_cpu():
    """bf16 on the CPU: the all-candidates decode is no further from the fp32 decode than plain bf16 is."""
    vae32 = tiny_vae()
    vae16 = copy.deepcopy(vae32).to(torch.bfloat16)
    h, w = 3, 4
    blocks = latent_blocks(vae32, h, w, frames=(2, 2))
    ref = stream(vae32, blocks, h, w)
    plain = stream(vae16, [b.bfloat16() for b in blocks], h, w)
    try:
        vae_fast.use_all(vae16)
        fast = stream(vae16, [b.bfloat16() for b in blocks], h, w)
    finally:
        vae_fast.restore_plain(vae16)
    for f, p, r in zip(fast, plain, ref, strict=True):
        e_fast, e_plain = rel(f, r), rel(p, r)
        print(f"bf16 CPU: fast {e_fast:.2e} plain {e_plain:.2e} vs fp32")
        assert e_fast <= 1.5 * e_plain + 1e-3


# ------------------------------------------------------------------------------------------ CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "cl"])
@pytest.mark.parametrize("shape", [(1, 3, 1, 2, 2), (2, 37, 3, 7, 11), (1, 128, 2, 22, 40), (1, 300, 1, 5, 9),
                                   (1, 1024, 2, 6, 10)])
@pytest.mark.parametrize("norm,pad,with_h", [(True, True, True), (True, True, False), (True, False, False),
                                             (False, True, True), (False, True, False)])
def test_triton_equals_reference(shape, layout, dtype, norm, pad, with_h):
    triton_equals_reference(shape, layout, dtype, norm, pad, with_h, "cuda")


@pytest.mark.skipif(not interpreter_usable(), reason="needs Triton and TRITON_INTERPRET=1 (Triton's CPU "
                    "interpreter), with numpy < 2.4 for Triton <= 3.6")
@pytest.mark.parametrize("layout", ["contiguous", "cl"])
@pytest.mark.parametrize("shape", [(2, 37, 3, 7, 11), (1, 300, 1, 5, 9)])  # channels in registers / in chunks
@pytest.mark.parametrize("norm,pad,with_h", [(True, True, True), (True, False, False), (False, True, True)])
def test_interpreter_triton_equals_reference(shape, layout, norm, pad, with_h):
    """The Triton kernel in Triton's CPU interpreter (its semantics, not its GPU behaviour) against the
    reference, fp32."""
    triton_equals_reference(shape, layout, torch.float32, norm, pad, with_h, "cpu")


def triton_equals_reference(shape, layout, dtype, norm, pad, with_h, device):
    g = torch.Generator(device=device).manual_seed(3)
    x = torch.randn(shape, device=device, generator=g).to(dtype)
    x = x.contiguous(memory_format=CL) if layout == "cl" else x
    h = torch.randn(shape, device=device, generator=g).to(dtype) if with_h else None
    bias = torch.randn(shape[1], device=device, generator=g).to(dtype) if with_h else None
    out_shape = (*shape[:3], shape[3] + 2, shape[4] + 2) if pad else shape
    big_t, out_t = poisoned_view(out_shape, layout, dtype, device)
    big_r, out_r = poisoned_view(out_shape, layout, dtype, device)
    res_t = torch.full_like(x, float("nan")) if with_h else None
    res_r = torch.full_like(x, float("nan")) if with_h else None
    rms_silu_pad_triton(x, out_t, h=h, bias=bias, residual=res_t, norm=norm, pad=pad)
    rms_silu_pad_reference(x, out_r, h=h, bias=bias, residual=res_r, norm=norm, pad=pad)
    assert torch.equal(torch.isnan(big_t), torch.isnan(big_r))  # wrote exactly the view, every element of it
    tol = 1e-6 if dtype == torch.float32 else 8e-3
    assert rel(out_t, out_r) <= tol
    if with_h:
        assert rel(res_t, res_r) <= tol


@pytest.mark.gpu
@pytest.mark.parametrize("names", SWITCHES + [("vae-pad", *SWITCHES[-1])], ids=IDS + ["vae-pad+all"])
@pytest.mark.parametrize("hw", [(6, 10), (5, 7), (2, 3)])
def test_candidates_equal_plain_cuda(names, hw):
    """fp32 (TF32 off): each candidate equals plain; bf16: its error against the fp32 decode stays near plain
    bf16's. Streamed (first block, a 1-frame block, a 3-frame block) and whole decodes, batch 2."""
    h, w = hw
    vae32 = tiny_vae(device="cuda", seed=5)
    vae16 = copy.deepcopy(vae32).to(torch.bfloat16)
    blocks = latent_blocks(vae32, h, w, batch=2, seed=1, device="cuda")
    ref = stream(vae32, blocks, h, w)
    plain16 = stream(vae16, [b.bfloat16() for b in blocks], h, w)
    fast_names = [n for n in names if n != "vae-pad"]
    try:
        for vae in (vae32, vae16):
            switched(vae, fast_names)
            if "vae-pad" in names:
                use_fast_reflect_pad(vae)
        fast32 = stream(vae32, blocks, h, w)
        whole32 = vae32.decode(torch.cat(blocks, 2), causal=True)
        fast16 = stream(vae16, [b.bfloat16() for b in blocks], h, w)
    finally:
        for vae in (vae32, vae16):
            vae_fast.restore_plain(vae)
            restore_plain_pad(vae)
    e32 = max(rel(a, b) for a, b in zip(fast32, ref, strict=True))
    e_whole = rel(torch.cat(fast32, 2), whole32)
    e16 = [rel(a, b) for a, b in zip(fast16, ref, strict=True)]
    p16 = [rel(a, b) for a, b in zip(plain16, ref, strict=True)]
    print(f"{names} {hw}: fp32 vs plain {e32:.2e}, streamed vs whole {e_whole:.2e}; bf16 vs fp32 "
          f"{max(e16):.2e} (plain bf16 {max(p16):.2e})")
    assert e32 <= 1e-4 and e_whole <= 1e-4
    for a in fast16:
        assert torch.isfinite(a).all()
    for f, p in zip(e16, p16, strict=True):
        assert f <= 1.5 * p + 2e-3


@pytest.mark.gpu
def test_all_candidates_graph_replay_equals_eager():
    """The all-candidates decode of a steady block captured in a CUDA graph replays to the eager result."""
    vae = tiny_vae(dtype=torch.bfloat16, device="cuda", seed=6)
    h, w = 6, 10
    blocks = latent_blocks(vae, h, w, seed=2, device="cuda", frames=(3, 3))
    blocks = [b.bfloat16() for b in blocks]
    try:
        vae_fast.use_all(vae)
        d = StreamingDecoder(vae, 1, h, w)
        d.decode_block(blocks[0])
        snap = d.snapshot()
        eager = d.decode_block(blocks[1]).clone()
        d.restore(snap)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            d.decode_block(blocks[1])
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = d.decode_block(blocks[1])
        d.restore(snap)
        graph.replay()
        torch.cuda.synchronize()
    finally:
        vae_fast.restore_plain(vae)
    print(f"graph vs eager {rel(out, eager):.2e}")
    assert rel(out, eager) <= 1e-6
