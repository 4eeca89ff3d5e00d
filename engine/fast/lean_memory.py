"""`lean-memory`: the weights no chunk reads live in page-locked host memory, the VAE decodes one latent frame per
call, and the refiner's K/V window leaves out the active block's slots. The plain path keeps every weight on the GPU,
decodes a chunk in one call and keeps the active block in the window. The first two give the same values (the
weights are the same bytes; the streaming decoder equals the whole decode for any split of the frames); the window
gives the same values up to rounding (engine/refiner/ar.py `RefinerKVWindow(active_slots=False)`: the block
attends to the window and to itself as two segments merged by their log-sum-exps; 2.1 GB at the release size).

What a chunk never reads (release size, bf16): the refiner's cross-attention K/V projections `attn2.to_k/to_v`
(+ `norm_k`, 3.2 GB) and its caption projection (65 MB), stage-1's cross-attention `kv_linear` / `k_norm` (0.4 GB)
and caption embedder (20 MB): they turn a prompt into the per-layer text K/V that the chunks read; the VAE encoder
(1.4 GB): it turns the first image into the anchor latent; the refiner's text connectors where the world has them.
Here each module that owns such parameters (or buffers, e.g. fp8 weights) gets a forward pre-hook that copies
them onto the device just before it runs and a forward hook that drops the device copies after, so a prompt change
streams 3.7 GB through PCIe one layer at a time (~0.2 s at 25 GB/s) and a session start 1.4 GB, and the device
holds one layer's copy at a time. Tensors these modules produced (the text K/V) stay on the device as before.

The decode: an LTX-2 decoder block over 3 latent frames holds ~2 GB of activations at the release size (24 frames
at 176x320 with 256 channels, a few tensors at once); one latent frame per call holds a third of that. The pieces'
pixels are joined on the device (130 MB a chunk) and converted as before.

`use_lean_memory(pipe)`: the host residency is world-wide and applied once (later pipelines of the world find it in
place); the decode split and the window layout (from the next session start) are per pipeline.
`host_resident_bytes(world)` says how much lives on the host. H100, full bf16 (tests/benchmarks/memory_probe.py):
peak 49.6 -> 40.2 GB allocated.
"""

from __future__ import annotations

import torch
from torch import nn

_FLAG = "_sana_wm_host_resident"


def prompt_and_image_modules(world) -> list[nn.Module]:
    """The modules whose weights no chunk reads: each module that owns parameters or buffers directly, under the
    roots listed in the module docstring (a root's children are hooked one by one, so one layer is copied at a time)."""
    roots: list[nn.Module] = []
    s1 = world.stage1
    roots.append(s1.y_embedder)
    for blk in s1.blocks:
        roots += [blk.cross_attn.kv_linear, blk.cross_attn.k_norm]
    if world.refiner is not None:
        ref = world.refiner
        roots.append(ref.caption_projection)
        for blk in ref.transformer_blocks:
            roots += [blk.attn2.to_k, blk.attn2.to_v, blk.attn2.norm_k]
    if getattr(world.vae, "encoder", None) is not None:
        roots.append(world.vae.encoder)
    if world.connectors is not None:
        roots.append(world.connectors)
    owners = []
    for root in roots:
        for m in root.modules():
            if any(True for _ in m.parameters(recurse=False)) or any(t is not None for t in m._buffers.values()):
                owners.append(m)
    return list(dict.fromkeys(owners))


def _tensors(m: nn.Module):
    """(kind, name, tensor) of what a module owns directly."""
    for name, p in m._parameters.items():
        if p is not None:
            yield "p", name, p
    for name, b in m._buffers.items():
        if b is not None:
            yield "b", name, b


def _set(m: nn.Module, kind: str, name: str, value: torch.Tensor) -> None:
    if kind == "p":
        m._parameters[name].data = value
    else:
        m._buffers[name] = value


def host_resident(m: nn.Module, device: torch.device) -> int:
    """Move what `m` owns directly to page-locked host memory and hook `m` to copy it onto `device` for each call.
    Returns the bytes moved (0 when `m` is already host-resident)."""
    if getattr(m, _FLAG, None) is not None:
        return 0
    host = {}
    moved = 0
    for kind, name, t in _tensors(m):
        h = t.detach().to("cpu")
        h = h.pin_memory() if device.type == "cuda" else h
        host[(kind, name)] = h
        moved += t.numel() * t.element_size()
    for (kind, name), h in host.items():
        _set(m, kind, name, h)

    def bring(module, args, kwargs=None):
        for (kind, name), h in host.items():
            _set(module, kind, name, h.to(device, non_blocking=True))

    def drop(module, args, out):
        for (kind, name), h in host.items():
            _set(module, kind, name, h)  # the device copies go back to the allocator (stream-ordered reuse)
        return out

    handles = (m.register_forward_pre_hook(bring), m.register_forward_hook(drop, always_call=True))
    setattr(m, _FLAG, (host, handles))
    return moved


def host_resident_bytes(world) -> int:
    """Bytes of the world's weights that live on the host (0 without lean-memory)."""
    total = 0
    for m in prompt_and_image_modules(world):
        state = getattr(m, _FLAG, None)
        if state is not None:
            total += sum(h.numel() * h.element_size() for h in state[0].values())
    return total


def use_lean_memory(pipe) -> str:
    """Host residency for the world's prompt- and image-only weights (once), one latent frame per decoder call for
    this pipeline. Returns what was done."""
    world = pipe.world
    for m in prompt_and_image_modules(world):
        host_resident(m, world.device)
    pipe.decode_frames_per_call = 1
    if pipe.refiner is not None:  # from the next start on
        pipe.refiner.split_window = True
    gb = host_resident_bytes(world) / 1e9
    return (f"{gb:.2f} GB of prompt/image-only weights in page-locked host memory, copied in per layer when used; "
            "VAE decode one latent frame per call; refiner K/V window without the active block's slots")
