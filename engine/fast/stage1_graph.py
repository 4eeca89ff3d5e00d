"""CUDA-graph replay of the streaming stage-1 forward (the plain path is `Stage1Transformer.forward_cached`).

The eager stage-1 forward of a 3-frame chunk is launch-bound (thousands of small kernels). A chunk's five
forwards (4 denoising steps + the cache-write pass) have static shapes once the stream is past its first
chunks, so each (frames, write?, softmax window fill) combination is captured once into a CUDA graph and
replayed with its inputs copied into static buffers:

- static inputs: latents `[B, C, T, h, w]`, timestep `[B, 1, T]` fp32, Plücker maps `[B, 48, T, h, w]`;
- static frame context: RoPE tables and the UCPE ray matrices, computed eagerly once per chunk (they depend on
  the chunk's cameras and frame offset) and copied in;
- static prompt K/V (copied in when the prompt changes);
- the caches are the stream's own preallocated buffers (written in place by the write graph).

Only steady-state keys are captured (the stream past its first chunk, the softmax window holding a sink and a
recent chunk): the first two chunks of a session run eagerly, so no graph is made that one session uses once
(that would cost time to first frame). The first time a steady key is seen the plain eager forward runs
(warm-up); the second time it is captured. Python-side cache counters (softmax window fill, frames written) are
advanced exactly as the eager pass does.
`GraphedStage1Stream.from_stream(stream)` swaps a `Stage1Stream` for one that uses this; CUDA only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.stage1.cache import SoftmaxBlockCache, Stage1Cache
from engine.stage1.model import Stage1Transformer, TextContext, mark_text_dynamic
from engine.stage1.stream import Stage1Stream
from engine.stage1.temporal import AttentionMode, FrameContext


def no_recompile():
    """Inside a capture a compile would break it (allocations, syncs): make any recompile a clear error instead."""
    return torch.compiler.set_stance("fail_on_recompile")


@dataclass
class _Statics:
    """Static input buffers of one chunk size T (shared by the read and the write graphs)."""

    x: torch.Tensor  # [B, C, T, h, w] model dtype
    t: torch.Tensor  # [B, 1, T] fp32
    plucker: torch.Tensor  # [B, 48, T, h, w] model dtype
    rope: torch.Tensor  # complex64 [N, D/2]
    cam_rope: torch.Tensor  # complex64 [N, D/4]
    P: torch.Tensor  # [B, N, 4, 4] fp32
    P_inv: torch.Tensor  # [B, N, 4, 4] fp32


class Stage1GraphRunner:
    """`forward_cached` through CUDA graphs keyed by (T, write_cache, softmax window fill)."""

    def __init__(self, model: Stage1Transformer, cache: Stage1Cache, mode: AttentionMode) -> None:
        self.model, self.cache, self.mode = model, cache, mode
        self.device = next(model.parameters()).device
        self._require_cuda()
        self.pool = torch.cuda.graph_pool_handle()
        self.capture_stream = torch.cuda.Stream(self.device)
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.seen: set[tuple] = set()
        self.statics: dict[int, _Statics] = {}
        self.text: TextContext | None = None  # static copy of the prompt K/V
        self._text_src: TextContext | None = None
        self._ctx_key: tuple | None = None
        self._ctx_src: tuple[torch.Tensor, int] | None = None  # the camera tensor the statics' context came from
        self.replays = 0
        self.block_fn = None  # steady-state block call (None = plain; engine.fast.stage1_compile sets a compiled one)

    def drop_graphs(self) -> bool:
        """Forget the captured graphs (they read the buffers, parameters and ops of their capture): each kind
        runs eagerly once more (a compiled block call compiles there) before its new capture. True if any were."""
        had = bool(self.graphs or self.seen)
        self.graphs.clear()
        self.seen.clear()
        return had

    def _require_cuda(self) -> None:
        if self.device.type != "cuda":
            raise RuntimeError("Stage1GraphRunner needs a CUDA device")

    # -- state -----------------------------------------------------------------------------------------------------
    def _window_fill(self) -> tuple[int, int] | None:
        for b in self.cache.blocks:
            if isinstance(b, SoftmaxBlockCache):
                return b.sink_len, b.recent_len
        return None

    def steady(self) -> bool:
        """Past the first chunk, and the softmax window (if any) holds both its sink and a recent chunk."""
        fill = self._window_fill()
        return self.cache.frames_written > 0 and (fill is None or (fill[0] > 0 and fill[1] > 0))

    def _counters(self) -> list[tuple[int, int]]:
        return [(b.sink_len, b.recent_len) for b in self.cache.blocks if isinstance(b, SoftmaxBlockCache)]

    def _set_counters(self, values: list[tuple[int, int]]) -> None:
        blocks = [b for b in self.cache.blocks if isinstance(b, SoftmaxBlockCache)]
        for b, (s, r) in zip(blocks, values, strict=True):
            b.sink_len, b.recent_len = s, r

    def _advance_counters(self, tokens: int) -> None:
        """What `SoftmaxBlockCache.append` does to the counters of every softmax block."""
        for b in self.cache.blocks:
            if isinstance(b, SoftmaxBlockCache):
                if b.sink_len:
                    b.recent_len = tokens
                else:
                    b.sink_len = tokens

    def _sync_text(self, text: TextContext) -> None:
        if text is self._text_src:
            return
        if self.text is None or any(a.shape != b.shape for (a, _), (b, _) in zip(self.text.kv, text.kv, strict=True)) \
                or self.text.bias.shape != text.bias.shape:
            self.text = TextContext(kv=[(k.clone(), v.clone()) for k, v in text.kv], bias=text.bias.clone(),
                                    dynamic_length=text.dynamic_length)
            if text.dynamic_length:  # prompts of other lengths to come: no recompile for them
                mark_text_dynamic(self.text)
            self.drop_graphs()  # captured against other buffers (a trimmed prompt of another length: captured again)
        else:
            for (sk, sv), (k, v) in zip(self.text.kv, text.kv, strict=True):
                sk.copy_(k)
                sv.copy_(v)
            self.text.bias.copy_(text.bias)
        # the prompt's K/V held once: the caller's prompt reads the static copies (equal values); the previous
        # prompt object, whose values those copies no longer hold, is emptied (a use of it fails loudly)
        if self._text_src is not None:
            self._text_src.kv = self._text_src.bias = None
        text.kv, text.bias = self.text.kv, self.text.bias
        self._text_src = text

    def _statics_for(self, x: torch.Tensor, plucker: torch.Tensor, ctx: FrameContext | None) -> _Statics:
        T = x.shape[2]
        if T not in self.statics:
            if ctx is None:
                raise RuntimeError(f"no static buffers for chunks of {T} frames and no context computed")
            self.statics[T] = _Statics(
                x=torch.empty_like(x), t=torch.empty(x.shape[0], 1, T, device=self.device),
                plucker=torch.empty_like(plucker), rope=torch.empty_like(ctx.rope),
                cam_rope=torch.empty_like(ctx.cam_rope), P=torch.empty_like(ctx.P), P_inv=torch.empty_like(ctx.P_inv))
        return self.statics[T]

    def _context(self, camera_conditions: torch.Tensor, T: int, h: int, w: int) -> FrameContext | None:
        """The eager frame context of this chunk, or None when the statics already hold it (same chunk)."""
        # the same tensor object, unmodified (its version counter): the chunk's 4 steps and its cache pass get the
        # one camera tensor, so only its first forward builds the context (a few small kernels and two page-locked
        # copies; none for the others). The reference keeps the object alive, so its id cannot be reused by another
        # tensor. A write that bypasses the version counter (`.data`, DLPack, a shared numpy buffer) would go unseen;
        # WorldPipeline hands in a fresh device tensor per chunk.
        key = (self.cache.frames_written, T, h, w)
        src = self._ctx_src
        if key == self._ctx_key and src is not None and src[0] is camera_conditions \
                and src[1] == camera_conditions._version:
            return None
        ctx = self.model._context(camera_conditions, self.cache.frames_written, T, h, w, ((0, T),), self.mode, False)
        self._ctx_key, self._ctx_src = key, (camera_conditions, camera_conditions._version)
        return ctx

    # -- forward ---------------------------------------------------------------------------------------------------
    def _body(self, st: _Statics, write: bool, h: int, w: int, caches_only: bool = False) -> torch.Tensor | None:
        """`Stage1Transformer.run` on the static buffers (one segment, cached)."""
        m = self.model
        B, T = st.x.shape[0], st.x.shape[2]
        ctx = FrameContext(frames=T, height=h, width=w, segments=((0, T),), rope=st.rope, cam_rope=st.cam_rope,
                           P=st.P, P_inv=st.P_inv, mode=self.mode, write_cache=write, scans=m.scan_ops,
                           ffn=m.ffn_ops)
        x = m.x_embedder(st.x)
        p_emb = m.plucker_embedder(st.plucker)
        t_emb, mod = m.embed_timestep(st.t, B, T)
        return m.run_blocks(x, mod, p_emb, t_emb, self.text, ctx, self.cache, self.block_fn, caches_only,
                            (B, T, h, w))

    def _capture(self, st: _Statics, write: bool, h: int, w: int,
                 caches_only: bool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor | None]:
        counters = self._counters()
        s = self.capture_stream
        s.wait_stream(torch.cuda.current_stream(self.device))
        if not self.graphs:  # warm this stream's library handles with a side-effect-free read pass
            with torch.cuda.stream(s):
                self._body(st, False, h, w)
            torch.cuda.current_stream(self.device).wait_stream(s)
        g = torch.cuda.CUDAGraph()
        try:
            with no_recompile(), torch.cuda.graph(g, pool=self.pool, stream=s):
                out = self._body(st, write, h, w, caches_only)
        finally:
            self._set_counters(counters)  # capture ran the Python side of the cache writes; nothing executed
        return g, out

    @torch.no_grad()
    def __call__(self, hidden_states: torch.Tensor, timestep: torch.Tensor, text: TextContext,
                 camera_conditions: torch.Tensor, chunk_plucker: torch.Tensor, *, write_cache: bool,
                 caches_only: bool = False) -> torch.Tensor | None:
        """One forward (`forward_cached`); `caches_only`: a cache-write pass whose output nobody reads (None)."""
        B, _, T, h, w = hidden_states.shape
        key = (tuple(hidden_states.shape), write_cache, caches_only, self._window_fill())
        steady = self.steady()
        if steady:  # first: a new prompt buffer clears `seen`, which must not forget this call's first sight
            self._sync_text(text)
        first_sight = steady and key not in self.seen
        if first_sight:
            self.seen.add(key)
        if not steady or (first_sight and self.block_fn is None):  # start-up, or first sight: plain eager
            return self.model.forward_cached(hidden_states, timestep, text, camera_conditions, chunk_plucker,
                                             self.cache, write_cache=write_cache, mode=self.mode,
                                             caches_only=caches_only)
        ctx = self._context(camera_conditions, T, h, w)
        st = self._statics_for(hidden_states, chunk_plucker, ctx)
        if ctx is not None:
            for name in ("rope", "cam_rope", "P", "P_inv"):
                getattr(st, name).copy_(getattr(ctx, name))
        st.x.copy_(hidden_states)
        st.t.copy_(torch.as_tensor(timestep, device=self.device).reshape(B, 1, T))
        st.plucker.copy_(chunk_plucker)
        if first_sight:  # a compiled block call: run it eagerly on the very buffers the graph will read, so it
            out = self._body(st, write_cache, h, w, caches_only)  # compiles here (same guards), not in the capture
            if write_cache:  # the eager body advanced the softmax counters itself (cache.append)
                self.cache.frames_written += T
            return None if out is None else out.clone()
        if key not in self.graphs:
            self.graphs[key] = self._capture(st, write_cache, h, w, caches_only)
        graph, out = self.graphs[key]
        graph.replay()
        self.replays += 1
        if write_cache:
            self._advance_counters(T * h * w)
            self.cache.frames_written += T
        return None if out is None else out.clone()


class GraphedStage1Stream(Stage1Stream):
    """A `Stage1Stream` whose model passes go through `Stage1GraphRunner` (same caches, same results)."""

    runner: Stage1GraphRunner

    @classmethod
    def from_stream(cls, stream: Stage1Stream) -> GraphedStage1Stream:
        new = cls.__new__(cls)
        new.__dict__.update(stream.__dict__)
        new.runner = Stage1GraphRunner(stream.model, stream.cache, stream.mode)
        new.runner.block_fn, new.block_fn = stream.block_fn, None  # a compiled block call serves the steady state
        return new

    def _velocity(self, camera_conditions, chunk_plucker):
        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.runner(x, t, self.text, camera_conditions, chunk_plucker, write_cache=False)

        return velocity

    @torch.no_grad()
    def write_cache(self, clean: torch.Tensor, camera_conditions: torch.Tensor, chunk_plucker: torch.Tensor) -> None:
        self._check(clean, camera_conditions, chunk_plucker)
        t = torch.zeros(clean.shape[0], 1, clean.shape[2], device=clean.device)
        self.runner(clean, t, self.text, camera_conditions, chunk_plucker, write_cache=True,
                    caches_only=self.lean_pass)
