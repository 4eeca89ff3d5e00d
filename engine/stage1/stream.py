"""Chunk-level streaming API of the distilled stage-1 model (spec stage1.md §7) — what the rollout calls.

Per chunk: `denoise_chunk` (4 distilled Euler steps reading the cache), then `write_cache` on the clean
latents (the t=0 pass that stores GDN states, conv tails and the softmax K/V window). Chunks are 4 latent
frames (anchor + 3) then 3 each. The stream knows nothing of controls, refiner, VAE or I/O: camera
tensors, noise and prompt embeddings come in as tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.errors import InputError
from engine.stage1.cache import Stage1Cache
from engine.stage1.model import Stage1Transformer, TextContext, trim_text
from engine.stage1.sampler import DISTILLED_SIGMAS, distilled_chunk_sample
from engine.stage1.temporal import streaming_mode

FIRST_CHUNK_FRAMES = 4
CHUNK_FRAMES = 3


def chunk_frame_counts(total_frames: int, first: int = FIRST_CHUNK_FRAMES, rest: int = CHUNK_FRAMES) -> list[int]:
    """Latent frames per chunk for a video of `total_frames` latent frames: [4, 3, 3, ...] (last may be short)."""
    counts = [min(first, total_frames)]
    while sum(counts) < total_frames:
        counts.append(min(rest, total_frames - sum(counts)))
    return counts


class Stage1Stream:
    """One streaming session of the stage-1 model: prompt, caches and chunk position."""

    def __init__(
        self,
        model: Stage1Transformer,
        *,
        batch: int = 1,
        height: int,
        width: int,
        sigmas: Sequence[float] = DISTILLED_SIGMAS,
        camera_renorm: str = "T",
        first_chunk_frames: int = FIRST_CHUNK_FRAMES,
        chunk_frames: int = CHUNK_FRAMES,
    ) -> None:
        self.model = model
        self.sigmas = tuple(sigmas)
        self.first_chunk_frames, self.chunk_frames = first_chunk_frames, chunk_frames
        self.mode = streaming_mode(model.config.linear_head_dim, camera_renorm)
        param = next(model.parameters())
        self.cache = Stage1Cache(model.config, batch, height, width, first_chunk_frames=first_chunk_frames,
                                 chunk_frames=chunk_frames, dtype=param.dtype, device=param.device)
        self.text: TextContext | None = None
        self.block_fn = None  # replaces the plain block call when set (engine.fast.stage1_compile)
        # the cache-write pass computes only what the caches keep (its last block's tail, no final layer; fast path
        # `stage1-lean-pass`); False: the whole forward, output discarded
        self.lean_pass = False
        # the prompt's K/V cut to a multiple of this many positions past its last token (fast path
        # `stage1-prompt-trim`, engine.stage1.model.trim_text); None: all positions
        self.prompt_trim: int | None = None

    # session state -------------------------------------------------------------------------------
    def reset(self, prompt_embeds: torch.Tensor, prompt_mask: torch.Tensor | None = None) -> None:
        """Start a new video: clear the caches and set the prompt (`[B, L, Cc]` or `[B, 1, L, Cc]`, mask `[B, L]`)."""
        self.cache.reset()
        self.set_prompt(prompt_embeds, prompt_mask)

    def set_prompt(self, prompt_embeds: torch.Tensor, prompt_mask: torch.Tensor | None = None) -> None:
        """Change the prompt for the following chunks (the caches are kept)."""
        with torch.no_grad():
            text = self.model.encode_text(prompt_embeds, prompt_mask)
            self.text = text if self.prompt_trim is None else trim_text(text, self.prompt_trim)

    @property
    def next_frame(self) -> int:
        """Video latent frame index of the next chunk's first frame."""
        return self.cache.frames_written

    def next_chunk_frames(self) -> int:
        return self.first_chunk_frames if self.next_frame == 0 else self.chunk_frames

    def snapshot(self, copy: bool = True) -> dict[str, torch.Tensor]:
        """Copies (`copy=False`: views) of every cache buffer and counter (the prompt is not included)."""
        return self.cache.snapshot(copy)

    def restore(self, state: dict[str, torch.Tensor]) -> None:
        self.cache.restore(state)

    # per chunk -----------------------------------------------------------------------------------
    def _check(self, latents, camera_conditions, chunk_plucker) -> None:
        if self.text is None:
            raise InputError("Stage1Stream has no prompt: call reset(prompt_embeds, mask) first")
        T = latents.shape[2]
        if self.next_frame == 0 and T != self.first_chunk_frames:
            raise InputError(f"the first chunk has {self.first_chunk_frames} latent frames, got {T}")
        if self.next_frame > 0 and not 1 <= T <= self.chunk_frames:
            raise InputError(f"a chunk after the first has at most {self.chunk_frames} latent frames, got {T}")

    def _velocity(self, camera_conditions, chunk_plucker):
        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.model.forward_cached(x, t, self.text, camera_conditions, chunk_plucker, self.cache,
                                             mode=self.mode, block_fn=self.block_fn)

        return velocity

    @torch.no_grad()
    def denoise_chunk(
        self,
        noise: torch.Tensor,
        camera_conditions: torch.Tensor,
        chunk_plucker: torch.Tensor,
        anchor: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Clean latents `[B, C, T_c, H, W]` of the next chunk from its noise `[B, C, T_c, H, W]`, camera
        slices `[B, T_c, 20]` / `[B, 48, T_c, H, W]` (of the full-video tensors, poses relative to video
        frame 0) and, for the first chunk, the clean image latent `anchor [B, C, 1, H, W]` (required then).
        Reads the cache only; call `write_cache` with the result before the next chunk."""
        self._check(noise, camera_conditions, chunk_plucker)
        if (anchor is None) != (self.next_frame > 0):
            raise InputError("anchor (the clean first-image latent) is required for the first chunk only")
        return distilled_chunk_sample(self._velocity(camera_conditions, chunk_plucker), noise, anchor,
                                      self.sigmas)

    @torch.no_grad()
    def write_cache(self, clean: torch.Tensor, camera_conditions: torch.Tensor, chunk_plucker: torch.Tensor) -> None:
        """The cache-write pass: the model on the chunk's clean latents at timestep 0 (output discarded)."""
        self._check(clean, camera_conditions, chunk_plucker)
        t = torch.zeros(clean.shape[0], 1, clean.shape[2], device=clean.device)
        self.model.forward_cached(clean, t, self.text, camera_conditions, chunk_plucker, self.cache,
                                  write_cache=True, mode=self.mode, block_fn=self.block_fn,
                                  caches_only=self.lean_pass)
