"""Streaming state of the chunk-causal stage-1 model (spec stage1.md §7.2), allocated once per session.

One cache object per block, holding what the next chunk needs from the past:

- every block: the FFN temporal-conv tail (last frame of the spatial branch output `s`);
- GDN blocks: the forward scan states (main Sigma, z and camera Sigma) and the last K-1 pre-conv frames of
  the main K (the short conv's left context);
- softmax blocks: the K/V window = the sink chunk (chunk 0, kept for the whole session) + the most recent
  chunk, main (post-RoPE, absolute positions) and camera (post-UCPE).

Blocks read a cache during every pass of a chunk and write it only on the chunk's cache-write (t=0) pass.
Buffers are preallocated and overwritten in place, so memory does not grow with the session length.
`Stage1Cache.snapshot()` / `restore()` copy every buffer and counter out / in by name.
"""

from __future__ import annotations

import torch

from engine.errors import InputError
from engine.stage1.config import Stage1Config


class BlockCache:
    """State shared by both block kinds: the FFN temporal-conv tail."""

    def __init__(self, batch: int, tokens_per_frame: int, channels: int, dtype, device) -> None:
        self.ffn_tail = torch.zeros(batch, 1, tokens_per_frame, channels, dtype=dtype, device=device)  # [B,1,S,C]

    def write_ffn_tail(self, s: torch.Tensor) -> None:
        """s `[B, T, S, C]`: keep its last frame (the left tap of the next chunk's first frame)."""
        self.ffn_tail.copy_(s[:, -1:])

    def buffers(self) -> dict[str, torch.Tensor]:
        return {"ffn_tail": self.ffn_tail}


class GDNBlockCache(BlockCache):
    def __init__(self, batch, heads, head_dim, tokens_per_frame, channels, conv_taps, dtype, device) -> None:
        super().__init__(batch, tokens_per_frame, channels, dtype, device)
        f32 = dict(dtype=torch.float32, device=device)
        self.sigma = torch.zeros(batch, heads, head_dim, head_dim, **f32)  # [B,H,Dv,Dk] main numerator state
        self.z = torch.zeros(batch, heads, head_dim, **f32)  # [B,H,D] main normaliser state
        self.sigma_cam = torch.zeros(batch, heads, head_dim, head_dim, **f32)  # [B,H,Dv,Dk] camera state
        # [B, K-1, S, C]: pre-conv main K (qkv output) of the last K-1 frames, oldest first
        self.k_tail = torch.zeros(batch, conv_taps - 1, tokens_per_frame, channels, dtype=dtype, device=device)

    def write_states(self, sigma: torch.Tensor, z: torch.Tensor, sigma_cam: torch.Tensor) -> None:
        self.sigma.copy_(sigma)
        self.z.copy_(z)
        self.sigma_cam.copy_(sigma_cam)

    def write_k_tail(self, k_extended: torch.Tensor) -> None:
        """k_extended `[B, K-1+T, S, C]` = old tail followed by this chunk's pre-conv K."""
        self.k_tail.copy_(k_extended[:, -self.k_tail.shape[1] :])

    def buffers(self) -> dict[str, torch.Tensor]:
        return {**super().buffers(), "sigma": self.sigma, "z": self.z, "sigma_cam": self.sigma_cam,
                "k_tail": self.k_tail}


