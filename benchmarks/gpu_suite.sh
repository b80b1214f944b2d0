#!/usr/bin/env bash
# One call on a GPU machine: build the extension for the local arch, run the CUDA tests, then the
# GPU benchmarks; logs and JSON go to $OUT (default ./gpu_out). Steps are picked by arguments:
#   bash benchmarks/gpu_suite.sh build test sanitize small_tiles bench train   # everything
#   bash benchmarks/gpu_suite.sh build test                        # build and the CUDA tests only
#   bash benchmarks/gpu_suite.sh build small_tiles                 # the small-tile backward only
#   bash benchmarks/gpu_suite.sh build kvcache hf_gpu decode_bench # the KV-cache kernel, HF on GPU, decode bench
#   CUTLASS_INCLUDE_DIR=... bash benchmarks/gpu_suite.sh build hopper  # the sm_90a forward (ism_ext.config hopper_fwd)
#   bash benchmarks/gpu_suite.sh build profile ncu                 # where the backward's time goes
# Steps: build (setup.py build_ext --inplace, -Xptxas -v report in build.log), test (the CUDA test
# files, the KV-cache composite path included), sanitize (compute-sanitizer memcheck and racecheck on
# tests/cuda/sanitize_case.py),
# small_tiles (the backward test file, then sanitize_case.py under memcheck and racecheck, all with
# ISM_EXT_BWD_SMALL_TILES=1: the small dK/dV tiles of 99 KiB GPUs, run on this GPU), bench
# (benchmarks/bench_prefill_gpu.py with BENCH_ARGS), train (benchmarks/bench_train_step_gpu.py with
# TRAIN_ARGS), profile (benchmarks/profile_kernels_gpu.py: per-kernel times of one call), ncu (Nsight
# Compute sections of one dK/dV kernel launch, 8k-token ISM, head dim 128). With PACK=1 everything
# under $OUT ends up in one $OUT/gpu_suite.tgz (the device tool returns at most 8 files). Environment: TORCH_CUDA_ARCH_LIST (default 9.0a, Hopper), MAX_JOBS (default 16),
# PYTEST_ARGS (default: both CUDA test files), BENCH_ARGS, TRAIN_ARGS.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}" MAX_JOBS="${MAX_JOBS:-16}"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
step() { echo "== $* ($(date +%T))"; }
# Copies the results/<prefix>* files written since `stamp` (not the committed ones) to $OUT.
copy_new_results() { find benchmarks/results -name "$1*" -newer "$2" -exec cp {} "$OUT"/ \; ; }

