"""Loading stage-1 weights: release safetensors, diffusers layout (single or sharded) and the streaming
`model.pt`, every key and shape checked (spec stage1.md §1, §4).

Layouts:
- release (`dit/sana_wm_1600m_720p.safetensors`): the model's keys plus a `pos_embed` buffer, dropped;
- diffusers (`transformer/diffusion_pytorch_model*.safetensors`, the diffusers port): `t_embedder.linear_1/2`
  for `t_embedder.mlp.0/2` and no `y_embedder.y_embedding` (the unused training-time null caption, left
  at zeros);
- streaming (`sana_dit/model.pt`, a torch pickle read with `weights_only=True`): the state under
  `["generator"]` when present, keys prefixed `model.`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from engine.errors import InputError
from engine.weights import load_checked, read_state_dict

DIFFUSERS_RENAMES = {"t_embedder.linear_1.": "t_embedder.mlp.0.", "t_embedder.linear_2.": "t_embedder.mlp.2."}
DROPPED_KEYS = ("pos_embed",)
NULL_CAPTION_KEY = "y_embedder.y_embedding"


def read_stage1_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Raw tensors of a stage-1 checkpoint: safetensors (file, index or directory) or a torch `.pt`/`.pth`."""
    p = Path(path)
    if p.suffix in (".pt", ".pth"):
        if not p.is_file():
            raise InputError(f"stage-1 checkpoint {str(p)!r} does not exist")
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
            raise InputError(f"{str(p)!r} is not a readable torch state dict ({e})") from e
        if isinstance(obj, Mapping) and "generator" in obj:
            obj = obj["generator"]
        if not isinstance(obj, Mapping):
            raise InputError(f"{str(p)!r} holds a {type(obj).__name__}, expected a state dict")
        return {(k[len("model."):] if k.startswith("model.") else k): v for k, v in obj.items()}
    return read_state_dict(p)


def to_model_key(key: str) -> str:
    for old, new in DIFFUSERS_RENAMES.items():
        if key.startswith(old):
            return new + key[len(old):]
    return key


def load_stage1_weights(
    model: torch.nn.Module, source: str | Path | Mapping[str, torch.Tensor], what: str | None = None
) -> list[str]:
    """Load `source` (a path or a state dict in any layout above) into `model`; returns the dropped keys.
    Raises InputError naming the first missing, unexpected or mis-shaped key."""
    state = dict(source) if isinstance(source, Mapping) else read_stage1_state_dict(source)
    what = what or ("stage-1 state dict" if isinstance(source, Mapping) else f"stage-1 checkpoint {str(source)!r}")
    diffusers_layout = any(k.startswith(tuple(DIFFUSERS_RENAMES)) for k in state)
    if diffusers_layout and NULL_CAPTION_KEY not in state:
        state[NULL_CAPTION_KEY] = torch.zeros_like(model.state_dict()[NULL_CAPTION_KEY], device="cpu")
    return load_checked(model, state, rename=to_model_key, skip=lambda k: k in DROPPED_KEYS, what=what)
