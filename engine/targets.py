"""Issue 7's speed targets, checked against a `sana-wm bench` or `sana-wm latency` report.

The targets are for the `release` preset on one H100. A report of another preset or device (an H200 included) gets the
same checks with `applies` False and `why_not` saying what differs, so its numbers are never mistaken for the
issue's. Each check says what was
measured, the limit, whether it is met and, if not, by how much (in the unit and in percent of the limit).

    python -m engine.targets REPORT.json [...] [--json OUT]   # the checks of stored reports (bench or latency
                                                              # JSON), printed; with --json also written

Knows the reports' layout (engine/bench.py, engine/latency.py), nothing of models.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# (limit, unit); "max" targets are upper limits, "min" lower ones
STAGE1_CHUNK_MS = 200.0  # 4 denoising steps + the cache-write pass, a 3-latent-frame chunk
REFINER_BLOCK_MS = {"bf16": 650.0, "fp8": 450.0}
VAE_BLOCK_MS = 70.0
REALTIME = {"preview": 5.0, "full": {"bf16": 1.6, "fp8": 2.0}}
PEAK_FULL_BF16_GB = 42.0
LATENCY_P50_MS = {"preview": 1100.0, "full": 1800.0}


def check(target: str, quality: str, measured: float | None, limit: float, unit: str, upper: bool,
          note: str = "") -> dict:
    """One target: met (measured <= limit for an upper limit, >= for a lower one) and, if missed, by how much.
    A missing measurement is reported as not met, with `measured` None."""
    entry = {"target": target, "quality": quality, "measured": measured, "limit": limit, "unit": unit,
             "kind": "max" if upper else "min"}
    if measured is None:
        return dict(entry, met=False, missed_by=None, missed_by_pct=None, note=note or "not measured")
    met = measured <= limit if upper else measured >= limit
    gap = 0.0 if met else abs(measured - limit)
    pct = round(100 * gap / limit, 1) if limit else None
    return dict(entry, met=met, missed_by=round(gap, 4), missed_by_pct=pct, note=note)


def _median(stages: dict, name: str) -> float | None:
    s = stages.get(name)
    return s["median_ms"] if s and s.get("n") else None


def bench_targets(report: dict) -> dict:
    """The checks of a bench report: per quality the stage-1 chunk (denoise + the deferred cache pass,
    `stage1_chunk`, else `stage1`), the decode stage (the VAE block with the frames' conversion) and memory growth;
    preview's realtime factor; full quality's realtime factor, refiner block and (bf16) peak memory. With
    `refiner-fp8` among the fast paths the refiner and full-realtime limits are the fp8 ones."""
    cfg = report["config"]
    fp8 = "refiner-fp8" in cfg.get("fast", ())
    numerics = "fp8" if fp8 else "bf16"  # which limits: the bf16 ones serve any other dtype too
    label = "fp8" if fp8 else cfg.get("dtype") or "bf16"
    entries = []
    for quality, r in report.get("qualities", {}).items():
        stages = r["stages"]
        stage1 = _median(stages, "stage1_chunk")
        entries.append(check("stage-1 chunk", quality, stage1 if stage1 is not None else _median(stages, "stage1"),
                             STAGE1_CHUNK_MS, "ms", True))
        entries.append(check("VAE block (decode stage)", quality, _median(stages, "decode"), VAE_BLOCK_MS, "ms",
                             True))
        growth = r.get("memory_growth_bytes")
        between = r.get("memory_growth_between")
        entries.append(check("memory growth", quality, growth, 0.0, "B", True,
                             note=f"allocated after chunk {between[0]} vs {between[1]}" if between else ""))
        if quality == "preview":
            entries.append(check("realtime factor", quality, r.get("realtime_factor"), REALTIME["preview"], "x",
                                 False))
        elif quality == "full":
            entries.append(check(f"realtime factor ({label})", quality, r.get("realtime_factor"),
                                 REALTIME["full"][numerics], "x", False))
            entries.append(check(f"refiner block ({label})", quality, _median(stages, "refiner"),
                                 REFINER_BLOCK_MS[numerics], "ms", True))
            if not fp8 and cfg.get("dtype") == "bf16":
                entries.append(check("peak memory (bf16, allocated)", quality, r.get("peak_memory_gb"),
                                     PEAK_FULL_BF16_GB, "GB", True))
    return _summary(entries, cfg, report.get("env") or {})


def latency_targets(report: dict) -> dict:
    """The check of a latency report: keypress -> generated frame p50 (preview <= 1.1 s, full <= 1.8 s)."""
    cfg = report["config"]
    quality = cfg["quality"]
    p50 = (report.get("generated") or {}).get("p50_ms")
    entries = [check("keypress -> generated frame p50", quality, p50, LATENCY_P50_MS[quality], "ms", True,
                     note=f"n = {report['generated']['n']}" if report.get("generated") else "")]
    return _summary(entries, cfg, report.get("env") or {})


def _summary(entries: list[dict], cfg: dict, env: dict) -> dict:
    """The checks with whether they are the issue's: the release preset on an H100 (`why_not` says what differs)."""
    gpu = env.get("gpu")
    why_not = ("not the release preset" if cfg.get("preset") != "release" else
               "not on a GPU" if env.get("device") != "cuda" else
               f"on {gpu or 'an unnamed GPU'}, not the issue's H100" if "H100" not in (gpu or "") else None)
    return {"issue": 7, "applies": why_not is None, "why_not": why_not, "device": gpu or env.get("device"),
            "met": sum(e["met"] for e in entries), "missed": sum(not e["met"] for e in entries), "checks": entries}


def report_targets(report: dict) -> dict:
    """`bench_targets` or `latency_targets`, by the report's layout."""
    if "qualities" in report:
        return bench_targets(report)
    if "generated" in report:
        return latency_targets(report)
    raise ValueError("not a bench report (no 'qualities') nor a latency report (no 'generated')")


def format_targets(targets: dict) -> str:
    """A short table of the checks."""
    where = targets["device"] or "?"
    why_not = targets.get("why_not") or "not the issue's setting"
    lines = [f"issue 7 targets on {where}: {targets['met']} met, {targets['missed']} missed"
             + ("" if targets["applies"] else f" ({why_not}: the issue's targets do not apply as such)")]
    for e in targets["checks"]:
        sign = "<=" if e["kind"] == "max" else ">="
        measured = "-" if e["measured"] is None else f"{e['measured']:g}"
        verdict = "met" if e["met"] else (
            "MISSED" if e["missed_by"] is None else f"MISSED by {e['missed_by']:g} {e['unit']} ({e['missed_by_pct']}%)")
        note = f"  [{e['note']}]" if e["note"] else ""
        lines.append(f"  {e['quality']:<8} {e['target']:<32} {measured:>10} {e['unit']:<3} {sign} {e['limit']:g}  "
                     f"{verdict}{note}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: python -m engine.targets REPORT.json [...] [--json OUT] (bench or latency reports)"
    if "-h" in args or "--help" in args:
        print(usage)
        return 0
    out = None
    if "--json" in args:
        i = args.index("--json")
        if i + 1 >= len(args):
            print("--json needs a file to write", file=sys.stderr)
            return 2
        out = args.pop(i + 1)
        args.pop(i)
    if not args:
        print(usage, file=sys.stderr)
        return 2
    checked = {}
    for path in args:
        try:
            checked[path] = report_targets(json.loads(Path(path).read_text()))
        except (OSError, ValueError, KeyError) as e:
            print(f"{path}: cannot check: {e}", file=sys.stderr)
            return 2
        print(f"{path}\n{format_targets(checked[path])}")
    if out is not None:
        Path(out).write_text(json.dumps(checked, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
