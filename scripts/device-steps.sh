# The steps of the device check after the test binaries (crates/moe-cuda/DEVICE_CHECK.md), on the
# GPU machine: sourced by .device/run.sh (scripts/device-check.sh puts the line there), from the
# project root, with $OUT set. Every step has its own timeout, so a slow one cannot eat the rest.
# --- moe-cuda device check ---------------------------------------------------------------
# At most 8 files come back from $OUT: the test binaries' logs (one each, about a dozen) travel
# as one archive beside the six files below (archived first, so a call cut short keeps them).
(cd "$OUT" && tar czf tests.tar.gz test-*.log && rm -f test-*.log)
echo "== NVRTC on this machine"
ls /usr/local/cuda/lib64/libnvrtc.so* /opt/torch/.venv/lib/python3*/site-packages/nvidia/cu13/lib/libnvrtc.so* 2>/dev/null
# The kernel cache the tests filled (crates/moe-cuda/src/cache.rs): one image per source and
# option set, so later processes skip NVRTC.
echo "== CUDA kernel cache"; ls -l "${MOE_CUDA_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/moe-hal/cuda}" 2>&1 | head -12
# Two test binaries are called conformance (the suite's, and examples/fallback-backend's): the
# one that lists cuda:: cases.
conf=$(for b in .device/bin/test-conformance-*; do "$b" --list 2>/dev/null | grep -q '^cuda::' && echo "$b"; done | head -1)
echo "suite binary: $conf"
echo "== peers (torch grouped_mm, Triton fused MoE) on deepseek-v3"
timeout 170 python3 bench/peers/gpu_peers.py --preset deepseek-v3 --tokens 1,16,128,1024,4096,16384 \
  --iters 10 --warmup 2 --json "$OUT/gpu-peers.json" > "$OUT/peers.log" 2>&1
echo "peers exit $?"; tail -12 "$OUT/peers.log"
echo "== moe bench cuda (eager, and replaying a CUDA graph per token count), wgpu on deepseek-v3"
# The ratio table only where the peers wrote their JSON: a missing file would stop the bench.
cmp=(); [ -s "$OUT/gpu-peers.json" ] && cmp=(--compare "$OUT/gpu-peers.json")
timeout 200 .device/bin/moe bench --backend cuda,wgpu --cuda-graphs --preset deepseek-v3 \
  --tokens 1,16,128,1024,4096,16384 --iters 10 --warmup 2 \
  "${cmp[@]}" --json "$OUT/bench.json" > "$OUT/bench.log" 2>&1
echo "bench exit $?"; tail -30 "$OUT/bench.log"
# The sanitizer after the peers and the bench: those two are what the WGSL and bench issues need
# besides the test step, so a call cut short by a slow memcheck still brings them back.
echo "== compute-sanitizer memcheck: the cuda instance of the conformance suite"
timeout 200 compute-sanitizer --tool memcheck --leak-check no --print-limit 20 \
  "$conf" cuda:: --test-threads=1 > "$OUT/sanitizer.log" 2>&1
echo "sanitizer exit $?"; grep -E "ERROR SUMMARY|test result|Invalid|out of bounds" "$OUT/sanitizer.log" | head -20
echo "== moe bench cuda,wgpu on deepseek-v3, f8_e4m3 weights (DeepSeek's format: half the bytes of bf16)"
timeout 120 .device/bin/moe bench --backend cuda,wgpu --preset deepseek-v3 --dtype f8_e4m3 \
  --tokens 1,16,128,1024,4096 --iters 10 --warmup 2 > "$OUT/bench-f8.log" 2>&1
echo "bench f8 exit $?"; tail -14 "$OUT/bench-f8.log"
echo "== cuda f8_e4m3: the hardware E4M3 conversion (default) against the arithmetic decode, Qwen3-30B-A3B decode"
# 40 s each: the first process with MOE_CUDA_F8_CVT=0 compiles grouped_gemm.cu with NVRTC (~12 s on
# the CPU machine; the kernel cache serves every later process with the same options).
for cvt in 1 0; do
  echo "MOE_CUDA_F8_CVT=$cvt"
  MOE_CUDA_F8_CVT=$cvt timeout 40 .device/bin/moe bench --backend cuda --preset qwen3-30b-a3b --dtype f8_e4m3 \
    --tokens 1,16,128 --iters 20 --warmup 3 2>&1 | tail -3
