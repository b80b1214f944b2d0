// The kernel templates of one instruction-set build, in dependency order, and that build's table. Included
// once by each kernels_*.cpp after `#define ISM_ISA_NS <level>` and its simd_<level>.h.
#ifndef ISM_ISA_NS
#error "define ISM_ISA_NS and include a simd_*.h first (see kernels_avx2.cpp)"
#endif

#include "micro_gemm.h"
#include "tile_stage.h"
#include "softmax_cols.h"
#include "attend_tile.h"
#include "segment_attn_fwd.h"
#include "segment_attn_bwd.h"
#include "kvcache_attn.h"

namespace ism::cpu::ISM_ISA_NS {

constexpr IsaKernels kTable{Vec::kName, &segment_attn_fwd, &segment_attn_bwd, &kvcache_attn};

const IsaKernels* kernels() { return &kTable; }

}  // namespace ism::cpu::ISM_ISA_NS
