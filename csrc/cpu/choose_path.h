// Which path (float_path.h) a kernel loop runs: bfloat16 rows of an even head dim on bfloat16 pairs where the
// build has them (pair_path.h), everything else on float32. The row path of decode asks only where it converts
// V in registers (attend_rows.h).
#pragma once

namespace ism::cpu::ISM_ISA_NS {

// Calls fn(path) with the path that rows of element type T and head dim d run on.
template <typename T, typename Fn>
void with_path(int d, const Fn& fn) {
#if defined(ISM_ISA_NATIVE_BF16)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (d % 2 == 0) return fn(PairPath{});
  }
#endif
  fn(FloatPath{});
}

}  // namespace ism::cpu::ISM_ISA_NS
