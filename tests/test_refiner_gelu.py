"""`refiner-gelu` (engine/fast/refiner_gelu.py): the FFN up-projection with bias and GELU (tanh) in the GEMM's
epilogue, against the plain `F.gelu(F.linear(...), approximate="tanh")`.

CPU (where the op is the plain computation): the swap keeps parameters and state-dict names, takes the op only for a
plain Linear with bias and leaves a tiny refiner's forward unchanged. GPU: cuBLASLt's epilogue against the
function in fp32 (tight: 1e-5, a tenth of what the erf GELU would be off; its tanh is evaluated a little less
exactly than torch's) and bf16 (one bf16 rounding apart: the epilogue rounds
the fused result once, the plain path rounds the GEMM output and then the GELU), at odd shapes and the release
FFN shape, and the tiny refiner's forward with and without the swap, eager and under torch.compile.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.fast.refiner_gelu import FusedGELUProj, linear_gelu_tanh, use_fused_gelu
from engine.presets import get_preset
from engine.refiner.model import RefinerTransformer
from engine.world import seeded_init_


def plain(x, w, b):
    return F.gelu(F.linear(x, w, b), approximate="tanh")


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def tiny_refiner(dtype=torch.float32, device="cpu") -> RefinerTransformer:
    m = RefinerTransformer(dataclasses.replace(get_preset("tiny").refiner))
    seeded_init_(m, 5)
    return m.to(device=device, dtype=dtype).eval().requires_grad_(False)


def refiner_call(model, device, seed=0, n=3, hw=(4, 6)):
    g = torch.Generator().manual_seed(seed)
    c = model.cfg
    dtype = model.proj_in.weight.dtype
    x = torch.randn(1, c.in_channels, n, *hw, generator=g).to(device, dtype)
    emb = torch.randn(1, 7, c.caption_channels, generator=g).to(device, dtype)
    mask = torch.ones(1, 7, dtype=torch.int64, device=device)
    text = model.prepare_text(emb, mask)
    return lambda: model(x, 0.725, text, fps=16.0, frame_positions=torch.arange(5, 5 + n))


def test_swap_keeps_parameters_and_falls_back_where_it_does_not_apply():
    model = tiny_refiner()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    want = refiner_call(model, "cpu")()
    n = use_fused_gelu(model)
    assert n == model.num_layers and use_fused_gelu(model) == 0  # once
    assert all(type(b.ff.net[0]) is FusedGELUProj for b in model.transformer_blocks)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    torch.testing.assert_close(refiner_call(model, "cpu")(), want, rtol=1e-5, atol=1e-5)
    # no bias, or a projection another fast path replaced: the plain computation
    x = torch.randn(3, 8)
    nobias = FusedGELUProj(nn.Linear(8, 12, bias=False))
    torch.testing.assert_close(nobias(x), F.gelu(nobias.proj(x), approximate="tanh"))

    class Other(nn.Linear):
        pass

    other = FusedGELUProj(Other(8, 12))
    torch.testing.assert_close(other(x), F.gelu(nn.Linear.forward(other.proj, x), approximate="tanh"))


def test_which_path_the_swapped_projection_takes(monkeypatch):
    """The fused op for a plain Linear with bias; the plain computation (never the op) otherwise."""
    import engine.fast.refiner_gelu as rg

    calls = []
    monkeypatch.setattr(rg, "linear_gelu_tanh", lambda x, w, b: calls.append(x.shape) or plain(x, w, b))
    x = torch.randn(3, 8)

    class Other(nn.Linear):
        pass

    FusedGELUProj(nn.Linear(8, 12))(x)
    assert calls == [x.shape]
    FusedGELUProj(nn.Linear(8, 12, bias=False))(x)
    FusedGELUProj(Other(8, 12))(x)
    assert calls == [x.shape]


# ------------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
# fp32: the epilogue evaluates tanh with a faster approximation than torch's GELU (measured on the H100: 2.4e-6
# relative against fp64 at every shape, the plain path 1e-7..1.3e-6); the erf GELU would be off by ~1e-4.
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 8e-3)])
@pytest.mark.parametrize("m,k,n", [(37, 72, 104), (300, 256, 1000), (2640, 4096, 16384)])
def test_epilogue_equals_plain_on_gpu(dtype, tol, m, k, n):
    g = torch.Generator(device="cuda").manual_seed(2)
    x = torch.randn(m, k, device="cuda", generator=g).to(dtype)
    w = (torch.randn(n, k, device="cuda", generator=g) / k**0.5).to(dtype)
    b = (0.1 * torch.randn(n, device="cuda", generator=g)).to(dtype)
    got = linear_gelu_tanh(x, w, b)
    want = plain(x.double(), w.double(), b.double())  # the function itself, without either path's roundings
    err, err_plain = rel(got, want), rel(plain(x, w, b), want)
    print(f"linear_gelu_tanh {dtype} {m}x{k}x{n}: rel err {err:.2e} (plain path {err_plain:.2e}, tol {tol})")
    assert got.dtype == dtype and got.shape == (m, n)
    assert err <= tol


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_tiny_refiner_forward_with_the_swap(dtype, tol):
    model = tiny_refiner(dtype, "cuda")
    call = refiner_call(model, "cuda", hw=(12, 20))
    want = call()
    use_fused_gelu(model)
    err = rel(call(), want)
    print(f"tiny refiner {dtype} fused GELU vs plain: rel err {err:.2e} (tol {tol})")
    assert err <= tol


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 8e-3)])
def test_compiled_ffn_keeps_the_fused_op(dtype, tol):
    """torch.compile calls the op as it is (one opaque GEMM with its epilogue) and gets the eager op's values."""
    torch.manual_seed(3)
    ff = tiny_refiner(dtype, "cuda").transformer_blocks[0].ff
    use_ff = FusedGELUProj(ff.net[0].proj)
    h = torch.randn(2, 240, ff.net[0].proj.in_features, device="cuda").to(dtype)
    eager = ff.net[2](use_ff(h))
    compiled = torch.compile(lambda t: ff.net[2](use_ff(t)))(h)
    err = rel(compiled, eager)
    print(f"compiled FFN with the fused op {dtype}: rel err vs eager {err:.2e}")
    assert err <= tol


def test_fp8_takes_precedence_over_the_fused_gelu():
    """`refiner-gelu` then `refiner-fp8` (FAST_PATHS order): fp8 still finds every block linear by name (the
    up-projection inside FusedGELUProj); the GELU then moves into the down projection's quantiser, and the FFN
    computes what the plain order (GELU over the fp8 up projection, then the fp8 down projection) does."""
    from engine.fast.refiner_fp8 import BLOCK_LINEARS, Fp8Linear, PreActivation, use_fp8_linears

    model = tiny_refiner()
    use_fused_gelu(model)
    assert use_fp8_linears(model) == len(BLOCK_LINEARS) * model.num_layers
    ff = model.transformer_blocks[0].ff
    up, down = ff.net[0], ff.net[2]
    assert type(up) is PreActivation and isinstance(up.proj, Fp8Linear) and down.act == "gelu_tanh"
    plain_down = Fp8Linear(down.weight, down.weight_scale, down.bias, down.out_dtype)
    x = torch.randn(2, 5, up.proj.in_features)
    torch.testing.assert_close(ff(x), plain_down(F.gelu(up.proj(x), approximate="tanh")))
