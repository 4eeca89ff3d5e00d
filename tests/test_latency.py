"""`sana-wm latency` (engine/latency.py): the real engine server on a loopback port, a client changing keys and
timing when each change comes back in a frame. Tiny preset on CPU; no timing thresholds (a loaded 2-core CPU
is slower than real time), only what must hold whatever the speed."""

import json

import pytest

from engine.cli import main
from engine.errors import InputError
from engine.latency import LatencyConfig, check_config, format_table, run_latency

CHUNK_FRAMES = 24  # frames per chunk; chunk k >= 1 starts at frame 24 k + 1 (frame 0 is the first image)


def _check_samples(report: dict, presses: int, warmup: int) -> None:
    samples = report["samples"]
    assert len(samples) == presses + warmup
    assert [s["warmup"] for s in samples] == [True] * warmup + [False] * presses
    assert report["unmatched"] == 0 and report["errors"] == []
    assert report["generated"]["n"] == presses and report["photon"]["n"] == presses
    previous = frozenset()
    for s in samples:
        held = frozenset(s["held"])
        assert held != previous, "every press changes the held set"
        previous = held
        # the first frame received after the change carries exactly that held set, from that keys message on
        assert s["matched"] and frozenset(s["frame_held"]) == held
        assert s["frame_keys_seq"] >= s["seq"]
        # the live engine samples keys once per chunk: the first frame showing a change opens a chunk
        assert s["chunk"] >= 1 and s["frame_index"] == CHUNK_FRAMES * s["chunk"] + 1
        assert 0 < s["generated_s"] <= s["photon_s"]
        assert s["shown_index"] >= s["frame_index"]
        # the engine sampled the keys after the change went out, then computed, then delivered
        assert s["wait_s"] > -1e-3 and s["chunk_s"] > 0 and s["delivery_s"] > -1e-3
    for a, b in zip(samples, samples[1:], strict=False):
        assert a["t_change_s"] < b["t_change_s"]
        assert a["frame_index"] < b["frame_index"]  # a change is only made once the previous one showed up
    stats = report["generated"]
    assert 0 < stats["min_ms"] <= stats["p50_ms"] <= stats["p90_ms"] <= stats["max_ms"]
    assert report["photon"]["p50_ms"] >= stats["min_ms"]


@pytest.mark.slow
def test_latency_through_the_real_server_tiny_cpu(tmp_path):
    out = tmp_path / "latency.json"
    cfg = LatencyConfig(preset="tiny", device="cpu", server="thread", presses=3, warmup_presses=1,
                        warmup_chunks=1, gap_s=0.3, start_timeout_s=300, press_timeout_s=300, out=str(out))
    report = run_latency(cfg)
    _check_samples(report, presses=3, warmup=1)
    assert report["session"]["ended"] == "stopped"
    assert report["session"]["delivery"] == "live" and report["session"]["encoding"] == "rgb24"
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    table = format_table(report)
    assert "keypress->generated" in table and "keypress->photon" in table
    (check,) = report["targets"]["checks"]
    assert not report["targets"]["applies"] and check["measured"] == report["generated"]["p50_ms"]
    assert "issue 7 targets" in table


@pytest.mark.slow
def test_cli_latency_engine_in_a_child_process(tmp_path, capsys):
    out = tmp_path / "latency.json"
    rc = main(["latency", "--preset", "tiny", "--device", "cpu", "--presses", "1", "--warmup-presses", "0",
               "--warmup-chunks", "1", "--gap-s", "0.2", "--start-timeout", "300", "--press-timeout", "300",
               "--out", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["config"]["server"] == "process"
    _check_samples(report, presses=1, warmup=0)
    assert "keypress->generated" in capsys.readouterr().out


@pytest.mark.parametrize("change, what", [
    (dict(quality="best"), "quality"),
    (dict(server="remote"), "server"),
    (dict(presses=0), "presses"),
    (dict(fast=("warp-drive",)), "warp-drive"),
    (dict(fast=("stage1-graph",)), "cuda"),
])
def test_bad_config_is_refused_before_anything_is_built(change, what):
    cfg = LatencyConfig(preset="tiny", device="cpu", **change)
    with pytest.raises(InputError, match=what):
        check_config(cfg)


@pytest.mark.gpu
@pytest.mark.parametrize("quality", ["preview", "full"])
def test_latency_release_gpu(tmp_path, quality):
    """Release size on the GPU through the real server (a smoke run: `sana-wm latency` is the measurement)."""
    cfg = LatencyConfig(preset="release", device="cuda", quality=quality, fast=("all",), presses=4, warmup_presses=1,
                        warmup_chunks=6, out=str(tmp_path / f"latency_{quality}.json"))
    report = run_latency(cfg)
    print()
    print(format_table(report))
    _check_samples(report, presses=4, warmup=1)


def test_a_dead_engine_ends_the_run_at_once():
    import time

    from engine.driver_cli import demo_image_bytes
    from engine.latency import LatencyError, ThreadEngine, drive

    cfg = LatencyConfig(preset="tiny", device="cpu", presses=1, server="thread")
    engine = ThreadEngine(cfg, None)
    try:
        t0 = time.monotonic()
        with pytest.raises(LatencyError, match="engine stopped"):
            drive(engine.address, cfg, demo_image_bytes(), alive=lambda: False)
        assert time.monotonic() - t0 < cfg.start_timeout_s / 10  # not after the start-up timeout
    finally:
        engine.close()


def test_change_phases_are_stratified_and_seeded():
    """One change in each n-th of the chunk cycle (so the median wait is the cycle's middle, not the draws'), in a
    seeded shuffled order."""
    import random

    from engine.latency import change_phases

    phases = change_phases(60, random.Random(0))
    assert len(phases) == 60 and sorted(int(p * 60) for p in phases) == list(range(60))
    assert phases != sorted(phases)
    assert change_phases(60, random.Random(0)) == phases and change_phases(60, random.Random(1)) != phases
    assert change_phases(0, random.Random(0)) == []
