"""`stage1-real-rope`: the real-arithmetic form of the stage-1 RoPE (kernels/rope.py `rope_pairs_real`), eagerly and
under torch.compile on the CPU (inductor's C++ backend), against the complex multiply; the fast path's eager calls are
the plain path itself. Inside the compiled live loop on a GPU: tests/test_fast_paths_gpu.py.

`stage1-rope`: the stage-1 RoPE (adjacent pairs, complex table) as one Triton pass (kernels/rope.py) against the
plain complex multiply of engine/stage1/geometry.py.

CPU: the kernel module's reference is geometry's function; the fast path's dispatch falls back off CUDA. Interpreter
(TRITON_INTERPRET=1 with Triton installed): the kernel on CPU tensors at odd shapes (D/2 not a power of two, a
partial row block, strided and transposed views, inverse), outputs poisoned with NaN. GPU: the same at the release
shapes in fp32 (tight: the same products in fp32, only FMA contraction may differ) and bf16, and under torch.compile
(one opaque op). The live loop with `stage1-rope` under graphs + compile is in tests/test_fast_paths_gpu.py.
"""

import shutil

import pytest
import torch

from engine.stage1.geometry import apply_rope, rope_angles, rope_table
from kernels import interpreter_usable
from kernels.rope import rope_pairs_real, rope_pairs_reference, rope_pairs_triton


def table(N, half, seed=0):
    g = torch.Generator().manual_seed(seed)
    return rope_table(torch.randn(N, half, generator=g) * 3)


def inputs(B, H, N, D, dtype, device, layout, seed=1):
    g = torch.Generator().manual_seed(seed)
    if layout == "transposed":  # [B, H, N, D] over [B, N, H, D] memory (the model's q / k)
        return torch.randn(B, N, H, D, generator=g).to(device, dtype).transpose(1, 2)
    if layout == "half":  # the last D/2 features of a wider tensor (UCPE's rotated half)
        return torch.randn(B, H, N, 2 * D, generator=g).to(device, dtype)[..., D:]
    return torch.randn(B, H, N, D, generator=g).to(device, dtype)


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("inverse", [False, True])
def test_reference_is_the_models_rope(inverse):
    x = inputs(2, 3, 7, 12, torch.float32, "cpu", "transposed")
    t = table(7, 6)
    assert torch.equal(rope_pairs_reference(x, t, inverse), apply_rope(x, t, inverse=inverse))


@pytest.mark.parametrize("layout", ["plain", "transposed", "half"])
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("shape", [(1, 2, 7, 112), (2, 3, 33, 56), (1, 1, 1, 2)])
def test_real_form_matches_the_complex_multiply(shape, inverse, layout):
    B, H, N, D = shape
    t = table(N, D // 2)
    x = inputs(B, H, N, D, torch.float32, "cpu", layout)
    assert rel(rope_pairs_real(x, t, inverse), apply_rope(x, t, inverse=inverse)) <= 1e-6  # fp32 rounding only
    xb = inputs(B, H, N, D, torch.bfloat16, "cpu", layout)
    got = rope_pairs_real(xb, t, inverse)
    assert got.dtype == torch.bfloat16 and rel(got, apply_rope(xb, t, inverse=inverse)) <= 8e-3


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("cc") is None,
                    reason="inductor's CPU backend needs a C++ compiler")
def test_real_form_compiled_on_cpu_and_the_fast_paths_eager_call_is_plain():
    from engine.fast.stage1_rope import apply_rope_compiled

    x, t = inputs(2, 3, 33, 56, torch.float32, "cpu", "transposed"), table(33, 28)
    f = torch.compile(lambda x, t: apply_rope_compiled(x, t, inverse=True) * 2, fullgraph=True)
    assert rel(f(x, t), apply_rope(x, t, inverse=True) * 2) <= 1e-6
    assert torch.equal(apply_rope_compiled(x, t, inverse=True), apply_rope(x, t, inverse=True))


def test_fast_path_falls_back_off_cuda():
    from engine.fast.stage1_rope import apply_rope_fast

    x, t = inputs(1, 2, 5, 8, torch.float32, "cpu", "plain"), table(5, 4)
    assert torch.equal(apply_rope_fast(x, t, inverse=True), apply_rope(x, t, inverse=True))


def test_bad_shapes_are_refused_with_the_shapes_named():
    pytest.importorskip("triton")
    x = torch.randn(1, 2, 5, 8)
    with pytest.raises((ValueError, RuntimeError), match=r"needs|need x"):
        rope_pairs_triton(x, table(4, 4))


SHAPES = [(1, 2, 7, 112), (2, 3, 33, 56), (1, 1, 1, 2)]  # D/2 = 56 and 28 (release), a partial row block, D = 2


@pytest.mark.skipif(not interpreter_usable(), reason="needs Triton and TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 8e-3)])
@pytest.mark.parametrize("layout", ["plain", "transposed", "half"])
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_interpreter_matches_reference(shape, inverse, layout, dtype, tol, poison_cpu):
    B, H, N, D = shape
    x, t = inputs(B, H, N, D, dtype, "cpu", layout), table(N, D // 2)
    got = rope_pairs_triton(x, t, inverse)
    assert got.dtype == dtype and got.shape == x.shape and torch.isfinite(got).all()
    assert rel(got, rope_pairs_reference(x, t, inverse)) <= tol


# ------------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 8e-3)])
@pytest.mark.parametrize("layout", ["plain", "transposed", "half"])
@pytest.mark.parametrize("shape", SHAPES + [(1, 20, 2640, 112), (1, 20, 2640, 56)])
def test_kernel_matches_reference_on_gpu(shape, layout, dtype, tol):
    B, H, N, D = shape
    x = inputs(B, H, N, D, dtype, "cuda", layout)
    t = (rope_table(rope_angles(D, torch.arange(10, 13), 22, 40)) if N == 2640 and D == 112
         else table(N, D // 2)).cuda()
    for inverse in (False, True):
        got, want = rope_pairs_triton(x, t, inverse), rope_pairs_reference(x, t, inverse)
        err = rel(got, want)
        print(f"rope_pairs {shape} {layout} {dtype} inverse={inverse}: rel err {err:.2e}")
        assert got.dtype == dtype and err <= tol


@pytest.mark.gpu
def test_compiled_call_is_the_op():
    x = inputs(1, 4, 100, 112, torch.bfloat16, "cuda", "transposed")
    t = table(100, 56).cuda()
    f = torch.compile(lambda x, t: rope_pairs_triton(x, t, False) * 2, fullgraph=True)
    assert torch.equal(f(x, t), rope_pairs_triton(x, t, False) * 2)
