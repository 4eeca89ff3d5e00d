export OUT
FP8_CONFIGS="m64 n128 w4 s3 tma" bash tests/benchmarks/gpu_check.sh fp8 2>&1 | tail -32
timeout 200 python3 -m engine.bench --preset release --fast all,lean-memory,refiner-fp8,refiner-fp8-attn --quality full \
  --chunks 10 --warmup 5 --no-snapshot --replay-chunks 0 --gemm 0 --out "$OUT/bench_fp8_attn_lean.json" > "$OUT/bench_fp8_attn_lean.log" 2>&1
echo "lean rc=$?"; tail -8 "$OUT/bench_fp8_attn_lean.log"
