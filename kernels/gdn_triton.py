"""Frame-wise gated delta rule scans as Triton kernels (the plain references are kernels/gdn.py and
kernels/camera_scan.py; this module computes the same functions behind the same signatures).

Per batch element and head, frame f's tokens K_f, V_f `[S, D]`, B_f = diag(beta[f]), gamma_f:

    state_f = gamma_f * state_{f-1} + (V_f - gamma_f K_f state_{f-1}^T)^T B_f K_f      # [Dv, Dk]
            = gamma_f * (state_{f-1} - state_{f-1} K_f^T B_f K_f) + V_f^T B_f K_f      (kernels/gdn.py)
    out[f, s] = state_f q_{f,s}    (forward, inclusive; backward reads state_{f+1..} before the update)

The rows of the state (one per value channel) evolve independently, so one program owns a `[BLOCK_V, Dk]`
slice of the fp32 state in registers for one (batch, head) and walks the frames: per S tile it computes
P = K state^T `[BLOCK_S, BLOCK_V]`, U = beta (V - gamma P), accumulates U^T K, and after the frame sets
state = gamma state + sum U^T K; outputs are q state^T per tile. Dk is padded to a power of two (112 -> 128)
with masked loads. The GDN normaliser (Dv = 1, v = ones, unrotated q/k) runs as one extra program per
(batch, head) of the same launch, so numerator and normaliser share one wave of programs.

Inputs may be bf16/fp16/fp32 and non-contiguous (any strides); everything is accumulated in fp32; outputs and
states are fp32 like the references. `precision` picks the tl.dot mode for the fp32 products: "ieee" (exact
fp32 FMAs, no tensor cores), "tf32x3" (three TF32 products, ~fp32 accuracy on tensor cores) or "tf32"
(one TF32 product, ~1e-3 relative, as the project's TF32 scan path). The wrappers allocate with torch.empty
only and never synchronise, so they can be captured in CUDA graphs; they are torch custom ops (`sana_wm::`)
with fake implementations, so torch.compile treats them as opaque calls. Triton is optional: without it (or
off CUDA, unless TRITON_INTERPRET=1 runs the kernels on CPU tensors) the wrappers raise `TritonScanError`.

Knows nothing of models. Shapes as the references: q, k, v `[B, H, T, S, D]`, beta `[B, H, T, S]`,
gamma `[B, H, T]`, state `[B, H, Dv, Dk]`.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the plain scans serve
    triton = None

PRECISIONS = ("ieee", "tf32x3", "tf32")
# H100, release shapes, bf16 inputs, one GDN block's four scans replayed from a CUDA graph
# (tests/benchmarks/scan_bench.py): strict-fp32 torch 2.01 ms, TF32 torch 1.37 ms (max rel. err 3.0e-4);
# Triton tf32 0.49 ms (7.6e-4), tf32x3 0.99 ms (1.1e-6), ieee 4.7 ms (1.1e-6). The project accepts TF32-level
# error for its scans (stage1-tf32-scans), so the default is tf32; pass "tf32x3" for fp32 accuracy.
DEFAULT_PRECISION = "tf32"


class TritonScanError(RuntimeError):
    """The Triton scans were called where they cannot run (no Triton, tensors not on CUDA) or with bad inputs."""


if triton is not None:

    @triton.jit
    def _scan_stream(q_ptr, k_ptr, v_ptr, beta_ptr, gamma_ptr, s_in_ptr, out_ptr, s_out_ptr,
                     T, S, DK, DV, v0,
                     sq_t, sq_s, sq_d, sk_t, sk_s, sk_d, sv_t, sv_s, sv_d, sb_t, sb_s, sg_t, ss_v, ss_k,
                     HAS_STATE: tl.constexpr, REVERSE: tl.constexpr, V_ONES: tl.constexpr,
                     BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
                     PRECISION: tl.constexpr):
        """One (batch, head, value block): pointers arrive offset to the (batch, head). The output is
        contiguous `[T, S, DV]`, the final state contiguous `[DV, DK]`."""
        offs_k = tl.arange(0, BLOCK_K)
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_k = offs_k < DK
        mask_v = offs_v < DV
        mask_st = mask_v[:, None] & mask_k[None, :]
        if HAS_STATE:
            st = tl.load(s_in_ptr + offs_v[:, None] * ss_v + offs_k[None, :] * ss_k, mask=mask_st,
                         other=0.0).to(tl.float32)
        else:
            st = tl.zeros([BLOCK_V, BLOCK_K], dtype=tl.float32)
        for i in range(T):
            if REVERSE:
                f = T - 1 - i
            else:
                f = i
            g = tl.load(gamma_ptr + f * sg_t).to(tl.float32)
            acc = tl.zeros([BLOCK_V, BLOCK_K], dtype=tl.float32)
            for s0 in range(0, S, BLOCK_S):
                rows = s0 + tl.arange(0, BLOCK_S)
                mask_r = rows < S
                kt = tl.load(k_ptr + f * sk_t + rows[:, None] * sk_s + offs_k[None, :] * sk_d,
                             mask=mask_r[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
                bt = tl.load(beta_ptr + f * sb_t + rows * sb_s, mask=mask_r, other=0.0).to(tl.float32)
                if V_ONES:
                    vt = tl.where(mask_r[:, None] & mask_v[None, :], 1.0, 0.0)
                else:
                    vt = tl.load(v_ptr + f * sv_t + rows[:, None] * sv_s + offs_v[None, :] * sv_d,
                                 mask=mask_r[:, None] & mask_v[None, :], other=0.0).to(tl.float32)
                if REVERSE:  # exclusive: frame f reads the state of frames f+1.. before its own update
                    qt = tl.load(q_ptr + f * sq_t + rows[:, None] * sq_s + offs_k[None, :] * sq_d,
                                 mask=mask_r[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
                    o = tl.dot(qt, tl.trans(st), input_precision=PRECISION)
                    tl.store(out_ptr + (f * S + rows[:, None]) * DV + offs_v[None, :], o,
                             mask=mask_r[:, None] & mask_v[None, :])
                p = tl.dot(kt, tl.trans(st), input_precision=PRECISION)  # K state^T  [BLOCK_S, BLOCK_V]
                u = (vt - g * p) * bt[:, None]
                acc = tl.dot(tl.trans(u), kt, acc, input_precision=PRECISION)
            st = g * st + acc
            if not REVERSE:  # inclusive: frame f reads the state after its own update
                for s0 in range(0, S, BLOCK_S):
                    rows = s0 + tl.arange(0, BLOCK_S)
                    mask_r = rows < S
                    qt = tl.load(q_ptr + f * sq_t + rows[:, None] * sq_s + offs_k[None, :] * sq_d,
                                 mask=mask_r[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
                    o = tl.dot(qt, tl.trans(st), input_precision=PRECISION)
                    tl.store(out_ptr + (f * S + rows[:, None]) * DV + offs_v[None, :], o,
                             mask=mask_r[:, None] & mask_v[None, :])
        tl.store(s_out_ptr + offs_v[:, None] * DK + offs_k[None, :], st, mask=mask_st)

    @triton.jit
    def _delta_rule_kernel(
        qa_ptr, ka_ptr, v_ptr, qb_ptr, kb_ptr, beta_ptr, gamma_ptr, sa_in_ptr, sb_in_ptr,
        outa_ptr, outb_ptr, sa_out_ptr, sb_out_ptr,
        H, T, S, DK, DV, NV,
        sqa_b, sqa_h, sqa_t, sqa_s, sqa_d, ska_b, ska_h, ska_t, ska_s, ska_d,
        sv_b, sv_h, sv_t, sv_s, sv_d,
        sqb_b, sqb_h, sqb_t, sqb_s, sqb_d, skb_b, skb_h, skb_t, skb_s, skb_d,
        sbe_b, sbe_h, sbe_t, sbe_s, sg_b, sg_h, sg_t,
        ssa_b, ssa_h, ssa_v, ssa_k, ssb_b, ssb_h, ssb_k,
        HAS_STATE: tl.constexpr, REVERSE: tl.constexpr, HAS_NORM: tl.constexpr,
        BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_S_NORM: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """Grid (B*H, NV + HAS_NORM): programs 0..NV-1 of a (batch, head) scan stream a (q_a, k_a, v) by value
        blocks; program NV (when HAS_NORM) scans stream b (q_b, k_b, v = ones, Dv = 1)."""
        pid_bh = tl.program_id(0)
        pid_v = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        beta = beta_ptr + b * sbe_b + h * sbe_h
        gamma = gamma_ptr + b * sg_b + h * sg_h
        if pid_v < NV:
            _scan_stream(qa_ptr + b * sqa_b + h * sqa_h, ka_ptr + b * ska_b + h * ska_h, v_ptr + b * sv_b + h * sv_h,
                         beta, gamma, sa_in_ptr + b * ssa_b + h * ssa_h, outa_ptr + pid_bh.to(tl.int64) * T * S * DV,
                         sa_out_ptr + pid_bh.to(tl.int64) * DV * DK, T, S, DK, DV, pid_v * BLOCK_V,
                         sqa_t, sqa_s, sqa_d, ska_t, ska_s, ska_d, sv_t, sv_s, sv_d, sbe_t, sbe_s, sg_t, ssa_v, ssa_k,
                         HAS_STATE, REVERSE, False, BLOCK_S, BLOCK_K, BLOCK_V, PRECISION)
        elif HAS_NORM:
            _scan_stream(qb_ptr + b * sqb_b + h * sqb_h, kb_ptr + b * skb_b + h * skb_h, v_ptr,
                         beta, gamma, sb_in_ptr + b * ssb_b + h * ssb_h, outb_ptr + pid_bh.to(tl.int64) * T * S,
                         sb_out_ptr + pid_bh.to(tl.int64) * DK, T, S, DK, 1, 0,
                         sqb_t, sqb_s, sqb_d, skb_t, skb_s, skb_d, 0, 0, 0, sbe_t, sbe_s, sg_t, 0, ssb_k,
                         HAS_STATE, REVERSE, True, BLOCK_S_NORM, BLOCK_K, 16, PRECISION)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1 at import time)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _check_runnable(x: torch.Tensor, name: str) -> None:
    if triton is None:
        raise TritonScanError(f"{name}: Triton is not installed; use the plain scans (kernels.gdn) instead")
    if not x.is_cuda and not interpreting():
        raise TritonScanError(f"{name}: tensors are on {x.device}; the Triton scans need CUDA tensors "
                              "(or TRITON_INTERPRET=1 to run them on CPU tensors)")


def _check_inputs(q, k, v, beta, gamma, state, precision, name):
    if precision not in PRECISIONS:
        raise TritonScanError(f"{name}: precision {precision!r}; accepted: {PRECISIONS}")
    if q.dim() != 5 or k.shape != q.shape or v.shape[:-1] != q.shape[:-1]:
        raise TritonScanError(f"{name}: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: need q, k "
                              "[B, H, T, S, Dk] and v [B, H, T, S, Dv]")
    B, H, T, S, Dk = q.shape
    if tuple(beta.shape) != (B, H, T, S) or tuple(gamma.shape) != (B, H, T):
        raise TritonScanError(f"{name}: beta {tuple(beta.shape)}, gamma {tuple(gamma.shape)}: need "
                              f"beta {(B, H, T, S)} and gamma {(B, H, T)}")
    if state is not None and tuple(state.shape) != (B, H, v.shape[-1], Dk):
        raise TritonScanError(f"{name}: state {tuple(state.shape)}: need {(B, H, v.shape[-1], Dk)}")
    if Dk > 256:
        raise TritonScanError(f"{name}: head dim {Dk} > 256 is not supported by the Triton scans")
    if q.device != k.device or q.device != v.device or q.device != beta.device or q.device != gamma.device:
        raise TritonScanError(f"{name}: inputs on different devices")


def _blocks(Dk: int, Dv: int, precision: str, itemsize: int) -> dict:
    """Tile sizes and warps, the fastest of tests/benchmarks/scan_bench.py --sweep on an H100 at the release
    shapes (GDN forward + backward, H=20, T=3, S=880, D=112, bf16 inputs): tf32 / tf32x3 0.25 / 0.50 ms with
    BLOCK_S=128, BLOCK_V=32, 8 warps (0.30 / 0.68 with 64, 32, 4 warps, which fp32 inputs need: their
    128-row tiles overflow shared memory); the SIMT "ieee" dots spill at that size and want 32, 32, 4 warps
    (2.5 ms)."""
    block_k = max(16, triton.next_power_of_2(Dk))
    block_v = min(32, max(16, triton.next_power_of_2(Dv)))
    if precision == "ieee":
        block_s, warps = (32 if block_k <= 128 else 16), 4
    elif itemsize <= 2 and block_k <= 128:
        block_s, warps = 128, 8
    else:
        block_s, warps = (64 if block_k <= 128 else 32), 4
    return dict(BLOCK_S=block_s, BLOCK_K=block_k, BLOCK_V=block_v, BLOCK_S_NORM=block_s, num_warps=warps,
                num_stages=2)


_SMALLER: dict = {}  # launch key -> config that fitted after OutOfResources (a GPU with less shared memory)


def _launch(qa, ka, v, beta, gamma, state_a, qb, kb, state_b, reverse: bool, precision: str, config: dict | None):
    """Scan stream a (and, when qb is given, the normaliser stream b) in one launch. Returns
    (out_a, state_a, out_b, state_b); the b outputs are None without qb."""
    B, H, T, S, Dk = qa.shape
    Dv = v.shape[-1]
    dev = qa.device
    itemsize = max(t.element_size() for t in (qa, ka, v) + (() if qb is None else (qb, kb)))
    key = (Dk, Dv, precision, itemsize, qb is not None)
    cfg = dict(_SMALLER.get(key) or _blocks(Dk, Dv, precision, itemsize), **(config or {}))
    nv = triton.cdiv(Dv, cfg["BLOCK_V"])
    out_a = torch.empty(B, H, T, S, Dv, device=dev, dtype=torch.float32)
    st_a = torch.empty(B, H, Dv, Dk, device=dev, dtype=torch.float32)
    norm = qb is not None
    out_b = torch.empty(B, H, T, S, device=dev, dtype=torch.float32) if norm else out_a
    st_b = torch.empty(B, H, Dk, device=dev, dtype=torch.float32) if norm else st_a
    qb, kb = (qb, kb) if norm else (qa, ka)
    has_state = state_a is not None
    sa = state_a if has_state else st_a  # never read without HAS_STATE
    sb = state_b if (has_state and norm) else st_b
    if B * H == 0:
        return out_a, st_a, (out_b if norm else None), (st_b if norm else None)
    args = (qa, ka, v, qb, kb, beta, gamma, sa, sb, out_a, out_b, st_a, st_b, H, T, S, Dk, Dv, nv,
            *qa.stride(), *ka.stride(), *v.stride(), *qb.stride(), *kb.stride(), *beta.stride(), *gamma.stride(),
            *(sa.stride() if has_state else (0, 0, 0, 0)), *(sb.stride() if has_state and norm else (0, 0, 0)))
    while True:
        try:
            _delta_rule_kernel[(B * H, nv + int(norm))](*args, HAS_STATE=has_state, REVERSE=reverse, HAS_NORM=norm,
                                                        PRECISION=precision, **cfg)
            break
        except triton.runtime.errors.OutOfResources:  # raised at compile time, before anything runs
            if config or cfg["BLOCK_S"] <= 16:
                raise
            cfg = dict(cfg, BLOCK_S=cfg["BLOCK_S"] // 2, BLOCK_S_NORM=cfg["BLOCK_S"] // 2, num_stages=1)
            _SMALLER[key] = cfg
    return out_a, st_a, (out_b if norm else None), (st_b if norm else None)


# torch custom ops: opaque to dynamo, CUDA-graph friendly (torch.empty + one launch) -------------------------


@torch.library.custom_op("sana_wm::delta_rule_scan", mutates_args=())
def _delta_rule_scan_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, gamma: torch.Tensor,
                        state: torch.Tensor | None, reverse: bool, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    _check_runnable(q, "delta_rule_scan_triton")
    out, st, _, _ = _launch(q, k, v, beta, gamma, state, None, None, None, reverse, precision, None)
    return out, st


@_delta_rule_scan_op.register_fake
def _(q, k, v, beta, gamma, state, reverse, precision):
    B, H, T, S, Dk = q.shape
    Dv = v.shape[-1]
    return q.new_empty(B, H, T, S, Dv, dtype=torch.float32), q.new_empty(B, H, Dv, Dk, dtype=torch.float32)


@torch.library.custom_op("sana_wm::gdn_scan", mutates_args=())
def _gdn_scan_op(q_rot: torch.Tensor, k_rot: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 beta: torch.Tensor, gamma: torch.Tensor, sigma: torch.Tensor | None, z: torch.Tensor | None,
                 reverse: bool, precision: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_runnable(q, "gdn_forward_triton / gdn_backward_triton")
    num, sigma, den, z = _launch(q_rot, k_rot, v, beta, gamma, sigma, q, k, z, reverse, precision, None)
    return num, den, sigma, z


@_gdn_scan_op.register_fake
def _(q_rot, k_rot, q, k, v, beta, gamma, sigma, z, reverse, precision):
    B, H, T, S, Dk = q_rot.shape
    Dv = v.shape[-1]
    f32 = dict(dtype=torch.float32)
    return (q.new_empty(B, H, T, S, Dv, **f32), q.new_empty(B, H, T, S, **f32), q.new_empty(B, H, Dv, Dk, **f32),
            q.new_empty(B, H, Dk, **f32))


# public functions: the reference signatures (plus a keyword-only precision) --------------------------------


def delta_rule_scan_triton(q, k, v, beta, gamma, state=None, *, reverse=False, precision=DEFAULT_PRECISION):
    """`kernels.gdn.delta_rule_scan` in one Triton launch. Returns (out `[B, H, T, S, Dv]`, final state), fp32."""
    _check_inputs(q, k, v, beta, gamma, state, precision, "delta_rule_scan_triton")
    if reverse and state is not None:
        raise ValueError("the backward (exclusive) scan starts from zeros; no state can be passed")
    return _delta_rule_scan_op(q, k, v, beta, gamma, state, reverse, precision)


def gdn_forward_triton(q_rot, k_rot, q, k, v, beta, gamma, state=None, *, precision=DEFAULT_PRECISION):
    """`kernels.gdn.gdn_forward`: numerator and normaliser in one launch. Returns num `[B, H, T, S, D]`,
    den `[B, H, T, S]` (fp32) and the final (Sigma `[B, H, D, D]`, z `[B, H, D]`)."""
    sigma, z = (None, None) if state is None else state
    _check_inputs(q_rot, k_rot, v, beta, gamma, sigma, precision, "gdn_forward_triton")
    if q.shape != q_rot.shape or k.shape != k_rot.shape:
        raise TritonScanError(f"gdn_forward_triton: q {tuple(q.shape)} / k {tuple(k.shape)} differ from q_rot / k_rot "
                              f"{tuple(q_rot.shape)}")
    if z is not None and tuple(z.shape) != (q.shape[0], q.shape[1], q.shape[-1]):
        raise TritonScanError(f"gdn_forward_triton: z {tuple(z.shape)}: need {(q.shape[0], q.shape[1], q.shape[-1])}")
    if (sigma is None) != (z is None):
        raise TritonScanError("gdn_forward_triton: state must hold both Sigma and z (or be None)")
    num, den, sigma, z = _gdn_scan_op(q_rot, k_rot, q, k, v, beta, gamma, sigma, z, False, precision)
    return num, den, (sigma, z)


def gdn_backward_triton(q_rot, k_rot, q, k, v, beta, gamma, *, precision=DEFAULT_PRECISION):
    """`kernels.gdn.gdn_backward`: exclusive, zero-initialised. Returns num `[B, H, T, S, D]`, den `[B, H, T, S]`."""
    _check_inputs(q_rot, k_rot, v, beta, gamma, None, precision, "gdn_backward_triton")
    if q.shape != q_rot.shape or k.shape != k_rot.shape:
        raise TritonScanError(f"gdn_backward_triton: q {tuple(q.shape)} / k {tuple(k.shape)} differ from q_rot / "
                              f"k_rot {tuple(q_rot.shape)}")
    num, den, _, _ = _gdn_scan_op(q_rot, k_rot, q, k, v, beta, gamma, None, None, True, precision)
    return num, den


def camera_scan_forward_triton(q, k, v, beta, gamma, state=None, *, precision=DEFAULT_PRECISION):
    """`kernels.camera_scan.camera_scan_forward`. Returns (out `[B, H, T, S, D]`, state `[B, H, D, D]`)."""
    return delta_rule_scan_triton(q, k, v, beta, gamma, state, precision=precision)


def camera_scan_backward_triton(q, k, v, beta, gamma, *, precision=DEFAULT_PRECISION):
    """`kernels.camera_scan.camera_scan_backward`. Returns out `[B, H, T, S, D]`."""
    return delta_rule_scan_triton(q, k, v, beta, gamma, reverse=True, precision=precision)[0]


def launch_with_config(q, k, v, beta, gamma, state=None, *, reverse=False, precision=DEFAULT_PRECISION, qn=None,
                       kn=None, z=None, **config):
    """The raw launch with explicit tile sizes / warps (for tests/benchmarks/scan_bench.py --sweep); qn, kn
    add the normaliser stream. Returns (out, state, den, z)."""
    _check_inputs(q, k, v, beta, gamma, state, precision, "launch_with_config")
    _check_runnable(q, "launch_with_config")
    return _launch(q, k, v, beta, gamma, state, qn, kn, z, reverse, precision, config)
