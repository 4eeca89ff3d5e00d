"""The fused depthwise 3x3 conv + bias + GLU (kernels/dwconv_glu.py) and the `stage1-ffn` fast path built on it.

CPU: the reference equals the plain FFN's math (the model's depthwise conv on the NCHW layout, chunk, SiLU gate);
the restructured FFN (`Stage1Transformer.ffn_ops`: token-major GEMMs around the op) equals the plain one in fp32 in
the bidirectional and the streaming (cache-write) forwards, with the reference as the op; switching the op on in a
pipeline whose stage-1 CUDA graphs are already captured makes them recaptured (CUDA graph API emulated on the CPU).

Interpreter (TRITON_INTERPRET=1 with Triton installed): the kernel against the reference at small odd shapes (Hd
not a multiple of the channel block, several row / column / channel blocks), both SiLU modes, both shift modes,
fp32 and bf16, non-contiguous inputs, fresh buffers poisoned with NaN.

GPU (`-m gpu -s` prints the errors): the kernel against the reference at odd and release shapes, under CUDA-graph
capture, inside torch.compile; the release-size FFN module and the tiny model, fused vs plain, fp32 and bf16; the
live loop with `stage1-graph` (+ `stage1-compile`) and `stage1-ffn`, switched on before and after the captures.

Tolerances (error relative to the output's max |value|): fp32 outputs 2e-6 (nine taps and SiLU summed in another
order: a few fp32 roundings). bf16 outputs are compared with the fp32 reference of the same (bf16) inputs: the
kernel computes in fp32 and rounds once, so each element may be off by half a bf16 ulp, at most 2^-8 of its own
magnitude (a whole ulp, 2^-7, in Triton's interpreter, which truncates), plus the fp32 slack. The "tanh" SiLU
math adds what tanh.approx's documented error can move each output (`tanh_silu_bound`); "rcp" has none beyond fp32.
"""

import itertools
import shutil

import pytest
import torch
import torch.nn.functional as F

from kernels import dwconv_glu as dg
from kernels import interpreter_usable, interpreting

F32, BF16 = torch.float32, torch.bfloat16
FP32_TOL = 2e-6
# a bf16 output's error relative to its own magnitude: half an ulp (round to nearest); Triton's CPU interpreter
# truncates fp32 -> bf16 instead (whatever the kernel asks for), a whole ulp
BF16_ROUNDING = 2.0 ** -7 if interpreting() else 2.0 ** -8
LAYOUTS = ("contiguous", "sliced", "transposed", "channel-strided")


def make_inputs(Fr, h, w, Hd, dtype=F32, device="cpu", layout="contiguous", seed=0, conv_weight=True):
    """y `[Fr, h, w, 2Hd]` in a layout: "contiguous"; "sliced" (the channels of a wider tensor, as the model's GEMM
    output would be with padding); "transposed" (w-major frames); "channel-strided" (channel stride 2). weight
    `[2Hd, 1, 3, 3]` (the conv's; `[2Hd, 3, 3]` without conv_weight), bias `[2Hd]`. Values in the model's range."""
    g = torch.Generator().manual_seed(seed)
    C2 = 2 * Hd
    shape = {"sliced": (Fr, h, w, C2 + 6), "transposed": (Fr, w, h, C2), "channel-strided": (Fr, h, w, C2, 2)}
    base = (torch.randn(shape.get(layout, (Fr, h, w, C2)), generator=g) * 1.5).to(device=device, dtype=dtype)
    y = {"sliced": lambda: base[..., 3:3 + C2], "transposed": lambda: base.transpose(1, 2),
         "channel-strided": lambda: base[..., 0]}.get(layout, lambda: base)()  # views: the layout survives
    weight = torch.randn(C2, 1, 3, 3, generator=g) / 3
    bias = 0.3 * torch.randn(C2, generator=g)
    weight = weight if conv_weight else weight[:, 0]
    return y, weight.to(device=device, dtype=dtype), bias.to(device=device, dtype=dtype)


