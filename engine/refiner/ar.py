"""Chunk-causal AR refinement with the LTX-2 refiner (`rf_shifted_sink`, refiner_vae.md §4).

The stage-1 latents are refined block by block (3 latent frames). Each block's queries attend to
`[sink ; history ; block]` self-attention K/V:
- sink: latent frame 0 of stage-1, captured once per video at sigma = 0 **before RoPE** and re-rotated every block
  to the frame right before the history window (frame `start − history − sink_size`);
- history: the post-RoPE K/V of the last `kv_max_frames − sink_size` refined frames, each captured by one sigma = 0
  pass over the refined block under the window it saw (so a window can only be rebuilt by replaying those capture
  passes in order, from the sink or from a snapshot; never from its own frames alone).
A block starts from `x = (1 − σ₀)·z + σ₀·ε` (SDEdit), takes one Euler step per sigma with the velocity implied by
the x0 prediction, and lands on x0 at sigma 0.

`RefinerKVWindow` holds the K/V in one preallocated buffer per session (constant memory); `ARRefiner` is the
block-level API the rollout calls. Knows nothing of sockets, recording or the VAE.
"""

from __future__ import annotations

import torch
from torch import Tensor

from engine.errors import InputError
from engine.refiner.config import ARConfig
from engine.refiner.model import RefinerText, RefinerTransformer
from engine.refiner.rope import Rope, apply_rope
from kernels.fp8_attention import QuantizedKV, empty_quantized, quantize_kv, quantize_kv_into, segment_view


def quantize_text(text: RefinerText) -> RefinerText:
    """The prompt's per-layer cross-attention K/V as e4m3 segments (`k[i] = (QuantizedKV,)`, `v[i] = (None,)`: the
    segment carries both), attended by the fp8 attention (fast path `refiner-fp8-attn`), when no text position is
    masked (the connectors' output never is: padding became registers). A masked prompt keeps its bf16 K/V and the
    additive bias (the fp8 kernel takes no bias). One host sync (the mask test), once per prompt."""
    if not text_attends_in_fp8(text):
        return text
    k, v = zip(*(quantize_text_layer(k, v) for k, v in zip(text.k, text.v, strict=True)), strict=True)
    return RefinerText(k=list(k), v=list(v), bias=text.bias)


def text_attends_in_fp8(text: RefinerText) -> bool:
    """Whether the prompt's cross-attention can run in fp8: no position masked (an all-zero additive bias; the fp8
    kernel takes none). A host sync."""
    return not bool(text.bias.ne(0).any())


def quantize_text_layer(k: Tensor, v: Tensor) -> tuple[tuple, tuple]:
    """One layer's prompt K/V `[B, H, L, D]` -> the `((QuantizedKV,), (None,))` an unmasked prompt attends in fp8."""
    return (quantize_kv(k, v),), (None,)


