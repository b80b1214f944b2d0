// The CPU kernels, compiled once per x86-64 level, and the choice among them.
//
// kernels_avx512_bf16.cpp, kernels_avx512.cpp, kernels_avx2.cpp and kernels_generic.cpp compile the same
// kernel templates (the headers that open `namespace ism::cpu::ISM_ISA_NS`) under a target pragma each, with
// the vector type of that level (simd_*.h: Vec); the avx512_bf16 level adds bfloat16 attention on its dot
// product (pair_path.h) and is otherwise the avx512 one. Everything shared (the C++ library, ATen, these
// accessors) is included before the pragma, so no inline function outside an ISA namespace is ever compiled
// with wider instructions than the baseline. At run time the widest level that both the CPU and ATen's
// capability allow is chosen once (cpu_dispatch.cpp): ATEN_CPU_CAPABILITY=avx2 caps these kernels exactly as it
// caps PyTorch's own, so the two are always compared on the same instructions (ISM_CPU_ISA caps them alone).
#pragma once

#include "../ism_params.h"

namespace ism::cpu {

struct IsaKernels {
  const char* name;  // "avx512_bf16", "avx512", "avx2" or "generic"
  void (*fwd)(const SegmentAttnFwdParams&);
  void (*bwd)(const SegmentAttnBwdParams&);
  void (*kvcache)(const KVCacheAttnParams&);
};

// Each level's table; nullptr where this build does not have that level (not x86-64, or no compiler support).
namespace avx512_bf16 { const IsaKernels* kernels(); }
namespace avx512 { const IsaKernels* kernels(); }
namespace avx2 { const IsaKernels* kernels(); }
namespace generic { const IsaKernels* kernels(); }

// The table the ops run (chosen on first use, then fixed for the process).
const IsaKernels& selected_kernels();

}  // namespace ism::cpu