for what in "$@"; do
  case "$what" in
    build)
      step build
      nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
      # The system compiler when there is one: on the lent GPU machines /opt/gcc's g++ comes first on
      # PATH and links parts of libstdc++ into the extension, whose exceptions then segfault (a
      # TORCH_CHECK message crashed inside std::ostream). Plain toolchains need no such care.
      if [ -x /usr/bin/g++ ] && [ -x /usr/bin/gcc ]; then export CXX=/usr/bin/g++ CC=/usr/bin/gcc; fi
      t0=$(date +%s)
      NVCC_APPEND_FLAGS="${NVCC_APPEND_FLAGS:-} -Xptxas -v" "$PY" setup.py build_ext --inplace >"$OUT/build.log" 2>&1 \
        || { grep -B2 -A8 -i "error" "$OUT/build.log" | head -80; exit 1; }
      echo "build: $(( $(date +%s) - t0 )) s"
      ;;
    test)
      step test
      timeout "${TEST_TIMEOUT:-400}" "$PY" -m pytest -q --tb=short --maxfail=20 \
        ${PYTEST_ARGS:-tests/test_segment_attention_cuda.py tests/test_segment_attention_cuda_bwd.py tests/test_kvcache_cuda.py} 2>&1 \
        | tee "$OUT/test.log" | tail -60
      [ "${PIPESTATUS[0]}" = 0 ] || status=1
      ;;
    small_tiles)
      step small_tiles
      export ISM_EXT_BWD_SMALL_TILES=1
      timeout "${TEST_TIMEOUT:-400}" "$PY" -m pytest -q --tb=short --maxfail=20 tests/test_segment_attention_cuda_bwd.py 2>&1 \
        | tee "$OUT/small_tiles_test.log" | tail -30
      [ "${PIPESTATUS[0]}" = 0 ] || status=1
      for tool in memcheck racecheck; do
        timeout "${SANITIZE_TIMEOUT:-200}" compute-sanitizer --tool "$tool" --error-exitcode 1 "$PY" tests/cuda/sanitize_case.py >"$OUT/small_tiles_sanitize_$tool.log" 2>&1 \
          || status=1
        echo "$tool: $(tail -3 "$OUT/small_tiles_sanitize_$tool.log" | tr '\n' ' ')"
      done
      unset ISM_EXT_BWD_SMALL_TILES
      ;;
    kvcache)
      step kvcache
      # The kernel tests choose kvcache_kernel through ism_ext.config themselves (the composite tests keep the default).
      timeout "${TEST_TIMEOUT:-400}" "$PY" -m pytest -q --tb=short --maxfail=20 tests/test_kvcache_cuda.py -k kernel \
        tests/test_kvcache_dispatch.py 2>&1 | tee "$OUT/kvcache_test.log" | tail -30
      [ "${PIPESTATUS[0]}" = 0 ] || status=1
      for tool in memcheck racecheck; do
        timeout "${SANITIZE_TIMEOUT:-200}" compute-sanitizer --tool "$tool" --error-exitcode 1 "$PY" \
          tests/cuda/kvcache_sanitize_case.py >"$OUT/kvcache_sanitize_$tool.log" 2>&1 || status=1
        echo "$tool: $(tail -3 "$OUT/kvcache_sanitize_$tool.log" | tr '\n' ' ')"
      done
      ;;
    decode_bench)
      step decode_bench
      touch "$OUT/.decode_start"
      (cd benchmarks && timeout "${DECODE_TIMEOUT:-600}" "$PY" bench_decode.py --device cuda ${DECODE_ARGS:-} 2>&1) \
        | tee "$OUT/decode_bench.log" | tail -70
      copy_new_results decode_gpu "$OUT/.decode_start"
      rm -f "$OUT/.decode_start"
      ;;
    hf_gpu)
      step hf_gpu
      # transformers, chat, opcheck and torch.compile on the GPU (the KV-cache test file holds their GPU cases).
      timeout "${TEST_TIMEOUT:-400}" "$PY" -m pytest -q --tb=short --maxfail=20 tests/test_kvcache_cuda.py \
        -k "generation or smollm2 or opcheck or compile" 2>&1 | tee "$OUT/hf_gpu_test.log" | tail -20
      [ "${PIPESTATUS[0]}" = 0 ] || status=1
      ;;
    hopper)
      step hopper
      # Needs CUTLASS_INCLUDE_DIR (the headers of nvidia-cutlass==4.2.0.0, see requirements-gpu.txt) at build time.
      "$PY" -c "import torch, ism_ext; assert torch.ops.ism._cuda_hopper_fwd_built(), 'built without the Hopper kernel: see build.log'" \
        2>&1 | tee "$OUT/hopper.log"
      [ "${PIPESTATUS[0]}" = 0 ] || { status=1; continue; }
      nvcc -std=c++17 -O2 --expt-relaxed-constexpr -gencode arch=compute_90a,code=sm_90a -Icsrc -I"${CUTLASS_INCLUDE_DIR:?}" \
        tests/cuda/hopper_gmma_tma_test.cu -o /tmp/hopper_gmma_tma_test >>"$OUT/hopper.log" 2>&1 \
        && timeout 120 /tmp/hopper_gmma_tma_test 2>&1 | tee -a "$OUT/hopper.log"
      [ "${PIPESTATUS[0]}" = 0 ] || status=1
      timeout "${TEST_TIMEOUT:-400}" "$PY" -m pytest -q --tb=short --maxfail=20 -k hopper \
        tests/test_segment_attention_cuda.py tests/test_hopper_fwd_cuda.py 2>&1 | tee "$OUT/hopper_test.log" | tail -40
      [ "${PIPESTATUS[0]}" = 0 ] || status=1
      for tool in memcheck racecheck synccheck; do
        timeout "${SANITIZE_TIMEOUT:-200}" compute-sanitizer --tool "$tool" --error-exitcode 1 "$PY" \
          tests/cuda/hopper_sanitize_case.py >"$OUT/hopper_sanitize_$tool.log" 2>&1 || status=1
        echo "$tool: $(tail -3 "$OUT/hopper_sanitize_$tool.log" | tr '\n' ' ')"
      done
      touch "$OUT/.bench_start"
      (cd benchmarks && timeout "${BENCH_TIMEOUT:-900}" "$PY" bench_prefill_gpu.py --bench fwd --suffix _hopper \
        ${HOPPER_BENCH_ARGS:-} 2>&1) | tee "$OUT/hopper_bench.log" | tail -40
      copy_new_results gpu_prefill_fwd_hopper "$OUT/.bench_start"
      ;;
    bench)
      step bench
      touch "$OUT/.bench_start"
      (cd benchmarks && timeout "${BENCH_TIMEOUT:-1200}" "$PY" bench_prefill_gpu.py ${BENCH_ARGS:-} 2>&1) | tee "$OUT/bench.log" | tail -40
      copy_new_results gpu_prefill_ "$OUT/.bench_start"
      ;;
    sanitize)
      step sanitize
      for tool in memcheck racecheck; do
        timeout "${SANITIZE_TIMEOUT:-200}" compute-sanitizer --tool "$tool" --error-exitcode 1 "$PY" tests/cuda/sanitize_case.py >"$OUT/sanitize_$tool.log" 2>&1 \
          || status=1
        echo "$tool: $(tail -3 "$OUT/sanitize_$tool.log" | tr '\n' ' ')"
      done
      ;;
    train)
      step train
      touch "$OUT/.train_start"
      (cd benchmarks && timeout "${BENCH_TIMEOUT:-1200}" "$PY" bench_train_step_gpu.py ${TRAIN_ARGS:-} 2>&1) | tee "$OUT/train.log" | tail -12
      copy_new_results gpu_train_step "$OUT/.train_start"
      ;;
    profile)
      step profile
      "$PY" benchmarks/profile_kernels_gpu.py ${PROFILE_ARGS:-} 2>&1 | tee "$OUT/profile.log"
      ;;
    ncu)
      step ncu
      timeout "${NCU_TIMEOUT:-240}" ncu --clock-control none -k regex:dkdv --launch-count 1 \
        --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
        --section MemoryWorkloadAnalysis_Tables --section WarpStateStats --section Occupancy \
        --section LaunchStats --section SchedulerStats \
        "$PY" benchmarks/profile_kernels_gpu.py --repeats 1 >"$OUT/ncu.log" 2>&1 || status=1
      grep -E "Duration|Throughput|Registers|Achieved Occupancy|Warp Cycles|Stall|Eligible|Issued" "$OUT/ncu.log" | head -40
      ;;
    *) echo "unknown step $what"; exit 2 ;;
  esac
done
rm -f "$OUT"/.bench_start "$OUT"/.train_start
if [ "${PACK:-0}" = 1 ]; then
  tar czf "$PWD/gpu_suite.tgz" -C "$OUT" . && rm -rf "${OUT:?}"/* && mv "$PWD/gpu_suite.tgz" "$OUT"/
fi
exit $status
