"""engine/targets.py: issue 7's targets checked against bench and latency reports (synthetic reports here; the tiny
CPU bench and latency runs of tests/test_bench.py and tests/test_latency.py carry the checks too)."""

import json

import pytest

from engine.targets import bench_targets, check, format_targets, latency_targets, main, report_targets


def stages(**medians):
    return {name: {"n": 3, "median_ms": ms, "p90_ms": ms} for name, ms in medians.items()}


def bench_report(fast=("all",), preset="release", device="cuda", dtype="bf16", preview=None, full=None):
    qualities = {}
    if preview is not None:
        qualities["preview"] = preview
    if full is not None:
        qualities["full"] = full
    return {"config": {"preset": preset, "fast": list(fast), "dtype": dtype},
            "env": {"device": device, "gpu": "NVIDIA H100 test" if device == "cuda" else None}, "qualities": qualities}


def quality(realtime, peak, growth=0, **medians):
    return {"stages": stages(**medians), "realtime_factor": realtime, "peak_memory_gb": peak,
            "memory_growth_bytes": growth, "memory_growth_between": [6, 9]}


def by_name(targets):
    return {(c["quality"], c["target"]): c for c in targets["checks"]}


def test_check_upper_and_lower_limits():
    assert check("x", "full", 199.0, 200.0, "ms", True)["met"]
    assert check("x", "full", 200.0, 200.0, "ms", True)["met"]  # the limit itself meets an upper limit
    miss = check("x", "full", 230.0, 200.0, "ms", True)
    assert not miss["met"] and miss["missed_by"] == 30.0 and miss["missed_by_pct"] == 15.0
    low = check("r", "full", 1.2, 1.6, "x", False)
    assert not low["met"] and low["missed_by"] == pytest.approx(0.4) and low["missed_by_pct"] == 25.0
    assert check("r", "full", 1.6, 1.6, "x", False)["met"]
    none = check("r", "full", None, 1.6, "x", False)
    assert not none["met"] and none["missed_by"] is None and none["note"] == "not measured"


def test_bench_targets_bf16():
    report = bench_report(
        preview=quality(5.2, 30.0, stage1_chunk=210.0, stage1=170.0, decode=50.0),
        full=quality(1.55, 43.0, growth=4096, stage1_chunk=190.0, decode=72.0, refiner=640.0))
    t = bench_targets(report)
    c = by_name(t)
    assert t["applies"] and t["why_not"] is None and t["device"] == "NVIDIA H100 test"
    assert c[("preview", "stage-1 chunk")]["measured"] == 210.0  # the chunk's sum, not the denoising alone
    assert not c[("preview", "stage-1 chunk")]["met"] and c[("full", "stage-1 chunk")]["met"]
    assert c[("preview", "realtime factor")]["met"]
    assert not c[("full", "realtime factor (bf16)")]["met"] and c[("full", "realtime factor (bf16)")]["limit"] == 1.6
    assert c[("full", "refiner block (bf16)")]["met"]
    assert not c[("full", "VAE block (decode stage)")]["met"]
    assert not c[("full", "peak memory (bf16, allocated)")]["met"]
    assert not c[("full", "memory growth")]["met"] and c[("preview", "memory growth")]["met"]
    assert t["met"] + t["missed"] == len(t["checks"]) and t["missed"] == 5
    table = format_targets(t)
    assert "5 missed" in table and "MISSED by 10 ms (5.0%)" in table


def test_bench_targets_fp8_limits_and_no_bf16_memory_check():
    report = bench_report(fast=("all", "refiner-fp8"),
                          full=quality(1.9, 37.0, stage1=236.0, decode=50.0, refiner=500.0))
    c = by_name(bench_targets(report))
    assert c[("full", "stage-1 chunk")]["measured"] == 236.0  # no stage1_chunk (an older report): stage1
    assert c[("full", "realtime factor (fp8)")]["limit"] == 2.0 and not c[("full", "realtime factor (fp8)")]["met"]
    assert c[("full", "refiner block (fp8)")]["limit"] == 450.0
    assert ("full", "peak memory (bf16, allocated)") not in c


def test_targets_do_not_apply_off_the_release_gpu_run():
    t = bench_targets(bench_report(preset="tiny", device="cpu", dtype="fp32",
                                   preview=quality(7.0, None, stage1=100.0, decode=20.0)))
    assert not t["applies"] and t["why_not"] == "not the release preset" and "do not apply" in format_targets(t)
    h200 = bench_report(preview=quality(5.7, 38.0, stage1_chunk=209.0, decode=49.0))
    h200["env"]["gpu"] = "NVIDIA H200"
    t = bench_targets(h200)
    assert not t["applies"] and t["why_not"] == "on NVIDIA H200, not the issue's H100" and t["missed"] == 1


def test_latency_targets():
    report = {"config": {"quality": "preview", "preset": "release"}, "env": {"device": "cuda", "gpu": "NVIDIA H100"},
              "generated": {"n": 60, "p50_ms": 1150.0}}
    t = latency_targets(report)
    (c,) = t["checks"]
    assert t["applies"] and not c["met"] and c["missed_by"] == 50.0 and c["note"] == "n = 60"
    report["config"]["quality"] = "full"
    assert latency_targets(report)["checks"][0]["met"]


def test_report_targets_and_cli(tmp_path, capsys):
    bench = tmp_path / "b.json"
    bench.write_text(json.dumps(bench_report(preview=quality(5.5, 38.0, stage1_chunk=199.0, decode=50.0))))
    assert report_targets(json.loads(bench.read_text()))["missed"] == 0
    other = tmp_path / "o.json"
    other.write_text("{}")
    with pytest.raises(ValueError, match="not a bench report"):
        report_targets({})
    assert main([str(bench)]) == 0
    assert "4 met, 0 missed" in capsys.readouterr().out
    assert main([str(other)]) == 2
    assert "cannot check" in capsys.readouterr().err
    assert main([]) == 2
    written = tmp_path / "t.json"
    assert main([str(bench), "--json", str(written)]) == 0
    assert json.loads(written.read_text())[str(bench)]["met"] == 4
    assert main([str(bench), "--json"]) == 2
