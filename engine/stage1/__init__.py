"""Stage-1 SANA-WM DiT: the hybrid GDN / softmax camera-controlled video transformer (spec stage1.md).

`config.Stage1Config` describes it, `model.Stage1Transformer` is the network (bidirectional and
chunk-causal forwards), `cache.Stage1Cache` the streaming state, `stream.Stage1Stream` the chunk-level API
the rollout calls, `sampler` the distilled chunk sampler and the offline flow-matching Euler sampler,
`loading` reads release / diffusers / streaming checkpoints.
"""