class SoftmaxBlockCache(BlockCache):
    """K/V window: `sink_*` holds chunk 0 for the whole session, `recent_*` the latest later chunk.

    Each of k, v, k_cam, v_cam is one buffer `[B, H, chunk | sink | recent, D]`: `sink` and `recent` are views of it
    (what snapshots hold), the leading `chunk` slots take the keys of the chunk being computed, so that the window
    a forward attends to is one view of the buffer, not a concatenation (`keys_values`)."""

    NAMES = ("k", "v", "k_cam", "v_cam")

    def __init__(self, batch, heads, head_dim, tokens_per_frame, channels, sink_frames, recent_frames,
                 dtype, device) -> None:
        super().__init__(batch, tokens_per_frame, channels, dtype, device)
        self.sink_cap, self.recent_cap = sink_frames * tokens_per_frame, recent_frames * tokens_per_frame
        self.chunk_cap = self.recent_cap  # a chunk that fits `recent`
        total = self.chunk_cap + self.sink_cap + self.recent_cap
        self.slots = {n: torch.zeros(batch, heads, total, head_dim, dtype=dtype, device=device) for n in self.NAMES}
        s0 = self.chunk_cap
        self.sink = {n: b[:, :, s0 : s0 + self.sink_cap] for n, b in self.slots.items()}  # each [B, H, N_sink, D]
        self.recent = {n: b[:, :, s0 + self.sink_cap :] for n, b in self.slots.items()}  # each [B, H, N_recent, D]
        self.sink_len = 0  # valid tokens in sink (0 before chunk 0 is written)
        self.recent_len = 0  # valid tokens in recent

    def keys_values(self, k: torch.Tensor, v: torch.Tensor, k_cam: torch.Tensor,
                    v_cam: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """What a chunk with keys/values `[B, H, n, D]` attends to: (K, V, K_cam, V_cam), each `[B, H, n + window,
        D]`, the chunk's own tokens first, then sink, then recent (softmax attention does not depend on the order of
        its keys). The chunk's tokens are written into the leading slots and the result is a view of the buffers
        when the window is contiguous there (the sink full, or no recent chunk yet); a concatenation otherwise. The
        cache's contents (`buffers`) are not changed."""
        n = k.shape[2]
        new = dict(zip(self.NAMES, (k, v, k_cam, v_cam), strict=True))
        if n <= self.chunk_cap and (self.recent_len == 0 or self.sink_len == self.sink_cap):
            start, end = self.chunk_cap - n, self.chunk_cap + self.sink_len + self.recent_len
            for name, t in new.items():
                self.slots[name][:, :, start : self.chunk_cap].copy_(t)
            return tuple(self.slots[name][:, :, start:end] for name in self.NAMES)
        return tuple(torch.cat([new[n], self.sink[n][:, :, : self.sink_len], self.recent[n][:, :, : self.recent_len]],
                               dim=2) for n in self.NAMES)

    def append(self, k: torch.Tensor, v: torch.Tensor, k_cam: torch.Tensor, v_cam: torch.Tensor) -> None:
        """Store a chunk's K/V `[B, H, n, D]`: chunk 0 becomes the sink, later chunks replace `recent`."""
        n = k.shape[2]
        target = self.recent if self.sink_len else self.sink
        cap = target["k"].shape[2]
        if n > cap:
            raise InputError(f"chunk of {n} tokens does not fit the preallocated softmax cache ({cap} tokens)")
        for name, t in zip(self.NAMES, (k, v, k_cam, v_cam), strict=True):
            target[name][:, :, :n].copy_(t)
        if self.sink_len:
            self.recent_len = n
        else:
            self.sink_len = n

    def buffers(self) -> dict[str, torch.Tensor]:
        out = super().buffers()
        out.update({f"sink_{n}": t for n, t in self.sink.items()})
        out.update({f"recent_{n}": t for n, t in self.recent.items()})
        return out


class Stage1Cache:
    """All per-block caches of one streaming session plus the number of frames already written."""

    def __init__(
        self,
        config: Stage1Config,
        batch: int,
        height: int,
        width: int,
        *,
        first_chunk_frames: int = 4,
        chunk_frames: int = 3,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.batch, self.height, self.width = batch, height, width
        S = height * width
        H, D, C = config.self_attn_heads, config.linear_head_dim, config.hidden_size
        self.blocks: list[BlockCache] = []
        for i in range(config.num_layers):
            if config.is_softmax_block(i):
                self.blocks.append(SoftmaxBlockCache(batch, H, D, S, C, first_chunk_frames,
                                                     max(chunk_frames, first_chunk_frames), dtype, device))
            else:
                self.blocks.append(GDNBlockCache(batch, H, D, S, C, config.conv_kernel_size, dtype, device))
        self.frames_written = 0  # latent frames whose cache-write pass is in; = next chunk's first frame

    def reset(self) -> None:
        for b in self.blocks:
            for t in b.buffers().values():
                t.zero_()
            if isinstance(b, SoftmaxBlockCache):
                b.sink_len = b.recent_len = 0
        self.frames_written = 0

    def nbytes(self) -> int:
        """Device memory the caches hold: every storage behind `buffers()` once (a softmax block's window
        buffers, scratch slots included)."""
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for b in self.blocks for t in b.buffers().values()}
        return sum(storages.values())

    def snapshot(self, copy: bool = True) -> dict[str, torch.Tensor]:
        """Copies of every buffer and counter, keyed `blocks.{i}.{name}` / `frames_written` (`copy=False`: the live
        buffers themselves, for a caller that copies them out before the cache changes)."""
        out = {"frames_written": torch.tensor(self.frames_written)}
        for i, b in enumerate(self.blocks):
            for name, t in b.buffers().items():
                out[f"blocks.{i}.{name}"] = t.clone() if copy else t
            if isinstance(b, SoftmaxBlockCache):
                out[f"blocks.{i}.sink_len"] = torch.tensor(b.sink_len)
                out[f"blocks.{i}.recent_len"] = torch.tensor(b.recent_len)
        return out

    def restore(self, state: dict[str, torch.Tensor]) -> None:
        """Copy a `snapshot()` back in place; every key must be present with the same shape."""
        expected = self.snapshot(copy=False)
        missing = [k for k in expected if k not in state]
        extra = [k for k in state if k not in expected]
        if missing or extra:
            bad = (missing or extra)[0]
            raise InputError(f"stage-1 cache snapshot {'lacks' if missing else 'has unexpected'} key {bad!r}")
        for k, ref in expected.items():
            if tuple(state[k].shape) != tuple(ref.shape):
                raise InputError(f"stage-1 cache snapshot key {k!r} has shape {tuple(state[k].shape)}, "
                                 f"expected {tuple(ref.shape)}")
        self.frames_written = int(state["frames_written"])
        for i, b in enumerate(self.blocks):
            for name, t in b.buffers().items():
                t.copy_(state[f"blocks.{i}.{name}"])
            if isinstance(b, SoftmaxBlockCache):
                b.sink_len = int(state[f"blocks.{i}.sink_len"])
                b.recent_len = int(state[f"blocks.{i}.recent_len"])
