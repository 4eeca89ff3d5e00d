"""Triton scans (kernels/gdn_triton.py) against the plain references (kernels/gdn.py, kernels/camera_scan.py).

GPU tests compare every function at odd shapes (S not a multiple of the tile, T = 1..4, D = 112 padded to
128, small D, B = 2, H = 3), fp32 and bf16 inputs, non-contiguous inputs, state in/out, in each precision:
"ieee" and "tf32x3" are fp32-accurate (tolerance 2e-5 of the output's max, a few fp32 roundings summed over
S-long dot products in another order), "tf32" rounds the product inputs to 10-bit mantissas (unit roundoff
4.9e-4; tolerance 5e-3 of the max, the project's TF32 scan path is judged at 1e-2 end to end). Both sides
upcast the same inputs, so bf16 inputs need no looser tolerance. Fresh buffers are poisoned with NaN so an
element the kernel fails to write shows up. Run with `-s` to see the measured errors.

The CPU tests check that the module imports without Triton and that the Triton path refuses CPU tensors
with a clear error; with TRITON_INTERPRET=1 (and Triton installed) the kernels run on CPU tensors in
Triton's interpreter at small shapes.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels import gdn_triton as gt
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


@pytest.fixture
def poison_cuda():
    """Fill the caching allocator's free blocks with NaN so torch.empty buffers start as NaN."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    blob = torch.full((64 << 20,), float("nan"), device="cuda")  # 256 MB, split for the following allocations
    del blob
    yield


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


@pytest.mark.gpu
@pytest.mark.parametrize("B,H,T,S,D,dtype,precision", CASES)
def test_gdn_matches_reference(B, H, T, S, D, dtype, precision, poison_cuda):
    q_rot, k_rot, q, k, v, beta, gamma = make_inputs(B, H, T, S, D, dtype, "cuda", layout="heads")
    sigma, z = make_state(B, H, D, "cuda")
    for state in (None, (sigma, z)):
        num, den, (s1, z1) = gt.gdn_forward_triton(q_rot, k_rot, q, k, v, beta, gamma, state, precision=precision)
        rn, rd, (rs, rz) = gdn_forward(q_rot, k_rot, q, k, v, beta, gamma, state)
        check(f"gdn_forward state={state is not None}", (num, den, s1, z1), (rn, rd, rs, rz), precision)
    num, den = gt.gdn_backward_triton(q_rot, k_rot, q, k, v, beta, gamma, precision=precision)
    rn, rd = gdn_backward(q_rot, k_rot, q, k, v, beta, gamma)
    if T == 1:  # exclusive backward over one frame: nothing after it
        assert num.abs().max() == 0 and den.abs().max() == 0
    else:
        check("gdn_backward", (num, den), (rn, rd), precision)


@pytest.mark.gpu
@pytest.mark.parametrize("B,H,T,S,D,dtype,precision", CASES)
def test_camera_scans_match_reference(B, H, T, S, D, dtype, precision, poison_cuda):
    q, k, _, _, v, beta, gamma = make_inputs(B, H, T, S, D, dtype, "cuda", layout="strided")
    sigma, _ = make_state(B, H, D, "cuda")
    for state in (None, sigma):
        out, st = gt.camera_scan_forward_triton(q, k, v, beta, gamma, state, precision=precision)
        ro, rs = camera_scan_forward(q, k, v, beta, gamma, state)
        check(f"camera_forward state={state is not None}", (out, st), (ro, rs), precision)
    out = gt.camera_scan_backward_triton(q, k, v, beta, gamma, precision=precision)
    ref = camera_scan_backward(q, k, v, beta, gamma)
    if T == 1:
        assert out.abs().max() == 0
    else:
        check("camera_backward", (out,), (ref,), precision)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("Dv", [1, 16, 40, 112])
def test_delta_rule_scan_other_value_dims(Dv, precision, poison_cuda):
    """Dv != Dk and Dv not a multiple of the value block; both directions; reverse ends in the same state."""
    q, k, v, _, _, beta, gamma = make_inputs(2, 3, 3, 57, 112, torch.bfloat16, "cuda", layout="strided")
    v = v[..., :Dv]
    state = torch.randn(2, 3, Dv, 112, device="cuda") * 0.1
    for reverse in (False, True):
        st_in = None if reverse else state
        out = gt.delta_rule_scan_triton(q, k, v, beta, gamma, st_in, reverse=reverse, precision=precision)
        ref = delta_rule_scan(q, k, v, beta, gamma, st_in, reverse=reverse)
        check(f"delta_rule_scan Dv={Dv} reverse={reverse}", out, ref, precision)


