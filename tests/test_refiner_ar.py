"""The chunk-causal AR refinement recipe: fixture parity, caches vs explicit recomputation, snapshot/restore,
replay of capture passes, constant memory."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import fixture_params
from safetensors.torch import load_file, save_file

from engine.errors import InputError
from engine.refiner.ar import ARRefiner, history_in_time_order
from engine.refiner.config import ARConfig, RefinerConfig
from engine.refiner.model import ExplicitKV, RefinerTransformer, is_audio_key, load_refiner_weights
from engine.refiner.rope import apply_rope

FIXTURES = fixture_params("refiner_ar_tiny.safetensors")
PARITY_REL_TOL = 1e-5  # fixtures/README.md: max abs relative to the output scale


def load_fixture(path: Path):
    data = load_file(str(path))
    meta = json.loads(path.with_suffix(".json").read_text())
    model = RefinerTransformer(RefinerConfig.from_dict(meta["transformer_config"])).eval()
    weights = {k.removeprefix("weights."): v for k, v in data.items() if k.startswith("weights.")}
    skipped = load_refiner_weights(model, weights)
    ar_cfg = ARConfig(
        block_size=meta["block_size"],
        kv_max_frames=meta["kv_max_frames"],
        sink_size=meta["sink_size"],
        sigmas=meta["sigmas"],
        fps=meta["fps"],
        seed=meta["seed"],
    )
    return data, model, ar_cfg, skipped


def block_noises(data, refiner, num_frames):
    return [data[f"noise.block{i}"] for i in range(len(refiner.blocks(num_frames)))]


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("path", FIXTURES)
def test_fixture_parity(path):
    data, model, ar_cfg, skipped = load_fixture(path)
    assert skipped and all(is_audio_key(k) for k in skipped)
    assert torch.equal(data["inputs.sigmas"], torch.tensor(ar_cfg.sigmas, dtype=data["inputs.sigmas"].dtype))
    z, ref = data["inputs.stage1_latents"], data["output.latents"]
    refiner = ARRefiner(model, ar_cfg)
    noises = block_noises(data, refiner, z.shape[2])
    out = refiner.refine_video(z, data["inputs.prompt_embeds"], data["inputs.prompt_attention_mask"], noises=noises)
    assert torch.equal(out[:, :, : ar_cfg.sink_size], z[:, :, : ar_cfg.sink_size])
    assert rel(out, ref) <= PARITY_REL_TOL
    # The default noise source (a generator seeded with cfg.seed, one draw per block) is the fixture's noise.
    drawn = refiner.refine_video(z, data["inputs.prompt_embeds"], data["inputs.prompt_attention_mask"])
    assert torch.equal(drawn, out)


def recipe_without_cache(model, cfg: ARConfig, z, text, noises):
    """The recipe of refiner_vae.md §4 written plainly: Python lists of K/V, concatenation, slicing."""
    b, _, t, h, w = z.shape
    tpf = h * w
    s = [float(x) for x in torch.tensor(cfg.sigmas, dtype=torch.float32)]
    sink = ExplicitKV(record=True)
    model(z[:, :, : cfg.sink_size], 0.0, text, fps=cfg.fps, frame_positions=torch.arange(cfg.sink_size), kv=sink)
    hist_k = [None] * model.num_layers
    hist_v = [None] * model.num_layers
    hist = 0
    out = z.clone()
    for i, start in enumerate(range(cfg.sink_size, t, cfg.block_size)):
        end = min(start + cfg.block_size, t)
        pos = torch.arange(start, end)
        off = start - hist - cfg.sink_size
        sink_rope = model.video_rope(torch.arange(off, off + cfg.sink_size), h, w, cfg.fps)
        prefix = []
        for layer in range(model.num_layers):
            k = [apply_rope(sink.k_pre[layer], sink_rope)] + ([hist_k[layer]] if hist else [])
            v = [sink.v[layer]] + ([hist_v[layer]] if hist else [])
            prefix.append((torch.cat(k, dim=2), torch.cat(v, dim=2)))
        x = (1 - s[0]) * z[:, :, start:end] + s[0] * noises[i]
        for j in range(len(s) - 1):
            vel = model(x, s[j], text, fps=cfg.fps, frame_positions=pos, kv=ExplicitKV(prefix))
            x0 = x - s[j] * vel
            x = x + (s[j + 1] - s[j]) * (x - x0) / s[j]
        cap = ExplicitKV(prefix, record=True)
        model(x, 0.0, text, fps=cfg.fps, frame_positions=pos, kv=cap)
        for layer in range(model.num_layers):
            new_k, new_v = cap.k[layer], cap.v[layer]
            hist_k[layer] = new_k if not hist else torch.cat([hist_k[layer], new_k], dim=2)
            hist_v[layer] = new_v if not hist else torch.cat([hist_v[layer], new_v], dim=2)
        hist += end - start
        if hist > cfg.history_frames:
            for layer in range(model.num_layers):
                hist_k[layer] = hist_k[layer][:, :, -cfg.history_frames * tpf :]
                hist_v[layer] = hist_v[layer][:, :, -cfg.history_frames * tpf :]
            hist = cfg.history_frames
        out[:, :, start:end] = x
    return out, hist_k, hist_v


def long_video(data, cfg: ARConfig, blocks: int, seed: int = 0):
    """A longer video than the fixture's (the window fills and slides), with the fixture's channels and size."""
    z = data["inputs.stage1_latents"]
    g = torch.Generator().manual_seed(seed)
    t = cfg.sink_size + blocks * cfg.block_size - 1  # last block partial
    lat = torch.randn(z.shape[0], z.shape[1], t, *z.shape[3:], generator=g)
    refiner_blocks = [(a, min(a + cfg.block_size, t)) for a in range(cfg.sink_size, t, cfg.block_size)]
    noises = [torch.randn(lat[:, :, a:b].shape, generator=g) for a, b in refiner_blocks]
    return lat, noises


@pytest.mark.parametrize("split", [False, True], ids=["active-slots", "split-window"])
@pytest.mark.parametrize("path", FIXTURES)
@torch.no_grad()
def test_cached_recipe_equals_explicit_recomputation(path, split):
    """The window (and, split, the window without the active block's slots: two-segment attention, the capture
    pass writing the history layer by layer) against the recipe recomputed with explicit concatenations."""
    data, model, ar_cfg, _ = load_fixture(path)
    blocks = max(6, ar_cfg.history_frames // ar_cfg.block_size + 3)  # the history fills, then slides
    lat, noises = long_video(data, ar_cfg, blocks)
    refiner = ARRefiner(model, ar_cfg)
    refiner.split_window = split
    got = refiner.refine_video(lat, data["inputs.prompt_embeds"], data["inputs.prompt_attention_mask"], noises=noises)
    text = model.prepare_text(data["inputs.prompt_embeds"], data["inputs.prompt_attention_mask"])
    expected, hist_k, hist_v = recipe_without_cache(model, ar_cfg, lat, text, noises)
    assert refiner.window.history_len == ar_cfg.history_frames and refiner.window.active_slots != split
    tokens = refiner.window.k.shape[3] // refiner.window.tokens_per_frame
    assert tokens == ar_cfg.sink_size + ar_cfg.history_frames + (0 if split else ar_cfg.block_size)
    assert rel(got, expected) <= 1e-5
    snap = refiner.window.snapshot()
    assert int(snap["history_start"]) != 0  # the ring has turned: its slot order is not the time order
    k, v = history_in_time_order(snap, refiner.window.tokens_per_frame)
    assert rel(k, torch.stack(hist_k)) <= 1e-5
    assert rel(v, torch.stack(hist_v)) <= 1e-5


def run_blocks(refiner, lat, noises, which):
    ranges = refiner.blocks(lat.shape[2])
    return [refiner.refine_block(lat[:, :, a:b], noises[i]) for i, (a, b) in enumerate(ranges) if i in which]


@pytest.mark.parametrize("path", FIXTURES)
def test_snapshot_restore_continues_identically(path, tmp_path):
    data, model, ar_cfg, _ = load_fixture(path)
    z, prompt, mask = data["inputs.stage1_latents"], data["inputs.prompt_embeds"], data["inputs.prompt_attention_mask"]
    live = ARRefiner(model, ar_cfg)
    noises = block_noises(data, live, z.shape[2])
    n_blocks = len(noises)
    live.start(z[:, :, : ar_cfg.sink_size], prompt, mask)
    run_blocks(live, z, noises, range(3))
    snap = live.snapshot()
    save_file(snap, str(tmp_path / "refiner_state.safetensors"))  # a snapshot is plain tensors
    rest_live = run_blocks(live, z, noises, range(3, n_blocks))

    fresh = ARRefiner(model, ar_cfg)
    fresh.restore(load_file(str(tmp_path / "refiner_state.safetensors")))
    rest_fresh = run_blocks(fresh, z, noises, range(3, n_blocks))
    assert len(rest_live) == n_blocks - 3 >= 1
    for a, b in zip(rest_live, rest_fresh, strict=True):
        assert torch.equal(a, b)
    assert (
        rel(torch.cat(rest_live, dim=2), data["output.latents"][:, :, ar_cfg.sink_size + 3 * ar_cfg.block_size :])
        <= PARITY_REL_TOL
    )


@pytest.mark.parametrize("path", FIXTURES)
def test_split_window_snapshots_interchange(path):
    """A snapshot of a split window restores into a window with active slots and the other way round; both go on
    as a window of their own kind would (equal up to the rounding of the two-segment attention)."""
    data, model, ar_cfg, _ = load_fixture(path)
    z, prompt, mask = data["inputs.stage1_latents"], data["inputs.prompt_embeds"], data["inputs.prompt_attention_mask"]
    live = {}
    for split in (False, True):
        live[split] = ARRefiner(model, ar_cfg)
        live[split].split_window = split
        noises = block_noises(data, live[split], z.shape[2])
        live[split].start(z[:, :, : ar_cfg.sink_size], prompt, mask)
        run_blocks(live[split], z, noises, range(3))
    snaps = {split: live[split].snapshot() for split in live}
    for k in snaps[False]:
        if snaps[False][k].is_floating_point():
            assert rel(snaps[True][k].float(), snaps[False][k].float()) <= 1e-5, k
        else:  # counters and positions (the ring's start among them): the same
            assert torch.equal(snaps[True][k], snaps[False][k]), k
    for split in (False, True):
        other = ARRefiner(model, ar_cfg)
        other.split_window = not split
        other.restore(snaps[split])
        assert other.window.active_slots == split
        a = run_blocks(other, z, noises, range(3, len(noises)))
        b = run_blocks(live[split], z, noises, range(3, len(noises)))
        assert rel(torch.cat(a, dim=2), torch.cat(b, dim=2)) <= 1e-5


def assert_same_window(a: ARRefiner, b: ARRefiner):
    sa, sb = a.snapshot(), b.snapshot()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].shape == sb[k].shape, k
        assert torch.equal(sa[k], sb[k]), k  # the same passes over the same latents: bit for bit


@pytest.mark.parametrize("path", FIXTURES)
def test_replay_capture_rebuilds_the_window(path):
    data, model, ar_cfg, _ = load_fixture(path)
    z, prompt, mask = data["inputs.stage1_latents"], data["inputs.prompt_embeds"], data["inputs.prompt_attention_mask"]
    live = ARRefiner(model, ar_cfg)
    noises = block_noises(data, live, z.shape[2])
    live.start(z[:, :, : ar_cfg.sink_size], prompt, mask)
    refined = run_blocks(live, z, noises, range(len(noises)))
    mid_snapshot = None

    # From the sink: one capture pass per stored refined block.
    replay = ARRefiner(model, ar_cfg)
    replay.start(z[:, :, : ar_cfg.sink_size], prompt, mask)
    for i, blk in enumerate(refined):
        replay.replay_capture(blk)
        if i == 1:
            mid_snapshot = replay.snapshot()
    assert_same_window(live, replay)

    # From a snapshot onward.
    resumed = ARRefiner(model, ar_cfg)
    resumed.restore(mid_snapshot)
    for blk in refined[2:]:
        resumed.replay_capture(blk)
    assert_same_window(live, resumed)

    # Replaying only the blocks still in the window (without the earlier ones) gives another window: the K/V of
    # a block depends on the window it saw.
    partial = ARRefiner(model, ar_cfg)
    partial.start(z[:, :, : ar_cfg.sink_size], prompt, mask)
    partial.next_frame = ar_cfg.sink_size + ar_cfg.block_size
    for blk in refined[1:]:
        partial.replay_capture(blk)
    assert partial.window.history_len == live.window.history_len
    tpf = live.window.tokens_per_frame
    assert (history_in_time_order(partial.snapshot(), tpf)[0] - history_in_time_order(live.snapshot(), tpf)[0]).abs(
    ).max() > 1e-4


@pytest.mark.parametrize("split,fp8", [(False, False), (True, False), (False, True)],
                         ids=["active-slots", "split-window", "fp8-copy"])
@pytest.mark.parametrize("path", FIXTURES)
@torch.no_grad()
def test_a_block_writes_only_its_own_history_slots(path, split, fp8):
    """The history is a ring: appending a block writes the slots of its frames (the oldest frames' once the history
    is full) and leaves every other history frame where it was, bit for bit (nothing shifts). With the fp8 copy the
    capture pass writes the ring itself, as without active slots."""
    data, model, ar_cfg, _ = load_fixture(path)
    lat, noises = long_video(data, ar_cfg, blocks=2 * (ar_cfg.history_frames // ar_cfg.block_size + 2), seed=2)
    refiner = ARRefiner(model, ar_cfg)
    refiner.split_window, refiner.fp8_attention = split, fp8
    refiner.start(lat[:, :, : ar_cfg.sink_size], data["inputs.prompt_embeds"], data["inputs.prompt_attention_mask"])
    w = refiner.window
    tpf, base, starts = w.tokens_per_frame, ar_cfg.sink_size * w.tokens_per_frame, set()
    for i, (a, b) in enumerate(refiner.blocks(lat.shape[2])):
        before = (w.k.clone(), w.v.clone(), w.history_len)
        written = set(w._ring_slots(b - a))
        refiner.refine_block(lat[:, :, a:b], noises[i])
        starts.add(w.history_start)
        for slot in range(before[2]):  # the frames held before the block
            if slot not in written:
                sl = slice(base + slot * tpf, base + (slot + 1) * tpf)
                assert torch.equal(w.k[:, :, :, sl], before[0][:, :, :, sl]), (i, slot)
                assert torch.equal(w.v[:, :, :, sl], before[1][:, :, :, sl]), (i, slot)
    assert len(starts) > 1  # the ring turned
    if fp8:  # the active slots are never written (still the NaN of a fresh window)
        active = slice(base + ar_cfg.history_frames * tpf, None)
        assert torch.isnan(w.k[:, :, :, active]).all() and torch.isnan(w.v[:, :, :, active]).all()


@pytest.mark.parametrize("path", FIXTURES)
@torch.no_grad()
def test_a_time_ordered_snapshot_restores(path):
    """A snapshot from before the ring (the history in time order, `history_k` / `history_v`) restores at slot 0 and
    goes on as the live window does, up to the rounding of the keys' other order; a `history_start` that cannot be is
    refused with its value and what is accepted; a full ring restores into a window of a longer history in time
    order."""
    data, model, ar_cfg, _ = load_fixture(path)
    lat, noises = long_video(data, ar_cfg, blocks=ar_cfg.history_frames // ar_cfg.block_size + 4, seed=3)
    blocks = ARRefiner(model, ar_cfg).blocks(lat.shape[2])
    live = ARRefiner(model, ar_cfg)
    live.start(lat[:, :, : ar_cfg.sink_size], data["inputs.prompt_embeds"], data["inputs.prompt_attention_mask"])
    cut = len(blocks) - 2
    for i, (a, b) in enumerate(blocks[:cut]):
        live.refine_block(lat[:, :, a:b], noises[i])
    snap, tpf = live.snapshot(), live.window.tokens_per_frame
    assert int(snap["history_start"]) != 0
    old = dict(snap)
    old["history_k"], old["history_v"] = history_in_time_order(snap, live.window.tokens_per_frame)
    for name in ("history_k_slots", "history_v_slots", "history_start"):
        del old[name]
    resumed = ARRefiner(model, ar_cfg)
    resumed.restore(old)
    assert resumed.window.history_start == 0
    for i in range(cut, len(blocks)):
        a, b = blocks[i]
        got, want = resumed.refine_block(lat[:, :, a:b], noises[i]), live.refine_block(lat[:, :, a:b], noises[i])
        assert rel(got, want) <= 1e-5
    for bad in (ar_cfg.history_frames, -1):
        with pytest.raises(InputError, match=f"history_start={bad} .*accepted"):
            ARRefiner(model, ar_cfg).restore(dict(snap, history_start=torch.tensor(bad)))
    # into a window of a longer history (another config): loaded in time order from slot 0
    longer = ARRefiner(model, dataclasses.replace(ar_cfg, kv_max_frames=ar_cfg.kv_max_frames + 2))
    longer.restore(snap)
    assert longer.window.history_start == 0 and longer.window.history_len == ar_cfg.history_frames
    got, want = history_in_time_order(longer.snapshot(), tpf), history_in_time_order(snap, tpf)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


@pytest.mark.parametrize("path", FIXTURES)
@torch.no_grad()
def test_window_memory_is_constant(path):
    data, model, ar_cfg, _ = load_fixture(path)
    lat, noises = long_video(data, ar_cfg, blocks=3 * (ar_cfg.history_frames // ar_cfg.block_size + 2), seed=1)
    refiner = ARRefiner(model, ar_cfg)
    refiner.start(lat[:, :, : ar_cfg.sink_size], data["inputs.prompt_embeds"], data["inputs.prompt_attention_mask"])
    window = refiner.window
    ptrs = [t.data_ptr() for t in window.buffers()]
    nbytes = window.nbytes
    runs = []
    for _ in range(2):
        outs = []
        for i, (a, b) in enumerate(refiner.blocks(lat.shape[2])):
            out = refiner.refine_block(lat[:, :, a:b], noises[i])
            assert torch.isfinite(out).all()  # never reads a NaN-poisoned (unwritten) slot
            assert refiner.window is window and window.nbytes == nbytes
            assert [t.data_ptr() for t in window.buffers()] == ptrs
            assert window.history_len == min(b - ar_cfg.sink_size, ar_cfg.history_frames)
            outs.append(out)
        runs.append(outs)
        # Restarting a video of the same size reuses the buffers, its ring from slot 0: the same video again
        refiner.start(lat[:, :, : ar_cfg.sink_size], data["inputs.prompt_embeds"], data["inputs.prompt_attention_mask"])
        assert refiner.window is window and window.history_len == window.history_start == 0
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("path", FIXTURES)
def test_bad_blocks_are_refused(path):
    data, model, ar_cfg, _ = load_fixture(path)
    z = data["inputs.stage1_latents"]
    refiner = ARRefiner(model, ar_cfg)
    with pytest.raises(RuntimeError, match="start"):
        refiner.refine_block(z[:, :, 1:2], z[:, :, 1:2])
    refiner.start(z[:, :, : ar_cfg.sink_size], data["inputs.prompt_embeds"], data["inputs.prompt_attention_mask"])
    too_long = z[:, :, 1 : 2 + ar_cfg.block_size]
    with pytest.raises(InputError, match="latent frames"):
        refiner.refine_block(too_long, too_long)
    with pytest.raises(InputError, match="noise shape"):
        refiner.refine_block(z[:, :, 1:2], z[:, :, 1:3])
    with pytest.raises(InputError, match="sink latent"):
        refiner.start(z[:, :, : ar_cfg.sink_size + 1], data["inputs.prompt_embeds"])


@pytest.mark.gpu
@pytest.mark.parametrize("path", FIXTURES)
def test_fixture_parity_on_cuda(path):
    """The same recipe on a GPU: fp32 parity with the fixture, bit-exact snapshot/restore, and a bf16 run that stays
    near the fp32 result (the release dtype)."""
    data, model, ar_cfg, _ = load_fixture(path)
    model = model.cuda()
    z, prompt, mask = data["inputs.stage1_latents"], data["inputs.prompt_embeds"], data["inputs.prompt_attention_mask"]
    refiner = ARRefiner(model, ar_cfg)
    noises = block_noises(data, refiner, z.shape[2])
    out = refiner.refine_video(z.cuda(), prompt.cuda(), mask.cuda(), noises=[n.cuda() for n in noises])
    ref = data["output.latents"]
    assert rel(out.cpu(), ref) <= PARITY_REL_TOL

    live = ARRefiner(model, ar_cfg)
    live.start(z[:, :, : ar_cfg.sink_size].cuda(), prompt.cuda(), mask.cuda())
    run_blocks(live, z.cuda(), noises, range(2))
    fresh = ARRefiner(model, ar_cfg)
    fresh.restore({k: v.cpu() for k, v in live.snapshot().items()})
    rest = range(2, len(noises))
    for a, b in zip(run_blocks(live, z.cuda(), noises, rest), run_blocks(fresh, z.cuda(), noises, rest), strict=True):
        assert torch.equal(a, b)

    bf16 = ARRefiner(model.to(torch.bfloat16), ar_cfg)
    out16 = bf16.refine_video(z.cuda(), prompt.cuda(), mask.cuda(), noises=[n.cuda() for n in noises])
    assert out16.dtype == torch.bfloat16 and torch.isfinite(out16).all()
    assert rel(out16.float().cpu(), ref) <= 0.03  # measured 8e-3 on an H100


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_two_segment_attention_equals_one_attention_on_cuda(dtype):
    """cuDNN's attention with its log-sum-exp (half types) or the fp32 path, per segment, merged: as close to an
    fp64 reference as one SDPA over the concatenation is. The first segment is a view of a larger buffer, as the
    window's are."""
    import torch.nn.functional as F

    from engine.refiner.model import two_segment_attention

    g = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *shape: torch.randn(*shape, device="cuda", generator=g)
    q = r(1, 4, 300, 128).to(dtype)
    buf_k, buf_v = r(1, 4, 1000, 128).to(dtype), r(1, 4, 1000, 128).to(dtype)
    k1, v1 = buf_k[:, :, :700], buf_v[:, :, :700]
    k2, v2 = r(1, 4, 300, 128).to(dtype), r(1, 4, 300, 128).to(dtype)
    k, v = torch.cat([k1, k2], dim=2), torch.cat([v1, v2], dim=2)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    one = F.scaled_dot_product_attention(q, k, v)
    got = two_segment_attention(q, (k1, k2), (v1, v2))
    e_one, e_got = rel(one.double(), ref), rel(got.double(), ref)
    print(f"{dtype}: one SDPA {e_one:.2e}, two segments {e_got:.2e}")
    assert got.dtype == dtype and e_got <= max(2 * e_one, 1e-6)


@pytest.mark.parametrize("path", FIXTURES)
@torch.no_grad()
def test_kv_only_pass_records_the_same_kv(path):
    """A capture pass's forward with `kv_only` (no velocity: the last block stops at its K/V) hands every layer the
    same K/V, bit for bit, as the whole forward."""
    data, model, ar_cfg, _ = load_fixture(path)
    z = data["inputs.stage1_latents"][:, :, :3]
    text = model.prepare_text(data["inputs.prompt_embeds"], data["inputs.prompt_attention_mask"])
    full, lean = ExplicitKV(record=True), ExplicitKV(record=True)
    assert model(z, 0.0, text, fps=ar_cfg.fps, kv=full) is not None
    assert model(z, 0.0, text, fps=ar_cfg.fps, kv=lean, kv_only=True) is None
    for store in ("k_pre", "k", "v"):
        a, b = getattr(full, store), getattr(lean, store)
        assert a.keys() == b.keys() == set(range(model.num_layers))
        assert all(torch.equal(a[i], b[i]) for i in a), store
