"""Fewer, wider stage-1 GEMMs by re-laying out weights (fast paths `stage1-fused-proj` and `stage1-tconv`).

Plain path: a release stage-1 self-attention layer applies five or seven linears to its input `a [2640, 2240]`, one
by one (`qkv`, the camera branch's `q/k/v_proj_cam`, `output_gate`; GDN layers also `beta_proj` per token and
`gate_proj` on the frame mean), each reading `a` again; the four 2240 -> 2240 ones run at ~680 TFLOP/s on an H100 and
the 20-wide ones on a small tensor-core tile. The FFN's temporal conv gathers its three frame taps interleaved per
channel (the conv weight's order), a strided pass of ~46 us a block.

- `fuse_in_projections(model)`: each layer's input linears concatenated into one weight `[7C (+2H), C]` and bias
  (`qkv`'s absent bias as zeros; zero rows up to a multiple of `ROW_MULTIPLE`), held as the layer's `fused_weight` /
  `fused_bias` buffers (not in the state dict); the linears' parameters become views of them, so no memory is added
  and loading weights afterwards fills both. `SelfAttention.project` then runs one GEMM and splits it; the decay
  logits are the frame mean of the per-token `gate_proj` outputs, equal to `gate_proj` of the frame mean up to
  rounding (the map is affine).
- `tap_major_tconv(model)`: each FFN temporal conv weight re-stored tap-major (`[C, 3, C]` memory behind the same
  `[C, C, 3, 1]` parameter), so `temporal_conv` builds its taps as three contiguous copies (see its docstring).

Both change only rounding (a different summation order inside the GEMMs), both run on any device, and both act on
the model, i.e. world-wide: the caller drops its pipeline's captured stage-1 graphs (they read the old parameter
memory, which is freed); another pipeline of the same world that captured graphs before must not replay them.
`unfuse_in_projections` and `conv_major_tconv` undo them (tests)."""

from __future__ import annotations

import torch

from engine.stage1.model import Stage1Transformer

# the concatenated weight's rows are padded with zeros to a multiple of this: at 7C + 2H = 15720 rows (GDN layers) the
# GEMM did not take cuBLASLt's bias epilogue on the H100 (it copied the bias into the 83 MB output first, 68 us, and
# accumulated onto it); at 15680 (softmax layers) it did
ROW_MULTIPLE = 64


@torch.no_grad()
def fuse_in_projections(model: Stage1Transformer) -> int:
    """Concatenate every self-attention layer's input linears (`SelfAttention.in_projections`) and make their
    parameters views of the result; returns how many layers were fused (0 when already done)."""
    n = 0
    for block in model.blocks:
        attn = block.attn
        if attn.fused_weight is not None:
            continue
        lins = [lin for _, lin in attn.in_projections()]
        rows = sum(lin.out_features for lin in lins)
        pad = -rows % ROW_MULTIPLE
        weight = torch.cat([lin.weight for lin in lins] + [lins[0].weight.new_zeros(pad, lins[0].in_features)])
        bias = torch.cat([lin.weight.new_zeros(lin.out_features) if lin.bias is None else lin.bias for lin in lins]
                         + [lins[0].weight.new_zeros(pad)])
        row = 0
        for lin in lins:
            part = slice(row, row + lin.out_features)
            lin.weight.data = weight[part]
            if lin.bias is not None:
                lin.bias.data = bias[part]
            row = part.stop
        attn.fused_weight, attn.fused_bias = weight, bias
        n += 1
    return n


def unfuse_in_projections(model: Stage1Transformer) -> None:
    """Back to one GEMM per linear (their parameters stay views of the concatenated storage: same values)."""
    for block in model.blocks:
        block.attn.fused_weight = block.attn.fused_bias = None


@torch.no_grad()
def tap_major_tconv(model: Stage1Transformer) -> int:
    """Re-store every FFN temporal conv weight tap-major; returns how many were (0 when already done)."""
    n = 0
    for block in model.blocks:
        p = block.mlp.t_conv.weight  # [Cout, Cin, 3, 1]
        if p.is_contiguous():
            p.data = p.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
            n += 1
    return n


@torch.no_grad()
def conv_major_tconv(model: Stage1Transformer) -> None:
    """Back to the conv's own (contiguous) storage."""
    for block in model.blocks:
        p = block.mlp.t_conv.weight
        p.data = p.contiguous()


def use_fused_in_projections(pipe) -> str:
    return _applied(pipe, fuse_in_projections(pipe.world.stage1), "self-attention layers' input linears -> one GEMM")


def use_tap_major_tconv(pipe) -> str:
    return _applied(pipe, tap_major_tconv(pipe.world.stage1), "FFN temporal conv weights -> tap-major storage")


def _applied(pipe, n: int, what: str) -> str:
    from engine.fast.stage1_graph import GraphedStage1Stream

    what = f"{n} {what} (world-wide{', already' if n == 0 else ''})"
    if n and isinstance(pipe.stream, GraphedStage1Stream) and pipe.stream.runner.drop_graphs():
        what += "; the stage-1 graphs captured before are dropped"
    return what