class RefinerKVWindow:
    """Per-layer self-attention K/V of the AR refiner, laid out `[sink | history | active]` along tokens.

    Fresh buffers are filled with NaN so a read of a slot never written fails loudly. The history is a ring of
    `history_frames` frame slots: it fills in time order from slot 0; once full, a block's frames overwrite the
    oldest ones in place and `history_start` (the slot of the oldest frame) moves on, so no frame is ever moved
    (shifting the history cost ~5 ms a block at the release size). The attention sees the same keys as the
    reference's time-ordered concatenation, in another order: equal up to the rounding of the softmax sums
    (keys carry their positions in their RoPE, not in their place). Snapshots hold the history in slot order with
    `history_start` (`history_in_time_order` turns one into time order).

    `active_slots=False` (fast path `lean-memory`: 2.1 GB less at the release size) leaves out the active block's
    slots: a layer attends to `[sink | history]` and to the block's own K/V as two segments (`two_segment_attention`,
    equal up to rounding), and the capture pass writes the block's K/V into the history layer by layer, after the
    layer has attended (`after_attention`: into the ring slots `append_active` would copy them to, through a device
    index staged before the pass by `begin_capture`, so one captured graph serves every ring position).

    `use_fp8_attention()` (fast path `refiner-fp8-attn`) adds an e4m3 copy of the sink + history K/V (`fp8`, one
    scale per 128 tokens; half the bytes of the bf16 ones: 3.8 GB at the release size) that `refresh_fp8()`
    rebuilds from the bf16 window, once a block (`ARRefiner._place_sink`, from `_open` or ahead of it,
    `prepare_next_block`); `attend` then returns two segments, that copy and the block's own K/V, which the
    self-attention runs in fp8 (kernels/fp8_attention.py); the active slots are never written (a capture pass writes
    the history after attention, as without them). The bf16 window stays the state (snapshots, capture passes); the
    copy is derived. A layer whose window changed since the last refresh refuses to attend (`fp8_stale`).
    """

    def __init__(
        self,
        *,
        num_layers: int,
        batch: int,
        heads: int,
        head_dim: int,
        tokens_per_frame: int,
        sink_frames: int,
        history_frames: int,
        block_frames: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        active_slots: bool = True,
    ) -> None:
        self.tokens_per_frame = tokens_per_frame
        self.sink_frames, self.max_history, self.max_block = sink_frames, history_frames, block_frames
        self.active_slots = active_slots
        self.capturing = False  # a capture pass is running (ARRefiner._capture): see `after_attention`
        s_sink = sink_frames * tokens_per_frame
        cap = (sink_frames + history_frames + (block_frames if active_slots else 0)) * tokens_per_frame
        nan = float("nan")
        # [L, B, H, sink tokens, D]: the sink's keys after norm_k, before RoPE (re-rotated every block)
        self.sink_k_pre = torch.full((num_layers, batch, heads, s_sink, head_dim), nan, device=device, dtype=dtype)
        # [L, B, H, (sink + history + block) tokens, D]: post-RoPE keys; sink | history (oldest first) | active block
        self.k = torch.full((num_layers, batch, heads, cap, head_dim), nan, device=device, dtype=dtype)
        # [L, B, H, (sink + history + block) tokens, D]: values, same layout
        self.v = torch.full((num_layers, batch, heads, cap, head_dim), nan, device=device, dtype=dtype)
        self.history_len = 0  # frames of history held (<= max_history)
        self.history_start = 0  # ring slot of the oldest history frame (0 until the history is full)
        # the history frame slots a capture pass without active slots writes (`after_attention`), staged on the
        # device by `begin_capture` (a graph replays with whatever it holds)
        self._capture_slots = torch.zeros(min(block_frames, history_frames), dtype=torch.long, device=device)
        self.active_len = 0  # frames of the block now being refined (0 = none open)
        self.fp8: QuantizedKV | None = None  # e4m3 copy of sink + history: k [L, B, H, T, D], v_t [L, B, H, D, T]
        self._fp8_stale: set[int] = set()  # layers whose bf16 K/V changed since the copy was made

    # -- layout ---------------------------------------------------------------------------------------------------
    def _tok(self, frames: int) -> int:
        return frames * self.tokens_per_frame

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def buffers(self) -> tuple[Tensor, ...]:
        return (self.sink_k_pre, self.k, self.v) + (tuple(self.fp8) if self.fp8 is not None else ())

    def matches(self, batch: int, tokens_per_frame: int, device: torch.device, dtype: torch.dtype,
                active_slots: bool = True, fp8: bool = False) -> bool:
        return (
            self.active_slots == active_slots
            and self.k.shape[1] == batch
            and self.tokens_per_frame == tokens_per_frame
            and self.k.device == device
            and self.k.dtype == dtype
            and (self.fp8 is not None) == fp8
        )

    # -- the fp8 copy ---------------------------------------------------------------------------------------------
    def use_fp8_attention(self) -> None:
        """Allocate the e4m3 copy of sink + history (stale until `refresh_fp8`)."""
        if self.fp8 is None:
            layers, batch, heads, _, head_dim = self.k.shape
            tokens = self._tok(self.sink_frames + self.max_history)
            self.fp8 = empty_quantized((layers, batch, heads), tokens, head_dim, self.k.device)
        self._touch()

    def _touch(self, layer: int | None = None) -> None:
        """The bf16 K/V of `layer` (None: all layers) changed: the fp8 copy no longer matches it."""
        if self.fp8 is not None:
            self._fp8_stale.update(range(self.k.shape[0]) if layer is None else (layer,))

    @property
    def fp8_stale(self) -> bool:
        return bool(self._fp8_stale)

    def refresh_fp8(self) -> None:
        """Quantise the sink + history K/V of every layer into the fp8 copy (no-op without one)."""
        if self.fp8 is None:
            return
        t = self._tok(self.sink_frames + self.history_len)
        quantize_kv_into(self.k[:, :, :, :t], self.v[:, :, :, :t], segment_view(self.fp8, t))
        self._fp8_stale.clear()

    def _fp8_segment(self, layer: int, tokens: int) -> QuantizedKV:
        if layer in self._fp8_stale:
            raise RuntimeError(f"layer {layer}: the K/V window changed since its fp8 copy was made; call "
                               "refresh_fp8() before attending (ARRefiner does, once a block)")
        return segment_view(QuantizedKV(*(t[layer] for t in self.fp8)), tokens)

    # -- operations -----------------------------------------------------------------------------------------------
    def clear(self) -> None:
        """Forget the sink and the history (buffers are kept)."""
        for t in self.buffers()[:3]:
            t.fill_(float("nan"))
        self.history_len = self.active_len = self.history_start = 0
        self._touch()

    def sink_capture(self) -> _SinkCapture:
        """The `SelfAttentionKV` of the sink pass: records pre-RoPE K and V, attends within the sink only."""
        return _SinkCapture(self)

    def place_sink(self, rope: Rope) -> None:
        """Rotate the sink's pre-RoPE keys to the positions of `rope` (all layers)."""
        self.k[:, :, :, : self._tok(self.sink_frames)] = apply_rope(self.sink_k_pre, rope)
        self._touch()

    def open_block(self, frames: int) -> None:
        """The next forwards write a block of `frames` latent frames after the history."""
        if not 1 <= frames <= self.max_block:
            raise InputError(f"block of {frames} latent frames; the window takes 1..{self.max_block}")
        self.active_len = frames

    def attend(self, layer: int, k_pre: Tensor, k: Tensor, v: Tensor):
        """`SelfAttentionKV`: write the active block's post-RoPE K/V `[B, H, N, D]` after the history and return
        the window `[B, H, sink + history + N, D]` (views, no copy). Without active slots: the two segments
        `((K_window, k), (V_window, v))`, the window `[B, H, sink + history, D]` as views."""
        start = self._tok(self.sink_frames + self.history_len)
        end = start + k.shape[2]
        if k.shape[2] != self._tok(self.active_len):
            raise RuntimeError(f"{k.shape[2]} active tokens for an open block of {self.active_len} frames")
        if self.fp8 is not None:  # the attention reads the fp8 copy and k, v themselves
            seg = self._fp8_segment(layer, start)
            return (seg, k), (seg, v)
        if not self.active_slots:
            return (self.k[layer, :, :, :start], k), (self.v[layer, :, :, :start], v)
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def _ring_slots(self, frames: int) -> list[int]:
        """History slots of the last min(frames, max_history) frames of a block of `frames` appended now."""
        m, h = self.max_history, self.history_len
        return [(self.history_start + h + i) % m for i in range(max(0, frames - m), frames)]

    def _advance(self, frames: int) -> None:
        """`frames` appended frames join the history: the oldest beyond `max_history` drop out of the ring."""
        total = self.history_len + frames
        drop = max(0, total - self.max_history)
        self.history_start = (self.history_start + drop) % self.max_history
        self.history_len, self.active_len = total - drop, 0

    @property
    def _history_after_attention(self) -> bool:
        """A capture pass writes the history layer by layer after attention (no active slots, or the fp8 copy, whose
        attention takes the block's K/V as a segment of its own), not the active slots."""
        return not self.active_slots or self.fp8 is not None

    @property
    def writes_active(self) -> bool:
        """`attend` writes the block's K/V into the active slots (and attends to them there)."""
        return not self._history_after_attention

    @property
    def writes_after_attention(self) -> bool:
        return self.capturing and self._history_after_attention

    def begin_capture(self) -> None:
        """A capture pass over the open block starts (`ARRefiner._capture`): when it writes the history after
        attention, stage on the device the slots `after_attention` writes (a pinned copy: no host wait)."""
        self.capturing = True
        if self._history_after_attention:
            slots = torch.tensor([self.sink_frames + i for i in self._ring_slots(self.active_len)], dtype=torch.long)
            idx = self._capture_slots[: len(slots)]
            if idx.device.type == "cuda":
                idx.copy_(slots.pin_memory(), non_blocking=True)  # the host allocator holds the block until done
            else:
                idx.copy_(slots)

    def after_attention(self, layer: int, k: Tensor, v: Tensor) -> None:
        """Without active slots (or with the fp8 copy), in a capture pass: the block's K/V `[B, H, N, D]` join this
        layer's history once the layer has attended to it, into the ring slots `begin_capture` staged (the newest
        `max_history` frames of the block, when it is longer than the history)."""
        n, tpf = self.active_len, self.tokens_per_frame
        w = min(n, self.max_history)
        idx = self._capture_slots[:w]
        for buf, src in ((self.k, k), (self.v, v)):
            dst = buf[layer].unflatten(2, (-1, tpf))  # [B, H, frames, tpf, D]
            dst.index_copy_(2, idx, src.unflatten(2, (n, tpf))[:, :, n - w :])
        self._touch(layer)

    def append_active(self) -> None:
        """The open block (its K/V last written by a capture pass) joins the history: each of its newest
        `max_history` frames is copied from its active slot to its ring slot, unless it is there already (a
        history still filling). Without active slots (or with the fp8 copy) the capture pass wrote them there
        already, layer by layer."""
        n, base = self.active_len, self._tok(self.sink_frames)
        self._touch()
        if self.writes_active:
            for i, slot in zip(range(max(0, n - self.max_history), n), self._ring_slots(n), strict=True):
                src = self.history_len + i  # the frame's active slot, counted from the history's first slot
                if src != slot:
                    a, b = base + self._tok(src), base + self._tok(slot)
                    f = self.tokens_per_frame
                    self.k[:, :, :, b : b + f] = self.k[:, :, :, a : a + f]
                    self.v[:, :, :, b : b + f] = self.v[:, :, :, a : a + f]
        self._advance(n)

    def snapshot(self, copy: bool = True) -> dict[str, Tensor]:
        """The window's state as a dict of tensors (copies; `copy=False`: views of the live window, for a caller
        that copies them out before it changes): sink K (pre-RoPE) / V, the history K/V in slot order and the slot of
        the oldest history frame (`history_in_time_order` reorders them)."""
        s, h = self._tok(self.sink_frames), self._tok(self.history_len)
        if copy:
            copy = lambda t: t.clone(memory_format=torch.contiguous_format)  # contiguous: safetensors-ready
        else:
            copy = lambda t: t
        return {
            "sink_k_pre": copy(self.sink_k_pre),  # [L, B, H, sink tokens, D]
            "sink_v": copy(self.v[:, :, :, :s]),  # [L, B, H, sink tokens, D]
            # [L, B, H, history tokens, D] post-RoPE keys and values in slot order (named apart from the time-ordered
            # `history_k` / `history_v` of snapshots before the ring, which an engine without the ring would misread)
            "history_k_slots": copy(self.k[:, :, :, s : s + h]),
            "history_v_slots": copy(self.v[:, :, :, s : s + h]),
            "history_start": torch.tensor(self.history_start),  # ring slot (frames) of the oldest history frame
        }

    def restore(self, state: dict[str, Tensor]) -> None:
        """From `snapshot()`'s dict, or a snapshot from before the ring (`history_k` / `history_v` in time order,
        loaded as a ring at slot 0)."""
        s = self._tok(self.sink_frames)
        ring = "history_k_slots" in state
        names = ("history_k_slots", "history_v_slots", "history_start") if ring else ("history_k", "history_v")
        missing = [n for n in names + ("sink_k_pre", "sink_v") if n not in state]
        if missing:
            raise InputError(f"refiner window snapshot lacks {missing}; it has {sorted(state)}")
        hk, hv = state[names[0]], state[names[1]]
        hist = hk.shape[3]
        if hist % self.tokens_per_frame or hist > self._tok(self.max_history):
            raise InputError(
                f"snapshot history of {hist} tokens does not fit {self.max_history} frames of "
                f"{self.tokens_per_frame} tokens"
            )
        if tuple(state["sink_k_pre"].shape) != tuple(self.sink_k_pre.shape):
            raise InputError(
                f"snapshot sink K shape {tuple(state['sink_k_pre'].shape)}; "
                f"this window holds {tuple(self.sink_k_pre.shape)}"
            )
        frames = hist // self.tokens_per_frame
        start = int(state["history_start"]) if ring else 0
        if not 0 <= start < max(frames, 1):
            raise InputError(
                f"snapshot history_start={start} for a history of {frames} frames; accepted: 0..{max(frames - 1, 0)}"
            )
        if start and frames != self.max_history:  # a full ring of another size (a window of another config)
            hk, hv = history_in_time_order(state, self.tokens_per_frame)
            start = 0
        self.clear()  # also marks the fp8 copy stale
        self.sink_k_pre.copy_(state["sink_k_pre"])
        self.v[:, :, :, :s].copy_(state["sink_v"])
        self.k[:, :, :, s : s + hist].copy_(hk)
        self.v[:, :, :, s : s + hist].copy_(hv)
        self.history_len, self.history_start = frames, start


