"""`sana-wm bench` on the tiny preset (CPU): the live-loop code path the release-size GPU run measures."""

import json
import math

import pytest
import torch

from engine.bench import BenchConfig, GcPauses, build_bench_world, random_init_, run_bench, stand_in_text, stats_ms
from engine.cli import main
from engine.presets import get_preset
from engine.stage1.model import Stage1Transformer


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    argv = ["bench", "--preset", "tiny", "--device", "cpu", "--chunks", "2", "--warmup", "1",
            "--replay-chunks", "2", "--gemm", "64", "--profile", "--out", str(out)]
    assert main(argv) == 0
    return json.loads(out.read_text())


def test_report_has_every_measurement(report):
    assert set(report["qualities"]) == {"preview", "full"}
    for q, r in report["qualities"].items():
        assert r["chunks"] == 2
        stages = {"stage1", "decode", "total", "chunk_wall"} | ({"refiner"} if q == "full" else set())
        assert stages <= set(r["stages"])
        for s in stages:
            assert r["stages"][s]["n"] == 1 and r["stages"][s]["median_ms"] > 0
        assert r["realtime_factor"] > 0 and r["time_to_first_frame_s"] > 0
        assert r["snapshot"]["file_bytes"] > r["snapshot"]["tensor_bytes"] > 0
        assert r["replay"]["chunks"] == 2 and all(t > 0 for t in r["replay"]["per_chunk_s"])
        # chunk 0 shows 25 frames in preview, 24 in full (the refiner drops the anchor); later chunks 24
        assert [c["video_s"] for c in r["per_chunk"]] == [(25 if q == "preview" else 24) / 16, 24 / 16]
    # the refiner's window makes a full snapshot larger than a preview one
    assert report["qualities"]["full"]["snapshot"]["tensor_bytes"] > report["qualities"]["preview"]["snapshot"][
        "tensor_bytes"]
    assert report["gemm"]["tflops"] > 0
    assert set(report["profile"]) == {"stage1_forward", "stage1_denoise", "stage1_cache_pass", "refiner_forward",
                                      "refiner_block", "vae_decode_block"}
    assert report["profile"]["stage1_cache_pass"]["kernel_launches"] > 0
    assert report["profile"]["stage1_forward"]["top_kernels"]
    assert "errors" not in report
    # issue 7's checks ride along, marked as not applying to a tiny CPU run (fp32: no bf16 memory check)
    t = report["targets"]
    assert not t["applies"] and t["met"] + t["missed"] == len(t["checks"]) == 9
    assert {c["target"] for c in t["checks"]} == {"stage-1 chunk", "VAE block (decode stage)", "memory growth",
                                                  "realtime factor", "realtime factor (fp32)", "refiner block (fp32)"}


def test_random_init_follows_the_recipe():
    cfg = get_preset("tiny").stage1
    with torch.device("meta"):
        m = Stage1Transformer(cfg)
    m = m.to_empty(device="cpu")
    for t in m.state_dict().values():
        t.fill_(float("nan"))
    random_init_(m, seed=3)
    sd = m.state_dict()
    assert all(torch.isfinite(t).all() for t in sd.values())  # every tensor written
    a = sd["blocks.0.attn.A_log"].exp()
    assert a.min() >= 0.5 and a.max() <= 2.5
    w = sd["blocks.0.attn.qkv.weight"]
    assert abs(w.std().item() * math.sqrt(w.shape[1]) - 1) < 0.1
    n = sd["blocks.0.attn.q_norm.weight"]
    assert abs(n.mean().item() - 1) < 0.1 and n.std() > 0.1
    # seeded: same seed, same weights; another seed, others
    again = Stage1Transformer(cfg)
    random_init_(again, seed=3)
    assert torch.equal(again.state_dict()["blocks.0.attn.qkv.weight"], w)
    random_init_(again, seed=4)
    assert not torch.equal(again.state_dict()["blocks.0.attn.qkv.weight"], w)


def test_stand_in_text_has_the_release_shapes():
    text = stand_in_text(get_preset("release"), seed=0)
    e1, e2 = text.stage1.encode("a street"), text.refiner.encode("a street")
    assert tuple(e1.embeds.shape) == (1, 1, 300, 2304) and tuple(e1.mask.shape) == (1, 300)
    assert tuple(e2.embeds.shape) == (1, 1024, 3840) and tuple(e2.mask.shape) == (1, 1024)
    assert 0 < e1.mask.sum() < 300
    assert not torch.equal(text.stage1.encode("a road").embeds, e1.embeds)


def test_bench_world_is_built_on_the_device_without_cpu_init():
    w = build_bench_world("tiny", device="cpu", dtype=torch.float32, with_refiner=False)
    assert w.refiner is None and next(w.stage1.parameters()).device.type == "cpu"
    assert all(torch.isfinite(t).all() for t in w.vae.state_dict().values())


def test_stats_and_bad_inputs():
    s = stats_ms([0.001 * i for i in range(1, 11)])
    assert s["median_ms"] == pytest.approx(5.5) and s["p90_ms"] == pytest.approx(9.1) and s["n"] == 10
    assert stats_ms([])["median_ms"] is None
    assert main(["bench", "--preset", "nope", "--device", "cpu"]) == 2
    assert main(["bench", "--preset", "tiny", "--device", "cpu", "--quality", "fast"]) == 2
    with pytest.raises(Exception, match="quality"):
        run_bench(BenchConfig(preset="tiny", device="cpu", dtype="fp32", qualities=("ultra",)))


@pytest.mark.gpu
def test_cache_overlap_reports_the_in_line_chunks_too(tmp_path):
    """With `cache-overlap` the bench also times chunks with the cache pass in line (same session, overlap off)."""
    cfg = BenchConfig(preset="tiny", chunks=3, qualities=("full",), device="cuda", dtype="fp32", warmup=1,
                      replay_chunks=0, snapshot=False, gemm_size=0, fast=("cache-overlap",), in_line_chunks=2)
    r = run_bench(cfg)["qualities"]["full"]
    assert r["chunks"] == 3 and "stage1_cache" in r["stages"]
    assert r["in_line"]["chunks"] == 2
    assert "stage1_cache" not in r["in_line"]["stages"] and r["in_line"]["stages"]["stage1"]["median_ms"] > 0


def test_gc_pauses_are_counted_while_installed():
    import gc

    with GcPauses() as pauses:
        gc.collect()
    assert pauses.passes[2] >= 1 and pauses.seconds > 0
    passes = list(pauses.passes)
    gc.collect()  # uninstalled: not counted
    assert pauses.passes == passes
