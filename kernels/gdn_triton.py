"""Frame-wise gated delta rule scans as Triton kernels (the plain references are kernels/gdn.py and
kernels/camera_scan.py; this module computes the same functions behind the same signatures).

Per batch element and head, frame f's tokens K_f, V_f `[S, D]`, B_f = diag(beta[f]), gamma_f:

    state_f = gamma_f * state_{f-1} + (V_f - gamma_f K_f state_{f-1}^T)^T B_f K_f      # [Dv, Dk]
            = gamma_f * (state_{f-1} - state_{f-1} K_f^T B_f K_f) + V_f^T B_f K_f      (kernels/gdn.py)
    out[f, s] = state_f q_{f,s}    (forward, inclusive; backward reads state_{f+1..} before the update)

Two strategies compute the same functions (`strategy=`, default DEFAULT_STRATEGY):

"stream" (one launch). The rows of the state (one per value channel) evolve independently, so one program owns
a `[BLOCK_V, Dk]` slice of the fp32 state in registers for one (batch, head) and walks the frames: per S tile it
computes P = K state^T `[BLOCK_S, BLOCK_V]`, U = beta (V - gamma P), accumulates U^T K, and after the frame sets
state = gamma state + sum U^T K; outputs are q state^T per tile. Few programs (B*H*(Dv/BLOCK_V + 1)).

"parallel" (three launches). The frame matrices A_f = K_f^T B_f K_f `[Dk, Dk]` and W_f = V_f^T B_f K_f
`[Dv, Dk]` do not depend on the state: phase 1 computes them for all (batch, head, frame, token split, row
block) at once into a workspace (token-split partial sums, added in a fixed order in phase 2: deterministic);
phase 2 runs state_f = gamma_f (state_{f-1} - state_{f-1} A_f) + W_f per (batch, head, value block) over the
T frames and stores every frame's state; phase 3 reads out q state^T per (batch, head, frame, token tile, value
block). A different association than "stream", so results differ at the rounding level of the precision.

Both pad Dk to a power of two (112 -> 128) with masked loads, and run the GDN normaliser (Dv = 1, v = ones,
unrotated q/k) in the same launches as the numerator (extra programs per (batch, head)).

`gdn_block_phases_triton` runs a one-segment GDN block's scans and their combination (main = numerator over
normaliser + eps, camera = forward + backward) as three launches, "parallel"-style: the frame matrices once for both
directions, the six recurrences side by side, a readout from the summed forward and backward states that writes
the combined results in the model's dtype. With bf16 inputs under "tf32" its phase-1 and readout products split
the fp32 operand into two bf16 parts (two bf16 dots, ~2^-16 relative). H200, release shapes, graph replay: 0.20 ms
a block against 0.45 for the one launch below plus the combination in eager torch.

`gdn_block_triton` runs the four scans of a one-segment GDN block (main forward with its normaliser and state, main
backward, camera forward with its state, camera backward) as one launch of "stream" programs: ~4x the programs of
one scan in flight on the GPU's SMs (H100, release shapes, graph replay: 0.381 ms against 0.475 for four launches;
bit-equal to them).

Inputs may be bf16/fp16/fp32 and non-contiguous (any strides); everything is accumulated in fp32; outputs and
states are fp32 like the references. `precision` picks the tl.dot mode for the fp32 products: "ieee" (exact
fp32 FMAs, no tensor cores), "tf32x3" (three TF32 products, ~fp32 accuracy on tensor cores) or "tf32"
(one TF32 product, ~1e-3 relative, as the project's TF32 scan path). The wrappers allocate with torch.empty
only (outputs and workspaces) and never synchronise, so they can be captured in CUDA graphs; they are torch
custom ops (`sana_wm::`) with fake implementations, so torch.compile treats them as opaque calls. Triton is
optional: without it (or off CUDA, unless TRITON_INTERPRET=1 runs the kernels on CPU tensors) the wrappers
raise `TritonScanError`.

Knows nothing of models. Shapes as the references: q, k, v `[B, H, T, S, D]`, beta `[B, H, T, S]`,
gamma `[B, H, T]`, state `[B, H, Dv, Dk]`.
"""

from __future__ import annotations

import torch

from kernels import interpreting

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the plain scans serve
    triton = None

PRECISIONS = ("ieee", "tf32x3", "tf32")
# H100, release shapes, bf16 inputs, one GDN block's four scans replayed from a CUDA graph
# (tests/benchmarks/scan_bench.py): strict-fp32 torch 2.01 ms, TF32 torch 1.37 ms (max rel. err 3.0e-4);
# Triton ("stream") tf32 0.49 ms (7.6e-4), tf32x3 0.99 ms (1.1e-6), ieee 4.7 ms (1.1e-6). The project accepts TF32-level
# error for its scans (stage1-tf32-scans), so the default is tf32; pass "tf32x3" for fp32 accuracy.
DEFAULT_PRECISION = "tf32"
# "stream": one launch, a program per (batch, head, value block) walks the frames (at the release shapes only
# ~100 programs). "parallel": three launches (frame matrices per (frame, token split), the recurrence on them,
# the readout per (frame, token tile)). Measured on an H100 (scan_bench.py, release shapes, graph replay, tf32): a
# GDN block's four scans 0.72 ms "parallel" vs 0.50 ms "stream", untuned, so "stream" stays the default;
# "parallel" is kept for tuning (scan_bench.py --sweep) and is tested against the references like "stream".
STRATEGIES = ("stream", "parallel")
DEFAULT_STRATEGY = "stream"


class TritonScanError(RuntimeError):
    """The Triton scans were called where they cannot run (no Triton, tensors not on CUDA) or with bad inputs."""