done
echo "== cuda: eager forward against one CUDA graph launch per layer, Qwen3-30B-A3B decode (75 MB of experts at 1 token: launch-bound)"
timeout 40 .device/bin/moe bench --backend cuda --cuda-graphs --preset qwen3-30b-a3b --tokens 1,16,64 \
  --iters 20 --warmup 3 2>&1 | grep " tok "
echo "== decode kernels: 8 token rows per pass (default) against 4, Qwen3-30B-A3B at 1 and 64 tokens"
# At 64 tokens Qwen3 has 4 rows per expert on average (the decode path) and 5 to 8 in about a third
# of its experts: with 4-row passes those read their weights twice (1.40x the bytes, counted).
for rows in 8 4; do
  echo "MOE_GEMV_PASS_ROWS=$rows"
  MOE_GEMV_PASS_ROWS=$rows timeout 45 .device/bin/moe bench --backend cuda,wgpu --preset qwen3-30b-a3b \
    --tokens 1,64 --iters 20 --warmup 3 2>&1 | grep " tok "
done
echo "== cuda decode kernels: weights prefetched into L2 4 KiB and 16 KiB ahead against not (default), Qwen3-30B-A3B"
# Each setting compiles grouped_gemm.cu once with NVRTC (~12 s on the CPU machine; the kernel
# cache serves the rest). At 128 tokens all 128 experts are read (1.2 GB), at 16 about 80.
for ahead in 0 4096 16384; do
  echo "MOE_CUDA_GEMV_PREFETCH=$ahead"
  MOE_CUDA_GEMV_PREFETCH=$ahead timeout 45 .device/bin/moe bench --backend cuda --preset qwen3-30b-a3b --tokens 16,64,128 \
    --iters 20 --warmup 3 2>&1 | grep " tok "
done
echo "== where the time goes: each stage alone, cuda and wgpu, Qwen3-30B-A3B"
timeout 60 .device/bin/moe bench --backend cuda,wgpu --preset qwen3-30b-a3b --tokens 1,16,1024 \
  --iters 10 --warmup 2 --breakdown > "$OUT/breakdown.log" 2>&1
echo "breakdown exit $?"; grep -E " tok |stages" "$OUT/breakdown.log" | tail -12
echo "== wgpu: one submit per layer, scratch recycled (default) against a submit per op, fresh scratch, Qwen3-30B-A3B decode"
for batch in 1 0; do
  echo "MOE_WGPU_BATCH=$batch"
  MOE_WGPU_BATCH=$batch timeout 25 .device/bin/moe bench --backend wgpu --preset qwen3-30b-a3b \
    --tokens 1,16 --iters 20 --warmup 3 2>&1 | tail -2
done
echo "== wgpu: parameters as immediates (default) against a uniform buffer per dispatch, decode"
for imm in 1 0; do
  echo "MOE_WGPU_IMMEDIATES=$imm"
  MOE_WGPU_IMMEDIATES=$imm timeout 25 .device/bin/moe bench --backend wgpu --preset qwen3-30b-a3b \
    --tokens 1,16 --iters 20 --warmup 3 2>&1 | tail -2
done
echo "== wgpu: kernels without wgpu's shader runtime checks (default) against with them, decode and prefill"
for checked in 0 1; do
  echo "MOE_WGPU_CHECKED=$checked"
  MOE_WGPU_CHECKED=$checked timeout 25 .device/bin/moe bench --backend wgpu --preset qwen3-30b-a3b \
    --tokens 1,1024 --iters 10 --warmup 2 2>&1 | tail -2
done
echo "== wgpu: tensor cores (cooperative matrices, default) against f32 FMA tiles, prefill"
for coop in 1 0; do
  echo "MOE_WGPU_COOP=$coop"
  MOE_WGPU_COOP=$coop timeout 25 .device/bin/moe bench --backend wgpu --preset qwen3-30b-a3b \
    --tokens 1024,4096 --iters 10 --warmup 2 2>&1 | tail -2
done
ls "$OUT"
