"""Stage-1 bidirectional forward vs the reference: fixture tensors, diffusers at another tiny config,
and the timestep truncation quirk (spec stage1.md §3.1; tolerances in fixtures/README.md)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from engine.stage1.config import Stage1Config
from engine.stage1.loading import load_stage1_weights
from engine.stage1.model import Stage1Transformer
from tests.conftest import fixture_params

MAX_ABS, MEAN_ABS = 1e-3, 2e-4


def load_fixture(path):
    tensors = load_file(str(path))
    meta = json.loads(path.with_suffix(".json").read_text())
    cfg = Stage1Config.from_dict(meta["config"])
    weights = {k[len("weights."):]: v for k, v in tensors.items() if k.startswith("weights.")}
    inputs = {k[len("inputs."):]: v for k, v in tensors.items() if k.startswith("inputs.")}
    return cfg, weights, inputs, tensors["output.sample"]


def run_fixture(model, inputs):
    with torch.no_grad():
        return model(inputs["hidden_states"], inputs["timestep"], inputs["encoder_hidden_states"],
                     mask=inputs["encoder_attention_mask"], camera_conditions=inputs["camera_conditions"],
                     chunk_plucker=inputs["chunk_plucker"])


@pytest.mark.parametrize("path", fixture_params("stage1_tiny.safetensors"))
def test_fixture_parity(path):
    cfg, weights, inputs, expected = load_fixture(path)
    model = Stage1Transformer(cfg).eval()
    load_stage1_weights(model, weights)
    out = run_fixture(model, inputs)
    err = (out - expected).abs()
    assert out.shape == expected.shape
    assert err.max() <= MAX_ABS, f"max abs {err.max():.3g}"
    assert err.mean() <= MEAN_ABS, f"mean abs {err.mean():.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("path", fixture_params("stage1_tiny.safetensors"))
def test_fixture_parity_on_gpu(path):
    """The same plain path on CUDA (fp32, TF32 off) meets the same tolerance."""
    cfg, weights, inputs, expected = load_fixture(path)
    model = Stage1Transformer(cfg).eval()
    load_stage1_weights(model, weights)
    out = run_fixture(model.cuda(), {k: v.cuda() for k, v in inputs.items()}).cpu()
    err = (out - expected).abs()
    assert err.max() <= MAX_ABS, f"max abs {err.max():.3g}"
    assert err.mean() <= MEAN_ABS, f"mean abs {err.mean():.3g}"


@pytest.mark.parametrize("path", fixture_params("stage1_tiny.safetensors"))
def test_fixture_detects_wrong_camera_renorm(path):
    """The fixture is variant R; variant T must fail the tolerance (the flag is really wired)."""
    cfg, weights, inputs, expected = load_fixture(path)
    cfg.camera_renorm = "T"
    model = Stage1Transformer(cfg).eval()
    load_stage1_weights(model, weights)
    assert (run_fixture(model, inputs) - expected).abs().max() > 10 * MAX_ABS


def random_weights_(model_state, seed):
    g = torch.Generator().manual_seed(seed)
    for k, v in model_state.items():
        if v.ndim >= 2:
            v.copy_(torch.randn(v.shape, generator=g) / v[0].numel() ** 0.5)
        elif "norm" in k:
            v.copy_(1 + 0.2 * torch.randn(v.shape, generator=g))
        elif k.endswith("A_log"):
            v.copy_(torch.empty(v.shape).uniform_(0.5, 2.5, generator=g).log())
        else:
            v.copy_(0.1 * torch.randn(v.shape, generator=g))


def random_camera(B, T, g):
    c2w = torch.eye(4).repeat(B, T, 1, 1)
    ang = torch.randn(B, T, generator=g) * 0.3
    c2w[..., 0, 0], c2w[..., 0, 2], c2w[..., 2, 0], c2w[..., 2, 2] = ang.cos(), ang.sin(), -ang.sin(), ang.cos()
    c2w[..., :3, 3] = torch.randn(B, T, 3, generator=g)
    intr = torch.tensor([4.0, 3.5, 2.5, 1.5]).expand(B, T, 4)
    return torch.cat([c2w.reshape(B, T, 16), intr], dim=-1)


def test_matches_diffusers_at_other_config():
    """Another architecture (D=64, softmax every 2nd block, no Plücker in the last block, B=2, T=6)
    against the diffusers port itself (test-only dependency)."""
    sana_wm = pytest.importorskip("diffusers.models.transformers.transformer_sana_wm")
    kw = dict(in_channels=8, num_layers=3, hidden_size=128, num_attention_heads=4, linear_head_dim=64,
              softmax_every_n=2, caption_channels=32, chunk_plucker_post_attn_blocks=2)
    torch.manual_seed(0)
    ref = sana_wm.SanaWMTransformer3DModel(**kw).eval()
    state = ref.state_dict()
    random_weights_(state, seed=1)
    model = Stage1Transformer(Stage1Config(**kw, model_max_length=8)).eval()
    load_stage1_weights(model, state)  # diffusers layout: t_embedder.linear_1/2, no y_embedding
    g = torch.Generator().manual_seed(2)
    B, T, h, w = 2, 6, 3, 5
    x = torch.randn(B, 8, T, h, w, generator=g)
    t = torch.tensor([[[0.0, 500, 400, 300, 999, 20]], [[0.0, 10, 900, 300, 7, 650]]])
    y = torch.randn(B, 1, 8, 32, generator=g)
    mask = torch.tensor([[1] * 5 + [0] * 3, [1] * 8])
    cam = random_camera(B, T, g)
    pl = torch.randn(B, 48, T, h, w, generator=g)
    with torch.no_grad():
        expected = ref(x, t, y, mask=mask, camera_conditions=cam, chunk_plucker=pl).sample
        out = model(x, t, y, mask=mask, camera_conditions=cam, chunk_plucker=pl)
    err = (out - expected).abs()
    # the reference casts q, k, v to bf16 before its softmax attention: same bound as the fixture
    assert err.max() <= MAX_ABS * expected.abs().max().clamp_min(1) and err.mean() <= MEAN_ABS


@pytest.mark.parametrize("path", fixture_params("stage1_tiny.safetensors"))
def test_timestep_truncated_inside_model(path):
    cfg, weights, inputs, _ = load_fixture(path)
    model = Stage1Transformer(cfg).eval()
    load_stage1_weights(model, weights)
    t = inputs["timestep"].clone()
    t[..., 1:] = t[..., 1:] + 0.75  # fractional parts are dropped by the model
    with torch.no_grad():
        e_int, m_int = model.embed_timestep(inputs["timestep"], 1, t.shape[-1])
        e_frac, m_frac = model.embed_timestep(t, 1, t.shape[-1])
        e_next, _ = model.embed_timestep(inputs["timestep"] + 1, 1, t.shape[-1])
    assert torch.equal(e_int, e_frac) and torch.equal(m_int, m_frac)
    assert not torch.allclose(e_int[:, 1:], e_next[:, 1:])
    out_frac = run_fixture(model, {**inputs, "timestep": t})
    assert torch.equal(out_frac, run_fixture(model, inputs))