def history_in_time_order(state: dict[str, Tensor], tokens_per_frame: int) -> tuple[Tensor, Tensor]:
    """A window snapshot's history K and V `[L, B, H, tokens, D]` oldest frame first (snapshots keep the ring's slot
    order, `history_start` naming the oldest frame's slot; those from before the ring are in time order already)."""
    if "history_k_slots" not in state:
        return state["history_k"], state["history_v"]
    shift = -int(state["history_start"]) * tokens_per_frame
    return tuple(torch.roll(state[n], shift, dims=3) for n in ("history_k_slots", "history_v_slots"))


class _SinkCapture:
    def __init__(self, window: RefinerKVWindow) -> None:
        self.window = window

    def attend(self, layer: int, k_pre: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        w = self.window
        if k_pre.shape[2] != w.sink_k_pre.shape[3]:
            raise RuntimeError(
                f"sink pass with {k_pre.shape[2]} tokens; the window's sink holds {w.sink_k_pre.shape[3]}"
            )
        w.sink_k_pre[layer] = k_pre
        w.v[layer, :, :, : k_pre.shape[2]] = v
        w._touch(layer)
        return k, v


class ARRefiner:
    """Block-by-block refinement of stage-1 latents with a sink + history K/V window.

    Use: `start(sink_latent, prompt_embeds, mask)` once per video, then `refine_block(block, noise)` for frames
    `[sink_size, sink_size + n)`, and so on (the last block may be shorter). `snapshot()` / `restore()` save and
    load the whole state; `replay_capture(refined_block)` advances the state over an already-refined block with
    only its sigma = 0 capture pass (rebuilding the window from stored latents).
    """

    def __init__(self, model: RefinerTransformer, cfg: ARConfig | None = None) -> None:
        self.model = model
        self.cfg = cfg or ARConfig()
        s32 = torch.tensor(self.cfg.sigmas, dtype=torch.float32)
        # The schedule is held in fp32 (as the reference scheduler does); Euler steps use fp32 differences.
        self.sigmas = [float(s) for s in s32]
        self.dts = [float(d) for d in s32[1:] - s32[:-1]]
        self.window: RefinerKVWindow | None = None
        self.text: RefinerText | None = None
        self.prompt: tuple[Tensor, Tensor] | None = None
        self.next_frame = 0  # absolute latent index of the next block's first frame
        # windows without the active block's slots (fast path `lean-memory`; see RefinerKVWindow), from the next start
        self.split_window = False
        # an e4m3 copy of the window's sink + history, self-attention in fp8 (fast path `refiner-fp8-attn`; see
        # RefinerKVWindow), from the next start; the prompt's cross-attention too (`quantize_text`: H100, session
        # 10, 105 us a call against cuDNN's 145 over the prompt's 1024 positions), from the next prompt
        self.fp8_attention = False
        self._prepared: tuple[int, int] | None = None  # (sink offset, history) the sink and fp8 copy were placed for
        self.latent_hw: tuple[int, int] | None = None

    # -- session state --------------------------------------------------------------------------------------------
    def set_prompt(self, prompt_embeds: Tensor, mask: Tensor | None = None) -> None:
        """Connector output `prompt_embeds [B, L, caption_channels]`, `mask [B, L]` (1 = token)."""
        if mask is None:
            mask = torch.ones(prompt_embeds.shape[:2], dtype=torch.int64, device=prompt_embeds.device)
        # Own copies: the prompt may be a view into a loaded file, and CPU kernels may round differently on
        # differently aligned inputs, which would break "restore == uninterrupted" bit for bit.
        dev = self.model.proj_in.weight.device
        self.prompt = (
            prompt_embeds.to(dev).clone(memory_format=torch.contiguous_format),
            mask.to(dev).clone(memory_format=torch.contiguous_format),
        )
        prompt_embeds, mask = self.prompt
        with torch.no_grad():
            self.text = self.model.prepare_text(prompt_embeds, mask)
            if self.fp8_attention:
                self.text = quantize_text(self.text)

    def _ensure_window(self, batch: int, height: int, width: int) -> RefinerKVWindow:
        p = self.model.proj_in.weight
        tpf = height * width
        if self.window is None or not self.window.matches(batch, tpf, p.device, p.dtype, not self.split_window,
                                                          self.fp8_attention):
            self.window = None  # the old buffers go before the new ones are made
            c = self.model.cfg
            self.window = RefinerKVWindow(
                num_layers=self.model.num_layers,
                batch=batch,
                heads=c.num_attention_heads,
                head_dim=c.attention_head_dim,
                tokens_per_frame=tpf,
                sink_frames=self.cfg.sink_size,
                history_frames=self.cfg.history_frames,
                block_frames=self.cfg.block_size,
                device=p.device,
                dtype=p.dtype,
                active_slots=not self.split_window,
            )
            if self.fp8_attention:
                self.window.use_fp8_attention()
        else:
            self.window.clear()
        self.latent_hw = (height, width)
        return self.window

    @torch.no_grad()
    def start(self, sink_latent: Tensor, prompt_embeds: Tensor, mask: Tensor | None = None) -> None:
        """Begin a video: `sink_latent [B, C, sink_size, h, w]` (stage-1 frame 0) is captured at sigma = 0."""
        b, _, n, h, w = sink_latent.shape
        if n != self.cfg.sink_size:
            raise InputError(f"sink latent has {n} frames; sink_size is {self.cfg.sink_size}")
        self.set_prompt(prompt_embeds, mask)
        window = self._ensure_window(b, h, w)
        dev = window.k.device
        self.model(
            sink_latent.to(dev),
            0.0,
            self.text,
            fps=self.cfg.fps,
            frame_positions=torch.arange(n),
            kv=window.sink_capture(),
            kv_only=True,
        )
        self.next_frame = n

    def _check_block(self, block: Tensor) -> int:
        if self.window is None or self.text is None:
            raise RuntimeError("ARRefiner.start() (or restore()) must come before blocks")
        n = block.shape[2]
        if block.shape[0] != self.window.k.shape[1] or tuple(block.shape[3:]) != self.latent_hw:
            raise InputError(
                f"block shape {tuple(block.shape)}; this video has batch {self.window.k.shape[1]} and latent "
                f"size {self.latent_hw}"
            )
        if not 1 <= n <= self.cfg.block_size:
            raise InputError(f"block of {n} latent frames; accepted 1..{self.cfg.block_size}")
        return n

    def _sink_offset(self) -> int:
        return self.next_frame - self.window.history_len - self.cfg.sink_size

    def _place_sink(self, async_copy: bool = False) -> None:
        """Rotate the sink to the frame before the history, then rebuild the fp8 copy of sink + history (if any).
        `async_copy`: the rotation table's host inputs reach the GPU without a host wait (on a side stream)."""
        window, (h, w), off = self.window, self.latent_hw, self._sink_offset()
        rope = self.model.video_rope(torch.arange(off, off + self.cfg.sink_size), h, w, self.cfg.fps, window.k.device,
                                     async_copy=async_copy)
        window.place_sink(rope)
        window.refresh_fp8()
        self._prepared = (off, window.history_len)

    def prepare_next_block(self) -> None:
        """With an fp8 copy: place the sink for the block that comes next and rebuild the copy now, on the current
        stream (`WorldPipeline` runs it on its side stream beside the decode, which it orders before the next
        chunk); `_open` then finds them done, unless the window changed since (`fp8_stale`). No-op otherwise."""
        if self.window is not None and self.window.fp8 is not None and self.latent_hw is not None:
            # without a host wait: a pageable copy on the side stream would hold the host until the cache-write pass
            # queued before it had run (H100, session 10: the decode's span grew from 49 to 96 ms)
            self._place_sink(async_copy=True)

    def _open(self, n: int) -> Tensor:
        """Place the sink before the history (and rebuild the fp8 copy), unless `prepare_next_block` did for this
        window, and open the block; returns the block's frame positions `[n]`."""
        window = self.window
        if window.fp8 is None or window.fp8_stale or self._prepared != (self._sink_offset(), window.history_len):
            self._place_sink()
        window.open_block(n)
        return torch.arange(self.next_frame, self.next_frame + n)  # positions stay on the CPU (rope.py)

    def _capture(self, refined: Tensor, positions: Tensor) -> None:
        """The sigma = 0 pass over a refined block; its K/V join the history."""
        self.window.begin_capture()
        try:
            self.model(refined, 0.0, self.text, fps=self.cfg.fps, frame_positions=positions, kv=self.window,
                       kv_only=True)
        finally:
            self.window.capturing = False
        self.window.append_active()
        self.next_frame += refined.shape[2]

    @torch.no_grad()
    def refine_block(self, stage1_block: Tensor, noise: Tensor) -> Tensor:
        """Refine `stage1_block [B, C, n, h, w]` (n <= block_size; frames `next_frame ...`) starting from `noise`
        (same shape) and append it to the window. Returns the refined block `[B, C, n, h, w]`."""
        n = self._check_block(stage1_block)
        if noise.shape != stage1_block.shape:
            raise InputError(f"noise shape {tuple(noise.shape)}; expected {tuple(stage1_block.shape)}")
        dtype, dev = self.window.k.dtype, self.window.k.device
        positions = self._open(n)
        s0 = self.sigmas[0]
        x = ((1.0 - s0) * stage1_block.to(dev).float() + s0 * noise.to(dev).float()).to(dtype)
        for sigma, dt in zip(self.sigmas[:-1], self.dts, strict=True):
            v = self.model(x, sigma, self.text, fps=self.cfg.fps, frame_positions=positions, kv=self.window)
            x0 = (x.float() - sigma * v.float()).to(dtype)
            x = (x.float() + dt * ((x.float() - x0.float()) / sigma)).to(dtype)
        self._capture(x, positions)
        return x

    @torch.no_grad()
    def replay_capture(self, refined_block: Tensor) -> None:
        """Advance over an already-refined block `[B, C, n, h, w]` with its capture pass only."""
        n = self._check_block(refined_block)
        positions = self._open(n)
        self._capture(refined_block.to(self.window.k.device, self.window.k.dtype), positions)

    def snapshot(self, copy: bool = True) -> dict[str, Tensor]:
        """Everything needed to continue exactly: window K/V, positions and the prompt (tensors, copies;
        `copy=False`: views of the live state where it is a buffer)."""
        if self.window is None or self.prompt is None:
            raise RuntimeError("nothing to snapshot before start()")
        state = self.window.snapshot(copy)
        state["next_frame"] = torch.tensor(self.next_frame)
        state["latent_hw"] = torch.tensor(self.latent_hw)
        keep = (lambda t: t.clone(memory_format=torch.contiguous_format)) if copy else (lambda t: t)
        state["prompt_embeds"] = keep(self.prompt[0])
        state["prompt_mask"] = keep(self.prompt[1])
        return state

    def restore(self, state: dict[str, Tensor]) -> None:
        c = self.model.cfg
        sk = state["sink_k_pre"]
        expected = (self.model.num_layers, c.num_attention_heads, c.attention_head_dim)
        if (sk.shape[0], sk.shape[2], sk.shape[4]) != expected:
            raise InputError(
                f"snapshot K/V of shape {tuple(sk.shape)} does not fit this refiner: "
                f"(layers, heads, head dim) = {expected}"
            )
        h, w = (int(x) for x in state["latent_hw"])
        self.set_prompt(state["prompt_embeds"], state["prompt_mask"])
        self._ensure_window(sk.shape[1], h, w).restore(state)
        self.next_frame = int(state["next_frame"])

    # -- whole video ----------------------------------------------------------------------------------------------
    def blocks(self, num_frames: int) -> list[tuple[int, int]]:
        """`[start, end)` latent frame ranges of the blocks of a `num_frames` video."""
        s, b = self.cfg.sink_size, self.cfg.block_size
        return [(i, min(i + b, num_frames)) for i in range(s, num_frames, b)]

    @torch.no_grad()
    def refine_video(
        self,
        latents: Tensor,
        prompt_embeds: Tensor,
        mask: Tensor | None = None,
        noises: list[Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Refine stage-1 `latents [B, C, T, h, w]`; frames `[0, sink_size)` are returned unchanged. Noise per block
        comes from `noises` or, in block order, from `generator` (default: seeded with `cfg.seed` on the model's
        device)."""
        t = latents.shape[2]
        if t <= self.cfg.sink_size:
            raise InputError(f"{t} latent frames; need more than sink_size={self.cfg.sink_size}")
        ranges = self.blocks(t)
        if noises is not None and len(noises) != len(ranges):
            raise InputError(f"{len(noises)} noise tensors for {len(ranges)} blocks")
        self.start(latents[:, :, : self.cfg.sink_size], prompt_embeds, mask)
        dtype, dev = self.window.k.dtype, self.window.k.device
        if noises is None and generator is None:
            generator = torch.Generator(dev).manual_seed(self.cfg.seed)
        out = latents.to(dev, dtype).clone()
        for i, (a, b) in enumerate(ranges):
            blk = latents[:, :, a:b]
            if noises is not None:
                eps = noises[i]
            else:
                eps = torch.randn(blk.shape, generator=generator, device=generator.device, dtype=dtype)
            out[:, :, a:b] = self.refine_block(blk, eps)
        return out