if triton is not None:

    @triton.jit
    def _scan_stream(q_ptr, k_ptr, v_ptr, beta_ptr, gamma_ptr, s_in_ptr, out_ptr, s_out_ptr,
                     T, S, DK, DV, v0,
                     sq_t, sq_s, sq_d, sk_t, sk_s, sk_d, sv_t, sv_s, sv_d, sb_t, sb_s, sg_t, ss_v, ss_k,
                     HAS_STATE: tl.constexpr, REVERSE: tl.constexpr, V_ONES: tl.constexpr,
                     BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
                     PRECISION: tl.constexpr, STORE_STATE: tl.constexpr):
        """One (batch, head, value block): pointers arrive offset to the (batch, head). The output is
        contiguous `[T, S, DV]`, the final state contiguous `[DV, DK]` (not stored without STORE_STATE)."""
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
        if STORE_STATE:
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
                         HAS_STATE, REVERSE, False, BLOCK_S, BLOCK_K, BLOCK_V, PRECISION, True)
        elif HAS_NORM:
            _scan_stream(qb_ptr + b * sqb_b + h * sqb_h, kb_ptr + b * skb_b + h * skb_h, v_ptr,
                         beta, gamma, sb_in_ptr + b * ssb_b + h * ssb_h, outb_ptr + pid_bh.to(tl.int64) * T * S,
                         sb_out_ptr + pid_bh.to(tl.int64) * DK, T, S, DK, 1, 0,
                         sqb_t, sqb_s, sqb_d, skb_t, skb_s, skb_d, 0, 0, 0, sbe_t, sbe_s, sg_t, 0, ssb_k,
                         HAS_STATE, REVERSE, True, BLOCK_S_NORM, BLOCK_K, 16, PRECISION, True)


    @triton.jit
    def _gdn_block_kernel(
        qr_ptr, kr_ptr, q_ptr, k_ptr, v_ptr, beta_ptr, gamma_ptr, sig_in_ptr, z_in_ptr,
        qc_ptr, kc_ptr, vc_ptr, betac_ptr, sigc_in_ptr,
        numf_ptr, denf_ptr, sig_out_ptr, z_out_ptr, numb_ptr, denb_ptr, camf_ptr, sigc_out_ptr, camb_ptr,
        H, T, S, DK, DV, NV,
        sqr_b, sqr_h, sqr_t, sqr_s, sqr_d, skr_b, skr_h, skr_t, skr_s, skr_d,
        sq_b, sq_h, sq_t, sq_s, sq_d, sk_b, sk_h, sk_t, sk_s, sk_d, sv_b, sv_h, sv_t, sv_s, sv_d,
        sbe_b, sbe_h, sbe_t, sbe_s, sg_b, sg_h, sg_t, ssg_b, ssg_h, ssg_v, ssg_k, sz_b, sz_h, sz_k,
        sqc_b, sqc_h, sqc_t, sqc_s, sqc_d, skc_b, skc_h, skc_t, skc_s, skc_d, svc_b, svc_h, svc_t, svc_s, svc_d,
        sbc_b, sbc_h, sbc_t, sbc_s, ssc_b, ssc_h, ssc_v, ssc_k,
        HAS_STATE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
        BLOCK_S_NORM: tl.constexpr, PRECISION: tl.constexpr,
    ):
        """The four scans of a one-segment GDN block in one launch. Grid (B*H, 4*NV + 2); the second index
        picks the scan: [0, NV) forward numerator by value blocks (q_rot, k_rot, v; state Sigma), NV forward
        normaliser (q, k, ones; state z), [NV+1, 2NV+1) and 2NV+1 the same backwards (exclusive, from zeros,
        final states not stored), [2NV+2, 3NV+2) the camera forward (qc, kc, vc, beta_c; state Sigma_c) and
        [3NV+2, 4NV+2) the camera backward. Each program runs `_scan_stream` as `_delta_rule_kernel` does."""
        pid_bh = tl.program_id(0)
        slot = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        bh = pid_bh.to(tl.int64)
        beta = beta_ptr + b * sbe_b + h * sbe_h
        gamma = gamma_ptr + b * sg_b + h * sg_h
        qr, kr = qr_ptr + b * sqr_b + h * sqr_h, kr_ptr + b * skr_b + h * skr_h
        q, k, v = q_ptr + b * sq_b + h * sq_h, k_ptr + b * sk_b + h * sk_h, v_ptr + b * sv_b + h * sv_h
        if slot < NV:
            _scan_stream(qr, kr, v, beta, gamma, sig_in_ptr + b * ssg_b + h * ssg_h, numf_ptr + bh * T * S * DV,
                         sig_out_ptr + bh * DV * DK, T, S, DK, DV, slot * BLOCK_V,
                         sqr_t, sqr_s, sqr_d, skr_t, skr_s, skr_d, sv_t, sv_s, sv_d, sbe_t, sbe_s, sg_t, ssg_v, ssg_k,
                         HAS_STATE, False, False, BLOCK_S, BLOCK_K, BLOCK_V, PRECISION, True)
        elif slot == NV:
            _scan_stream(q, k, v_ptr, beta, gamma, z_in_ptr + b * sz_b + h * sz_h, denf_ptr + bh * T * S,
                         z_out_ptr + bh * DK, T, S, DK, 1, 0,
                         sq_t, sq_s, sq_d, sk_t, sk_s, sk_d, 0, 0, 0, sbe_t, sbe_s, sg_t, 0, sz_k,
                         HAS_STATE, False, True, BLOCK_S_NORM, BLOCK_K, 16, PRECISION, True)
        elif slot < 2 * NV + 1:
            _scan_stream(qr, kr, v, beta, gamma, sig_in_ptr, numb_ptr + bh * T * S * DV, sig_out_ptr,
                         T, S, DK, DV, (slot - NV - 1) * BLOCK_V,
                         sqr_t, sqr_s, sqr_d, skr_t, skr_s, skr_d, sv_t, sv_s, sv_d, sbe_t, sbe_s, sg_t, 0, 0,
                         False, True, False, BLOCK_S, BLOCK_K, BLOCK_V, PRECISION, False)
        elif slot == 2 * NV + 1:
            _scan_stream(q, k, v_ptr, beta, gamma, z_in_ptr, denb_ptr + bh * T * S, z_out_ptr, T, S, DK, 1, 0,
                         sq_t, sq_s, sq_d, sk_t, sk_s, sk_d, 0, 0, 0, sbe_t, sbe_s, sg_t, 0, 0,
                         False, True, True, BLOCK_S_NORM, BLOCK_K, 16, PRECISION, False)
        else:
            qc, kc = qc_ptr + b * sqc_b + h * sqc_h, kc_ptr + b * skc_b + h * skc_h
            vc, betac = vc_ptr + b * svc_b + h * svc_h, betac_ptr + b * sbc_b + h * sbc_h
            if slot < 3 * NV + 2:
                _scan_stream(qc, kc, vc, betac, gamma, sigc_in_ptr + b * ssc_b + h * ssc_h,
                             camf_ptr + bh * T * S * DV, sigc_out_ptr + bh * DV * DK, T, S, DK, DV,
                             (slot - 2 * NV - 2) * BLOCK_V,
                             sqc_t, sqc_s, sqc_d, skc_t, skc_s, skc_d, svc_t, svc_s, svc_d, sbc_t, sbc_s, sg_t,
                             ssc_v, ssc_k, HAS_STATE, False, False, BLOCK_S, BLOCK_K, BLOCK_V, PRECISION, True)
            else:
                _scan_stream(qc, kc, vc, betac, gamma, sigc_in_ptr, camb_ptr + bh * T * S * DV, sigc_out_ptr,
                             T, S, DK, DV, (slot - 3 * NV - 2) * BLOCK_V,
                             sqc_t, sqc_s, sqc_d, skc_t, skc_s, skc_d, svc_t, svc_s, svc_d, sbc_t, sbc_s, sg_t,
                             0, 0, False, True, False, BLOCK_S, BLOCK_K, BLOCK_V, PRECISION, False)

    # "parallel" strategy: three launches, most of the work independent of the state. The counts (heads,
    # frames, tokens, splits, blocks) and the strides of small loads (beta's and gamma's outer ones, the input
    # state's) are not specialised on (value 1, multiple of 16): fewer compiles across shapes and layouts; the
    # strides of q, k, v and DK / DV still are, for vectorised loads. ----------------------------------------

    @triton.jit
    def _batch_head_frame(pid, T, H):
        """(batch*head, frame, batch, head) of a flat (batch, head, frame) program index."""
        bh = pid // T
        return bh, pid % T, bh // H, bh % H

    @triton.jit
    def _gram_program(NR, NSPLIT, SPLIT, S, T, H):
        """This frame-matrix program's (row block r, token split, flat (batch, head, frame) index, frame, batch, head,
        first token, end token) from a grid of B*H*T * NSPLIT * NR programs, row blocks varying fastest."""
        prog = tl.program_id(0)
        r = prog % NR
        split = (prog // NR) % NSPLIT
        pid = (prog // NR // NSPLIT).to(tl.int64)  # (batch, head, frame)
        _, f, b, h = _batch_head_frame(pid, T, H)
        s_lo = split * SPLIT
        return r, split, pid, f, b, h, s_lo, tl.minimum(s_lo + SPLIT, S)

    @triton.jit
    def _gram_block(k_ptr, x_ptr, beta_ptr, out_ptr, s_lo, s_hi, DK, NX, x0, sk_s, sk_d, sx_s, sx_d, sb_s,
                    X_ONES: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                    PRECISION: tl.constexpr, BF16_SPLIT: tl.constexpr):
        """Rows x0.. of X^T B K over tokens [s_lo, s_hi) of one frame, stored to `out` (rows of length DK).
        X is `[S, NX]` (a column slice of K for K^T B K, of V for V^T B K); X_ONES: X is a column of ones
        (NX = 1), the row sum_s beta_s k_s, summed in exact fp32. BF16_SPLIT (K and X bf16): the fp32 products
        x beta are split into a bf16 high part and a bf16 remainder, and each goes through a bf16 dot against the
        exact bf16 K (two bf16 tensor-core dots, ~2^-16 relative: closer than one TF32 dot, and faster)."""
        offs_k = tl.arange(0, BLOCK_K)
        mask_k = offs_k < DK
        offs_r = x0 + tl.arange(0, BLOCK_R)
        mask_x = offs_r < NX
        acc_row = tl.zeros([BLOCK_K], dtype=tl.float32)  # X_ONES
        acc = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
        for s0 in range(s_lo, s_hi, BLOCK_S):
            rows = s0 + tl.arange(0, BLOCK_S)
            mask_s = rows < s_hi
            kt = tl.load(k_ptr + rows[:, None] * sk_s + offs_k[None, :] * sk_d,
                         mask=mask_s[:, None] & mask_k[None, :], other=0.0)
            bt = tl.load(beta_ptr + rows * sb_s, mask=mask_s, other=0.0).to(tl.float32)
            if X_ONES:
                acc_row += tl.sum(kt.to(tl.float32) * bt[:, None], axis=0)
            else:
                xt = tl.load(x_ptr + rows[:, None] * sx_s + offs_r[None, :] * sx_d,
                             mask=mask_s[:, None] & mask_x[None, :], other=0.0).to(tl.float32)
                xb = xt * bt[:, None]
                if BF16_SPLIT:
                    hi = xb.to(tl.bfloat16)
                    lo = (xb - hi.to(tl.float32)).to(tl.bfloat16)
                    acc = tl.dot(tl.trans(hi), kt, acc)
                    acc = tl.dot(tl.trans(lo), kt, acc)
                else:
                    acc = tl.dot(tl.trans(xb), kt.to(tl.float32), acc, input_precision=PRECISION)
        if X_ONES:
            tl.store(out_ptr + offs_k, acc_row, mask=mask_k)
        else:
            tl.store(out_ptr + offs_r[:, None] * DK + offs_k[None, :], acc, mask=mask_x[:, None] & mask_k[None, :])

    @triton.jit
    def _gram_rows(r, ka, v, kb, beta, out, s_lo, s_hi, DK, DV, NA, NW, ska_s, ska_d, sv_s, sv_d, skb_s, skb_d, sbe_s,
                   HAS_NORM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                   PRECISION: tl.constexpr, BF16_SPLIT: tl.constexpr):
        """Row block r of one stream's frame matrices (pointers at the (batch, head, frame)), into `out`'s rows:
        [0, DK) K^T B K (r < NA), [DK, DK+DV) V^T B K (r < NA + NW), with HAS_NORM then [.., +DK) K'^T B K' and one
        row sum_s beta_s k'_s (kb = K')."""
        if r < NA:
            _gram_block(ka, ka, beta, out, s_lo, s_hi, DK, DK, r * BLOCK_R, ska_s, ska_d, ska_s, ska_d, sbe_s,
                        False, BLOCK_S, BLOCK_K, BLOCK_R, PRECISION, BF16_SPLIT)
        elif r < NA + NW:
            _gram_block(ka, v, beta, out + DK * DK, s_lo, s_hi, DK, DV, (r - NA) * BLOCK_R, ska_s, ska_d, sv_s, sv_d,
                        sbe_s, False, BLOCK_S, BLOCK_K, BLOCK_R, PRECISION, BF16_SPLIT)
        elif HAS_NORM:
            if r < 2 * NA + NW:
                _gram_block(kb, kb, beta, out + (DK + DV) * DK, s_lo, s_hi, DK, DK, (r - NA - NW) * BLOCK_R,
                            skb_s, skb_d, skb_s, skb_d, sbe_s, False, BLOCK_S, BLOCK_K, BLOCK_R, PRECISION, BF16_SPLIT)
            else:
                _gram_block(kb, kb, beta, out + (2 * DK + DV) * DK, s_lo, s_hi, DK, 1, 0,
                            skb_s, skb_d, 0, 0, sbe_s, True, BLOCK_S, BLOCK_K, BLOCK_R, PRECISION, BF16_SPLIT)

    @triton.jit(do_not_specialize=["H", "T", "S", "R", "SPLIT", "NSPLIT", "NA", "NW", "NR", "sbe_b", "sbe_h",
                                    "sbe_t"])
    def _gram_kernel(
        ka_ptr, v_ptr, kb_ptr, beta_ptr, ws_ptr,
        H, T, S, DK, DV, R, SPLIT, NSPLIT, NA, NW, NR,
        ska_b, ska_h, ska_t, ska_s, ska_d, sv_b, sv_h, sv_t, sv_s, sv_d, skb_b, skb_h, skb_t, skb_s, skb_d,
        sbe_b, sbe_h, sbe_t, sbe_s,
        HAS_NORM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """Phase 1. Grid (B*H*T * NSPLIT * NR,), NR = NA + NW (+ NA + 1 with HAS_NORM) row blocks varying
        fastest (programs reading the same K tiles run together): per (batch, head, frame) and token split, a
        block of rows of the frame's matrices, written to the workspace `[B*H, T, NSPLIT, R, DK]`,
        R = DK + DV (+ DK + 1 with HAS_NORM): rows [0, DK) K^T B K, [DK, DK+DV) V^T B K, then for the normaliser stream
        [.., +DK) K'^T B K' and one row sum_s beta_s k'_s. NA = cdiv(DK, BLOCK_R), NW = cdiv(DV, BLOCK_R)."""
        r, split, pid, f, b, h, s_lo, s_hi = _gram_program(NR, NSPLIT, SPLIT, S, T, H)
        out = ws_ptr + (pid * NSPLIT + split) * R * DK
        beta = beta_ptr + b * sbe_b + h * sbe_h + f * sbe_t
        _gram_rows(r, ka_ptr + b * ska_b + h * ska_h + f * ska_t, v_ptr + b * sv_b + h * sv_h + f * sv_t,
                   kb_ptr + b * skb_b + h * skb_h + f * skb_t, beta, out, s_lo, s_hi, DK, DV, NA, NW, ska_s, ska_d,
                   sv_s, sv_d, skb_s, skb_d, sbe_s, HAS_NORM, BLOCK_S, BLOCK_K, BLOCK_R, PRECISION, False)

    @triton.jit
    def _sum_splits(ptr, offs, mask, NSPLIT, split_stride):
        """The partial sums of phase 1 over the token splits, in a fixed order (deterministic)."""
        x = tl.load(ptr + offs, mask=mask, other=0.0)
        for p in range(1, NSPLIT):
            x += tl.load(ptr + p * split_stride + offs, mask=mask, other=0.0)
        return x

    @triton.jit
    def _recur_stream(ws_ptr, a_row, w_row, gamma_ptr, s_in_ptr, slots_ptr, s_out_ptr,
                      T, NSPLIT, R, DK, DV, v0, sg_t, ss_v, ss_k,
                      HAS_STATE: tl.constexpr, REVERSE: tl.constexpr, BLOCK_V: tl.constexpr,
                      BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, PRECISION: tl.constexpr):
        """The recurrence of one (batch, head, value block) on the frame matrices: state = gamma (state -
        state A_f) + W_f. ws_ptr: this (batch, head)'s `[T, NSPLIT, R, DK]` partials, A_f at rows a_row..,
        W_f at rows w_row + value. slots_ptr `[T + 1, DV, DK]`: slot 0 the initial state, slot i + 1 the state
        after the i-th frame scanned (frame i; REVERSE: frame T-1-i); s_out the final state `[DV, DK]`.
        state A_f runs over BLOCK_C-column chunks of the previous state read back from its slot, so no operand
        is larger than `[BLOCK_C, BLOCK_K]` (a whole `[128, 128]` A_f in registers spills)."""
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < DV
        offs_k = tl.arange(0, BLOCK_K)
        mask_k = offs_k < DK
        offs_c = tl.arange(0, BLOCK_C)
        tile = offs_v[:, None] * DK + offs_k[None, :]
        mask = mask_v[:, None] & mask_k[None, :]
        if HAS_STATE:
            st = tl.load(s_in_ptr + offs_v[:, None] * ss_v + offs_k[None, :] * ss_k, mask=mask,
                         other=0.0).to(tl.float32)
        else:
            st = tl.zeros([BLOCK_V, BLOCK_K], dtype=tl.float32)
        tl.store(slots_ptr + tile, st, mask=mask)
        split_stride = R * DK
        for i in range(T):
            if REVERSE:
                f = T - 1 - i
            else:
                f = i
            tl.debug_barrier()  # slot i, stored by every thread of the program, is read back in chunks
            src = slots_ptr + i * DV * DK
            mats = ws_ptr + f * NSPLIT * split_stride
            p = tl.zeros([BLOCK_V, BLOCK_K], dtype=tl.float32)
            for c0 in range(0, BLOCK_K, BLOCK_C):
                cols = c0 + offs_c
                mask_c = cols < DK
                st_c = tl.load(src + offs_v[:, None] * DK + cols[None, :], mask=mask_v[:, None] & mask_c[None, :],
                               other=0.0, cache_modifier=".cg")  # from L2: written by this program just now
                a_c = _sum_splits(mats, (a_row + cols)[:, None] * DK + offs_k[None, :],
                                  mask_c[:, None] & mask_k[None, :], NSPLIT, split_stride)
                p = tl.dot(st_c, a_c, p, input_precision=PRECISION)
            w = _sum_splits(mats, (w_row + offs_v)[:, None] * DK + offs_k[None, :], mask, NSPLIT, split_stride)
            g = tl.load(gamma_ptr + f * sg_t).to(tl.float32)
            st = g * (st - p) + w
            tl.store(src + DV * DK + tile, st, mask=mask)
        tl.store(s_out_ptr + tile, st, mask=mask)

    @triton.jit(do_not_specialize=["H", "T", "NSPLIT", "R", "NV", "sg_b", "sg_h", "sg_t", "ssa_b", "ssa_h", "ssa_v",
                                    "ssb_b", "ssb_h"])
    def _recur_kernel(
        ws_ptr, gamma_ptr, sa_in_ptr, sb_in_ptr, states_a_ptr, states_b_ptr, sa_out_ptr, sb_out_ptr,
        H, T, NSPLIT, R, DK, DV, NV,
        sg_b, sg_h, sg_t, ssa_b, ssa_h, ssa_v, ssa_k, ssb_b, ssb_h, ssb_k,
        HAS_STATE: tl.constexpr, REVERSE: tl.constexpr, HAS_NORM: tl.constexpr, BLOCK_V: tl.constexpr,
        BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, PRECISION: tl.constexpr,
    ):
        """Phase 2. Grid (B*H, NV + HAS_NORM): programs 0..NV-1 of a (batch, head) run the recurrence of stream a
        by value blocks, program NV (when HAS_NORM) that of the normaliser (one value row). The state slots are
        `[B*H, T + 1, DV, DK]` (`[B*H, T + 1, DK]` for the normaliser)."""
        pid_bh = tl.program_id(0).to(tl.int64)
        pid_v = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        ws = ws_ptr + pid_bh * T * NSPLIT * R * DK
        gamma = gamma_ptr + b * sg_b + h * sg_h
        if pid_v < NV:
            _recur_stream(ws, 0, DK, gamma, sa_in_ptr + b * ssa_b + h * ssa_h,
                          states_a_ptr + pid_bh * (T + 1) * DV * DK, sa_out_ptr + pid_bh * DV * DK, T, NSPLIT, R, DK,
                          DV, pid_v * BLOCK_V, sg_t, ssa_v, ssa_k, HAS_STATE, REVERSE, BLOCK_V, BLOCK_K, BLOCK_C,
                          PRECISION)
        elif HAS_NORM:
            _recur_stream(ws, DK + DV, 2 * DK + DV, gamma, sb_in_ptr + b * ssb_b + h * ssb_h,
                          states_b_ptr + pid_bh * (T + 1) * DK, sb_out_ptr + pid_bh * DK, T, NSPLIT, R, DK, 1, 0,
                          sg_t, 0, ssb_k, HAS_STATE, REVERSE, 16, BLOCK_K, BLOCK_C, PRECISION)

    @triton.jit(do_not_specialize=["H", "T", "S", "NV", "NS"])
    def _readout_kernel(
        qa_ptr, qb_ptr, states_a_ptr, states_b_ptr, outa_ptr, outb_ptr,
        H, T, S, DK, DV, NV, NS,
        sqa_b, sqa_h, sqa_t, sqa_s, sqa_d, sqb_b, sqb_h, sqb_t, sqb_s, sqb_d,
        REVERSE: tl.constexpr, HAS_NORM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_V: tl.constexpr, PRECISION: tl.constexpr,
    ):
        """Phase 3. Grid (B*H*T * NS * (NV + HAS_NORM),), NS = cdiv(S, BLOCK_S) token tiles, the value blocks
        varying fastest (programs reading the same q tile run together): out[f, s] = state q_{f,s} for a tile of
        tokens and a block of values (program NV: the normaliser, q'_{f,s} . z in exact fp32), the state read
        from phase 2's slots: after frame f's update (slot f + 1), REVERSE before it (slot T - 1 - f)."""
        prog = tl.program_id(0)
        if HAS_NORM:
            nvn = NV + 1
        else:
            nvn = NV
        pid_v = prog % nvn
        pid_s = (prog // nvn) % NS
        pid = (prog // nvn // NS).to(tl.int64)  # (batch, head, frame)
        bh, f, b, h = _batch_head_frame(pid, T, H)
        rows = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
        mask_r = rows < S
        offs_k = tl.arange(0, BLOCK_K)
        mask_k = offs_k < DK
        if REVERSE:
            slot = bh * (T + 1) + T - 1 - f
        else:
            slot = bh * (T + 1) + f + 1
        if pid_v < NV:
            qt = tl.load(qa_ptr + b * sqa_b + h * sqa_h + f * sqa_t + rows[:, None] * sqa_s + offs_k[None, :] * sqa_d,
                         mask=mask_r[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
            offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
            mask_v = offs_v < DV
            st = tl.load(states_a_ptr + slot * DV * DK + offs_v[:, None] * DK + offs_k[None, :],
                         mask=mask_v[:, None] & mask_k[None, :], other=0.0)
            o = tl.dot(qt, tl.trans(st), input_precision=PRECISION)
            tl.store(outa_ptr + (pid * S + rows[:, None]) * DV + offs_v[None, :], o,
                     mask=mask_r[:, None] & mask_v[None, :])
        elif HAS_NORM:
            qt = tl.load(qb_ptr + b * sqb_b + h * sqb_h + f * sqb_t + rows[:, None] * sqb_s + offs_k[None, :] * sqb_d,
                         mask=mask_r[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
            z = tl.load(states_b_ptr + slot * DK + offs_k, mask=mask_k, other=0.0)
            tl.store(outb_ptr + pid * S + rows, tl.sum(qt * z[None, :], axis=1), mask=mask_r)

    # the phased block ("phases"): a one-segment GDN block's four scans as three launches. The frame matrices
    # are computed once for both directions (the backward scan uses the same A_f, W_f), the recurrences of the
    # six streams (main numerator, normaliser, camera; forward and backward) run side by side, and the readout adds
    # the forward and backward states before one product per tile and writes the combined result (main: numerator
    # over normaliser + eps; camera: the sum) in the model's dtype and layout `[B, T, S, H, D]`. -----------------

    @triton.jit(do_not_specialize=["H", "T", "S", "SPLIT", "NSPLIT", "NA", "NW", "NR", "sbe_b", "sbe_h", "sbe_t",
                                    "sbc_b", "sbc_h", "sbc_t"])
    def _block_gram_kernel(
        kr_ptr, v_ptr, k_ptr, kc_ptr, vc_ptr, beta_ptr, betac_ptr, wsm_ptr, wsc_ptr,
        H, T, S, DK, DV, SPLIT, NSPLIT, NA, NW, NR,
        skr_b, skr_h, skr_t, skr_s, skr_d, sv_b, sv_h, sv_t, sv_s, sv_d, sk_b, sk_h, sk_t, sk_s, sk_d,
        skc_b, skc_h, skc_t, skc_s, skc_d, svc_b, svc_h, svc_t, svc_s, svc_d,
        sbe_b, sbe_h, sbe_t, sbe_s, sbc_b, sbc_h, sbc_t, sbc_s,
        BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
        BF16_SPLIT: tl.constexpr,
    ):
        """Phase 1 of the phased block. Grid (B*H*T * NSPLIT * NR,), NR = 3*NA + 2*NW + 1 row blocks varying
        fastest: the main workspace `[B*H, T, NSPLIT, 2*DK + DV + 1, DK]` gets, per (batch, head, frame) and token
        split, K~^T B K~, V^T B K~, K^T B K and sum_s beta_s k_s (as `_gram_kernel` with the normaliser); the camera
        one `[B*H, T, NSPLIT, DK + DV, DK]` Kc^T Bc Kc and Vc^T Bc Kc."""
        r, split, pid, f, b, h, s_lo, s_hi = _gram_program(NR, NSPLIT, SPLIT, S, T, H)
        if r < 2 * NA + NW + 1:  # the main stream with its normaliser
            _gram_rows(r, kr_ptr + b * skr_b + h * skr_h + f * skr_t, v_ptr + b * sv_b + h * sv_h + f * sv_t,
                       k_ptr + b * sk_b + h * sk_h + f * sk_t, beta_ptr + b * sbe_b + h * sbe_h + f * sbe_t,
                       wsm_ptr + (pid * NSPLIT + split) * (2 * DK + DV + 1) * DK, s_lo, s_hi, DK, DV, NA, NW,
                       skr_s, skr_d, sv_s, sv_d, sk_s, sk_d, sbe_s, True, BLOCK_S, BLOCK_K, BLOCK_R, PRECISION,
                       BF16_SPLIT)
        else:  # the camera stream
            kc = kc_ptr + b * skc_b + h * skc_h + f * skc_t
            _gram_rows(r - (2 * NA + NW + 1), kc, vc_ptr + b * svc_b + h * svc_h + f * svc_t, kc,
                       betac_ptr + b * sbc_b + h * sbc_h + f * sbc_t, wsc_ptr + (pid * NSPLIT + split) * (DK + DV) * DK,
                       s_lo, s_hi, DK, DV, NA, NW, skc_s, skc_d, svc_s, svc_d, skc_s, skc_d, sbc_s, False, BLOCK_S,
                       BLOCK_K, BLOCK_R, PRECISION, BF16_SPLIT)

    @triton.jit(do_not_specialize=["H", "T", "NSPLIT", "NV", "sg_b", "sg_h", "sg_t", "ssg_b", "ssg_h", "ssg_v",
                                    "sz_b", "sz_h", "ssc_b", "ssc_h", "ssc_v"])
    def _block_recur_kernel(
        wsm_ptr, wsc_ptr, gamma_ptr, sig_in_ptr, z_in_ptr, sigc_in_ptr, slots_ptr, zslots_ptr,
        sig_out_ptr, z_out_ptr, sigc_out_ptr,
        H, T, NSPLIT, DK, DV, NV,
        sg_b, sg_h, sg_t, ssg_b, ssg_h, ssg_v, ssg_k, sz_b, sz_h, sz_k, ssc_b, ssc_h, ssc_v, ssc_k,
        HAS_STATE: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """Phase 2 of the phased block. Grid (B*H, 4*NV + 2); the second index picks the stream: [0, NV) main
        forward by value blocks (from the input state; final state stored), NV normaliser forward, [NV+1, 2NV+1)
        and 2NV+1 the same backwards (from zeros), [2NV+2, 3NV+2) camera forward, [3NV+2, 4NV+2) camera backward.
        State slots `[4, B*H, T + 1, DV, DK]` (main f, main b, camera f, camera b) and `[2, B*H, T + 1, DK]`
        (normaliser f, b), as `_recur_stream` writes them; a backward stream's final state goes to its last slot
        (the value it holds already)."""
        pid_bh = tl.program_id(0).to(tl.int64)
        j = tl.program_id(1)
        BH = tl.num_programs(0).to(tl.int64)
        b = pid_bh // H
        h = pid_bh % H
        RM = 2 * DK + DV + 1
        wsm = wsm_ptr + pid_bh * T * NSPLIT * RM * DK
        wsc = wsc_ptr + pid_bh * T * NSPLIT * (DK + DV) * DK
        gamma = gamma_ptr + b * sg_b + h * sg_h
        per = (T + 1) * DV * DK
        zper = (T + 1) * DK
        if j < NV:
            _recur_stream(wsm, 0, DK, gamma, sig_in_ptr + b * ssg_b + h * ssg_h, slots_ptr + pid_bh * per,
                          sig_out_ptr + pid_bh * DV * DK, T, NSPLIT, RM, DK, DV, j * BLOCK_V, sg_t, ssg_v, ssg_k,
                          HAS_STATE, False, BLOCK_V, BLOCK_K, BLOCK_C, PRECISION)
        elif j == NV:
            _recur_stream(wsm, DK + DV, 2 * DK + DV, gamma, z_in_ptr + b * sz_b + h * sz_h,
                          zslots_ptr + pid_bh * zper, z_out_ptr + pid_bh * DK, T, NSPLIT, RM, DK, 1, 0, sg_t, 0, sz_k,
                          HAS_STATE, False, 16, BLOCK_K, BLOCK_C, PRECISION)
        elif j < 2 * NV + 1:
            slots = slots_ptr + (BH + pid_bh) * per
            _recur_stream(wsm, 0, DK, gamma, sig_in_ptr, slots, slots + T * DV * DK, T, NSPLIT, RM, DK, DV,
                          (j - NV - 1) * BLOCK_V, sg_t, 0, 0, False, True, BLOCK_V, BLOCK_K, BLOCK_C, PRECISION)
        elif j == 2 * NV + 1:
            zslots = zslots_ptr + (BH + pid_bh) * zper
            _recur_stream(wsm, DK + DV, 2 * DK + DV, gamma, z_in_ptr, zslots, zslots + T * DK, T, NSPLIT, RM, DK,
                          1, 0, sg_t, 0, 0, False, True, 16, BLOCK_K, BLOCK_C, PRECISION)
        elif j < 3 * NV + 2:
            _recur_stream(wsc, 0, DK, gamma, sigc_in_ptr + b * ssc_b + h * ssc_h,
                          slots_ptr + (2 * BH + pid_bh) * per, sigc_out_ptr + pid_bh * DV * DK, T, NSPLIT, DK + DV,
                          DK, DV, (j - 2 * NV - 2) * BLOCK_V, sg_t, ssc_v, ssc_k, HAS_STATE, False, BLOCK_V, BLOCK_K,
                          BLOCK_C, PRECISION)
        else:
            slots = slots_ptr + (3 * BH + pid_bh) * per
            _recur_stream(wsc, 0, DK, gamma, sigc_in_ptr, slots, slots + T * DV * DK, T, NSPLIT, DK + DV, DK, DV,
                          (j - 3 * NV - 2) * BLOCK_V, sg_t, 0, 0, False, True, BLOCK_V, BLOCK_K, BLOCK_C, PRECISION)

    @triton.jit(do_not_specialize=["H", "T", "S", "NV", "NS"])
    def _block_readout_kernel(
        qr_ptr, q_ptr, qc_ptr, slots_ptr, zslots_ptr, main_ptr, cam_ptr, eps,
        H, T, S, DK, DV, NV, NS,
        sqr_b, sqr_h, sqr_t, sqr_s, sqr_d, sq_b, sq_h, sq_t, sq_s, sq_d, sqc_b, sqc_h, sqc_t, sqc_s, sqc_d,
        BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, PRECISION: tl.constexpr,
        BF16_SPLIT: tl.constexpr,
    ):
        """Phase 3 of the phased block. Grid (B*H*T * NS * 2*NV,), value blocks (main then camera) varying fastest:
        for a tile of a frame's tokens, main = q~ (Sigma_f + Sigma_b)^T / (q . (z_f + z_b) + eps) and camera =
        qc (Sigma_c,f + Sigma_c,b)^T, the forward states after frame f's update (slot f + 1), the backward ones
        before it (slot T - 1 - f); stored in the outputs' dtype at `[B, T, S, H, DV]`."""
        prog = tl.program_id(0)
        pid_v = prog % (2 * NV)
        pid_s = (prog // (2 * NV)) % NS
        pid = (prog // (2 * NV) // NS).to(tl.int64)  # (batch, head, frame)
        bh, f, b, h = _batch_head_frame(pid, T, H)
        BH = (tl.num_programs(0) // (2 * NV) // NS // T).to(tl.int64)
        rows = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
        mask_r = rows < S
        offs_k = tl.arange(0, BLOCK_K)
        mask_k = offs_k < DK
        fwd = bh * (T + 1) + f + 1
        bwd = bh * (T + 1) + T - 1 - f
        per_stream = BH * (T + 1)
        if pid_v < NV:
            vb = pid_v
            qt = tl.load(qr_ptr + b * sqr_b + h * sqr_h + f * sqr_t + rows[:, None] * sqr_s + offs_k[None, :] * sqr_d,
                         mask=mask_r[:, None] & mask_k[None, :], other=0.0)
            f_slot, b_slot = fwd, per_stream + bwd
        else:
            vb = pid_v - NV
            qt = tl.load(qc_ptr + b * sqc_b + h * sqc_h + f * sqc_t + rows[:, None] * sqc_s + offs_k[None, :] * sqc_d,
                         mask=mask_r[:, None] & mask_k[None, :], other=0.0)
            f_slot, b_slot = 2 * per_stream + fwd, 3 * per_stream + bwd
        offs_v = vb * BLOCK_V + tl.arange(0, BLOCK_V)
        mask_v = offs_v < DV
        tile = offs_v[:, None] * DK + offs_k[None, :]
        mask = mask_v[:, None] & mask_k[None, :]
        st = (tl.load(slots_ptr + f_slot * DV * DK + tile, mask=mask, other=0.0)
              + tl.load(slots_ptr + b_slot * DV * DK + tile, mask=mask, other=0.0))
        if BF16_SPLIT:  # q is bf16 (exact); the state as a bf16 high part plus a bf16 remainder, two bf16 dots
            hi = st.to(tl.bfloat16)
            lo = (st - hi.to(tl.float32)).to(tl.bfloat16)
            o = tl.dot(qt, tl.trans(hi))
            o = tl.dot(qt, tl.trans(lo), o)
        else:
            o = tl.dot(qt.to(tl.float32), tl.trans(st), input_precision=PRECISION)
        dst = ((b * T + f) * S + rows[:, None]) * H * DV + h * DV + offs_v[None, :]
        if pid_v < NV:
            qn = tl.load(q_ptr + b * sq_b + h * sq_h + f * sq_t + rows[:, None] * sq_s + offs_k[None, :] * sq_d,
                         mask=mask_r[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
            z = (tl.load(zslots_ptr + fwd * DK + offs_k, mask=mask_k, other=0.0)
                 + tl.load(zslots_ptr + (per_stream + bwd) * DK + offs_k, mask=mask_k, other=0.0))
            den = tl.sum(qn * z[None, :], axis=1) + eps
            o = o / den[:, None]
            tl.store(main_ptr + dst, o.to(main_ptr.dtype.element_ty), mask=mask_r[:, None] & mask_v[None, :])
        else:
            tl.store(cam_ptr + dst, o.to(cam_ptr.dtype.element_ty), mask=mask_r[:, None] & mask_v[None, :])


def _check_runnable(x: torch.Tensor, name: str) -> None:
    if triton is None:
        raise TritonScanError(f"{name}: Triton is not installed; use the plain scans (kernels.gdn) instead")
    if not x.is_cuda and not interpreting():
        raise TritonScanError(f"{name}: tensors are on {x.device}; the Triton scans need CUDA tensors "
                              "(or TRITON_INTERPRET=1 to run them on CPU tensors)")


def _check_inputs(q, k, v, beta, gamma, state, precision, strategy, name):
    if precision not in PRECISIONS:
        raise TritonScanError(f"{name}: precision {precision!r}; accepted: {PRECISIONS}")
    if strategy not in STRATEGIES:
        raise TritonScanError(f"{name}: strategy {strategy!r}; accepted: {STRATEGIES}")
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


STREAM_CONFIG = ("BLOCK_S", "BLOCK_K", "BLOCK_V", "BLOCK_S_NORM", "num_warps", "num_stages")  # launch_with_config's


def _blocks(Dk: int, Dv: int, precision: str, itemsize: int) -> dict:
    """Tile sizes and warps of the "stream" strategy, the fastest of tests/benchmarks/scan_bench.py --sweep on
    an H100 at the release shapes (GDN forward + backward, H=20, T=3, S=880, D=112, bf16 inputs): tf32 / tf32x3
    0.25 / 0.50 ms with BLOCK_S=128, BLOCK_V=32, 8 warps (0.30 / 0.68 with 64, 32, 4 warps, which fp32 inputs
    need: their 128-row tiles overflow shared memory); the SIMT "ieee" dots spill at that size and want 32, 32,
    4 warps (2.5 ms)."""
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


def _outputs(qa, v, norm: bool):
    B, H, T, S, Dk = qa.shape
    Dv = v.shape[-1]
    f32 = dict(device=qa.device, dtype=torch.float32)
    out_a, st_a = torch.empty(B, H, T, S, Dv, **f32), torch.empty(B, H, Dv, Dk, **f32)
    out_b, st_b = (torch.empty(B, H, T, S, **f32), torch.empty(B, H, Dk, **f32)) if norm else (None, None)
    return out_a, st_a, out_b, st_b


def _settings(caller: str, of: str, accepted, key: tuple, defaults, config: dict | None) -> dict:
    """The launch settings of `key`: the smaller ones that fitted after OutOfResources, else `defaults()`, with
    `config`'s over them; a setting not in `accepted` raises, naming the caller, what they set and what is accepted."""
    unknown = sorted(set(config or {}) - set(accepted))
    if unknown:
        raise TritonScanError(f"{caller}: {unknown} are not settings of {of}; accepted: {tuple(accepted)}")
    return dict(_SMALLER.get(key) or defaults(), **(config or {}))


def _config(strategy: str, accepted: tuple, defaults, qa, ka, v, qb, kb, precision: str, config: dict | None):
    """(cache key, launch config) of a strategy: `defaults(itemsize)` for these shapes (or the smaller config
    that fitted after OutOfResources) with `config`'s settings over it; a setting not in `accepted` raises."""
    itemsize = max(t.element_size() for t in (qa, ka, v) + (() if qb is None else (qb, kb)))
    key = (strategy, qa.shape[-1], v.shape[-1], precision, itemsize, qb is not None)
    return key, _settings("launch_with_config", f"the {strategy} strategy", accepted, key, lambda: defaults(itemsize),
                          config)


def _stand_ins(qa, ka, state_a, qb, kb, state_b, out_a, st_a, out_b, st_b):
    """The kernels' arguments for the optional parts: without the normaliser stream its pointers are stream a's,
    without an input state the output states stand in (the kernels read neither then). Returns qb, kb, out_b,
    st_b, has_state, the input states and their strides."""
    norm = qb is not None
    ob, sbo = (out_b, st_b) if norm else (out_a, st_a)
    qb, kb = (qb, kb) if norm else (qa, ka)
    has_state = state_a is not None
    sa = state_a if has_state else st_a
    sb = state_b if (has_state and norm) else sbo
    strides = (*(sa.stride() if has_state else (0, 0, 0, 0)), *(sb.stride() if has_state and norm else (0, 0, 0)))
    return qb, kb, ob, sbo, has_state, sa, sb, strides


def _launch(qa, ka, v, beta, gamma, state_a, qb, kb, state_b, reverse: bool, precision: str, strategy: str,
            config: dict | None):
    """Scan stream a (and, when qb is given, the normaliser stream b). Returns (out_a, state_a, out_b, state_b);
    the b outputs are None without qb."""
    launch = _launch_parallel if strategy == "parallel" else _launch_stream
    return launch(qa, ka, v, beta, gamma, state_a, qb, kb, state_b, reverse, precision, config)


def _launch_stream(qa, ka, v, beta, gamma, state_a, qb, kb, state_b, reverse, precision, config):
    """The "stream" strategy: both streams in one launch of `_delta_rule_kernel`."""
    B, H, T, S, Dk = qa.shape
    Dv = v.shape[-1]
    key, cfg = _config("stream", STREAM_CONFIG, lambda itemsize: _blocks(Dk, Dv, precision, itemsize), qa, ka, v,
                       qb, kb, precision, config)
    nv = triton.cdiv(Dv, cfg["BLOCK_V"])
    norm = qb is not None
    out_a, st_a, out_b, st_b = _outputs(qa, v, norm)
    if B * H == 0:
        return out_a, st_a, out_b, st_b
    qb, kb, ob, sbo, has_state, sa, sb, state_strides = _stand_ins(qa, ka, state_a, qb, kb, state_b, out_a, st_a,
                                                                   out_b, st_b)
    args = (qa, ka, v, qb, kb, beta, gamma, sa, sb, out_a, ob, st_a, sbo, H, T, S, Dk, Dv, nv,
            *qa.stride(), *ka.stride(), *v.stride(), *qb.stride(), *kb.stride(), *beta.stride(), *gamma.stride(),
            *state_strides)
    _fit(key, cfg, config, lambda cfg: _delta_rule_kernel[(B * H, nv + int(norm))](
        *args, HAS_STATE=has_state, REVERSE=reverse, HAS_NORM=norm, PRECISION=precision, **cfg), _shrink_stream)
    return out_a, st_a, out_b, st_b



def _launch_block(qr, kr, q, k, v, beta, gamma, sigma, z, qc, kc, vc, betac, sigc, precision, config):
    """The four scans of a one-segment GDN block in one launch of `_gdn_block_kernel` ("stream" tiles: the
    numerator and camera programs walk the frames as `_delta_rule_kernel`'s do). Returns num_f, den_f,
    Sigma, z, num_b, den_b, cam_f, Sigma_c, cam_b."""
    B, H, T, S, Dk = qr.shape
    Dv = v.shape[-1]
    itemsize = max(t.element_size() for t in (qr, kr, q, k, v, qc, kc, vc))
    key = ("block", Dk, Dv, precision, itemsize)
    cfg = _settings("gdn_block", "the block launch", STREAM_CONFIG, key, lambda: _blocks(Dk, Dv, precision, itemsize),
                    config)
    num_f, sig_out, den_f, z_out = _outputs(qr, v, True)
    num_b, den_b = torch.empty_like(num_f), torch.empty_like(den_f)
    cam_f, sigc_out = _outputs(qc, vc, False)[:2]
    cam_b = torch.empty_like(cam_f)
    outs = (num_f, den_f, sig_out, z_out, num_b, den_b, cam_f, sigc_out, cam_b)
    if B * H == 0:
        return outs
    has_state = sigma is not None
    sig_in, z_in, sigc_in = (sigma, z, sigc) if has_state else (sig_out, z_out, sigc_out)  # unread stand-ins
    state_strides = ((*sigma.stride(), *z.stride()) if has_state else (0,) * 7,
                     sigc.stride() if has_state else (0,) * 4)

    def launch(cfg):
        nv = triton.cdiv(Dv, cfg["BLOCK_V"])
        _gdn_block_kernel[(B * H, 4 * nv + 2)](
            qr, kr, q, k, v, beta, gamma, sig_in, z_in, qc, kc, vc, betac, sigc_in, *outs, H, T, S, Dk, Dv, nv,
            *qr.stride(), *kr.stride(), *q.stride(), *k.stride(), *v.stride(), *beta.stride(), *gamma.stride(),
            *state_strides[0], *qc.stride(), *kc.stride(), *vc.stride(), *betac.stride(), *state_strides[1],
            HAS_STATE=has_state, PRECISION=precision, **cfg)

    _fit(key, cfg, config, launch, _shrink_stream)
    return outs

PARALLEL_CONFIG = (  # the tunables of the "parallel" strategy (launch_with_config's keywords)
    "P1_BLOCK_S",  # phase 1 (frame matrices): tokens per loop step
    "P1_BLOCK_R",  # phase 1: matrix rows per program
    "P1_SPLIT",  # phase 1: tokens per split (more splits: more programs, more partial sums to write and add)
    "P1_WARPS",
    "P2_BLOCK_V",  # phase 2 (recurrence): value rows of the state per program
    "P2_BLOCK_C",  # phase 2: state columns (rows of A_f) per step of state @ A_f
    "P2_WARPS",
    "P3_BLOCK_S",  # phase 3 (readout): tokens per program
    "P3_BLOCK_V",  # phase 3: values per program
    "P3_WARPS",
    "num_stages",
)


def _parallel_blocks(Dk: int, Dv: int, precision: str) -> dict:
    """Tile sizes and warps of the "parallel" strategy. Not tuned by timing yet (scan_bench.py --sweep does):
    chosen as the largest tiles that sm_90 compiles without register spills (ptxas resource usage, Triton 3.6)
    at Dk = Dv = 112. At the release shapes (H=20, T=3, S=880) phase 1 runs 60 (head, frame) x 7 row blocks
    (4 without the normaliser) programs over all 880 tokens, phase 2 20 heads x 5 value blocks, phase 3 60 x 14
    token tiles x 3 value blocks. The dots' fp32 operands are the same whatever the input dtype, so the tiles
    depend on the padded head dim and the precision only."""
    block_k = max(16, triton.next_power_of_2(Dk))
    cfg = dict(P1_SPLIT=1024, P1_WARPS=8, P2_BLOCK_V=32, P2_BLOCK_C=32, P2_WARPS=8, P3_WARPS=8, num_stages=2)
    if block_k > 128:
        return dict(cfg, P1_BLOCK_S=32, P1_BLOCK_R=32, P2_BLOCK_V=16, P3_BLOCK_S=32, P3_BLOCK_V=32)
    if precision == "ieee":  # SIMT dots
        return dict(cfg, P1_BLOCK_S=32, P1_BLOCK_R=32, P3_BLOCK_S=64, P3_BLOCK_V=32)
    if precision == "tf32x3":  # three products: more registers
        return dict(cfg, P1_BLOCK_S=32, P1_BLOCK_R=64, P3_BLOCK_S=64, P3_BLOCK_V=64)
    return dict(cfg, P1_BLOCK_S=64, P1_BLOCK_R=64, P3_BLOCK_S=64, P3_BLOCK_V=64)


def _phases_blocks(Dk: int, Dv: int, precision: str, bf16_split: bool) -> dict:
    """Tiles of the phased block (`gdn_block_phases_triton`). With bf16 inputs under "tf32" (the model's case: the
    products split into bf16 dots) the fastest of scan_bench.py --block tf32 --sweep on an H200 at the release
    shapes, one phase varied at a time: phase 1 (64 tokens, 32 rows, one split, 4 warps) 0.312 -> 0.203 ms a
    block, phase 3 (128 tokens, 64 values, 4 warps) -0.023 ms, phase 2 (32, 32, 4 warps) -0.008 ms; otherwise
    the "parallel" strategy's `_parallel_blocks`."""
    if bf16_split and triton.next_power_of_2(Dk) <= 128:
        return dict(P1_BLOCK_S=64, P1_BLOCK_R=32, P1_SPLIT=1024, P1_WARPS=4, P2_BLOCK_V=32, P2_BLOCK_C=32, P2_WARPS=4,
                    P3_BLOCK_S=128, P3_BLOCK_V=64, P3_WARPS=4, num_stages=2)
    return _parallel_blocks(Dk, Dv, precision)


def _shrink(cfg: dict) -> dict:
    """Halve the tiles of every phase (not below 16) and drop pipelining: a config for a GPU with less shared
    memory. Returns cfg itself when nothing can shrink."""
    smaller = {n: max(16, cfg[n] // 2) for n in ("P1_BLOCK_S", "P1_BLOCK_R", "P2_BLOCK_V", "P3_BLOCK_S",
                                                 "P3_BLOCK_V")}
    return cfg if all(smaller[n] == cfg[n] for n in smaller) else dict(cfg, **smaller, num_stages=1)


def _shrink_stream(cfg: dict) -> dict:
    """Halve the token tiles of a "stream" / one-launch block config (not below 16) and drop pipelining. Returns cfg
    itself when nothing can shrink."""
    if cfg["BLOCK_S"] <= 16:
        return cfg
    return dict(cfg, BLOCK_S=cfg["BLOCK_S"] // 2, BLOCK_S_NORM=cfg["BLOCK_S"] // 2, num_stages=1)


def _fit(key, cfg: dict, config, launch, shrink) -> None:
    """`launch(cfg)`; on OutOfResources (raised at compile time, before anything of that launch runs) again with
    `shrink(cfg)`, remembered in `_SMALLER[key]` for later calls, until it fits. Raises when the caller chose the
    settings (`config`) or nothing can shrink (`shrink` returns cfg itself). A retry redoes every launch of `launch`."""
    while True:
        try:
            return launch(cfg)
        except triton.runtime.errors.OutOfResources:
            smaller = shrink(cfg)
            if config or smaller is cfg:
                raise
            cfg = _SMALLER[key] = smaller


def _launch_parallel(qa, ka, v, beta, gamma, state_a, qb, kb, state_b, reverse, precision, config):
    """The "parallel" strategy. The frame matrices A_f = K_f^T B_f K_f and W_f = V_f^T B_f K_f do not depend on
    the state: phase 1 computes them for every (batch, head, frame, token split, row block) at once, phase 2
    runs the short recurrence state_f = gamma_f (state_{f-1} - state_{f-1} A_f) + W_f per (batch, head, value
    block) and writes every frame's state, phase 3 reads out q state^T per (batch, head, frame, token tile,
    value block). Workspaces (torch.empty): the partial matrices `[B*H, T, splits, R, Dk]` and the per-frame
    states `[B*H, T + 1, Dv, Dk]` (`[B*H, T + 1, Dk]` for the normaliser)."""
    B, H, T, S, Dk = qa.shape
    Dv = v.shape[-1]
    norm = qb is not None
    key, cfg = _config("parallel", PARALLEL_CONFIG, lambda itemsize: _parallel_blocks(Dk, Dv, precision), qa, ka, v,
                       qb, kb, precision, config)
    out_a, st_a, out_b, st_b = _outputs(qa, v, norm)
    BH = B * H
    if BH == 0:
        return out_a, st_a, out_b, st_b
    dev = qa.device
    block_k = max(16, triton.next_power_of_2(Dk))
    R = Dk + Dv + (Dk + 1 if norm else 0)
    states_a = torch.empty(BH, T + 1, Dv, Dk, device=dev, dtype=torch.float32)
    states_b = torch.empty(BH, T + 1, Dk, device=dev, dtype=torch.float32) if norm else states_a
    qb, kb, ob, sbo, has_state, sa, sb, state_strides = _stand_ins(qa, ka, state_a, qb, kb, state_b, out_a, st_a,
                                                                   out_b, st_b)

    def launch(cfg):  # OutOfResources is raised at compile time, before that phase runs
        nsplit = max(1, triton.cdiv(S, cfg["P1_SPLIT"]))
        ws = torch.empty(BH, T, nsplit, R, Dk, device=dev, dtype=torch.float32)
        na, nw = triton.cdiv(Dk, cfg["P1_BLOCK_R"]), triton.cdiv(Dv, cfg["P1_BLOCK_R"])
        nr = na + nw + (na + 1 if norm else 0)
        nv2, nv3 = triton.cdiv(Dv, cfg["P2_BLOCK_V"]), triton.cdiv(Dv, cfg["P3_BLOCK_V"])
        ns = triton.cdiv(S, cfg["P3_BLOCK_S"])
        if T > 0:
            _gram_kernel[(BH * T * nsplit * nr,)](
                ka, v, kb, beta, ws, H, T, S, Dk, Dv, R, cfg["P1_SPLIT"], nsplit, na, nw, nr,
                *ka.stride(), *v.stride(), *kb.stride(), *beta.stride(), HAS_NORM=norm,
                BLOCK_S=cfg["P1_BLOCK_S"], BLOCK_K=block_k, BLOCK_R=cfg["P1_BLOCK_R"], PRECISION=precision,
                num_warps=cfg["P1_WARPS"], num_stages=cfg["num_stages"])
        _recur_kernel[(BH, nv2 + int(norm))](
            ws, gamma, sa, sb, states_a, states_b, st_a, sbo, H, T, nsplit, R, Dk, Dv, nv2, *gamma.stride(),
            *state_strides,
            HAS_STATE=has_state, REVERSE=reverse, HAS_NORM=norm, BLOCK_V=cfg["P2_BLOCK_V"], BLOCK_K=block_k,
            BLOCK_C=min(block_k, cfg["P2_BLOCK_C"]), PRECISION=precision, num_warps=cfg["P2_WARPS"],
            num_stages=cfg["num_stages"])
        if T > 0 and S > 0:
            _readout_kernel[(BH * T * ns * (nv3 + int(norm)),)](
                qa, qb, states_a, states_b, out_a, ob, H, T, S, Dk, Dv, nv3, ns, *qa.stride(), *qb.stride(),
                REVERSE=reverse, HAS_NORM=norm, BLOCK_S=cfg["P3_BLOCK_S"], BLOCK_K=block_k,
                BLOCK_V=cfg["P3_BLOCK_V"], PRECISION=precision, num_warps=cfg["P3_WARPS"],
                num_stages=cfg["num_stages"])

    _fit(key, cfg, config, launch, _shrink)
    return out_a, st_a, out_b, st_b


def _launch_block_phases(qr, kr, q, k, v, beta, gamma, sigma, z, qc, kc, vc, betac, sigc, eps, out_dtype, precision,
                         config):
    """The phased block (three launches: `_block_gram_kernel`, `_block_recur_kernel`, `_block_readout_kernel`;
    tiles: PARALLEL_CONFIG's keys, defaults `_phases_blocks`). Returns main, Sigma, z, cam, Sigma_c: main and cam
    `[B, T, S, H, Dv]` in out_dtype, the final forward states fp32. Workspaces (torch.empty): the frame matrices
    `[B*H, T, splits, 2*Dk + Dv + 1, Dk]` and `[B*H, T, splits, Dk + Dv, Dk]`, the per-frame states
    `[4, B*H, T + 1, Dv, Dk]` and `[2, B*H, T + 1, Dk]`."""
    B, H, T, S, Dk = qr.shape
    Dv = v.shape[-1]
    itemsize = max(t.element_size() for t in (qr, kr, q, k, v, qc, kc, vc))
    # bf16 inputs under "tf32": the fp32 operand of each frame-matrix and readout product as two bf16 parts (exact
    # bf16 x (hi + lo) in two bf16 dots, ~2^-16 relative): more accurate than one TF32 dot and faster on sm_90
    bf16_split = precision == "tf32" and all(t.dtype == torch.bfloat16 for t in (qr, kr, q, k, v, qc, kc, vc))
    key = ("phases", Dk, Dv, precision, itemsize, bf16_split)
    cfg = _settings("gdn_block_phases", "the phased block", PARALLEL_CONFIG, key,
                    lambda: _phases_blocks(Dk, Dv, precision, bf16_split), config)
    dev = qr.device
    f32 = dict(device=dev, dtype=torch.float32)
    main = torch.empty(B, T, S, H, Dv, device=dev, dtype=out_dtype)
    cam = torch.empty(B, T, S, H, Dv, device=dev, dtype=out_dtype)
    sig_out, z_out, sigc_out = torch.empty(B, H, Dv, Dk, **f32), torch.empty(B, H, Dk, **f32), torch.empty(
        B, H, Dv, Dk, **f32)
    outs = (main, sig_out, z_out, cam, sigc_out)
    BH = B * H
    if BH == 0:
        return outs
    has_state = sigma is not None
    sig_in, z_in, sigc_in = (sigma, z, sigc) if has_state else (sig_out, z_out, sigc_out)  # unread stand-ins
    state_strides = ((*sigma.stride(), *z.stride(), *sigc.stride()) if has_state else (0,) * 11)
    block_k = max(16, triton.next_power_of_2(Dk))
    slots = torch.empty(4, BH, T + 1, Dv, Dk, **f32)
    zslots = torch.empty(2, BH, T + 1, Dk, **f32)

    def launch(cfg):  # OutOfResources is raised at compile time, before that phase runs
        nsplit = max(1, triton.cdiv(S, cfg["P1_SPLIT"]))
        wsm = torch.empty(BH, T, nsplit, 2 * Dk + Dv + 1, Dk, **f32)
        wsc = torch.empty(BH, T, nsplit, Dk + Dv, Dk, **f32)
        na, nw = triton.cdiv(Dk, cfg["P1_BLOCK_R"]), triton.cdiv(Dv, cfg["P1_BLOCK_R"])
        nr = 3 * na + 2 * nw + 1
        nv2, nv3 = triton.cdiv(Dv, cfg["P2_BLOCK_V"]), triton.cdiv(Dv, cfg["P3_BLOCK_V"])
        ns = triton.cdiv(S, cfg["P3_BLOCK_S"])
        if T > 0:
            _block_gram_kernel[(BH * T * nsplit * nr,)](
                kr, v, k, kc, vc, beta, betac, wsm, wsc, H, T, S, Dk, Dv, cfg["P1_SPLIT"], nsplit, na, nw, nr,
                *kr.stride(), *v.stride(), *k.stride(), *kc.stride(), *vc.stride(), *beta.stride(),
                *betac.stride(), BLOCK_S=cfg["P1_BLOCK_S"], BLOCK_K=block_k, BLOCK_R=cfg["P1_BLOCK_R"],
                PRECISION=precision, BF16_SPLIT=bf16_split, num_warps=cfg["P1_WARPS"],
                num_stages=cfg["num_stages"])
        _block_recur_kernel[(BH, 4 * nv2 + 2)](
            wsm, wsc, gamma, sig_in, z_in, sigc_in, slots, zslots, sig_out, z_out, sigc_out, H, T, nsplit, Dk,
            Dv, nv2, *gamma.stride(), *state_strides, HAS_STATE=has_state, BLOCK_V=cfg["P2_BLOCK_V"],
            BLOCK_K=block_k, BLOCK_C=min(block_k, cfg["P2_BLOCK_C"]), PRECISION=precision,
            num_warps=cfg["P2_WARPS"], num_stages=cfg["num_stages"])
        if T > 0 and S > 0:
            _block_readout_kernel[(BH * T * ns * 2 * nv3,)](
                qr, q, qc, slots, zslots, main, cam, eps, H, T, S, Dk, Dv, nv3, ns, *qr.stride(), *q.stride(),
                *qc.stride(), BLOCK_S=cfg["P3_BLOCK_S"], BLOCK_K=block_k, BLOCK_V=cfg["P3_BLOCK_V"],
                PRECISION=precision, BF16_SPLIT=bf16_split, num_warps=cfg["P3_WARPS"],
                num_stages=cfg["num_stages"])

    _fit(key, cfg, config, launch, _shrink)
    return outs


# torch custom ops: opaque to dynamo, CUDA-graph friendly (torch.empty + launches, no sync) ------------------


@torch.library.custom_op("sana_wm::delta_rule_scan", mutates_args=())
def _delta_rule_scan_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, gamma: torch.Tensor,
                        state: torch.Tensor | None, reverse: bool, precision: str,
                        strategy: str) -> tuple[torch.Tensor, torch.Tensor]:
    _check_runnable(q, "delta_rule_scan_triton")
    out, st, _, _ = _launch(q, k, v, beta, gamma, state, None, None, None, reverse, precision, strategy, None)
    return out, st


@_delta_rule_scan_op.register_fake
def _(q, k, v, beta, gamma, state, reverse, precision, strategy):
    B, H, T, S, Dk = q.shape
    Dv = v.shape[-1]
    return q.new_empty(B, H, T, S, Dv, dtype=torch.float32), q.new_empty(B, H, Dv, Dk, dtype=torch.float32)


@torch.library.custom_op("sana_wm::gdn_scan", mutates_args=())
def _gdn_scan_op(q_rot: torch.Tensor, k_rot: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 beta: torch.Tensor, gamma: torch.Tensor, sigma: torch.Tensor | None, z: torch.Tensor | None,
                 reverse: bool, precision: str,
                 strategy: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_runnable(q, "gdn_forward_triton / gdn_backward_triton")
    num, sigma, den, z = _launch(q_rot, k_rot, v, beta, gamma, sigma, q, k, z, reverse, precision, strategy, None)
    return num, den, sigma, z


@_gdn_scan_op.register_fake
def _(q_rot, k_rot, q, k, v, beta, gamma, sigma, z, reverse, precision, strategy):
    B, H, T, S, Dk = q_rot.shape
    Dv = v.shape[-1]
    f32 = dict(dtype=torch.float32)
    return (q.new_empty(B, H, T, S, Dv, **f32), q.new_empty(B, H, T, S, **f32), q.new_empty(B, H, Dv, Dk, **f32),
            q.new_empty(B, H, Dk, **f32))



@torch.library.custom_op("sana_wm::gdn_block_scan", mutates_args=())
def _gdn_block_scan_op(q_rot: torch.Tensor, k_rot: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       beta: torch.Tensor, gamma: torch.Tensor, sigma: torch.Tensor | None, z: torch.Tensor | None,
                       qc: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, beta_c: torch.Tensor,
                       sigma_c: torch.Tensor | None, precision: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                              torch.Tensor, torch.Tensor, torch.Tensor,
                                                                              torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_runnable(q, "gdn_block_triton")
    return _launch_block(q_rot, k_rot, q, k, v, beta, gamma, sigma, z, qc, kc, vc, beta_c, sigma_c, precision, None)


@_gdn_block_scan_op.register_fake
def _(q_rot, k_rot, q, k, v, beta, gamma, sigma, z, qc, kc, vc, beta_c, sigma_c, precision):
    B, H, T, S, Dk = q_rot.shape
    Dv, Dc = v.shape[-1], vc.shape[-1]
    f32 = dict(dtype=torch.float32)
    num, den = q.new_empty(B, H, T, S, Dv, **f32), q.new_empty(B, H, T, S, **f32)
    cam = q.new_empty(B, H, T, S, Dc, **f32)
    return (num, den, q.new_empty(B, H, Dv, Dk, **f32), q.new_empty(B, H, Dk, **f32), torch.empty_like(num),
            torch.empty_like(den), cam, q.new_empty(B, H, Dc, Dk, **f32), torch.empty_like(cam))

@torch.library.custom_op("sana_wm::gdn_block_phases", mutates_args=())
def _gdn_block_phases_op(q_rot: torch.Tensor, k_rot: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                         v: torch.Tensor, beta: torch.Tensor, gamma: torch.Tensor, sigma: torch.Tensor | None,
                         z: torch.Tensor | None, qc: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
                         beta_c: torch.Tensor, sigma_c: torch.Tensor | None, eps: float, out_dtype: torch.dtype,
                         precision: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                  torch.Tensor]:
    _check_runnable(q, "gdn_block_phases_triton")
    return _launch_block_phases(q_rot, k_rot, q, k, v, beta, gamma, sigma, z, qc, kc, vc, beta_c, sigma_c, eps,
                                out_dtype, precision, None)


@_gdn_block_phases_op.register_fake
def _(q_rot, k_rot, q, k, v, beta, gamma, sigma, z, qc, kc, vc, beta_c, sigma_c, eps, out_dtype, precision):
    B, H, T, S, Dk = q_rot.shape
    Dv = v.shape[-1]
    f32 = dict(dtype=torch.float32)
    return (q.new_empty(B, T, S, H, Dv, dtype=out_dtype), q.new_empty(B, H, Dv, Dk, **f32),
            q.new_empty(B, H, Dk, **f32), q.new_empty(B, T, S, H, Dv, dtype=out_dtype),
            q.new_empty(B, H, Dv, Dk, **f32))


# public functions: the reference signatures (plus keyword-only precision and strategy) -------------------


def delta_rule_scan_triton(q, k, v, beta, gamma, state=None, *, reverse=False, precision=DEFAULT_PRECISION,
                           strategy=DEFAULT_STRATEGY):
    """`kernels.gdn.delta_rule_scan` in Triton. Returns (out `[B, H, T, S, Dv]`, final state), fp32."""
    _check_inputs(q, k, v, beta, gamma, state, precision, strategy, "delta_rule_scan_triton")
    if reverse and state is not None:
        raise ValueError("the backward (exclusive) scan starts from zeros; no state can be passed")
    return _delta_rule_scan_op(q, k, v, beta, gamma, state, reverse, precision, strategy)


def gdn_forward_triton(q_rot, k_rot, q, k, v, beta, gamma, state=None, *, precision=DEFAULT_PRECISION,
                       strategy=DEFAULT_STRATEGY):
    """`kernels.gdn.gdn_forward`: numerator and normaliser in the same launches. Returns num `[B, H, T, S, D]`,
    den `[B, H, T, S]` (fp32) and the final (Sigma `[B, H, D, D]`, z `[B, H, D]`)."""
    sigma, z = (None, None) if state is None else state
    _check_inputs(q_rot, k_rot, v, beta, gamma, sigma, precision, strategy, "gdn_forward_triton")
    if q.shape != q_rot.shape or k.shape != k_rot.shape:
        raise TritonScanError(f"gdn_forward_triton: q {tuple(q.shape)} / k {tuple(k.shape)} differ from q_rot / k_rot "
                              f"{tuple(q_rot.shape)}")
    if z is not None and tuple(z.shape) != (q.shape[0], q.shape[1], q.shape[-1]):
        raise TritonScanError(f"gdn_forward_triton: z {tuple(z.shape)}: need {(q.shape[0], q.shape[1], q.shape[-1])}")
    if (sigma is None) != (z is None):
        raise TritonScanError("gdn_forward_triton: state must hold both Sigma and z (or be None)")
    num, den, sigma, z = _gdn_scan_op(q_rot, k_rot, q, k, v, beta, gamma, sigma, z, False, precision, strategy)
    return num, den, (sigma, z)


def gdn_backward_triton(q_rot, k_rot, q, k, v, beta, gamma, *, precision=DEFAULT_PRECISION,
                        strategy=DEFAULT_STRATEGY):
    """`kernels.gdn.gdn_backward`: exclusive, zero-initialised. Returns num `[B, H, T, S, D]`, den `[B, H, T, S]`."""
    _check_inputs(q_rot, k_rot, v, beta, gamma, None, precision, strategy, "gdn_backward_triton")
    if q.shape != q_rot.shape or k.shape != k_rot.shape:
        raise TritonScanError(f"gdn_backward_triton: q {tuple(q.shape)} / k {tuple(k.shape)} differ from q_rot / "
                              f"k_rot {tuple(q_rot.shape)}")
    num, den, _, _ = _gdn_scan_op(q_rot, k_rot, q, k, v, beta, gamma, None, None, True, precision, strategy)
    return num, den


def camera_scan_forward_triton(q, k, v, beta, gamma, state=None, *, precision=DEFAULT_PRECISION,
                               strategy=DEFAULT_STRATEGY):
    """`kernels.camera_scan.camera_scan_forward`. Returns (out `[B, H, T, S, D]`, state `[B, H, D, D]`)."""
    return delta_rule_scan_triton(q, k, v, beta, gamma, state, precision=precision, strategy=strategy)


def camera_scan_backward_triton(q, k, v, beta, gamma, *, precision=DEFAULT_PRECISION, strategy=DEFAULT_STRATEGY):
    """`kernels.camera_scan.camera_scan_backward`. Returns out `[B, H, T, S, D]`."""
    return delta_rule_scan_triton(q, k, v, beta, gamma, reverse=True, precision=precision, strategy=strategy)[0]



def gdn_block_triton(q_rot, k_rot, q, k, v, beta, gamma, state, qc, kc, vc, beta_c, state_c, *,
                     precision=DEFAULT_PRECISION, config: dict | None = None):
    """The four scans of a one-segment GDN block (`engine.stage1.temporal.ScanOps.block`'s plain composition:
    `gdn_forward`, `gdn_backward`, `camera_scan_forward`, `camera_scan_backward` on the same frames) in one
    launch of the "stream" kernel: ~4x the programs of one scan in flight. state = (Sigma, z) and state_c =
    Sigma_c, both given or both None (zeros). Returns num_f, den_f, (Sigma, z), num_b, den_b, cam_f, Sigma_c,
    cam_b (fp32). `config`: explicit "stream" tiles (STREAM_CONFIG's keys; for the sweep) instead of `_blocks`."""
    sigma, z = (None, None) if state is None else state
    if (state is None) != (state_c is None) or (sigma is None) != (z is None):
        raise TritonScanError("gdn_block_triton: pass both states (Sigma, z) and Sigma_c, or neither")
    _check_inputs(q_rot, k_rot, v, beta, gamma, sigma, precision, "stream", "gdn_block_triton")
    _check_inputs(qc, kc, vc, beta_c, gamma, state_c, precision, "stream", "gdn_block_triton (camera)")
    if q.shape != q_rot.shape or k.shape != k_rot.shape or qc.shape != q_rot.shape:
        raise TritonScanError(f"gdn_block_triton: q {tuple(q.shape)}, k {tuple(k.shape)}, qc {tuple(qc.shape)} must "
                              f"match q_rot {tuple(q_rot.shape)}")
    if z is not None and tuple(z.shape) != (q.shape[0], q.shape[1], q.shape[-1]):
        raise TritonScanError(f"gdn_block_triton: z {tuple(z.shape)}: need {(q.shape[0], q.shape[1], q.shape[-1])}")
    if config is not None:
        _check_runnable(q, "gdn_block_triton")
        outs = _launch_block(q_rot, k_rot, q, k, v, beta, gamma, sigma, z, qc, kc, vc, beta_c, state_c, precision,
                             config)
    else:
        outs = _gdn_block_scan_op(q_rot, k_rot, q, k, v, beta, gamma, sigma, z, qc, kc, vc, beta_c, state_c,
                                  precision)
    num_f, den_f, sigma, z, num_b, den_b, cam_f, sigma_c, cam_b = outs
    return num_f, den_f, (sigma, z), num_b, den_b, cam_f, sigma_c, cam_b

def gdn_block_phases_triton(q_rot, k_rot, q, k, v, beta, gamma, state, qc, kc, vc, beta_c, state_c, *, eps: float,
                            out_dtype: torch.dtype | None = None, precision=DEFAULT_PRECISION,
                            config: dict | None = None):
    """A one-segment GDN block's scans combined as the block uses them (`engine.stage1.temporal.ScanOps.
    block_combined`'s plain composition), in three launches ("phases"): the frame matrices of the main, normaliser
    and camera streams once for both directions, the six recurrences side by side, and a readout that adds the
    forward and backward states and writes the combined results. Returns main `[B, H, T, S, Dv]` =
    (num_f + num_b) / (den_f + den_b + eps), (Sigma, z), cam `[B, H, T, S, Dv]` = cam_f + cam_b, Sigma_c; main and
    cam in out_dtype (default q_rot's), as views of `[B, T, S, H, Dv]` buffers (the heads-last layout the block
    reshapes to `[B, N, C]` without a copy), the states fp32. A different association than the four scans (states
    summed before the product), so equal to them at the rounding level of the precision. `config`: explicit tiles
    (PARALLEL_CONFIG's keys)."""
    sigma, z = (None, None) if state is None else state
    if (state is None) != (state_c is None) or (sigma is None) != (z is None):
        raise TritonScanError("gdn_block_phases_triton: pass both states (Sigma, z) and Sigma_c, or neither")
    _check_inputs(q_rot, k_rot, v, beta, gamma, sigma, precision, "parallel", "gdn_block_phases_triton")
    _check_inputs(qc, kc, vc, beta_c, gamma, state_c, precision, "parallel", "gdn_block_phases_triton (camera)")
    if q.shape != q_rot.shape or k.shape != k_rot.shape or qc.shape != q_rot.shape or vc.shape != v.shape:
        raise TritonScanError(f"gdn_block_phases_triton: q {tuple(q.shape)}, k {tuple(k.shape)}, qc "
                              f"{tuple(qc.shape)}, vc {tuple(vc.shape)} must match q_rot {tuple(q_rot.shape)} / v "
                              f"{tuple(v.shape)}")
    if z is not None and tuple(z.shape) != (q.shape[0], q.shape[1], q.shape[-1]):
        raise TritonScanError(f"gdn_block_phases_triton: z {tuple(z.shape)}: need "
                              f"{(q.shape[0], q.shape[1], q.shape[-1])}")
    out_dtype = out_dtype or q_rot.dtype
    if not out_dtype.is_floating_point:
        raise TritonScanError(f"gdn_block_phases_triton: out_dtype {out_dtype} is not a floating-point dtype")
    if config is not None:
        _check_runnable(q, "gdn_block_phases_triton")
        outs = _launch_block_phases(q_rot, k_rot, q, k, v, beta, gamma, sigma, z, qc, kc, vc, beta_c, state_c,
                                    float(eps), out_dtype, precision, config)
    else:
        outs = _gdn_block_phases_op(q_rot, k_rot, q, k, v, beta, gamma, sigma, z, qc, kc, vc, beta_c, state_c,
                                    float(eps), out_dtype, precision)
    main, sigma, z, cam, sigma_c = outs
    return main.permute(0, 3, 1, 2, 4), (sigma, z), cam.permute(0, 3, 1, 2, 4), sigma_c


def launch_with_config(q, k, v, beta, gamma, state=None, *, reverse=False, precision=DEFAULT_PRECISION,
                       strategy=DEFAULT_STRATEGY, qn=None, kn=None, z=None, **config):
    """The raw launch with explicit tile sizes / warps (for tests/benchmarks/scan_bench.py --sweep): for
    "stream" the keywords of `_blocks`, for "parallel" those of PARALLEL_CONFIG (others raise); qn, kn add the
    normaliser stream. Returns (out, state, den, z)."""
    _check_inputs(q, k, v, beta, gamma, state, precision, strategy, "launch_with_config")
    _check_runnable(q, "launch_with_config")
    return _launch(q, k, v, beta, gamma, state, qn, kn, z, reverse, precision, strategy, config)
