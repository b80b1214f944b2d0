// The kernel templates of one instruction-set build, in dependency order, and that build's table. Included
// once by each kernels_*.cpp, after isa_prelude.h, with
//   ISM_ISA_NS      the build's namespace under ism::cpu (avx512_bf16, avx512, avx2, generic)
//   ISM_ISA_SIMD    its vector type's header (simd_*.h)
//   ISM_ISA_TARGET  the compiler's target string for the build (absent for the baseline)
//   ISM_ISA_NATIVE_BF16  (avx512_bf16 only) bfloat16 attention on the CPU's dot product (pair_path.h)
// Everything below is compiled for that target (GCC: push_options/target; Clang: an attribute on every function).
#if !defined(ISM_ISA_NS) || !defined(ISM_ISA_SIMD)
#error "define ISM_ISA_NS and ISM_ISA_SIMD first (see kernels_avx2.cpp)"
#endif

#define ISM_STR(x) #x
#define ISM_PRAGMA(x) _Pragma(ISM_STR(x))
#if defined(ISM_ISA_TARGET)
#if defined(__clang__)
ISM_PRAGMA(clang attribute push(__attribute__((target(ISM_ISA_TARGET))), apply_to = function))
#else
ISM_PRAGMA(GCC push_options)
ISM_PRAGMA(GCC target(ISM_ISA_TARGET))
#endif
#endif

#include ISM_ISA_SIMD
#include "vec_math.h"
#include "micro_gemm.h"
#include "tile_stage.h"
#include "softmax_cols.h"
#include "float_path.h"
#if defined(ISM_ISA_NATIVE_BF16)
#include "pair_path.h"
#endif
#include "choose_path.h"
#include "attend_tile.h"
#include "attend_rows.h"
#include "segment_attn_fwd.h"
#include "bwd_tile.h"
#include "bwd_delta.h"
#include "bwd_chunks.h"
#include "segment_attn_bwd.h"
#include "kvcache_attn.h"

namespace ism::cpu::ISM_ISA_NS {

constexpr IsaKernels kTable{Vec::kName, &segment_attn_fwd, &segment_attn_bwd, &kvcache_attn};

const IsaKernels* kernels() { return &kTable; }

}  // namespace ism::cpu::ISM_ISA_NS

#if defined(ISM_ISA_TARGET)
#if defined(__clang__)
ISM_PRAGMA(clang attribute pop)
#else
ISM_PRAGMA(GCC pop_options)
#endif
#endif
