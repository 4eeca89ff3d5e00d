"""Reading checkpoints: single or sharded safetensors, checked key by key against a module.

Knows nothing of any model: callers pass the module, the state dict and (optionally) a renaming and a
predicate for keys that a checkpoint legitimately carries but the module does not use (e.g. the audio
half of an LTX-2 transformer). Loading never ignores a weight silently: every skipped key is matched
by an explicit predicate, and the first missing, unexpected or mis-shaped key is named in the error.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file

from engine.errors import InputError

INDEX_NAME_SUFFIX = ".safetensors.index.json"


def safetensors_files(path: str | Path) -> list[Path]:
    """The safetensors files that make up a checkpoint at `path`.

    `path` is a `.safetensors` file, a `*.safetensors.index.json` (sharded; its `weight_map` names the
    shards), or a directory holding exactly one index or one or more `.safetensors` files.
    """
    p = Path(path)
    if p.is_file() and p.name.endswith(INDEX_NAME_SUFFIX):
        with open(p) as f:
            index = json.load(f)
        if "weight_map" not in index:
            raise InputError(f"{str(p)!r} is not a safetensors index: it has no 'weight_map' key")
        shards = sorted(set(index["weight_map"].values()))
        files = [p.parent / s for s in shards]
        for f in files:
            if not f.is_file():
                raise InputError(f"shard {str(f)!r} named by {str(p)!r} does not exist")
        return files
    if p.is_file() and p.suffix == ".safetensors":
        return [p]
    if p.is_dir():
        indexes = sorted(p.glob(f"*{INDEX_NAME_SUFFIX}"))
        if len(indexes) == 1:
            return safetensors_files(indexes[0])
        if len(indexes) > 1:
            raise InputError(f"{str(p)!r} holds several safetensors indexes {[i.name for i in indexes]}; name one")
        files = sorted(p.glob("*.safetensors"))
        if files:
            return files
        raise InputError(f"{str(p)!r} holds no .safetensors file and no {INDEX_NAME_SUFFIX}")
    raise InputError(
        f"checkpoint path {str(p)!r} does not exist or is not a .safetensors file, an index or a directory"
    )


def read_state_dict(path: str | Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint at `path` (see `safetensors_files`) whose key starts with `prefix`,
    with the prefix removed. A key present in two shards is an error."""
    state: dict[str, torch.Tensor] = {}
    for f in safetensors_files(path):
        for k, v in load_file(str(f)).items():
            if not k.startswith(prefix):
                continue
            k = k[len(prefix):]
            if k in state:
                raise InputError(f"key {k!r} appears in more than one shard (second time in {str(f)!r})")
            state[k] = v
    return state


def load_checked(
    module: torch.nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    rename: Callable[[str], str] | None = None,
    skip: Callable[[str], bool] | None = None,
    what: str = "checkpoint",
) -> list[str]:
    """Copy `state` into `module` after checking every key and shape.

    `rename` maps a checkpoint key to the module's key (e.g. diffusers layout -> release layout).
    `skip(key)` returns True for checkpoint keys that are deliberately not loaded (checked after rename).
    Returns the sorted list of skipped keys. Raises InputError naming the first missing, unexpected or
    mis-shaped key.
    """
    expected = module.state_dict()
    renamed: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    for k, v in state.items():
        name = rename(k) if rename is not None else k
        if skip is not None and skip(name):
            skipped.append(k)
            continue
        if name in renamed:
            raise InputError(f"{what}: keys map onto {name!r} twice (second from {k!r})")
        renamed[name] = v
    missing = [k for k in expected if k not in renamed]
    if missing:
        raise InputError(
            f"{what} is missing key {missing[0]!r} (expected shape {tuple(expected[missing[0]].shape)}); "
            f"{len(missing)} missing in all"
        )
    unexpected = [k for k in renamed if k not in expected]
    if unexpected:
        raise InputError(
            f"{what} has unexpected key {unexpected[0]!r} (shape {tuple(renamed[unexpected[0]].shape)}), "
            f"which the model does not have; {len(unexpected)} unexpected in all"
        )
    for k, ref in expected.items():
        if tuple(renamed[k].shape) != tuple(ref.shape):
            raise InputError(
                f"{what} key {k!r} has shape {tuple(renamed[k].shape)}, expected {tuple(ref.shape)}"
            )
    module.load_state_dict(renamed, strict=True, assign=False)
    return sorted(skipped)
