"""Stage-1 state-dict layout and checked loading (spec stage1.md §1, §4)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from engine.errors import InputError
from engine.stage1.config import Stage1Config
from engine.stage1.loading import load_stage1_weights
from engine.stage1.model import Stage1Transformer

TSV = Path(__file__).parent / "fixtures" / "reference" / "stage1_full_state_dict.tsv"


def read_tsv(path):
    rows = []
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, shape = line.split("\t")
        rows.append((key, tuple(int(s) for s in shape.strip("()").split(",") if s.strip())))
    return rows


def test_release_config_on_meta_matches_tsv():
    with torch.device("meta"):
        model = Stage1Transformer(Stage1Config())
    got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    expected = read_tsv(TSV)
    assert len(expected) == 871
    assert got == expected
    n_params = sum(v.numel() for _, v in model.state_dict().items())
    assert n_params == sum(torch.Size(s).numel() for _, s in expected)


def tiny_config():
    return Stage1Config(in_channels=4, num_layers=2, hidden_size=64, num_attention_heads=2, linear_head_dim=32,
                        softmax_every_n=2, caption_channels=16, model_max_length=4,
                        chunk_plucker_post_attn_blocks=2)


def random_state(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}


def assert_loaded(model, state):
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_load_release_layout_drops_pos_embed(tmp_path):
    model = Stage1Transformer(tiny_config())
    state = random_state(model)
    save_file({**state, "pos_embed": torch.zeros(1, 3)}, str(tmp_path / "dit.safetensors"))
    assert load_stage1_weights(model, tmp_path / "dit.safetensors") == ["pos_embed"]
    assert_loaded(model, state)


@pytest.mark.parametrize("kind", ["missing", "extra", "shape"])
def test_bad_key_is_named(kind):
    model = Stage1Transformer(tiny_config())
    state = random_state(model)
    key = "blocks.1.attn.q_norm_cam.weight"
    if kind == "missing":
        del state[key]
    elif kind == "extra":
        key = "blocks.1.attn.conv_k.weight"  # block 1 is softmax: no short conv
        state[key] = torch.zeros(64, 1, 4)
    else:
        state[key] = torch.zeros(65)
    with pytest.raises(InputError, match=key.replace(".", r"\.")):
        load_stage1_weights(model, state)


def test_load_sharded_diffusers_layout(tmp_path):
    model = Stage1Transformer(tiny_config())
    state = random_state(model, seed=1)
    diffusers = {k.replace("t_embedder.mlp.0.", "t_embedder.linear_1.").replace("t_embedder.mlp.2.",
                                                                                  "t_embedder.linear_2."): v
                 for k, v in state.items() if k != "y_embedder.y_embedding"}
    keys = sorted(diffusers)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2 :]}
    for name, ks in shards.items():
        save_file({k: diffusers[k] for k in ks}, str(tmp_path / name))
    index = {"metadata": {}, "weight_map": {k: name for name, ks in shards.items() for k in ks}}
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    fresh = Stage1Transformer(tiny_config())
    load_stage1_weights(fresh, tmp_path)  # the directory: finds the index
    expected = dict(state, **{"y_embedder.y_embedding": torch.zeros_like(state["y_embedder.y_embedding"])})
    assert_loaded(fresh, expected)


def test_load_streaming_pt(tmp_path):
    model = Stage1Transformer(tiny_config())
    state = random_state(model, seed=2)
    torch.save({"generator": {"model." + k: v for k, v in {**state, "pos_embed": torch.zeros(2)}.items()}},
               tmp_path / "model.pt")
    load_stage1_weights(model, tmp_path / "model.pt")
    assert_loaded(model, state)


def test_config_rejects_unknown_key():
    with pytest.raises(InputError, match="num_layerz"):
        Stage1Config.from_dict({"num_layerz": 3})
    cfg = Stage1Config.from_dict({"_class_name": "SanaWMTransformer3DModel", "num_layers": 3})
    assert cfg.num_layers == 3 and cfg.hidden_size == 2240
    with pytest.raises(InputError, match="camera_renorm"):
        Stage1Config(camera_renorm="X")
