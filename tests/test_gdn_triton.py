"""Triton scans (kernels/gdn_triton.py) against the plain references (kernels/gdn.py, kernels/camera_scan.py).

GPU tests compare every function at odd shapes (S not a multiple of the tile, T = 1..4, D = 112 padded to
128, small D, B = 2, H = 3), fp32 and bf16 inputs, non-contiguous inputs, state in/out, in each precision:
"ieee" and "tf32x3" are fp32-accurate (tolerance 2e-5 of the output's max, a few fp32 roundings summed over
S-long dot products in another order), "tf32" rounds the product inputs to 10-bit mantissas (unit roundoff
4.9e-4; tolerance 5e-3 of the max, the project's TF32 scan path is judged at 1e-2 end to end). Both sides
upcast the same inputs, so bf16 inputs need no looser tolerance. Fresh buffers are poisoned with NaN so an
element the kernel fails to write shows up. Every comparison runs for both strategies ("stream": one launch
walking the frames; "parallel": frame matrices, recurrence, readout in three launches), and the strategies are
compared with each other. A one-segment GDN block's scans are also checked as the block launches them: the one
launch (`gdn_block_triton`, bit-equal to four launches) and the phased block (`gdn_block_phases_triton`, combined
results, against the plain composition `ScanOps.block_combined`; with bf16 inputs under "tf32" its products run as
split bf16 dots, which only the GPU tests exercise). Run with `-s` to see the measured errors.

The CPU tests check that the module imports without Triton and that the Triton path refuses CPU tensors
with a clear error; with TRITON_INTERPRET=1 (and Triton installed) the kernels of both strategies run on CPU
tensors in Triton's interpreter at small shapes, with torch.empty poisoned with NaN.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels import gdn_triton as gt
from kernels import interpreter_usable
from kernels.camera_scan import camera_scan_backward, camera_scan_forward
from kernels.gdn import delta_rule_scan, gdn_backward, gdn_forward

ROOT = Path(__file__).resolve().parent.parent
TOL = {"ieee": 2e-5, "tf32x3": 2e-5, "tf32": 5e-3}


def make_inputs(B, H, T, S, D, dtype=torch.float32, device="cpu", layout="contiguous", seed=0):
    """q_rot, k_rot, q, k, v `[B, H, T, S, D]`, beta `[B, H, T, S]`, gamma `[B, H, T]` with the model's value
    ranges (ReLU'd q/k, keys scaled by 1/sqrt(D*S), beta in (0, 1), gamma in (0.5, 1)).

    layout "heads": views of `[B, T*S, H*D]` as SelfAttention makes them (strides b, h, t, s = N*C, D, S*C, C);
    "strided": every tensor a slice of a larger one (last-dim stride 2, gaps between frames)."""
    g = torch.Generator().manual_seed(seed)
    kscale = (D * S) ** -0.5

    def tensor(*shape, kind="randn", scale=1.0):
        heads = layout == "heads" and len(shape) == 5
        full = (B, T * S, H * D) if heads else shape[:-1] + (2 * shape[-1],) if layout == "strided" else shape
        x = (torch.rand if kind == "rand" else torch.randn)(*full, generator=g)
        x = ((x.relu() if kind == "relu" else x) * scale).to(dtype).to(device)
        if heads:
            return x.reshape(B, T * S, H, D).transpose(1, 2).reshape(B, H, T, S, D)
        return x[..., ::2] if layout == "strided" else x

    q_rot, k_rot = tensor(B, H, T, S, D), tensor(B, H, T, S, D, scale=kscale)
    q, k = tensor(B, H, T, S, D, kind="relu"), tensor(B, H, T, S, D, kind="relu", scale=kscale)
    v = tensor(B, H, T, S, D)
    beta = tensor(B, H, T, S, kind="rand")
    gamma = (torch.rand(B, H, T, generator=g) * 0.5 + 0.5).to(device)
    return q_rot, k_rot, q, k, v, beta, gamma


def make_state(B, H, D, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, D, D, generator=g) * 0.1).to(device), torch.rand(B, H, D, generator=g).to(device)


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape and a.dtype == torch.float32
    assert torch.isfinite(a).all(), "non-finite output (an unwritten element of a NaN-poisoned buffer?)"
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def check(name, outs, refs, precision):
    errs = [max_rel(a, b) for a, b in zip(outs, refs, strict=True)]
    print(f"{name} [{precision}]: max rel err " + " ".join(f"{e:.2e}" for e in errs))
    assert max(errs) < TOL[precision], (name, precision, errs)


F32, BF16 = torch.float32, torch.bfloat16
SHAPES = {  # B, H, T, S, D
    "release": (1, 20, 3, 880, 112),
    "B2-S37-T4": (2, 3, 4, 37, 112),
    "T1-S37-D16": (1, 3, 1, 37, 16),
    "B2-S130-D16": (2, 3, 3, 130, 16),
    "S65-D48": (1, 2, 2, 65, 48),
}
# every shape, dtype and precision appears; not the full product (each new combination is a Triton compile)
CASES = [pytest.param(*SHAPES[shape], dtype, prec, id=f"{shape}-{str(dtype)[6:]}-{prec}") for shape, dtype, prec in (
    ("release", BF16, "tf32"), ("release", BF16, "tf32x3"), ("release", BF16, "ieee"), ("release", F32, "tf32"),
    ("release", F32, "tf32x3"), ("B2-S37-T4", BF16, "tf32"), ("B2-S37-T4", BF16, "tf32x3"),
    ("B2-S37-T4", F32, "ieee"), ("T1-S37-D16", F32, "tf32"), ("T1-S37-D16", BF16, "ieee"),
    ("B2-S130-D16", BF16, "tf32x3"), ("B2-S130-D16", F32, "ieee"), ("S65-D48", BF16, "tf32"),
    ("S65-D48", F32, "tf32x3"),
)]
PRECISIONS = [pytest.param(p, id=p) for p in gt.PRECISIONS]
STRATEGIES = [pytest.param(s, id=s) for s in gt.STRATEGIES]


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("B,H,T,S,D,dtype,precision", CASES)
def test_gdn_matches_reference(B, H, T, S, D, dtype, precision, strategy, poison_cuda):
    q_rot, k_rot, q, k, v, beta, gamma = make_inputs(B, H, T, S, D, dtype, "cuda", layout="heads")
    sigma, z = make_state(B, H, D, "cuda")
    kw = dict(precision=precision, strategy=strategy)
    for state in (None, (sigma, z)):
        num, den, (s1, z1) = gt.gdn_forward_triton(q_rot, k_rot, q, k, v, beta, gamma, state, **kw)
        rn, rd, (rs, rz) = gdn_forward(q_rot, k_rot, q, k, v, beta, gamma, state)
        check(f"{strategy} gdn_forward state={state is not None}", (num, den, s1, z1), (rn, rd, rs, rz), precision)
    num, den = gt.gdn_backward_triton(q_rot, k_rot, q, k, v, beta, gamma, **kw)
    rn, rd = gdn_backward(q_rot, k_rot, q, k, v, beta, gamma)
    if T == 1:  # exclusive backward over one frame: nothing after it
        assert num.abs().max() == 0 and den.abs().max() == 0
    else:
        check(f"{strategy} gdn_backward", (num, den), (rn, rd), precision)


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("B,H,T,S,D,dtype,precision", CASES)
def test_camera_scans_match_reference(B, H, T, S, D, dtype, precision, strategy, poison_cuda):
    q, k, _, _, v, beta, gamma = make_inputs(B, H, T, S, D, dtype, "cuda", layout="strided")
    sigma, _ = make_state(B, H, D, "cuda")
    kw = dict(precision=precision, strategy=strategy)
    for state in (None, sigma):
        out, st = gt.camera_scan_forward_triton(q, k, v, beta, gamma, state, **kw)
        ro, rs = camera_scan_forward(q, k, v, beta, gamma, state)
        check(f"{strategy} camera_forward state={state is not None}", (out, st), (ro, rs), precision)
    out = gt.camera_scan_backward_triton(q, k, v, beta, gamma, **kw)
    ref = camera_scan_backward(q, k, v, beta, gamma)
    if T == 1:
        assert out.abs().max() == 0
    else:
        check(f"{strategy} camera_backward", (out,), (ref,), precision)


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("Dv", [1, 16, 40, 112])
def test_delta_rule_scan_other_value_dims(Dv, precision, strategy, poison_cuda):
    """Dv != Dk and Dv not a multiple of the value block; both directions; reverse ends in the same state."""
    q, k, v, _, _, beta, gamma = make_inputs(2, 3, 3, 57, 112, torch.bfloat16, "cuda", layout="strided")
    v = v[..., :Dv]
    state = torch.randn(2, 3, Dv, 112, device="cuda") * 0.1
    for reverse in (False, True):
        st_in = None if reverse else state
        out = gt.delta_rule_scan_triton(q, k, v, beta, gamma, st_in, reverse=reverse, precision=precision,
                                        strategy=strategy)
        ref = delta_rule_scan(q, k, v, beta, gamma, st_in, reverse=reverse)
        check(f"{strategy} delta_rule_scan Dv={Dv} reverse={reverse}", out, ref, precision)


def check_parallel_configs(B, H, T, S, D, dtype, device, precision, **config):
    """gdn forward (with state) and backward through launch_with_config(strategy="parallel", **config)."""
    q_rot, k_rot, q, k, v, beta, gamma = make_inputs(B, H, T, S, D, dtype, device, layout="heads")
    sigma, z = make_state(B, H, D, device)
    cfg = dict(gt._parallel_blocks(D, D, precision), **config)
    kw = dict(precision=precision, strategy="parallel", qn=q, kn=k, **cfg)
    name = f"parallel B={B} H={H} T={T} S={S} D={D} {config}"
    num, sig, den, zz = gt.launch_with_config(q_rot, k_rot, v, beta, gamma, sigma, z=z, **kw)
    rn, rd, (rs, rz) = gdn_forward(q_rot, k_rot, q, k, v, beta, gamma, (sigma, z))
    check(f"{name} forward", (num, den, sig, zz), (rn, rd, rs, rz), precision)
    num, _, den, _ = gt.launch_with_config(q_rot, k_rot, v, beta, gamma, reverse=True, **kw)
    check(f"{name} backward", (num, den), gdn_backward(q_rot, k_rot, q, k, v, beta, gamma), precision)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", [pytest.param(p, id=p) for p in ("tf32", "tf32x3")])
def test_parallel_token_splits_and_wide_heads(precision, poison_cuda):
    """The parallel strategy with phase-1 token splits (partial sums added in phase 2; the default config has
    one split at these shapes) and with a head dim over 128 (padded to 256: smaller tiles, 8 column chunks of
    state @ A_f in phase 2)."""
    check_parallel_configs(2, 3, 3, 300, 112, torch.bfloat16, "cuda", precision, P1_SPLIT=64)
    check_parallel_configs(1, 3, 2, 97, 160, torch.bfloat16, "cuda", precision, P1_SPLIT=48)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", PRECISIONS)
def test_strategies_agree(precision, poison_cuda):
    """Release shapes, bf16 inputs: the two strategies give the same scans to within the reference tolerance
    (they associate the products differently; with TF32 rounding emulated in torch each is ~3e-4 off the fp32
    reference at these shapes, so their difference stays well inside 5e-3)."""
    q_rot, k_rot, q, k, v, beta, gamma = make_inputs(1, 20, 3, 880, 112, torch.bfloat16, "cuda", layout="heads")
    sigma, z = make_state(1, 20, 112, "cuda")

    def block(strategy):
        kw = dict(precision=precision, strategy=strategy)
        num, den, (s, zz) = gt.gdn_forward_triton(q_rot, k_rot, q, k, v, beta, gamma, (sigma, z), **kw)
        nb, db = gt.gdn_backward_triton(q_rot, k_rot, q, k, v, beta, gamma, **kw)
        cf, cs = gt.camera_scan_forward_triton(q_rot, k_rot, v, beta, gamma, sigma, **kw)
        return num, den, s, zz, nb, db, cf, cs

    errs = [max_rel(a, b) for a, b in zip(block("parallel"), block("stream"), strict=True)]
    print(f"parallel vs stream [{precision}]: max rel diff " + " ".join(f"{e:.2e}" for e in errs))
    assert max(errs) < TOL[precision], errs


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["ieee", "tf32"])
def test_parallel_long_recurrence(precision, poison_cuda):
    """The parallel strategy's recurrence phase writes each frame's state to a slot and reads it back after a
    barrier; many frames at a full head dim give a race many chances to show (the other cases have T <= 4)."""
    q_rot, k_rot, q, k, v, beta, gamma = make_inputs(1, 4, 16, 97, 112, torch.bfloat16, "cuda", layout="heads")
    sigma, z = make_state(1, 4, 112, "cuda")
    kw = dict(precision=precision, strategy="parallel")
    num, den, (s1, z1) = gt.gdn_forward_triton(q_rot, k_rot, q, k, v, beta, gamma, (sigma, z), **kw)
    rn, rd, (rs, rz) = gdn_forward(q_rot, k_rot, q, k, v, beta, gamma, (sigma, z))
    check("parallel gdn_forward T=16", (num, den, s1, z1), (rn, rd, rs, rz), precision)
    num, den = gt.gdn_backward_triton(q_rot, k_rot, q, k, v, beta, gamma, **kw)
    rn, rd = gdn_backward(q_rot, k_rot, q, k, v, beta, gamma)
    check("parallel gdn_backward T=16", (num, den), (rn, rd), precision)


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("split", [1, 2, 3])
def test_forward_state_carries_across_calls(split, strategy):
    """Streaming: scanning frames [0, split) then [split, T) from the returned state == one call over T."""
    q_rot, k_rot, q, k, v, beta, gamma = make_inputs(1, 3, 4, 100, 112, torch.bfloat16, "cuda")
    a = lambda s: tuple(t[:, :, s] for t in (q_rot, k_rot, q, k, v, beta, gamma))
    kw = dict(precision="ieee", strategy=strategy)
    num, den, (sig, z) = gt.gdn_forward_triton(*a(slice(None)), **kw)
    n1, d1, state = gt.gdn_forward_triton(*a(slice(0, split)), **kw)
    n2, d2, (sig2, z2) = gt.gdn_forward_triton(*a(slice(split, None)), state=state, **kw)
    check(f"{strategy} gdn_forward split at {split}", (torch.cat([n1, n2], 2), torch.cat([d1, d2], 2), sig2, z2),
          (num, den, sig, z), "ieee")


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_cuda_graph_capture_and_replay(strategy):
    """The wrappers allocate with torch.empty and never sync: capture one block's four scans, replay on new
    inputs copied into the static buffers, compare with eager calls."""
    args = make_inputs(1, 20, 3, 880, 112, torch.bfloat16, "cuda", layout="heads")
    sigma, z = make_state(1, 20, 112, "cuda")
    static = [t.clone() for t in args] + [sigma.clone(), z.clone()]
    kw = dict(strategy=strategy)

    def block(q_rot, k_rot, q, k, v, beta, gamma, sigma, z):
        num, den, (s, zz) = gt.gdn_forward_triton(q_rot, k_rot, q, k, v, beta, gamma, (sigma, z), **kw)
        nb, db = gt.gdn_backward_triton(q_rot, k_rot, q, k, v, beta, gamma, **kw)
        cf, cs = gt.camera_scan_forward_triton(q_rot, k_rot, v, beta, gamma, sigma, **kw)
        cb = gt.camera_scan_backward_triton(q_rot, k_rot, v, beta, gamma, **kw)
        return num, den, s, zz, nb, db, cf, cs, cb

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        block(*static)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed = block(*static)
    fresh = make_inputs(1, 20, 3, 880, 112, torch.bfloat16, "cuda", layout="heads", seed=5)
    for dst, src in zip(static, list(fresh) + list(make_state(1, 20, 112, "cuda", seed=6)), strict=True):
        dst.copy_(src)
    graph.replay()
    eager = block(*static)
    for a, b in zip(graphed, eager, strict=True):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_torch_compile_sees_an_opaque_op(strategy):
    """fullgraph=True fails on any graph break: dynamo must treat the scans as custom ops, not trace Triton."""
    args = make_inputs(1, 3, 3, 64, 112, torch.bfloat16, "cuda")
    kw = dict(precision="ieee", strategy=strategy)

    def f(q_rot, k_rot, q, k, v, beta, gamma):
        num, den, _ = gt.gdn_forward_triton(q_rot, k_rot, q, k, v, beta, gamma, **kw)
        nb, db = gt.gdn_backward_triton(q_rot, k_rot, q, k, v, beta, gamma, **kw)
        cam = gt.camera_scan_forward_triton(q_rot, k_rot, v, beta, gamma, **kw)[0]
        return (num + nb) / (den + db + 1e-6)[..., None] + cam

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(*args), f(*args), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_tiles_too_large_for_shared_memory_fall_back(monkeypatch):
    """A tile config the GPU cannot hold (OutOfResources at compile time) is halved until it fits."""
    big = lambda Dk, Dv, precision, itemsize: dict(BLOCK_S=256, BLOCK_K=128, BLOCK_V=32, BLOCK_S_NORM=256,
                                                   num_warps=8, num_stages=2)
    monkeypatch.setattr(gt, "_blocks", big)
    monkeypatch.setattr(gt, "_SMALLER", {})
    args = make_inputs(1, 2, 2, 100, 112, torch.float32, "cuda")
    out = gt.gdn_backward_triton(*args, precision="tf32x3")
    check("gdn_backward after fallback", out, gdn_backward(*args), "tf32x3")
    (cfg,) = gt._SMALLER.values()
    print("fitted config", cfg)
    assert cfg["BLOCK_S"] < 256


@pytest.mark.gpu
def test_triton_scan_ops_on_gpu():
    from engine.fast.scans import triton_scan_ops

    ops = triton_scan_ops(precision="ieee")
    q_rot, k_rot, q, k, v, beta, gamma = make_inputs(1, 2, 2, 40, 112, torch.bfloat16, "cuda")
    num, den, _ = ops.gdn_forward(q_rot, k_rot, q, k, v, beta, gamma, None)
    rn, rd, _ = gdn_forward(q_rot, k_rot, q, k, v, beta, gamma)
    check("ScanOps.gdn_forward", (num, den), (rn, rd), "ieee")
    check("ScanOps.camera_backward", (ops.camera_backward(q, k, v, beta, gamma),),
          (camera_scan_backward(q, k, v, beta, gamma),), "ieee")

BLOCK_CASES = ("release-bfloat16-tf32", "release-bfloat16-tf32x3", "B2-S37-T4-bfloat16-tf32", "B2-S37-T4-float32-ieee",
               "T1-S37-D16-float32-tf32", "B2-S130-D16-bfloat16-tf32x3", "S65-D48-bfloat16-tf32")


def block_inputs(B, H, T, S, D, dtype, device, layout="contiguous", state=True):
    """The arguments of ScanOps.block: main inputs, then camera inputs from another seed (their own beta)."""
    q_rot, k_rot, q, k, v, beta, gamma = make_inputs(B, H, T, S, D, dtype, device, layout=layout)
    _, _, qc, kc, vc, beta_c, _ = make_inputs(B, H, T, S, D, dtype, device, layout=layout, seed=5)
    sigma, z = make_state(B, H, D, device)
    sigma_c = make_state(B, H, D, device, seed=2)[0]
    return (q_rot, k_rot, q, k, v, beta, gamma, (sigma, z) if state else None, qc, kc, vc, beta_c,
            sigma_c if state else None)


def flat_block(out) -> list[torch.Tensor]:
    num_f, den_f, (sigma, z), num_b, den_b, cam_f, sigma_c, cam_b = out
    return [num_f, den_f, sigma, z, num_b, den_b, cam_f, sigma_c, cam_b]


def check_block(args, precision, label):
    """gdn_block_triton against the plain ScanOps.block (the four references) and bit-equal to the four
    separate Triton launches (the same per-program code and tiles)."""
    from engine.fast.scans import triton_scan_ops
    from engine.stage1.temporal import ScanOps

    out = gt.gdn_block_triton(*args, precision=precision)
    check(f"{label} gdn_block", flat_block(out), flat_block(ScanOps().block(*args)), precision)
    separate = triton_scan_ops(precision=precision, strategy="stream")
    separate.gdn_block = None
    for a, b in zip(flat_block(out), flat_block(separate.block(*args)), strict=True):
        assert torch.equal(a, b), label


@pytest.mark.gpu
@pytest.mark.parametrize("state", [True, False])
@pytest.mark.parametrize("B,H,T,S,D,dtype,precision", [c for c in CASES if c.id in BLOCK_CASES])
def test_block_launch_matches_reference(B, H, T, S, D, dtype, precision, state, poison_cuda):
    check_block(block_inputs(B, H, T, S, D, dtype, "cuda", layout="heads", state=state), precision,
                f"B{B} H{H} T{T} S{S} D{D} {dtype}")


@pytest.mark.gpu
def test_block_launch_in_a_cuda_graph():
    args = block_inputs(1, 20, 3, 880, 112, torch.bfloat16, "cuda", layout="heads")
    eager = flat_block(gt.gdn_block_triton(*args))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        gt.gdn_block_triton(*args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = flat_block(gt.gdn_block_triton(*args))
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(captured, eager, strict=True):
        assert torch.equal(a, b)


def combined_ref(args, eps=1e-8):
    """The plain ScanOps.block_combined (the four references, combined in fp32) as fp32: main, Sigma, z, cam,
    Sigma_c."""
    from engine.stage1.temporal import ScanOps

    main, (sigma, z), cam, sigma_c = ScanOps().block_combined(*args, eps=eps, out_dtype=torch.float32)
    return [main, sigma, z, cam, sigma_c]


def check_phases(args, precision, label, out_dtype=torch.float32, config=None):
    """gdn_block_phases_triton against the plain composition; outputs in out_dtype are compared after the
    reference is rounded to it the same way (the kernel rounds its fp32 result once)."""
    main, (sigma, z), cam, sigma_c = gt.gdn_block_phases_triton(*args, eps=1e-8, out_dtype=out_dtype,
                                                                precision=precision, config=config)
    assert main.dtype == out_dtype and cam.dtype == out_dtype and main.shape == cam.shape == args[4].shape
    ref = combined_ref(args)
    if out_dtype != torch.float32:  # compare in fp32 after the reference gets the same one rounding
        ref = [r.to(out_dtype).float() if i in (0, 3) else r for i, r in enumerate(ref)]
        out_dtype_tol = {torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11}[out_dtype]
    else:
        out_dtype_tol = 0.0
    outs = [main.float(), sigma, z, cam.float(), sigma_c]
    errs = [max_rel(a, b) for a, b in zip(outs, ref, strict=True)]
    print(f"{label} phases [{precision}]: max rel err " + " ".join(f"{e:.2e}" for e in errs))
    # main is a quotient of two fp32 dot products; relative to its max it rounds like them (plus one output rounding)
    assert max(errs) < TOL[precision] + 2 * out_dtype_tol, (label, precision, errs)


@pytest.mark.gpu
@pytest.mark.parametrize("state", [True, False])
@pytest.mark.parametrize("B,H,T,S,D,dtype,precision", [c for c in CASES if c.id in BLOCK_CASES])
def test_block_phases_match_reference(B, H, T, S, D, dtype, precision, state, poison_cuda):
    args = block_inputs(B, H, T, S, D, dtype, "cuda", layout="heads", state=state)
    check_phases(args, precision, f"B{B} H{H} T{T} S{S} D{D} {dtype}")
    if dtype == torch.bfloat16:  # the model's case: the results written in bf16
        check_phases(args, precision, f"B{B} H{H} T{T} S{S} D{D} {dtype} -> bf16", out_dtype=torch.bfloat16)


@pytest.mark.gpu
def test_block_phases_near_one_launch_and_in_a_cuda_graph():
    """At the release shapes in bf16 / tf32 (the model's setting) the phased block is near the one launch combined
    in torch, and a captured replay on new inputs equals the eager call."""
    from engine.stage1.temporal import ScanOps

    args = block_inputs(1, 20, 3, 880, 112, torch.bfloat16, "cuda", layout="heads")
    one = ScanOps(gdn_block=gt.gdn_block_triton).block_combined(*args, eps=1e-8, out_dtype=torch.float32)
    eager = gt.gdn_block_phases_triton(*args, eps=1e-8, out_dtype=torch.float32)
    errs = [max_rel(a, b) for a, b in zip((eager[0], *eager[1], eager[2], eager[3]),
                                          (one[0], *one[1], one[2], one[3]), strict=True)]
    print("phases vs one launch [tf32]:", " ".join(f"{e:.2e}" for e in errs))
    assert max(errs) < TOL["tf32"]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        gt.gdn_block_phases_triton(*args, eps=1e-8, out_dtype=torch.float32)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = gt.gdn_block_phases_triton(*args, eps=1e-8, out_dtype=torch.float32)
    fresh = block_inputs(1, 20, 3, 880, 112, torch.bfloat16, "cuda", layout="heads")
    for old, new in zip(args, fresh, strict=True):
        for o, n in zip(old if isinstance(old, tuple) else (old,), new if isinstance(new, tuple) else (new,),
                        strict=True):
            o.copy_(n)
    graph.replay()
    torch.cuda.synchronize()
    want = gt.gdn_block_phases_triton(*args, eps=1e-8, out_dtype=torch.float32)
    for a, b in zip((captured[0], *captured[1], captured[2], captured[3]), (want[0], *want[1], want[2], want[3]),
                    strict=True):
        assert torch.equal(a, b)


# CPU ------------------------------------------------------------------------------------------------------


interpreter = pytest.mark.skipif(not interpreter_usable(), reason="needs Triton and TRITON_INTERPRET=1 (Triton's "
                                 "CPU interpreter), with numpy < 2.4 for Triton <= 3.6")


@interpreter
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("T,S,D", [(3, 37, 16), (2, 20, 20), (1, 19, 112), (4, 33, 112)])
def test_interpreter_matches_reference(T, S, D, layout, strategy, poison_cpu):
    q_rot, k_rot, q, k, v, beta, gamma = make_inputs(2, 3, T, S, D, torch.float32, "cpu", layout=layout)
    sigma, z = make_state(2, 3, D, "cpu")
    kw = dict(precision="ieee", strategy=strategy)
    for state in (None, (sigma, z)):
        out = gt.gdn_forward_triton(q_rot, k_rot, q, k, v, beta, gamma, state, **kw)
        ref = gdn_forward(q_rot, k_rot, q, k, v, beta, gamma, state)
        check(f"interpreter {strategy} gdn_forward state={state is not None}", (*out[:2], *out[2]),
              (*ref[:2], *ref[2]), "ieee")
    out = gt.gdn_backward_triton(q_rot, k_rot, q, k, v, beta, gamma, **kw)
    check(f"interpreter {strategy} gdn_backward", out, gdn_backward(q_rot, k_rot, q, k, v, beta, gamma), "ieee")
    if T == 1:  # exclusive over one frame: nothing after it
        assert out[0].abs().max() == 0 and out[1].abs().max() == 0
    check(f"interpreter {strategy} camera_forward", gt.camera_scan_forward_triton(q, k, v, beta, gamma, sigma, **kw),
          camera_scan_forward(q, k, v, beta, gamma, sigma), "ieee")
    check(f"interpreter {strategy} camera_backward", (gt.camera_scan_backward_triton(q, k, v, beta, gamma, **kw),),
          (camera_scan_backward(q, k, v, beta, gamma),), "ieee")


@interpreter
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_interpreter_other_value_dims(strategy, poison_cpu):
    """Dv != Dk (one value, a partial value block); both directions, the final state of each."""
    q, k, v, _, _, beta, gamma = make_inputs(2, 3, 3, 23, 20, torch.float32, "cpu", layout="strided")
    for Dv in (1, 40):
        vv = torch.randn(2, 3, 3, 23, Dv)
        state = torch.randn(2, 3, Dv, 20) * 0.1
        for reverse in (False, True):
            st_in = None if reverse else state
            out = gt.delta_rule_scan_triton(q, k, vv, beta, gamma, st_in, reverse=reverse, precision="ieee",
                                            strategy=strategy)
            check(f"interpreter {strategy} delta_rule_scan Dv={Dv} reverse={reverse}", out,
                  delta_rule_scan(q, k, vv, beta, gamma, st_in, reverse=reverse), "ieee")


@interpreter
def test_interpreter_parallel_token_splits_and_wide_heads(poison_cpu):
    """Phase-1 token splits (the last one partial) summed in phase 2; a head dim over 128 (padded to 256)."""
    check_parallel_configs(2, 3, 3, 37, 16, torch.float32, "cpu", "ieee", P1_SPLIT=16, P1_BLOCK_S=16)
    check_parallel_configs(1, 2, 2, 21, 136, torch.float32, "cpu", "ieee", P1_SPLIT=16)


def too_big(real, limit: int = 16):
    """Kernel `real` as launched (`kernel[grid](...)`), but a launch with token tiles (BLOCK_S) over `limit` raises
    OutOfResources, as compiling a config the GPU cannot hold does."""
    class TooBig:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                if kw["BLOCK_S"] > limit:
                    raise gt.triton.runtime.errors.OutOfResources(kw["BLOCK_S"] << 12, limit << 12, "shared memory")
                return real[grid](*args, **kw)

            return launch

    return TooBig()


@interpreter
def test_interpreter_stream_shrinks_tiles_after_out_of_resources(monkeypatch):
    """The "stream" strategy's fallback: token tiles over 16 fail (faked OutOfResources), so a 64-token default is
    halved to 16 and remembered; an explicit config is not changed but fails."""
    monkeypatch.setattr(gt, "_delta_rule_kernel", too_big(gt._delta_rule_kernel))
    monkeypatch.setattr(gt, "_blocks", lambda Dk, Dv, precision, itemsize: dict(
        BLOCK_S=64, BLOCK_K=16, BLOCK_V=16, BLOCK_S_NORM=64, num_warps=4, num_stages=2))
    monkeypatch.setattr(gt, "_SMALLER", {})
    args = make_inputs(1, 2, 2, 37, 16)
    out = gt.gdn_backward_triton(*args, precision="ieee", strategy="stream")
    check("interpreter gdn_backward after fallback", out, gdn_backward(*args), "ieee")
    (cfg,) = gt._SMALLER.values()
    assert cfg["BLOCK_S"] == cfg["BLOCK_S_NORM"] == 16 and cfg["num_stages"] == 1, cfg
    q_rot, k_rot, _, _, v, beta, gamma = args
    with pytest.raises(gt.triton.runtime.errors.OutOfResources):
        gt.launch_with_config(q_rot, k_rot, v, beta, gamma, precision="ieee", strategy="stream", BLOCK_S=32)


@interpreter
def test_interpreter_parallel_shrinks_tiles_after_out_of_resources(monkeypatch):
    """A default config the GPU cannot hold (OutOfResources at compile time; faked here for phase-3 tiles over
    16 tokens) is halved until it fits and remembered; an explicit config is not changed but fails."""
    monkeypatch.setattr(gt, "_readout_kernel", too_big(gt._readout_kernel))
    monkeypatch.setattr(gt, "_SMALLER", {})
    args = make_inputs(1, 2, 2, 37, 16)
    out = gt.gdn_backward_triton(*args, precision="ieee", strategy="parallel")
    check("interpreter gdn_backward after fallback", out, gdn_backward(*args), "ieee")
    (cfg,) = gt._SMALLER.values()
    assert cfg["P3_BLOCK_S"] == 16 and cfg["num_stages"] == 1, cfg
    q_rot, k_rot, _, _, v, beta, gamma = args
    with pytest.raises(gt.triton.runtime.errors.OutOfResources):
        gt.launch_with_config(q_rot, k_rot, v, beta, gamma, precision="ieee", strategy="parallel", P3_BLOCK_S=32)


@interpreter
def test_interpreter_launch_with_config_refuses_unknown_settings():
    q_rot, k_rot, _, _, v, beta, gamma = make_inputs(1, 2, 2, 5, 16)
    with pytest.raises(gt.TritonScanError, match="BLOCK_S.*not settings of the parallel strategy"):
        gt.launch_with_config(q_rot, k_rot, v, beta, gamma, strategy="parallel", BLOCK_S=64)
    with pytest.raises(gt.TritonScanError, match="P1_SPLIT.*not settings of the stream strategy"):
        gt.launch_with_config(q_rot, k_rot, v, beta, gamma, strategy="stream", P1_SPLIT=48)


@interpreter
@pytest.mark.parametrize("state", [True, False])
@pytest.mark.parametrize("layout", ["heads", "strided"])
@pytest.mark.parametrize("T,S,D", [(3, 37, 16), (1, 19, 20), (2, 21, 112)])
def test_interpreter_block_launches(T, S, D, layout, state, poison_cpu):
    """Both ways a block's scans go out, on the same inputs: the one launch and the phased block."""
    args = block_inputs(2, 3, T, S, D, torch.float32, "cpu", layout=layout, state=state)
    check_block(args, "ieee", f"interpreter T{T} S{S} D{D} {layout}")
    check_phases(args, "ieee", f"interpreter T{T} S{S} D{D} {layout}")


@interpreter
def test_interpreter_block_launch_config_and_errors():
    args = block_inputs(1, 2, 2, 21, 16, torch.float32, "cpu")
    small = gt.gdn_block_triton(*args, precision="ieee", config=dict(BLOCK_S=16, BLOCK_V=16, num_warps=2))
    check("interpreter gdn_block BLOCK_S=16", flat_block(small), flat_block(gt.gdn_block_triton(*args,
          precision="ieee")), "ieee")
    with pytest.raises(gt.TritonScanError, match="P1_SPLIT.*not settings of the block launch"):
        gt.gdn_block_triton(*args, config=dict(P1_SPLIT=16))


@interpreter
def test_interpreter_block_phases_splits_tiles_dtype_and_errors(poison_cpu):
    """Token splits (the last partial), small tiles, a bf16 output, and the refusals."""
    args = block_inputs(1, 2, 3, 37, 16, torch.float32, "cpu", layout="heads")
    check_phases(args, "ieee", "interpreter P1_SPLIT=16", config=dict(
        gt._parallel_blocks(16, 16, "ieee"), P1_SPLIT=16, P1_BLOCK_S=16, P1_BLOCK_R=16, P2_BLOCK_V=16, P3_BLOCK_S=16,
        P3_BLOCK_V=16))
    check_phases(args, "ieee", "interpreter -> bf16", out_dtype=torch.bfloat16)
    # bf16 inputs outside "tf32" (which splits products into bf16 dots: Triton 3.6's interpreter computes bf16 dots
    # wrongly, so that path is tested on the GPU only, by the bf16 / tf32 cases of test_block_phases_match_reference)
    bf16 = block_inputs(1, 2, 3, 37, 16, torch.bfloat16, "cpu", layout="heads")
    check_phases(bf16, "tf32x3", "interpreter bf16 inputs, tf32x3")
    with pytest.raises(gt.TritonScanError, match="BLOCK_S.*not settings of the phased block"):
        gt.gdn_block_phases_triton(*args, eps=1e-8, config=dict(BLOCK_S=16))
    with pytest.raises(gt.TritonScanError, match="pass both states"):
        gt.gdn_block_phases_triton(*args[:-1], None, eps=1e-8)
    with pytest.raises(gt.TritonScanError, match="out_dtype torch.int32"):
        gt.gdn_block_phases_triton(*args, eps=1e-8, out_dtype=torch.int32)


def test_triton_scan_ops_refuses_an_unknown_block_launch():
    from engine.fast.scans import triton_scan_ops

    with pytest.raises(ValueError, match=r"block 'fused'; accepted: \('stream', 'phases'\)"):
        triton_scan_ops(block="fused")


def test_imports_without_triton_and_says_so():
    """With triton unimportable the module still imports; calling the Triton path raises TritonScanError."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from kernels import gdn_triton as gt\n"
        "assert gt.triton is None\n"
        "x = torch.zeros(1, 1, 2, 3, 16)\n"
        "try:\n"
        "    gt.gdn_forward_triton(x, x, x, x, x, x[..., 0], x[..., 0, 0])\n"
        "except gt.TritonScanError as e:\n"
        "    print('ERR', e)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert "ERR" in res.stdout and "Triton is not installed" in res.stdout, res.stdout


@pytest.mark.skipif(gt.interpreting(), reason="the interpreter runs CPU tensors")
def test_cpu_tensors_are_refused():
    args = make_inputs(1, 1, 2, 5, 16)
    with pytest.raises(gt.TritonScanError, match="Triton is not installed|need CUDA tensors"):
        gt.gdn_forward_triton(*args)
    with pytest.raises(gt.TritonScanError, match="Triton is not installed|need CUDA tensors"):
        gt.camera_scan_backward_triton(*args[:2], *args[4:])


def test_bad_inputs_are_refused():
    q_rot, k_rot, q, k, v, beta, gamma = make_inputs(1, 2, 2, 5, 16)
    with pytest.raises(gt.TritonScanError, match="beta"):
        gt.gdn_backward_triton(q_rot, k_rot, q, k, v, beta[:, :, :1], gamma)
    with pytest.raises(gt.TritonScanError, match="state"):
        gt.camera_scan_forward_triton(q, k, v, beta, gamma, torch.zeros(1, 2, 16, 8))
    with pytest.raises(ValueError, match="exclusive"):
        gt.delta_rule_scan_triton(q, k, v, beta, gamma, torch.zeros(1, 2, 16, 16), reverse=True)
    with pytest.raises(gt.TritonScanError, match="precision"):
        gt.gdn_backward_triton(q_rot, k_rot, q, k, v, beta, gamma, precision="fp16")
    with pytest.raises(gt.TritonScanError, match="strategy 'chunked'; accepted: .*stream.*parallel"):
        gt.gdn_forward_triton(q_rot, k_rot, q, k, v, beta, gamma, strategy="chunked")
    with pytest.raises(gt.TritonScanError, match="strategy 'chunked'"):
        gt.camera_scan_backward_triton(q, k, v, beta, gamma, strategy="chunked")
    args = block_inputs(1, 2, 2, 5, 16, torch.float32, "cpu")
    with pytest.raises(gt.TritonScanError, match="both states"):
        gt.gdn_block_triton(*args[:12], None)
    with pytest.raises(gt.TritonScanError, match="qc .* must match q_rot"):
        gt.gdn_block_triton(*args[:8], *(t[:, :, :, :4] for t in args[8:12]), args[12])


def test_triton_scan_ops_binds_precision():
    from engine.fast.scans import triton_scan_ops
    from engine.stage1.temporal import ScanOps

    ops = triton_scan_ops(precision="tf32")
    assert isinstance(ops, ScanOps)
    for fn, base in ((ops.gdn_forward, gt.gdn_forward_triton), (ops.gdn_backward, gt.gdn_backward_triton),
                     (ops.camera_forward, gt.camera_scan_forward_triton),
                     (ops.camera_backward, gt.camera_scan_backward_triton)):
        assert fn.func is base and fn.keywords == {"precision": "tf32", "strategy": gt.DEFAULT_STRATEGY}
    assert ops.gdn_block.func is gt.gdn_block_triton and ops.gdn_block.keywords == {"precision": "tf32"}
    assert triton_scan_ops(strategy="parallel").gdn_forward.keywords["strategy"] == "parallel"
    assert triton_scan_ops(strategy="parallel").gdn_block is None  # four launches of the parallel strategy
    with pytest.raises(ValueError, match="precision"):
        triton_scan_ops(precision="fp16")
    with pytest.raises(ValueError, match="strategy 'chunked'"):
        triton_scan_ops(strategy="chunked")
