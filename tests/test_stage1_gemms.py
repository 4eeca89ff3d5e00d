"""`stage1-fused-proj` and `stage1-tconv` (engine/fast/stage1_gemms.py) against the plain stage-1: the same
projections, temporal convs, forwards and live loop up to rounding, the same state dict, no added memory."""

import pytest
import torch

from engine.bench import build_bench_world, first_image, scripted_controls
from engine.fast import apply_fast_paths
from engine.fast.stage1_gemms import conv_major_tconv, fuse_in_projections, tap_major_tconv, unfuse_in_projections
from engine.rollout import Rollout
from engine.stage1.temporal import streaming_mode, temporal_conv
from engine.world import WorldPipeline
from tests.test_stage1_streaming import clip, small_model


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def storage_bytes(model) -> int:
    seen = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


@torch.no_grad()
def test_fused_projections_equal_the_linears_and_keep_the_state_dict():
    model = small_model(seed=1)
    T, S, C = 3, 6, model.config.hidden_size
    a = torch.randn(2, T * S, C, generator=torch.Generator().manual_seed(2))
    plain = [block.attn.project(a, T) for block in model.blocks]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    size = storage_bytes(model)

    assert fuse_in_projections(model) == len(model.blocks)
    assert fuse_in_projections(model) == 0  # once
    assert model.state_dict().keys() == state.keys()  # the fused buffers are not persistent
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    # the linears are views of the concatenation: zero bias rows for qkv and zero padding rows are all that is added
    added = sum((block.attn.fused_weight.shape[0] - sum(lin.out_features for _, lin in block.attn.in_projections()))
                * (C + 1) * 4 + block.attn.qkv.out_features * 4 for block in model.blocks)
    assert storage_bytes(model) == size + added
    for block, want in zip(model.blocks, plain, strict=True):
        attn = block.attn
        for _, lin in attn.in_projections():
            assert lin.weight.untyped_storage().data_ptr() == attn.fused_weight.untyped_storage().data_ptr()
        got = attn.project(a, T)
        for field in ("q", "k", "v", "q_cam", "k_cam", "v_cam", "gate", "beta", "decay"):
            w, g = getattr(want, field), getattr(got, field)
            if attn.softmax and field in ("beta", "decay"):
                assert w is None and g is None
                continue
            assert g.shape == w.shape and g.dtype == w.dtype
            assert rel(g, w) < 1e-6, field


@torch.no_grad()
def test_fused_model_forward_and_later_loading():
    model, ref = small_model(seed=3), small_model(seed=3)
    x, t, cam, pl, y, mask = clip(model, T=5)
    fuse_in_projections(model)
    want = ref(x, t, y, mask, cam, pl)
    assert rel(model(x, t, y, mask, cam, pl), want) < 1e-5
    # weights loaded after fusing fill the fused buffers (the linears are views of them)
    other = small_model(seed=4)
    model.load_state_dict(other.state_dict())
    assert rel(model(x, t, y, mask, cam, pl), other(x, t, y, mask, cam, pl)) < 1e-5
    unfuse_in_projections(model)
    assert model.blocks[0].attn.fused_weight is None
    assert rel(model(x, t, y, mask, cam, pl), other(x, t, y, mask, cam, pl)) < 1e-6


@pytest.mark.parametrize("segments,left", [(((0, 4),), False), (((0, 4),), True), (((0, 2), (2, 3), (3, 4)), True)])
def test_tap_major_temporal_conv_equals_the_interleaved_one(segments, left):
    g = torch.Generator().manual_seed(5)
    B, T, S, C = 2, 4, 3, 8
    s = torch.randn(B, T, S, C, generator=g)
    weight = torch.randn(C, C, 3, 1, generator=g)
    tail = torch.randn(B, 1, S, C, generator=g) if left else None
    tap_major = weight.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    assert torch.equal(tap_major, weight) and not tap_major.is_contiguous()
    want = temporal_conv(s, weight, segments, tail)
    got = temporal_conv(s, tap_major, segments, tail)
    assert rel(got, want) < 1e-6
    # the reference: s + sum over taps of W[:, :, tau] s[frame + tau - 1], zero across a segment's right end
    ref = s.clone()
    for t in range(T):
        end = next(e for st, e in segments if st <= t < e)
        for tau, dt in enumerate((-1, 0, 1)):
            src = t + dt
            if src < 0:
                if tail is None:
                    continue
                frame = tail[:, 0]
            elif src >= end:
                continue
            else:
                frame = s[:, src]
            ref[:, t] += frame @ weight[:, :, tau, 0].T
    assert rel(got, ref) < 1e-6
    with pytest.raises(AssertionError):  # the check has teeth: a transposed tap order is caught
        assert rel(temporal_conv(s, weight.flip(2), segments, tail), ref) < 1e-6


@torch.no_grad()
def test_tap_major_model_streams_like_the_plain_one():
    model, ref = small_model(seed=6), small_model(seed=6)
    assert tap_major_tconv(model) == len(model.blocks) and tap_major_tconv(model) == 0
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in model.state_dict().items())
    x, t, cam, pl, y, mask = clip(model, T=7)
    text_m, text_r = model.encode_text(y, mask), ref.encode_text(y, mask)
    counts = [4, 3]
    got = model.forward_chunk_causal(x, t, text_m, cam, pl, counts, mode=streaming_mode(48))
    want = ref.forward_chunk_causal(x, t, text_r, cam, pl, counts, mode=streaming_mode(48))
    assert rel(got, want) < 1e-5
    conv_major_tconv(model)
    assert all(block.mlp.t_conv.weight.is_contiguous() for block in model.blocks)


def live_loop(world, fast, chunks=4):
    pipe = WorldPipeline(world)
    applied = apply_fast_paths(pipe, fast)
    pipe.start(first_image(world.preset, 0), "a street", "preview")
    ro = Rollout(pipe, scripted_controls(chunks), intrinsics_px=world.preset.default_intrinsics, seed=3,
                 quality="preview")
    return applied, [c.latents.clone() for c in ro.chunks(chunks)]


@torch.no_grad()
def test_live_loop_with_both_equals_the_plain_one():
    world = build_bench_world("tiny", device="cpu", dtype=torch.float32, seed=2, with_refiner=False)
    _, plain = live_loop(world, ())
    try:
        applied, fast = live_loop(world, ("stage1-fused-proj", "stage1-tconv"))
    finally:
        unfuse_in_projections(world.stage1)
        conv_major_tconv(world.stage1)
    assert set(applied) == {"stage1-fused-proj", "stage1-tconv"}
    assert "world-wide" in applied["stage1-fused-proj"]
    errs = [rel(a, b) for a, b in zip(fast, plain, strict=True)]
    assert max(errs) < 1e-4, errs
