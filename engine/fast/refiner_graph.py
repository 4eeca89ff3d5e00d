"""CUDA-graph replay of the AR refiner's block forwards (the plain path is `RefinerTransformer.forward`).

A refined block runs the refiner 4 times (3 sigma steps + the sigma = 0 capture pass) over the same shapes; the
K/V window writes the block's K/V into slots that depend only on how much history it holds. So each
(latent shape, window history, open block) combination is captured once and replayed with static inputs:
latents `[B, C, n, h, w]`, sigma `[B]` fp64, the RoPE table of the block's frames (computed eagerly, once per
block) and the prompt's per-layer cross-attention K/V (copied in when the prompt changes). The sink pass, the
blocks before the history window is full (each of those shapes occurs once per session) and the first sight of a
steady shape run the plain forward.

`GraphedRefinerModel(model)` stands in for the model inside an `ARRefiner` (`ar.model = GraphedRefinerModel(...)`):
attribute access goes to the wrapped model, calls go through the graphs. CUDA only.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from engine.fast.stage1_graph import no_recompile
from engine.refiner.ar import RefinerKVWindow
from engine.refiner.model import RefinerText, RefinerTransformer
from engine.refiner.rope import Rope


class GraphedRefinerModel:
    def __init__(self, model: RefinerTransformer) -> None:
        self.model = model
        self.device = model.proj_in.weight.device
        self._require_cuda()
        self.pool = torch.cuda.graph_pool_handle()
        self.capture_stream = torch.cuda.Stream(self.device)
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self.seen: set[tuple] = set()
        self.statics: dict[tuple, dict[str, Tensor]] = {}
        self.text: RefinerText | None = None
        self._text_src: RefinerText | None = None
        self._rope_key: tuple | None = None
        self._window: weakref.ref | None = None  # the K/V window the graphs were captured with
        self.replays = 0
        self.parts: tuple | None = None  # steady-state block halves (None = plain; engine.fast.refiner_compile)

    def __getattr__(self, name: str):  # cfg, proj_in, num_layers, video_rope, prepare_text, ...
        return getattr(self.__dict__["model"], name)

    def _require_cuda(self) -> None:
        if self.device.type != "cuda":
            raise RuntimeError("GraphedRefinerModel needs a CUDA device")

    def drop_graphs(self) -> None:
        """Forget the captured graphs: each shape runs eagerly once more (compiled halves compile there) before its
        new capture."""
        self.graphs.clear()
        self.seen.clear()

    # -- static state ----------------------------------------------------------------------------------------------
    def _sync_text(self, text: RefinerText) -> None:
        if text is self._text_src:
            return
        # the prompt's tensors, whatever their nesting (bf16 K/V, or e4m3 segments beside None under
        # refiner-fp8-attn: torch's pytree keeps None as a leaf)
        leaves, spec = tree_flatten((text.k, text.v, text.bias))
        mine = tree_flatten((self.text.k, self.text.v, self.text.bias)) if self.text is not None else None
        same = mine is not None and mine[1] == spec and all(
            (a is None and b is None) or (a is not None and b is not None and a.shape == b.shape
                                          and a.dtype == b.dtype) for a, b in zip(mine[0], leaves, strict=True))
        if not same:
            k, v, bias = tree_unflatten([None if t is None else t.clone() for t in leaves], spec)
            self.text = RefinerText(k=k, v=v, bias=bias)
            self.drop_graphs()
        else:
            for dst, src in zip(mine[0], leaves, strict=True):
                if dst is not None:
                    dst.copy_(src)
        # the caller's prompt now reads the static copies (equal values), so the prompt's K/V (0.8 GB at the
        # release size) are held once, not twice. A later prompt of the same shapes is copied into them, so the
        # previous prompt object would read the new values: it is emptied, and a use of it fails loudly.
        if self._text_src is not None:
            self._text_src.k = self._text_src.v = self._text_src.bias = None
        text.k, text.v, text.bias = self.text.k, self.text.v, self.text.bias
        self._text_src = text

    def _statics(self, latents: Tensor, rope: Rope) -> dict[str, Tensor]:
        key = tuple(latents.shape)
        if key not in self.statics:
            self.statics[key] = {
                "latents": torch.empty_like(latents),
                "sigma": torch.empty(latents.shape[0], dtype=torch.float64, device=self.device),
                "cos": torch.empty_like(rope.cos),
                "sin": torch.empty_like(rope.sin),
            }
        return self.statics[key]

    # -- forward ---------------------------------------------------------------------------------------------------
    def _body(self, st: dict[str, Tensor], layout: str, kv: RefinerKVWindow, kv_only: bool) -> Tensor | None:
        """`RefinerTransformer.forward` on the static buffers (sigma per batch element)."""
        m = self.model
        b, c, n, h, w = st["latents"].shape
        dtype = m.proj_in.weight.dtype
        rope = Rope(cos=st["cos"], sin=st["sin"], layout=layout)
        timestep = (st["sigma"] * m.cfg.timestep_scale_multiplier).to(torch.float32).reshape(b, -1)
        emb, temb = m.time_embed(timestep, dtype)
        x = m.proj_in(st["latents"].permute(0, 2, 3, 4, 1).reshape(b, n * h * w, c).to(dtype))
        last = m.num_layers - 1
        for i, blk in enumerate(m.transformer_blocks):
            x = blk(x, temb, rope, self.text.k[i], self.text.v[i], self.text.bias, i, kv, parts=self.parts,
                    kv_only=kv_only and i == last)
        if kv_only:
            return None
        shift = m.scale_shift_table[0] + emb
        scale = m.scale_shift_table[1] + emb
        out = m.proj_out(m.norm_out(x) * (1 + scale) + shift)
        return out.reshape(b, n, h, w, -1).permute(0, 4, 1, 2, 3)

    def _capture(self, st, layout, kv, kv_only) -> tuple[torch.cuda.CUDAGraph, Tensor | None]:
        s = self.capture_stream
        s.wait_stream(torch.cuda.current_stream(self.device))
        g = torch.cuda.CUDAGraph()
        with no_recompile(), torch.cuda.graph(g, pool=self.pool, stream=s):
            out = self._body(st, layout, kv, kv_only)
        return g, out

    @torch.no_grad()
    def __call__(self, latents: Tensor, sigma, text: RefinerText, *, fps: float, frame_positions: Tensor | None = None,
                 kv=None, kv_only: bool = False) -> Tensor | None:
        plain = dict(fps=fps, frame_positions=frame_positions, kv=kv, kv_only=kv_only)
        if not isinstance(kv, RefinerKVWindow) or frame_positions is None or torch.is_tensor(sigma):
            return self.model(latents, sigma, text, **plain)
        if self._window is None or self._window() is not kv:  # another window (a new session's, a new layout): the
            # graphs point at the old one's buffers, which may be gone (and its id reused): capture again
            self.drop_graphs()
            self._window = weakref.ref(kv)
        key = (tuple(latents.shape), kv.history_len, kv.active_len, kv.writes_after_attention, kv.writes_active,
               kv_only)
        if kv.history_len < kv.max_history:  # the window still fills: a shape this session sees once
            return self.model(latents, sigma, text, **plain)
        self._sync_text(text)  # first: a new prompt buffer clears `seen`, which must not forget this first sight
        first_sight = key not in self.seen
        if first_sight:
            self.seen.add(key)
            if self.parts is None:
                return self.model(latents, sigma, text, **plain)
        b, c, n, h, w = latents.shape
        rope_key = (tuple(frame_positions.tolist()), b, h, w, fps)
        if rope_key != self._rope_key or tuple(latents.shape) not in self.statics:  # once per block
            rope = self.model.video_rope(frame_positions, h, w, fps)
            st = self._statics(latents, rope)
            st["cos"].copy_(rope.cos)
            st["sin"].copy_(rope.sin)
            self._rope_key = rope_key
        else:
            st = self.statics[tuple(latents.shape)]
        st["latents"].copy_(latents)
        st["sigma"].fill_(float(sigma))
        if first_sight:  # compiled block halves: run (and so compile) them once outside any capture
            out = self._body(st, self.model.cfg.rope_type, kv, kv_only)
            return None if out is None else out.clone()
        # a replay reads the fp8 copy without asking the window (attend checks eager forwards); checked before a
        # capture, whose Python side marks the layers a capture pass will write (after_attention) as stale
        if kv.fp8_stale:
            raise RuntimeError("the K/V window changed since its fp8 copy was made; call refresh_fp8() first")
        if key not in self.graphs:
            self.graphs[key] = self._capture(st, self.model.cfg.rope_type, kv, kv_only)
        graph, out = self.graphs[key]
        graph.replay()
        self.replays += 1
        return None if out is None else out.clone()
