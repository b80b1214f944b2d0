// The CPU kernels for x86-64-v4 with AVX512_BF16 (Cooper Lake, Sapphire Rapids, AMD Zen 4 and later): the
// AVX-512 build plus the bfloat16 dot product, which bfloat16 attention runs on (pair_path.h).
// cpu_dispatch.cpp chooses it on AMD's CPUs only; see isa_kernels.h.
#include "isa_prelude.h"

// AVX512_BF16's intrinsics came with GCC 10 and Clang 9; an older compiler leaves this level out.
#if defined(__x86_64__) && ((defined(__clang__) && __clang_major__ >= 9) || \
                            (defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 10))
// GCC 12's own _mm512_max_ps (and friends) pass _mm512_undefined_ps() as the unused merge source, which trips
// -Wmaybe-uninitialized in every caller.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define ISM_ISA_NS avx512_bf16
#define ISM_ISA_SIMD "simd_avx512.h"
#define ISM_ISA_NATIVE_BF16 1
#define ISM_ISA_TARGET "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c,bmi,bmi2"
#include "kernel_bodies.h"
#else
namespace ism::cpu::avx512_bf16 {
const IsaKernels* kernels() { return nullptr; }
}  // namespace ism::cpu::avx512_bf16
#endif
