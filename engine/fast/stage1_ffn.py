"""The stage-1 FFN's depthwise 3x3 conv + bias + GLU as one Triton kernel (kernels/dwconv_glu.py).

The plain FFN (`GLUMBConvTemp`, spec stage1.md §3.12) runs a 1x1 conv to 2Hd channels, SiLU, cudnn's depthwise 3x3
conv (~110 us a call on an H100 at the release shape, at about a third of memory speed), the gate's SiLU and the
product, each a full pass over a 71 MB tensor, with NCHW permutes around them. With `Stage1Transformer.ffn_ops` set,
the FFN is two token-major GEMMs around one kernel that reads the first GEMM's output once and writes the gated
Hd channels once (the same math, fp32 inside the kernel; not bit-equal to the bf16 plain path, which rounds after
each pass).

`set_ffn_ops(pipe, op)` switches an op of that signature on (None: back to the plain FFN) for the world's stage-1
model. The op must be a plain function or a torch custom op: dynamo does not guard `ctx.ffn is None` on a
`torch.compiler.disable`d callable, so a compiled block would keep calling such an op after a switch back. The
pipeline's stage-1 CUDA-graph runner, if it already captured graphs, would replay the old path, so its
graphs are dropped and each kind runs eagerly once more before its new capture (with `stage1-compile`, that is where
the block call recompiles). Runners of other pipelines of the same world are not touched.
"""

from __future__ import annotations


def fused_ffn_op():
    """The Triton op (kernels/dwconv_glu.py, its default config); needs Triton and CUDA tensors at call time."""
    from kernels.dwconv_glu import dwconv_glu_triton

    return dwconv_glu_triton


def set_ffn_ops(pipe, op) -> str:
    """Point the stage-1 model of `pipe` (a `WorldPipeline`) at `op` (None = the plain FFN) and drop the CUDA graphs
    captured with the previous one."""
    from engine.fast.stage1_graph import GraphedStage1Stream

    what = f"Stage1Transformer.ffn_ops -> {getattr(op, '__name__', op)}"
    if pipe.world.stage1.ffn_ops is op:
        return what + " (already)"
    pipe.world.stage1.ffn_ops = op
    if isinstance(pipe.stream, GraphedStage1Stream) and pipe.stream.runner.drop_graphs():
        what += "; the stage-1 graphs captured before are dropped"
    return what
