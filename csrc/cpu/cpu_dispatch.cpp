// The CPU kernels' entry points: each runs the instruction-set build chosen once per process.
#include <ATen/Version.h>
#include <c10/util/Exception.h>

#include <array>
#include <cstdlib>
#include <string>
#include <string_view>

#include "isa_kernels.h"
#include "segment_attn_cpu.h"

namespace ism::cpu {
namespace {

bool cpu_has_avx512() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

// AVX512_BF16 where its dot product pays: VDPBF16PS does twice the multiply-adds of a float32 FMA per cycle on
// AMD's Zen 4 and 5 (measured on Zen 5: 7.5 G instructions/s against 8.0 G FMAs, 32 products each against
// 16), but no more than the FMAs on Intel's cores, where the pair path ran 1.1-1.3x slower than converting to
// float32 (docs/cpu_kernels.md).
bool cpu_has_fast_avx512_bf16() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  return cpu_has_avx512() && __builtin_cpu_supports("avx512bf16") && __builtin_cpu_is("amd");
#else
  return false;
#endif
}

bool cpu_has_avx2() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

// The builds from narrowest to widest, by the names cpu_kernel_isa() gives them.
constexpr std::array<std::string_view, 4> kBuilds = {"generic", "avx2", "avx512", "avx512_bf16"};

// A build's place in kBuilds (kBuilds.size() for a name that is none of them).
constexpr size_t rank(std::string_view build) {
  size_t i = 0;
  while (i < kBuilds.size() && kBuilds[i] != build) ++i;
  return i;
}

// The widest build ISM_CPU_ISA allows (an index into kBuilds; all of them when it is unset or empty). It caps
// the op's kernels alone, as ATEN_CPU_CAPABILITY caps ATen's and the op's together: the one way to run the
// plain avx512 build on a CPU that takes avx512_bf16 (tests, and a user comparing the two).
size_t isa_cap() {
  const char* value = std::getenv("ISM_CPU_ISA");
  if (value == nullptr || *value == '\0') return kBuilds.size() - 1;
  const size_t allowed = rank(value);
  TORCH_CHECK(allowed < kBuilds.size(), "ISM_CPU_ISA='", value,
              "' is not one of generic, avx2, avx512, avx512_bf16 (it caps the op's CPU kernels; unset it for "
              "the widest build the CPU runs)");
  return allowed;
}

const IsaKernels* choose() {
  // ATen's capability ("DEFAULT", "AVX2", "AVX512" on x86) already folds in the CPU and ATEN_CPU_CAPABILITY;
  // the CPU test also covers F16C, which ATen's AVX2 level does not name.
  const std::string cap = at::get_cpu_capability();
  const bool avx512_level = cap == "AVX512", avx2_level = avx512_level || cap == "AVX2";
  const size_t allowed = isa_cap();
  if (allowed >= rank("avx512_bf16") && avx512_level && cpu_has_fast_avx512_bf16() &&
      avx512_bf16::kernels() != nullptr) {
    return avx512_bf16::kernels();
  }
  if (allowed >= rank("avx512") && avx512_level && cpu_has_avx512() && avx512::kernels() != nullptr) {
    return avx512::kernels();
  }
  if (allowed >= rank("avx2") && avx2_level && cpu_has_avx2() && avx2::kernels() != nullptr) return avx2::kernels();
  return generic::kernels();
}

}  // namespace

const IsaKernels& selected_kernels() {
  static const IsaKernels* const chosen = choose();
  return *chosen;
}

void segment_attn_fwd_cpu(const SegmentAttnFwdParams& params) { selected_kernels().fwd(params); }
void segment_attn_bwd_cpu(const SegmentAttnBwdParams& params) { selected_kernels().bwd(params); }
void kvcache_attn_cpu(const KVCacheAttnParams& params) { selected_kernels().kvcache(params); }
const char* kernel_isa() { return selected_kernels().name; }

}  // namespace ism::cpu