def error(out: torch.Tensor, y, weight, bias, silu_input: bool, math: str = "div") -> float:
    """Max |out - reference| relative to the reference's max, the reference computed in fp32 from the same inputs;
    asserts the per-element bound of out's dtype (module docstring), plus `tanh_silu_bound` for math "tanh"."""
    assert out.shape == y.shape[:-1] + (y.shape[-1] // 2,) and out.dtype == y.dtype and out.is_contiguous()
    assert torch.isfinite(out).all(), "non-finite output (an unwritten element of a NaN-poisoned buffer?)"
    ref = dg.dwconv_glu_reference(y.float(), weight.float(), bias.float(), silu_input=silu_input).double()
    diff = (out.double() - ref).abs()
    scale = ref.abs().max().clamp_min(1e-30)
    bound = FP32_TOL * scale + (0 if out.dtype == F32 else BF16_ROUNDING * ref.abs())
    if math == "tanh":
        bound = bound + tanh_silu_bound(y, weight, bias, silu_input)
    assert (diff <= bound).all(), (diff - bound).max().item() / scale.item()
    return (diff.max() / scale).item()


TANH_REL = 2.0 ** -10.9  # tanh.approx.f32's maximum relative error (PTX ISA), rounded up


def tanh_silu_bound(y, weight, bias, silu_input: bool) -> torch.Tensor:
    """How far the "tanh" SiLU may move each output, from tanh.approx's error bound: silu(x) = x (1 + tanh(x/2)) / 2
    is off by at most e(x) = |x| TANH_REL / 2. So the conv's val and gate halves u_v, u_g are off by at most
    E = |w| * e(y) (the depthwise conv of the errors, when SiLU is applied on load; 0 otherwise), and
    out = u_v silu(u_g) by at most E_v |silu(u_g)| + (|u_v| + E_v) (1.1 E_g + e(|u_g| + E_g)) (|silu'| < 1.1)."""
    x = y.double().permute(0, 3, 1, 2)
    taps = weight.double().reshape(-1, 1, 3, 3)
    u = F.conv2d(F.silu(x) if silu_input else x, taps, bias.double(), padding=1, groups=x.shape[1])
    e_in = x.abs() * TANH_REL / 2 if silu_input else torch.zeros_like(x)
    E = F.conv2d(e_in, taps.abs(), padding=1, groups=x.shape[1])
    (u_v, u_g), (E_v, E_g) = u.chunk(2, dim=1), E.chunk(2, dim=1)
    out = E_v * F.silu(u_g).abs() + (u_v.abs() + E_v) * (1.1 * E_g + (u_g.abs() + E_g) * TANH_REL / 2)
    return out.permute(0, 2, 3, 1)


# CPU: the reference and the restructured FFN -------------------------------------------------------------------


def tiny_config():
    from engine.presets import get_preset

    return get_preset("tiny").stage1


@pytest.mark.parametrize("Fr,h,w,Hd", [(2, 5, 7, 20), (1, 1, 1, 3), (3, 4, 9, 11), (1, 6, 10, 672)])
def test_reference_equals_the_plain_ffn_math(Fr, h, w, Hd):
    """The model's own depthwise conv on the permuted (NCHW) layout, then chunk and the SiLU gate."""
    from engine.stage1.model import ConvLayer

    depth_conv = ConvLayer(2 * Hd, 2 * Hd, 3, groups=2 * Hd)  # GLUMBConvTemp's
    y, weight, bias = make_inputs(Fr, h, w, Hd, layout="sliced", seed=Hd)
    with torch.no_grad():
        depth_conv.conv.weight.copy_(weight)
        depth_conv.conv.bias.copy_(bias)
        for silu_input in (True, False):
            u = y.permute(0, 3, 1, 2)
            u = depth_conv.conv(F.silu(u) if silu_input else u)
            val, gate = u.chunk(2, dim=1)
            want = (val * F.silu(gate)).permute(0, 2, 3, 1)
            got = dg.dwconv_glu_reference(y, weight, bias, silu_input=silu_input)
            assert got.shape == (Fr, h, w, Hd)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(dg.dwconv_glu_reference(y, weight[:, 0], bias, silu_input=silu_input), got,
                                       rtol=0, atol=0)  # the [2Hd, 3, 3] weight form


def test_the_tolerance_catches_a_flipped_tap():
    """A kernel that read a tap mirrored (dx or dy), dropped the bias or the input SiLU fails `error`."""
    y, weight, bias = make_inputs(2, 5, 7, 20)
    good = dg.dwconv_glu_reference(y, weight, bias, silu_input=True)
    error(good, y, weight, bias, True)
    for wrong in (dg.dwconv_glu_reference(y, weight.flip(-1), bias, silu_input=True),
                  dg.dwconv_glu_reference(y, weight.flip(-2), bias, silu_input=True),
                  dg.dwconv_glu_reference(y, weight, bias * 0, silu_input=True),
                  dg.dwconv_glu_reference(y, weight, bias, silu_input=False)):
        with pytest.raises(AssertionError):
            error(wrong, y, weight, bias, True)
    with pytest.raises(AssertionError):
        error(good.bfloat16().float(), y, weight, bias, True)  # bf16 rounding is not fp32-accurate


def test_bad_inputs_are_refused():
    y, weight, bias = make_inputs(1, 3, 4, 5)
    for fn in (dg.dwconv_glu_reference, dg.dwconv_glu_triton):
        with pytest.raises(dg.DwConvGluError, match=r"weight \(10, 1, 3\)"):
            fn(y, weight[..., 0], bias, silu_input=True)
        with pytest.raises(dg.DwConvGluError, match=r"bias \(9,\)"):
            fn(y, weight, bias[:9], silu_input=True)
        with pytest.raises(dg.DwConvGluError, match=r"y \(1, 3, 4, 9\).*even channel count"):
            fn(y[..., :9], weight[:9], bias[:9], silu_input=True)
        with pytest.raises(dg.DwConvGluError, match=r"y \(12, 10\)"):
            fn(y.reshape(12, 10), weight, bias, silu_input=True)


@pytest.mark.skipif(interpreting(), reason="the interpreter runs CPU tensors")
def test_cpu_tensors_are_refused():
    y, weight, bias = make_inputs(1, 3, 4, 5)
    with pytest.raises(dg.DwConvGluError, match="Triton is not installed|need CUDA tensors"):
        dg.dwconv_glu_triton(y, weight, bias, silu_input=True)
    with pytest.raises(dg.DwConvGluError, match="Triton is not installed|need CUDA tensors"):
        dg.launch_with_config(y, weight, bias, silu_input=True, BLOCK_C=16)


class CountingOp:
    """An FFN op (the reference, or another) that counts its calls: proves the fused path ran."""

    def __init__(self, fn=dg.dwconv_glu_reference) -> None:
        self.fn, self.calls = fn, 0

    def __call__(self, y, weight, bias, *, silu_input):
        assert silu_input and y.shape[-1] == weight.shape[0]
        self.calls += 1
        return self.fn(y, weight, bias, silu_input=silu_input)


COUNTED = {"calls": 0}


@torch.library.custom_op("sana_wm_test::counted_dwconv_glu", mutates_args=())
def _counted_dwconv_glu(y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, silu_input: bool) -> torch.Tensor:
    COUNTED["calls"] += 1
    return dg.dwconv_glu_reference(y, weight, bias, silu_input=silu_input).contiguous()


@_counted_dwconv_glu.register_fake
def _(y, weight, bias, silu_input):
    return y.new_empty(*y.shape[:-1], y.shape[-1] // 2)


def counted_dwconv_glu(y, weight, bias, *, silu_input):
    """The reference as an op opaque to dynamo that counts its executions, compiled blocks included. (A
    `torch.compiler.disable`d callable would count too, but dynamo does not guard `ctx.ffn is None` on one: the
    compiled block would then call it even after the switch back to None.)"""
    return _counted_dwconv_glu(y, weight, bias, silu_input)


def tiny_model(seed=0, device="cpu", dtype=F32):
    from engine.stage1.model import Stage1Transformer
    from tests.test_stage1_parity import random_weights_

    model = Stage1Transformer(tiny_config()).eval()
    state = model.state_dict()
    random_weights_(state, seed)
    model.load_state_dict(state)
    return model.to(device=device, dtype=dtype)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


@torch.no_grad()
def test_fused_ffn_equals_plain_forward():
    """Bidirectional forward, odd grid (5 x 7), B = 2: the token-major restructure (F.linear for the 1x1 convs, the
    op on the GEMM output viewed per frame) is the plain FFN's math."""
    from tests.test_stage1_streaming import clip

    model = tiny_model()
    x, t, cam, pl, y, mask = clip(model, 3, h=5, w=7, B=2)
    plain = model(x, t, y, mask, cam, pl)
    model.ffn_ops = op = CountingOp()
    fused = model(x, t, y, mask, cam, pl)
    assert op.calls == model.config.num_layers
    err = rel(fused, plain)
    print(f"tiny model, fp32, fused FFN (reference op) vs plain: max rel err {err:.2e}")
    assert err <= 1e-5
    model.ffn_ops = CountingOp(lambda y, w, b, silu_input: dg.dwconv_glu_reference(y, w.flip(-1), b,
                                                                                   silu_input=silu_input))
    assert rel(model(x, t, y, mask, cam, pl), plain) > 1e-3  # the comparison can fail: a mirrored tap shows


@torch.no_grad()
def test_fused_ffn_equals_plain_streaming():
    """Chunks through the cache (a noise pass and the cache-write pass each): the same outputs and caches (the FFN
    tail the next chunk's temporal conv reads included)."""
    from engine.stage1.cache import Stage1Cache
    from tests.test_stage1_streaming import clip, stream_chunks

    model = tiny_model(seed=1)
    counts = [4, 3, 3]
    x, t, cam, pl, y, mask = clip(model, sum(counts), h=3, w=5)
    text = model.encode_text(y, mask)
    caches, outs = [], []
    for op in (None, CountingOp()):
        model.ffn_ops = op
        cache = Stage1Cache(model.config, 1, 3, 5)
        outs.append(stream_chunks(model, cache, text, x, t, cam, pl, counts))
        caches.append(cache)
    assert op.calls == 2 * len(counts) * model.config.num_layers
    err = rel(outs[1], outs[0])
    print(f"tiny model streaming, fp32, fused FFN (reference op) vs plain: max rel err {err:.2e}")
    assert err <= 1e-5
    for a, b in zip(caches[1].blocks, caches[0].blocks, strict=True):
        for name, buf in b.buffers().items():
            assert rel(a.buffers()[name], buf) <= 1e-5 or buf.abs().max() == 0, name
    assert caches[1].frames_written == caches[0].frames_written == sum(counts)


needs_cc = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("cc") is None,
                              reason="inductor's CPU backend needs a C++ compiler")


@pytest.mark.parametrize("compiled", [pytest.param(False, id="eager-blocks"),
                                      pytest.param(True, id="compiled-blocks", marks=needs_cc)])
def test_graph_runner_recaptures_after_the_switch(compiled, monkeypatch):
    """`set_ffn_ops` on a pipeline whose stage-1 graphs are captured: the graphs are dropped, each kind runs
    eagerly once (on the new op; compiled blocks recompile there, never inside a capture) and is captured again.
    The emulated replays run nothing, so without the drop the op would never be called."""
    from torch._dynamo.utils import counters

    from engine.bench import build_bench_world, first_image, scripted_controls
    from engine.fast import stage1_graph
    from engine.fast.stage1_compile import compiled_block_fn
    from engine.fast.stage1_ffn import set_ffn_ops
    from engine.rollout import Rollout
    from engine.world import WorldPipeline
    from tests.test_graph_capture_cpu import CpuRunner, fake_cuda

    captures = []  # dynamo's count of compiled graphs at the start and the end of each capture
    fake_cuda(monkeypatch, captures)
    monkeypatch.setattr(stage1_graph, "Stage1GraphRunner", CpuRunner)
    world = build_bench_world("tiny", device="cpu", dtype=F32, seed=2, with_refiner=False)
    pipe = WorldPipeline(world)
    pipe.stream = stage1_graph.GraphedStage1Stream.from_stream(pipe.stream)
    runner = pipe.stream.runner
    if compiled:
        runner.block_fn = compiled_block_fn()
    pipe.start(first_image(world.preset, 0), "a street", "preview")
    ro = Rollout(pipe, scripted_controls(10), intrinsics_px=world.preset.default_intrinsics, quality="preview")
    chunks = ro.chunks(10)

    def take():  # a chunk and its deferred cache pass, as the live server runs them
        next(chunks)
        ro.finish_chunk()

    for _ in range(4):
        take()
    assert len(runner.graphs) == 2 and runner.replays > 0  # the steady read and write passes, plain FFN
    assert "dropped" in set_ffn_ops(pipe, counted_dwconv_glu)
    assert world.stage1.ffn_ops is counted_dwconv_glu and not runner.graphs and not runner.seen
    compiles, calls, replays = counters["stats"]["unique_graphs"], COUNTED["calls"], runner.replays
    layers = world.stage1.config.num_layers
    op_calls = lambda: COUNTED["calls"] - calls
    take()  # read pass 1 and the write pass eager (first sight); pass 2 warms the capture stream, is captured
    assert op_calls() == 4 * layers and len(runner.graphs) == 1 and runner.replays == replays + 3  # reads 2-4
    take()  # the write pass captured, all five replayed
    assert op_calls() == 5 * layers and len(runner.graphs) == 2 and runner.replays == replays + 8
    take()
    assert op_calls() == 5 * layers and runner.replays == replays + 13
    assert all(a == b for a, b in zip(captures[::2], captures[1::2], strict=True))  # nothing compiled in a capture
    assert (counters["stats"]["unique_graphs"] > compiles) == compiled  # the switch made the blocks recompile
    assert "dropped" in set_ffn_ops(pipe, None)
    assert world.stage1.ffn_ops is None and "dropped" not in set_ffn_ops(pipe, None)
    calls = COUNTED["calls"]
    take()  # back on the plain FFN: eager first sights, then captures; the (compiled) blocks never call the op
    take()
    assert COUNTED["calls"] == calls and len(runner.graphs) == 2


def emulated_tanh_kernel(y, weight, bias, silu_input: bool, sign: float) -> torch.Tensor:
    """The "tanh" math's outputs with tanh.approx's worst error, TANH_REL relative, in direction `sign` (the one
    kernels/dwconv_glu.py computes on a GPU), in float64."""
    def silu_t(x):
        return x * (0.5 + 0.5 * torch.tanh(x / 2) * (1 + sign * TANH_REL))

    x = y.double().permute(0, 3, 1, 2)
    x = silu_t(x) if silu_input else x
    u = F.conv2d(x, weight.double().reshape(-1, 1, 3, 3), bias.double(), padding=1, groups=x.shape[1])
    val, gate = u.chunk(2, dim=1)
    return (val * silu_t(gate)).permute(0, 2, 3, 1)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_tanh_bound_covers_the_worst_tanh_error(sign):
    """tanh_silu_bound (the GPU test's allowance for the "tanh" math) covers the error it claims to; without it the
    fp32 bound fails: the allowance is needed and not vacuous."""
    y, weight, bias = make_inputs(2, 6, 9, 24, seed=3)
    ref = dg.dwconv_glu_reference(y, weight, bias, silu_input=True).double()
    diff = (emulated_tanh_kernel(y, weight, bias, True, sign) - ref).abs()
    assert (diff <= tanh_silu_bound(y, weight, bias, True) + FP32_TOL * ref.abs().max()).all()
    assert diff.max() > FP32_TOL * ref.abs().max()


# Interpreter ------------------------------------------------------------------------------------------------------


interpreter = pytest.mark.skipif(not interpreter_usable(), reason="needs Triton and TRITON_INTERPRET=1 (Triton's "
                                 "CPU interpreter), with numpy < 2.4 for Triton <= 3.6")
# the default config (one block of columns, channels and rows at these shapes) and small tiles (several of each:
# row blocks read their halo rows, column blocks their halo columns, the last channel block is partial)
CONFIGS = [pytest.param({}, id="default"), pytest.param(dict(BLOCK_W=4, BLOCK_C=8, ROWS=2), id="small-tiles")]


@interpreter
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("shift", dg.SHIFTS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_interpreter_matches_reference(dtype, layout, shift, config, poison_cpu):
    y, weight, bias = make_inputs(2, 5, 7, 20, dtype, layout=layout, conv_weight=layout != "transposed")
    assert y.is_contiguous() == (layout == "contiguous")
    for silu_input in (True, False):
        out = dg.launch_with_config(y, weight, bias, silu_input=silu_input, SHIFT=shift, **config)
        err = error(out, y, weight, bias, silu_input)
        print(f"interpreter {shift} {config} {layout} {dtype} silu_input={silu_input}: max rel err {err:.2e}")


@interpreter
@pytest.mark.parametrize("Fr,h,w,Hd", [(1, 1, 1, 3), (3, 2, 9, 5), (1, 9, 2, 17)])
def test_interpreter_custom_op_at_edge_shapes(Fr, h, w, Hd, poison_cpu):
    """The public op (default config): one pixel, a row narrower than the column tile, one column."""
    y, weight, bias = make_inputs(Fr, h, w, Hd, seed=h * w)
    for silu_input in (True, False):
        error(dg.dwconv_glu_triton(y, weight, bias, silu_input=silu_input), y, weight, bias, silu_input)
    assert dg.dwconv_glu_triton(y[:0], weight, bias, silu_input=True).shape == (0, h, w, Hd)


@interpreter
def test_interpreter_refuses_bad_settings():
    y, weight, bias = make_inputs(1, 3, 4, 5)
    with pytest.raises(dg.DwConvGluError, match=r"\['BLOCK_S'\] are not settings"):
        dg.launch_with_config(y, weight, bias, silu_input=True, BLOCK_S=16)
    with pytest.raises(dg.DwConvGluError, match="SHIFT 'roll'"):
        dg.launch_with_config(y, weight, bias, silu_input=True, SHIFT="roll")
    with pytest.raises(dg.DwConvGluError, match="BLOCK_C 24"):
        dg.launch_with_config(y, weight, bias, silu_input=True, BLOCK_C=24)
    with pytest.raises(dg.DwConvGluError, match="BLOCK_W 2"):
        dg.launch_with_config(y, weight, bias, silu_input=True, SHIFT="gather", BLOCK_W=2)
    with pytest.raises(dg.DwConvGluError, match=r"SILU_MATH 'fast'; accepted: \('div', 'rcp', 'tanh'\)"):
        dg.launch_with_config(y, weight, bias, silu_input=True, SILU_MATH="fast")


@interpreter
def test_interpreter_runs_every_silu_math_as_div():
    """The interpreter runs no PTX: the inline-assembly maths are accepted and run as "div" (their GPU test is
    test_kernel_matches_reference)."""
    y, weight, bias = make_inputs(2, 5, 7, 20)
    outs = [dg.launch_with_config(y, weight, bias, silu_input=True, SILU_MATH=m) for m in dg.SILU_MATHS]
    assert all(torch.equal(o, outs[0]) for o in outs[1:])


def test_column_tiles_avoid_padding():
    assert dg._block_w(40, "load") == 8  # the release width: 5 tiles, no padding lanes
    assert dg._block_w(40, "gather") == 16  # 3 tiles of 14 output columns: 48 lanes for 40 columns
    assert dg._block_w(7, "load") == 8 and dg._block_w(80, "load") == 16


# GPU --------------------------------------------------------------------------------------------------------------


RELEASE = (3, 22, 40, 6720)  # frames, h, w, Hd (2Hd = 13440)
GPU_SHAPES = {"release": RELEASE, "odd": (2, 5, 7, 20), "pixel": (1, 1, 1, 3), "wide": (4, 13, 33, 100),
              "tall": (1, 70, 3, 70)}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", list(GPU_SHAPES))
def test_kernel_matches_reference(shape, dtype, poison_cuda):
    """Every shift mode and SiLU math, the default and small tiles, both SiLU modes, a contiguous and a sliced
    input."""
    Fr, h, w, Hd = GPU_SHAPES[shape]
    for layout in ("contiguous", "sliced"):
        y, weight, bias = make_inputs(Fr, h, w, Hd, dtype, "cuda", layout=layout)
        for silu_input in (True, False):
            errs = {"op": error(dg.dwconv_glu_triton(y, weight, bias, silu_input=silu_input), y, weight, bias,
                                silu_input, dg.default_silu_math(dtype))}
            for shift, math in itertools.product(dg.SHIFTS, dg.SILU_MATHS):
                for name, cfg in (("default", {}), ("small", dict(BLOCK_W=8, BLOCK_C=16, ROWS=4))):
                    out = dg.launch_with_config(y, weight, bias, silu_input=silu_input, SHIFT=shift,
                                                SILU_MATH=math, **cfg)
                    errs[f"{shift}-{math}-{name}"] = error(out, y, weight, bias, silu_input, math)
            print(f"{shape} {layout} {dtype} silu_input={silu_input}: max rel err "
                  + " ".join(f"{k} {v:.2e}" for k, v in errs.items()))


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay():
    """torch.empty + one launch, no sync: capture at the release shape, replay on new inputs, compare with eager."""
    y, weight, bias = make_inputs(*RELEASE, BF16, "cuda")
    static = y.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        dg.dwconv_glu_triton(static, weight, bias, silu_input=True)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed = dg.dwconv_glu_triton(static, weight, bias, silu_input=True)
    static.copy_(make_inputs(*RELEASE, BF16, "cuda", seed=5)[0])
    graph.replay()
    assert torch.equal(graphed, dg.dwconv_glu_triton(static, weight, bias, silu_input=True))
    err = error(graphed, static, weight, bias, True, dg.default_silu_math(BF16))
    print(f"graph replay at the release shape: max rel err {err:.2e}")


@pytest.mark.gpu
def test_torch_compile_sees_an_opaque_op():
    """fullgraph=True fails on any graph break: dynamo must treat the kernel as a custom op."""
    y, weight, bias = make_inputs(2, 5, 7, 20, BF16, "cuda")

    def f(y):
        return dg.dwconv_glu_triton(y * 2, weight, bias, silu_input=True).float().sum(-1)

    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(y), f(y), rtol=0, atol=0)


def module_ctx(T, h, w, ffn):
    """The frame context the FFN reads (frames, grid, one segment, no cache write, the op); no attention parts."""
    from engine.stage1.temporal import FrameContext, streaming_mode

    empty = torch.empty(0)
    return FrameContext(frames=T, height=h, width=w, segments=((0, T),), rope=empty, cam_rope=empty, P=empty,
                        P_inv=empty, mode=streaming_mode(112), ffn=ffn)


@pytest.mark.gpu
@torch.no_grad()
def test_release_ffn_module_fused_vs_plain():
    """One release-size FFN (C = 2240, Hd = 6720, 3 frames of 22 x 40): fused vs plain in fp32 (the same math:
    GEMMs and the conv in another order), and in bf16 both against the fp32 module: the fused path rounds once
    where the plain one rounds after each pass, so it must not be less accurate (1.5x slack for the GEMMs)."""
    from engine.stage1.config import Stage1Config
    from engine.stage1.model import GLUMBConvTemp

    T, h, w = 3, 22, 40
    torch.manual_seed(0)
    mlp = GLUMBConvTemp(Stage1Config()).cuda()
    m = torch.randn(1, T * h * w, mlp.t_conv.in_channels, device="cuda")
    ref = mlp(m, module_ctx(T, h, w, None))
    fused32 = mlp(m, module_ctx(T, h, w, dg.dwconv_glu_triton))
    err32 = rel(fused32, ref)
    mlp16, m16 = mlp.to(BF16), m.to(BF16)
    plain16 = rel(mlp16(m16, module_ctx(T, h, w, None)), ref)
    fused16 = rel(mlp16(m16, module_ctx(T, h, w, dg.dwconv_glu_triton)), ref)
    print(f"release FFN module: fp32 fused vs plain {err32:.2e}; bf16 vs fp32: plain {plain16:.2e}, "
          f"fused {fused16:.2e}")
    assert err32 <= 1e-5
    assert fused16 <= 1.5 * plain16


@pytest.mark.gpu
@torch.no_grad()
@pytest.mark.parametrize("dtype,tol", [(F32, 1e-5), (BF16, None)], ids=["fp32", "bf16"])
def test_tiny_model_fused_vs_plain(dtype, tol):
    """The tiny model's bidirectional forward with the Triton op vs plain; bf16: both against fp32, the fused one
    not less accurate (1.5x slack)."""
    from tests.test_stage1_streaming import clip

    model = tiny_model(device="cuda")
    inputs = [a.cuda() for a in clip(model, 4, h=6, w=10, B=1)]
    x, t, cam, pl, y, mask = inputs
    ref = model(x, t, y, mask, cam, pl)
    model = model.to(dtype)
    plain = model(x, t, y, mask, cam, pl)
    model.ffn_ops = CountingOp(dg.dwconv_glu_triton)
    fused = model(x, t, y, mask, cam, pl)
    assert model.ffn_ops.calls == model.config.num_layers
    e_plain, e_fused = rel(plain, ref), rel(fused, ref)
    print(f"tiny model {dtype}: vs fp32 plain: plain {e_plain:.2e}, fused {e_fused:.2e}; fused vs plain "
          f"{rel(fused, plain):.2e}")
    if tol is not None:
        assert rel(fused, plain) <= tol
    else:
        assert e_fused <= 1.5 * e_plain


@pytest.mark.gpu
@pytest.mark.parametrize("names,switch_after,dtype,tol", [
    (("stage1-graph", "stage1-ffn"), None, F32, 1e-4),
    (("stage1-graph", "stage1-compile", "stage1-ffn"), None, F32, 1e-4),
    (("stage1-graph", "stage1-ffn"), None, BF16, 2e-2),
    (("stage1-graph",), 4, F32, 1e-4),
    (("stage1-graph", "stage1-compile"), 4, F32, 1e-4),
], ids=["graph", "graph-compile", "graph-bf16", "switched-after-capture", "compiled-switched-after-capture"])
def test_live_loop_with_stage1_ffn(names, switch_after, dtype, tol):
    """The live loop (tiny, preview, 7 chunks) with `stage1-ffn` against the plain path: switched on with the
    graphs (and the compiled blocks), or after chunk `switch_after`, when the graphs are captured and replayed on the
    plain FFN. Then the chunks after the switch must differ from a run without the switch (at fp32 by rounding
    only): replaying the old graphs would give them bit for bit."""
    from engine.bench import build_bench_world, first_image, scripted_controls
    from engine.fast import apply_fast_paths
    from engine.rollout import Rollout
    from engine.world import WorldPipeline
    from tests.test_fast_paths_gpu import CHUNKS, compare, rollout

    world = build_bench_world("tiny", device="cuda", dtype=dtype, seed=1, with_refiner=False)
    _, _, plain, snap_plain = rollout(world, (), "preview")
    try:
        pipe = WorldPipeline(world)
        applied = apply_fast_paths(pipe, names)
        pipe.start(first_image(world.preset, 0), "a street", "preview")
        ro = Rollout(pipe, scripted_controls(CHUNKS), intrinsics_px=world.preset.default_intrinsics, seed=3,
                     quality="preview")
        fast = []
        for i, chunk in enumerate(ro.chunks(CHUNKS)):
            fast.append(chunk)
            if i + 1 == switch_after:
                assert pipe.stream.runner.graphs and world.stage1.ffn_ops is None  # captured on the plain FFN
                applied.update(apply_fast_paths(pipe, ["stage1-ffn"]))
                assert "dropped" in applied["stage1-ffn"]
        snap_fast = pipe.snapshot()
        assert world.stage1.ffn_ops is dg.dwconv_glu_triton
        world.stage1.ffn_ops = None
        unswitched = rollout(world, names, "preview")[2] if switch_after else None
    finally:
        world.stage1.ffn_ops = None
    assert set(applied) == set(names) | {"stage1-ffn"}
    err = compare(fast, plain, snap_fast, snap_plain, "preview")
    print(f"live loop {names} switch_after={switch_after} {dtype}: max rel err {err:.2e} (tol {tol}), "
          f"{pipe.stream.runner.replays} stage-1 replays")
    assert err <= tol
    if switch_after:
        diff = max(rel(a.latents, b.latents) for a, b in zip(fast[switch_after:], unswitched[switch_after:],
                                                              strict=True))
        print(f"  chunks after the switch vs the same run unswitched: max rel diff {diff:.2e}")
        assert diff > 0
