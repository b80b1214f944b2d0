// The CPU kernels for x86-64-v3: AVX2, FMA, F16C (see isa_kernels.h).
#include "isa_prelude.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define ISM_ISA_NS avx2
#define ISM_ISA_SIMD "simd_avx2.h"
#define ISM_ISA_TARGET "avx2,fma,f16c,bmi,bmi2"
#include "kernel_bodies.h"
#else
namespace ism::cpu::avx2 {
const IsaKernels* kernels() { return nullptr; }
}  // namespace ism::cpu::avx2
#endif
