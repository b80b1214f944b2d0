#!/usr/bin/env bash
# Every CPU benchmark whose figures the README quotes, in one run at one clean commit, into
# benchmarks/results/ (JSON + PNG each). Run it on a quiet machine: nothing else may compete for the cores.
#
#   bash benchmarks/cpu_suite.sh                 # all stages
#   bash benchmarks/cpu_suite.sh kernels trl     # some: kernels kernels_avx2 kernels_bf16 decode chat chat_decode
#                                                #       train trl
#
# kernels_avx2 runs the kernel benchmark with torch and the op both capped at AVX2 (ATEN_CPU_CAPABILITY, and
# MKL/oneDNN for torch's matmul): AVX2 instructions on an AVX-512 machine, with that machine's caches, so not
# an AVX2 machine's figures (docs/performance.md). It writes cpu_attention_avx2_capped.* and leaves the real
# AVX2 machine's cpu_attention_avx2.* (the `kernels` stage there) alone; it is skipped where the CPU has no
# AVX-512 (there `kernels` is the AVX2 run) or no AVX2. Each stage's log goes to benchmarks/results/logs/<stage>.log.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
if [ -n "$(git status --porcelain --untracked-files=no -- . ':(exclude)benchmarks/results')" ]; then
  echo "cpu_suite: the tree has uncommitted changes; results must name a clean commit" >&2
  exit 1
fi
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(kernels kernels_avx2 kernels_bf16 decode chat chat_decode train trl)
mkdir -p benchmarks/results/logs

run() {  # run <stage> <command...>
  local stage=$1
  shift
  echo "== $stage: $*"
  "$@" 2>&1 | tee "benchmarks/results/logs/$stage.log"
}

for stage in "${stages[@]}"; do
  case $stage in
    kernels) run kernels "$PY" benchmarks/bench_cpu.py ;;
    kernels_bf16) run kernels_bf16 "$PY" benchmarks/bench_cpu.py --dtype bfloat16 ;;
    kernels_avx2)
      if grep -qw avx2 /proc/cpuinfo && grep -qw avx512f /proc/cpuinfo; then
        run kernels_avx2 env ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 \
          "$PY" benchmarks/bench_cpu.py --name cpu_attention_avx2_capped
      else
        echo "== kernels_avx2: skipped, the CPU has no AVX-512 to cap (or no AVX2)"
      fi ;;
    decode) run decode "$PY" benchmarks/bench_decode.py ;;
    chat) run chat "$PY" benchmarks/bench_chat.py ;;
    chat_decode) run chat_decode "$PY" benchmarks/bench_chat_decode.py ;;
    train) run train "$PY" benchmarks/bench_train.py ;;
    trl) run trl "$PY" benchmarks/bench_trl_train.py ;;
    *) echo "cpu_suite: unknown stage $stage" >&2; exit 2 ;;
  esac
done
