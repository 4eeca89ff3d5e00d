#!/bin/bash
# What to run on the lent GPU, one part per device call (each fits the 600 s per-call limit). Writes logs and JSON
# under $OUT (default /tmp/sana_wm_gpu_out) and prints a short summary last.
#
#   bash tests/benchmarks/gpu_check.sh tests     # tests/test_fast_paths_gpu.py (the live-loop comparisons) but
#                                                # the sessions 7-8 ones
#   bash tests/benchmarks/gpu_check.sh tests78   # those: fused-proj / tconv / real-rope / lean-pass graphs cases,
#                                                # real vs complex RoPE, chunk-async
#   bash tests/benchmarks/gpu_check.sh tests2    # the engine's other @pytest.mark.gpu test files, with time limits
#   bash tests/benchmarks/gpu_check.sh kernels   # the vae-fast, fp8, dwconv_glu (stage1-ffn) and refiner-gelu test files
#   bash tests/benchmarks/gpu_check.sh scans     # every Triton scan comparison, "stream" then "parallel" strategy
#   bash tests/benchmarks/gpu_check.sh bench     # release bench: --fast all,lean-memory (preview, full)
#   bash tests/benchmarks/gpu_check.sh bench-profile  # --fast all with --profile, then all + refiner-fp8
#   bash tests/benchmarks/gpu_check.sh latency   # sana-wm latency through the real server, preview then full
#   bash tests/benchmarks/gpu_check.sh probes    # tests/benchmarks/vae_probe.py, scan_bench.py (both strategies),
#                                                # ffn_probe.py, sdpa_probe.py
#   bash tests/benchmarks/gpu_check.sh ffn       # stage1-ffn alone: its kernel and model tests, its live-loop tests,
#                                                # ffn_probe.py with the kernel's config sweep
#   bash tests/benchmarks/gpu_check.sh memory    # memory_probe.py, full quality: all, then all,lean-memory
#   bash tests/benchmarks/gpu_check.sh fp8       # fp8_attention_probe.py, the bench with
#                                                # all,refiner-fp8,refiner-fp8-attn (full), tests/test_fp8_attention.py
#   bash tests/benchmarks/gpu_check.sh trim      # stage1-prompt-trim: its GPU test, then the release bench
#                                                # all,lean-memory against it without stage1-prompt-trim
#
# The device image lacks pyzmq and PyAV: carry wheels in .whl/ (see the library's device README) for `latency`
# (pyzmq) and for the session tests in `tests` (av); they are installed into /tmp/site when present.
set -u
OUT=${OUT:-/tmp/sana_wm_gpu_out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:.
else
  export PYTHONPATH=.
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
summary=()
NEW78="extra10 or extra11 or extra12 or extra13 or extra14 or real_rope or chunk_async"  # sessions 7-8's live-loop tests
t() {  # t <seconds> <name> <pytest args...>
  local s=$1 name=$2; shift 2
  timeout "$s" python3 -m pytest -m gpu -p no:cacheprovider -q -s "$@" > "$OUT/t_$name.log" 2>&1
  summary+=("$name rc=$? $(grep -E 'passed|failed' "$OUT/t_$name.log" | tail -1)")
}
case "${1:-}" in
  tests)
    # session 4: 13 of its cases took 180 s, the 6 compiled ones 183 s; session 6 added 3 (~120 s, on an H200)
    t 560 fast_paths tests/test_fast_paths_gpu.py -k "not ($NEW78 or prompt_trim)"  # prompt_trim: part `trim`
    ;;
  tests78)
    # session 8 (H100): real_rope 2 cases 168 s; chunk_async 4 + extra12 73 s
    t 560 fast_paths78 tests/test_fast_paths_gpu.py -k "$NEW78"
    ;;
  tests2)
    t 60 snapshot tests/test_snapshot_staging.py  # exports an mp4: needs the av wheel in .whl/
    t 150 models tests/test_stage1_parity.py tests/test_refiner_ar.py tests/test_latency.py tests/test_bench.py
    t 240 lean tests/test_lean_memory.py  # session 5: 165 s
    ;;
  kernels)
    t 240 vae_fast tests/test_vae_fast.py  # session 4: 204 s
    t 60 fp8 tests/test_refiner_fp8.py  # session 4: 14 s
    t 150 dwconv_glu tests/test_dwconv_glu.py -k "not live_loop"
    t 90 refiner_gelu tests/test_refiner_gelu.py  # session 4: 16 s
    ;;
  scans)
    # session 12, a machine fresh to these kernels: gdn_stream ran past 240 s (43 cases passed by then, none failed)
    t 240 gdn_stream tests/test_gdn_triton.py -k "not parallel and not agree and not long_recurrence"
    t 300 gdn_parallel tests/test_gdn_triton.py -k "parallel or agree or long_recurrence"
    ;;
  bench)
    # full quality captures the refiner's graphs in chunks 4-5 (history full from chunk 4; since session 10 the
    # K/V-only capture pass has a graph of its own, captured in chunk 5): warm up past them
    # the release configuration (session 9: every bf16 target met with it); the profile run is `all` alone
    timeout 300 python3 -m engine.bench --preset release --fast all,lean-memory --quality preview,full --chunks 12 \
      --warmup 6 --replay-chunks 2 --out "$OUT/bench_all_lean_memory.json" > "$OUT/bench_all_lean_memory.log" 2>&1
    summary+=("bench all,lean-memory rc=$?")
    grep -E "MISSED|met" "$OUT/bench_all_lean_memory.log"
    ;;
  bench-profile)
    timeout 360 python3 -m engine.bench --preset release --fast all --quality preview,full --chunks 12 --warmup 6 \
      --replay-chunks 2 --profile --out "$OUT/bench_all.json" > "$OUT/bench_all.log" 2>&1
    summary+=("bench all rc=$?")
    timeout 220 python3 -m engine.bench --preset release --fast all,refiner-fp8 --quality full --chunks 12 \
      --warmup 6 --no-snapshot --replay-chunks 0 --gemm 0 --out "$OUT/bench_fp8.json" > "$OUT/bench_fp8.log" 2>&1
    summary+=("bench fp8 rc=$?")
    tail -22 "$OUT/bench_all.log"; tail -10 "$OUT/bench_fp8.log"
    ;;
  latency)
    for q in preview full; do  # the median of a wait uniform over 1.5 s needs many presses (session 4: n=40 vs 120)
      n=60; [ $q = full ] && n=26
      timeout 280 python3 -m engine.latency --preset release --quality $q --fast all --presses $n \
        --warmup-chunks 4 --server thread --out "$OUT/latency_$q.json" > "$OUT/latency_$q.log" 2>&1
      summary+=("latency $q rc=$?"); tail -10 "$OUT/latency_$q.log"
    done
    ;;
  probes)
    timeout 300 python3 tests/benchmarks/vae_probe.py --preset release --device cuda --iters 10 --fp32-ref \
      --out "$OUT/vae_probe.json" > "$OUT/vae_probe.log" 2>&1
    summary+=("vae probe rc=$?"); tail -14 "$OUT/vae_probe.log"
    timeout 150 python3 tests/benchmarks/scan_bench.py --strategy stream parallel --iters 30 --out "$OUT/scan.json" \
      > "$OUT/scan.log" 2>&1
    summary+=("scan bench rc=$?"); tail -10 "$OUT/scan.log"
    timeout 120 python3 tests/benchmarks/ffn_probe.py --iters 30 --out "$OUT/ffn_probe.json" > "$OUT/ffn_probe.log" 2>&1
    summary+=("ffn probe rc=$?"); tail -12 "$OUT/ffn_probe.log"
    timeout 60 python3 tests/benchmarks/sdpa_probe.py --out "$OUT/sdpa_probe.json" > "$OUT/sdpa_probe.log" 2>&1
    summary+=("sdpa probe rc=$?"); tail -9 "$OUT/sdpa_probe.log"
    ;;
  memory)
    for f in all all,lean-memory; do  # session 5: ~200 s each (compiles inside the chunks)
      timeout 280 python3 tests/benchmarks/memory_probe.py --quality full --fast $f --chunks 7 \
        --out "$OUT/memory_${f//,/_}.json" > "$OUT/memory_${f//,/_}.log" 2>&1
      summary+=("memory $f rc=$?"); grep -E "peak|allocated|lean" "$OUT/memory_${f//,/_}.log"
    done
    ;;
  ffn)
    t 150 dwconv_glu tests/test_dwconv_glu.py -k "not live_loop"
    t 220 stage1_ffn_loop tests/test_dwconv_glu.py -k live_loop
    timeout 190 python3 tests/benchmarks/ffn_probe.py --iters 30 --sweep --out "$OUT/ffn_probe_sweep.json" \
      > "$OUT/ffn_probe_sweep.log" 2>&1
    summary+=("ffn probe --sweep rc=$?"); grep '^best' "$OUT/ffn_probe_sweep.log"; tail -12 "$OUT/ffn_probe_sweep.log"
    ;;
  fp8)
    timeout 170 python3 tests/benchmarks/fp8_attention_probe.py --iters 20 ${FP8_CONFIGS:+--configs "$FP8_CONFIGS"} \
      --out "$OUT/fp8_attention_probe.json" \
      > "$OUT/fp8_attention_probe.log" 2>&1
    summary+=("fp8 attention probe rc=$?"); tail -26 "$OUT/fp8_attention_probe.log"
    timeout 280 python3 -m engine.bench --preset release --fast all,refiner-fp8,refiner-fp8-attn --quality full \
      --chunks 12 --warmup 6 --no-snapshot --replay-chunks 0 --gemm 0 --profile --out "$OUT/bench_fp8_attn.json" \
      > "$OUT/bench_fp8_attn.log" 2>&1
    summary+=("bench fp8 + fp8 attention rc=$?"); grep -A 9 "^refiner_forward" "$OUT/bench_fp8_attn.log"
    tail -9 "$OUT/bench_fp8_attn.log"
    t 150 fp8_attention tests/test_fp8_attention.py tests/test_refiner_fp8.py tests/test_refiner_gelu.py
    ;;
  trim)
    t 300 prompt_trim tests/test_fast_paths_gpu.py -k prompt_trim  # session 12: 231 s
    # `all` holds stage1-prompt-trim since session 12: the baseline names the others
    others=$(python3 -c "from engine.fast import ALL; print(','.join(n for n in ALL if n != 'stage1-prompt-trim'))")
    for f in all,lean-memory $others,lean-memory; do  # same card, one after the other
      name=${f//,/_}; [ "$f" = "all,lean-memory" ] || name=no_prompt_trim_lean_memory
      timeout 200 python3 -m engine.bench --preset release --fast $f --quality preview,full --chunks 12 --warmup 6 \
        --no-snapshot --replay-chunks 0 --gemm 0 --out "$OUT/bench_$name.json" > "$OUT/bench_$name.log" 2>&1
      summary+=("bench $name rc=$?"); grep -E "stage-1 chunk|realtime" "$OUT/bench_$name.log"
    done
    ;;
  *)
    echo "usage: bash tests/benchmarks/gpu_check.sh tests|tests78|tests2|kernels|scans|bench|bench-profile|latency|probes|ffn|memory|fp8|trim" >&2
    exit 2 ;;
esac
printf '%s\n' "${summary[@]}"
