// The CPU kernels for x86-64-v4: AVX-512 F, BW, VL, DQ (see isa_kernels.h).
#include "isa_prelude.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2")
// GCC 12's own _mm512_reduce_* helpers trip -Wmaybe-uninitialized on an undefined-value idiom they use.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#define ISM_ISA_NS avx512
#include "simd_avx512.h"
#include "kernel_bodies.h"

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#else
namespace ism::cpu::avx512 {
const IsaKernels* kernels() { return nullptr; }
}  // namespace ism::cpu::avx512
#endif
