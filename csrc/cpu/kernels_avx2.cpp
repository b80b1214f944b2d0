// The CPU kernels for x86-64-v3: AVX2, FMA, F16C (see isa_kernels.h).
#include "isa_prelude.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c,bmi,bmi2"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2")
#endif

#define ISM_ISA_NS avx2
#include "simd_avx2.h"
#include "kernel_bodies.h"

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#else
namespace ism::cpu::avx2 {
const IsaKernels* kernels() { return nullptr; }
}  // namespace ism::cpu::avx2
#endif