@pytest.mark.gpu
@pytest.mark.parametrize("split", [1, 2, 3])
def test_forward_state_carries_across_calls(split):
    """Streaming: scanning frames [0, split) then [split, T) from the returned state == one call over T."""
    q_rot, k_rot, q, k, v, beta, gamma = make_inputs(1, 3, 4, 100, 112, torch.bfloat16, "cuda")
    a = lambda s: tuple(t[:, :, s] for t in (q_rot, k_rot, q, k, v, beta, gamma))
    num, den, (sig, z) = gt.gdn_forward_triton(*a(slice(None)), precision="ieee")
    n1, d1, state = gt.gdn_forward_triton(*a(slice(0, split)), precision="ieee")
    n2, d2, (sig2, z2) = gt.gdn_forward_triton(*a(slice(split, None)), state=state, precision="ieee")
    check(f"gdn_forward split at {split}", (torch.cat([n1, n2], 2), torch.cat([d1, d2], 2), sig2, z2),
          (num, den, sig, z), "ieee")


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay():
    """The wrappers allocate with torch.empty and never sync: capture one block's four scans, replay on new
    inputs copied into the static buffers, compare with eager calls."""
    args = make_inputs(1, 20, 3, 880, 112, torch.bfloat16, "cuda", layout="heads")
    sigma, z = make_state(1, 20, 112, "cuda")
    static = [t.clone() for t in args] + [sigma.clone(), z.clone()]

    def block(q_rot, k_rot, q, k, v, beta, gamma, sigma, z):
        num, den, (s, zz) = gt.gdn_forward_triton(q_rot, k_rot, q, k, v, beta, gamma, (sigma, z))
        nb, db = gt.gdn_backward_triton(q_rot, k_rot, q, k, v, beta, gamma)
        cf, cs = gt.camera_scan_forward_triton(q_rot, k_rot, v, beta, gamma, sigma)
        cb = gt.camera_scan_backward_triton(q_rot, k_rot, v, beta, gamma)
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
def test_torch_compile_sees_an_opaque_op():
    """fullgraph=True fails on any graph break: dynamo must treat the scans as custom ops, not trace Triton."""
    args = make_inputs(1, 3, 3, 64, 112, torch.bfloat16, "cuda")

    def f(q_rot, k_rot, q, k, v, beta, gamma):
        num, den, _ = gt.gdn_forward_triton(q_rot, k_rot, q, k, v, beta, gamma, precision="ieee")
        nb, db = gt.gdn_backward_triton(q_rot, k_rot, q, k, v, beta, gamma, precision="ieee")
        cam = gt.camera_scan_forward_triton(q_rot, k_rot, v, beta, gamma, precision="ieee")[0]
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


# CPU ------------------------------------------------------------------------------------------------------


def interpreter_usable() -> bool:
    """Triton 3.6's interpreter fails on runtime-bounded loops with numpy >= 2.4 (int() of a 1-element array)."""
    if gt.triton is None or not gt.interpreting():
        return False
    import numpy as np

    old = lambda v: tuple(int(p) for p in v.split(".")[:2])
    return old(np.__version__) < (2, 4) or old(gt.triton.__version__) > (3, 6)


@pytest.mark.skipif(not interpreter_usable(),
                    reason="needs Triton and TRITON_INTERPRET=1 (Triton's CPU interpreter), with numpy < 2.4 "
                           "for Triton <= 3.6")
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("T,S,D", [(3, 37, 16), (2, 20, 20)])
def test_interpreter_matches_reference(T, S, D, layout):
    q_rot, k_rot, q, k, v, beta, gamma = make_inputs(2, 2, T, S, D, torch.float32, "cpu", layout=layout)
    sigma, z = make_state(2, 2, D, "cpu")
    out = gt.gdn_forward_triton(q_rot, k_rot, q, k, v, beta, gamma, (sigma, z), precision="ieee")
    ref = gdn_forward(q_rot, k_rot, q, k, v, beta, gamma, (sigma, z))
    check("interpreter gdn_forward", (*out[:2], *out[2]), (*ref[:2], *ref[2]), "ieee")
    check("interpreter gdn_backward", gt.gdn_backward_triton(q_rot, k_rot, q, k, v, beta, gamma, precision="ieee"),
          gdn_backward(q_rot, k_rot, q, k, v, beta, gamma), "ieee")
    check("interpreter camera_forward", gt.camera_scan_forward_triton(q, k, v, beta, gamma, sigma, precision="ieee"),
          camera_scan_forward(q, k, v, beta, gamma, sigma), "ieee")
    check("interpreter camera_backward",
          (gt.camera_scan_backward_triton(q, k, v, beta, gamma, precision="ieee"),),
          (camera_scan_backward(q, k, v, beta, gamma),), "ieee")


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


def test_triton_scan_ops_binds_precision():
    from engine.fast.scans import triton_scan_ops
    from engine.stage1.temporal import ScanOps

    ops = triton_scan_ops(precision="tf32")
    assert isinstance(ops, ScanOps)
    for fn, base in ((ops.gdn_forward, gt.gdn_forward_triton), (ops.gdn_backward, gt.gdn_backward_triton),
                     (ops.camera_forward, gt.camera_scan_forward_triton),
                     (ops.camera_backward, gt.camera_scan_backward_triton)):
        assert fn.func is base and fn.keywords == {"precision": "tf32"}
    with pytest.raises(ValueError, match="precision"):
        triton_scan_ops(precision="fp16")
